"""A loaded 3D alpha-WGAN-GP model: the surface the worker, the CLI and ``voxgen evaluate`` use
(the same as ``model.hagan.infer.HAGANModel``).  ``encode`` is the trained encoder E, so
``generate(encode(x))`` reconstructs a scan."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.networks import AlphaWGAN, parameter_counts
from model.checkpoint import ModelDirError, read_config, read_weights, save_model_dir

Progress = Callable[[int, int, str], None]


def load_net(path: str | os.PathLike) -> AlphaWGAN:
    """The networks of a model directory (config.json + model.safetensors), checked key by key."""
    d = read_config(path)
    try:
        cfg = AlphaWGANConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{Path(path) / 'config.json'}: {e}") from e
    net = AlphaWGAN(cfg)
    sd = read_weights(path)
    ours = net.state_dict()
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
    net.load_state_dict(sd)
    return net


class AlphaWGANModel:
    """``generate(z)`` -> [n, 1, 64, 64, 64] float32 in [-1, 1] on the CPU; ``encode(x)`` -> [n, latent]."""

    family = "alphawgan"

    def __init__(self, net: AlphaWGAN, device: str | torch.device = "cpu", batch: int = 8) -> None:
        self.net = net.eval().requires_grad_(False)  # eval: BatchNorm uses its running statistics
        self.device = torch.device(device)
        self.net.to(self.device)
        self.batch = batch

    # ---------------------------------------------------------------- construction and storage
    @classmethod
    def init(cls, config: AlphaWGANConfig, seed: int = 0, device: str | torch.device = "cpu") -> AlphaWGANModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = AlphaWGAN(config)
        return cls(net, device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AlphaWGANModel:
        return cls(load_net(path), device)

    def save_pretrained(self, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
        return save_model_dir(path, self.config.to_dict(), self.net.state_dict(), extra_files)

    # ---------------------------------------------------------------- description
    @property
    def config(self) -> AlphaWGANConfig:
        return self.net.config

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
        return {"config": self.config.to_dict(), "parameters": parameter_counts(self.net)}

    # ---------------------------------------------------------------- latents
    def sample_latents(self, n: int, seed: int) -> torch.Tensor:
        """Standard-normal latents (the prior the code discriminator matches) from a CPU generator."""
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        if n < 1:
            raise ValueError("n must be >= 1")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.latent_dim, generator=g)

    # ---------------------------------------------------------------- generation and encoding
    @torch.no_grad()
    def generate(
        self, z: torch.Tensor, label: Any = None, *, progress: Progress | None = None, **kw: Any
    ) -> torch.Tensor:
        """Latents [n, latent_dim] -> volumes [n, 1, 64, 64, 64].  HA-GAN's keywords (mode, budget_mb)
        are accepted and ignored: a 64^3 volume always fits."""
        if label is not None:
            raise ValueError("this model is not class-conditional; label must be None")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent must have shape [n, {self.latent_dim}], got {list(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("latent contains NaN or infinite values")
        n = z.shape[0]
        out = torch.empty(n, 1, *self.output_shape, dtype=torch.float32)
        for s in range(0, n, self.batch):
            out[s : s + self.batch] = self.net.g(z[s : s + self.batch].to(self.device, torch.float32)).float().cpu()
            if progress:
                progress(min(n, s + self.batch), n, "generate")
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Volumes [n, 1, 64, 64, 64] in model space -> latents [n, latent_dim] (the encoder E)."""
        shape = (1, *self.output_shape)
        if x.ndim != 5 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"volume must have shape [n, {', '.join(map(str, shape))}], got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("volume contains NaN or infinite values")
        n = x.shape[0]
        zs = []
        for s in range(0, n, self.batch):
            zs.append(self.net.e(x[s : s + self.batch].to(self.device, torch.float32)).float().cpu())
            if progress:
                progress(min(n, s + self.batch), n, "encode")
        return torch.cat(zs, 0)

    def reconstruct(self, x: torch.Tensor, label: Any = None, **kw: Any) -> torch.Tensor:
        return self.generate(self.encode(x), label, **kw)


def init_model_dir(
    output: str | os.PathLike,
    *,
    latent_dim: int = 1000,
    width: float = 1.0,
    code_hidden: int = 4096,
    modality: str = "mri",
    spacing: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> AlphaWGANModel:
    """Write a freshly initialised (untrained) alpha-WGAN-GP model directory (``voxgen init``)."""
    from model.hagan.config import Intensity

    cfg = AlphaWGANConfig(
        latent_dim=latent_dim,
        width=width,
        code_hidden=code_hidden,
        modality=modality,
        intensity=Intensity.for_modality(modality),
        spacing=spacing or (1.0, 1.0, 1.0),
        description="UNTRAINED: a freshly initialised alpha-WGAN-GP with random weights; its volumes are not anatomy",
    )
    m = AlphaWGANModel.init(cfg, seed=seed)
    m.save_pretrained(output)
    return m
