"""What the families share: the base config and ``Intensity`` (defined in the torch-free
``model.config_base`` and re-exported here, the import for code that runs models) and the
loaded-model base ``VolumeModel`` (``HAGANModel``, ``StyleGAN3DModel``, ``AlphaWGANModel``): seeded
construction, loading and saving model directories, the properties read from the config, ``info``
and seeded standard-normal latents.

A family sets ``config_class`` (a ``BaseConfig`` subclass), ``net_class`` (built from a config, with
the config as ``net.config``) and ``count_parameters``, and adds its own generation and encoding
(the surface ``model.registry.GenerativeModel`` describes).  Model directories: config.json (with
its ``format_version``, see ``model.config_base``) + model.safetensors, read and written by
``model.checkpoint``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from model.checkpoint import ModelDirError, read_config, read_weights, save_model_dir
from model.config_base import BaseConfig
from model.config_base import Intensity as Intensity  # re-exported: model.base is where it is imported from

# The progress callback every long operation takes, ``progress(done, total, stage)``: the one
# definition (the job functions, evaluation, directions and projection import it; GET /jobs/{id}
# reports the last call as ``progress: {done, total, stage}``).
Progress = Callable[[int, int, str], None]


ConfigT = TypeVar("ConfigT", bound=BaseConfig)  # the family's config class
NetT = TypeVar("NetT", bound=torch.nn.Module)
M = TypeVar("M", bound="VolumeModel[Any, Any]")


def check_seed(n: int, seed: int) -> None:
    """Refuses a seed outside [0, 2^63) (or not an integer) and n < 1."""
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if n < 1:
        raise ValueError("n must be >= 1")


def check_latent(z: torch.Tensor, dim: int, what: str = "latent") -> None:
    """Refuses latents that are not [n, dim] or hold NaN or infinite values: the check a loaded
    model makes for its direct (library) users.  The service validates a request's latent once, at
    the API (worker/params.py ``latent_rows``), before any job runs."""
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"{what} must have shape [n, {dim}], got {list(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("latent contains NaN or infinite values")


def seeded_normal(n: int, seed: int, dim: int) -> torch.Tensor:
    """Standard-normal [n, dim] from a CPU generator seeded with ``seed``: the same on every device."""
    check_seed(n, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


def _aligned(t: torch.Tensor, boundary: int = 64) -> torch.Tensor:
    """``t``, or a copy of it in freshly allocated memory when it does not start on ``boundary``."""
    return t if t.data_ptr() % boundary == 0 else t.clone(memory_format=torch.contiguous_format)


def load_state_dict_checked(
    net: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike, parts: tuple[str, ...] | None = None
) -> None:
    """``net.load_state_dict(sd)`` after checking key by key that ``sd`` (the weights of the model
    directory ``path``) has exactly the network's keys and shapes (of the top-level sub-networks
    ``parts`` only, when given); ``ModelDirError`` otherwise."""
    ours = {k: v for k, v in net.state_dict().items() if parts is None or k.split(".", 1)[0] in parts}
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    wrong = [
        f"{k} {list(sd[k].shape)} != {list(v.shape)}" for k, v in ours.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ModelDirError(
            f"{Path(path) / 'model.safetensors'}: does not match config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]})"
        )
    # Tensors read from a safetensors file sit at the file's offsets, not on the 64-byte boundaries
    # fresh allocations have, and CPU kernels then take other vector paths (last-bit differences
    # between a loaded model and the one saved): each is copied once into an aligned tensor, which
    # becomes the parameter (assign), so no parameter is held twice.
    net.load_state_dict({k: _aligned(v) for k, v in sd.items()}, assign=True, strict=parts is None)


def _meta_parts(net: torch.nn.Module, parts: tuple[str, ...] | None = None) -> list[str]:
    """The top-level sub-networks (of ``parts``, or all) holding meta tensors (not loaded)."""
    return [
        name
        for name, child in net.named_children()
        if (parts is None or name in parts) and any(t.is_meta for t in (*child.parameters(), *child.buffers()))
    ]


def _move_loaded(net: torch.nn.Module, device: torch.device) -> None:
    """``net.to(device)``, leaving sub-networks that are not loaded (meta) where they are."""
    meta = set(_meta_parts(net))
    if not meta:
        net.to(device)
        return
    for name, child in net.named_children():
        if name not in meta:
            child.to(device)


class VolumeModel(Generic[ConfigT, NetT]):
    """A loaded model: ``net`` (in eval mode) on ``device``, described by ``net.config``."""

    family: str
    config_class: ClassVar[type[BaseConfig]]
    net_class: ClassVar[Callable[[Any], torch.nn.Module]]
    count_parameters: ClassVar[Callable[[Any], dict[str, int]]]

    precision = "fp32"  # generation arithmetic; a family with a bf16 path overrides set_precision

    # What serving needs of the network, as top-level sub-module names: ``from_pretrained(...,
    # serving=True)`` loads ``generator_parts`` only, ``encode`` loads ``encoder_parts`` on first use
    # (``need``), and the rest (the discriminators, which only training uses) is never read.  Empty
    # ``generator_parts``: the family always loads the whole network.
    generator_parts: ClassVar[tuple[str, ...]] = ()
    encoder_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, net: NetT, device: str | torch.device = "cpu") -> None:
        self.net = net.eval()
        self.device = torch.device(device)
        self._source: Path | None = None  # the model directory the unloaded parts are read from
        self._parts_lock = threading.Lock()
        _move_loaded(self.net, self.device)

    def set_precision(self, option: str | None = "auto") -> str:
        """'auto' and 'fp32' give fp32 (this family has no bf16 path); 'bf16' is refused."""
        if option in (None, "auto", "fp32"):
            return "fp32"
        if option == "bf16":
            raise ValueError(f"bf16 generation is implemented for the hagan family only, not {self.family}")
        raise ValueError(f"precision must be one of auto, fp32, bf16, got {option!r}")

    # ---------------------------------------------------------------- construction and storage
    @classmethod
    def init(cls: type[M], config: Any, seed: int = 0, device: str | torch.device = "cpu") -> M:
        """Freshly initialised networks from ``config``, the same for a seed whatever the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls.net_class(config)
        return cls(net, device)

    @classmethod
    def load_net(cls, path: str | os.PathLike, parts: tuple[str, ...] | None = None) -> NetT:
        """The networks of a model directory (config.json + model.safetensors), checked key by key;
        with ``parts``, only those top-level sub-networks are read (the others stay on the meta
        device: no memory)."""
        d = read_config(path)
        try:
            cfg = cls.config_class.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{Path(path) / 'config.json'}: {e}") from e
        # built on the meta device (no memory, no random initialisation of weights about to be
        # replaced), then the loaded tensors become its parameters; a network with state outside its
        # state dict (non-persistent buffers) is built for real instead
        with torch.device("meta"):
            net = cls.net_class(cfg)
        load_state_dict_checked(net, read_weights(path, parts=parts), path, parts)
        whole_meta = parts is None and any(t.is_meta for t in (*net.parameters(), *net.buffers()))
        if whole_meta or _meta_parts(net, parts):
            net = cls.net_class(cfg)
            load_state_dict_checked(net, read_weights(path), path)
        return net  # type: ignore[return-value]

    @classmethod
    def from_pretrained(
        cls: type[M], path: str | os.PathLike, device: str | torch.device = "cpu", serving: bool = False
    ) -> M:
        """The model of a directory; ``serving``: only what generation needs now, the encoders when
        first used, never the discriminators (the family's ``generator_parts``)."""
        if not (serving and cls.generator_parts):
            return cls(cls.load_net(path), device)
        m = cls(cls.load_net(path, parts=cls.generator_parts), device)
        m._source = Path(path)
        return m

    def unloaded_parts(self) -> list[str]:
        """Top-level sub-networks not read from the model directory (a serving load)."""
        return _meta_parts(self.net)

    def need(self, parts: tuple[str, ...]) -> None:
        """Reads those of ``parts`` that are not loaded yet (thread-safe; a no-op when all are)."""
        with self._parts_lock:
            missing = tuple(p for p in parts if p in self.unloaded_parts())
            if not missing:
                return
            if self._source is None:
                raise RuntimeError(f"sub-networks {missing} are not loaded and no model directory is known")
            net = self.load_net(self._source, parts=missing)
            for p in missing:
                setattr(self.net, p, getattr(net, p).to(self.device).eval())

    def save_pretrained(self, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
        if self.unloaded_parts():
            self.need(tuple(self.unloaded_parts()))
        return save_model_dir(path, self.config.to_dict(), self.net.state_dict(), extra_files)

    # ---------------------------------------------------------------- description
    @property
    def config(self) -> ConfigT:
        return self.net.config  # type: ignore[return-value]

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.config.output_shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.config.spacing

    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def class_names(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "parameters": self.count_parameters(self.net)}

    # ---------------------------------------------------------------- model space -> the network's grid
    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes [n, 1, R, R, R] on the model's cube (``config.cube()``: what ``load_for_model``
        gives, what the training data were prepared on) or already on the network's grid ->
        [n, 1, *grid_shape], resampled by ``model.data.grid.resample`` as the trainer resamples the
        prepared cubes (the grid itself, as float32, where it is the cube)."""
        from model.data.grid import resample

        r, grid = self.config.cube_resolution, tuple(self.config.grid_shape)
        shapes = [(1, r, r, r)] + ([(1, *grid)] if grid != (r, r, r) else [])
        if x.ndim != 5 or tuple(x.shape[1:]) not in shapes:
            want = " or ".join(f"[n, {', '.join(map(str, s))}]" for s in shapes)
            raise ValueError(
                f"volume must have shape {want} (the model's cube from load_for_model, or its grid), "
                f"got {list(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("volume contains NaN or infinite values")
        return resample(x, grid)

    # ---------------------------------------------------------------- latents
    def sample_latents(self, n: int, seed: int) -> torch.Tensor:
        """Standard-normal latents [n, latent_dim] from a CPU generator: the same on every device."""
        return seeded_normal(n, seed, self.latent_dim)
