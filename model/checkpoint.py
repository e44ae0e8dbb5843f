"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``directions.safetensors``,
``README.md``).  Nothing is ever unpickled.  Writes are atomic: a directory is assembled under a
temporary name and renamed into place, so a reader never sees a half-written model.

``config.json`` carries ``format_version`` (``FORMAT_VERSION``; a directory without one is of format
0 and loads the same); ``read_config`` checks it and returns the family's config without it.
Importing this module imports no torch: the API reads configs and direction names through
``read_config_cached``, ``direction_names`` and ``read_direction`` (cached, re-read when the
file changes); the functions that handle tensors import torch when called.

Training checkpoints, one layout for every family (``save_training_checkpoint``,
``read_training_checkpoint``): ``RUN/checkpoints/iter_NNNNNNN/`` is a model directory (the model the
run serves at that iteration) plus

* ``train.safetensors`` (``TRAIN_TENSORS_NAME``), the tensors of the training state, by key:
  ``optim.<optimizer>.<param index>.<state key>``: each optimizer's state (moments, and the step
  counters as ``...step``); ``rng.torch_cpu``: torch's global CPU generator; ``rng.torch_cuda``: the
  training device's generator (runs on CUDA); ``rng.<name>``: the trainer's own CPU generators
  (``rng.latents``, HA-GAN's ``rng.augment``); ``extra.<name>``: the family's other tensors (HA-GAN's
  live G beside its EMA ``extra.live.*``, StyleGAN's raw G ``extra.G_raw.*`` and ``extra.pl_mean``);
* ``state.json`` (``TRAIN_STATE_NAME``): ``format_version`` (``TRAIN_FORMAT_VERSION``), ``iteration``
  (the step counter of the run), ``options`` (all but ``resume``), ``optimizers`` (each optimizer's
  param groups), ``numpy_rng`` (the numpy generator's bit-generator state) and the family's own
  fields (HA-GAN: ``best``; StyleGAN: ``init``, ``lr``, ``batch``).

``RUN/latest.json`` names the newest checkpoint; it is written last, after the checkpoint and
``RUN/model``, so a run killed while saving resumes from the checkpoint before.  The checkpoints of
format 1 (a ``state.json`` without ``format_version``) resume the same, their keys renamed when read:
HA-GAN's and alpha-WGAN's ``optim.safetensors`` (``<optimizer>.<index>.<key>``, ``rng.torch_global``,
``rng.torch_latents``, ``rng.torch_augment``, ``live.*``) and StyleGAN's ``train.safetensors``
(``opt.<optimizer>.<index>.<key>``, ``rng.torch_cpu``, ``rng.torch_cuda``, ``rng.latents``,
``G_raw.*``, ``pl_mean``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

if TYPE_CHECKING:
    import numpy as np
    import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIRECTIONS_NAME = "directions.safetensors"
FORMAT_VERSION = 1  # of the model directory; bump when its layout changes, and read older ones


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or corrupt; the message names the file."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    cfg = p / CONFIG_NAME
    if not p.is_dir():
        raise ModelDirError(f"{p}: not a model directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not cfg.is_file():
        raise ModelDirError(f"{cfg}: missing; a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    d, _ = _read_versioned_json(cfg, 0, FORMAT_VERSION, "model directories")
    if "family" not in d:
        raise ModelDirError(f"{cfg}: no 'family' key; cannot tell which network this is")
    return d


def _read_versioned_json(f: Path, oldest: int, newest: int, what: str) -> tuple[dict[str, Any], int]:
    """The JSON object in ``f`` without its ``format_version``, and that version (``oldest`` where
    there is none); ModelDirError for invalid JSON or a version outside ``oldest..newest``."""
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ModelDirError(f"{f}: not a JSON object")
    version = d.pop("format_version", oldest)
    if not isinstance(version, int) or isinstance(version, bool) or not oldest <= version <= newest:
        raise ModelDirError(
            f"{f}: format_version {version!r}; this voxgen reads {what} of format {oldest}..{newest} "
            "(a newer voxgen wrote it?)"
        )
    return d, version


_CACHE_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}


def _cached(f: Path, kind: str, read: Any) -> Any:
    """``read(f)``, kept until the file's mtime or size change."""
    st = f.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = (str(f), kind)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    value = read(f)
    with _CACHE_LOCK:
        _CACHE[key] = (stamp, value)
    return value


def find_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a run folder's ``model/`` (its finished model)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise ValueError(f"{p}: neither a model directory (config.json) nor a run folder with model/config.json")


def read_config_cached(path: str | os.PathLike) -> dict[str, Any]:
    """``read_config``, cached per file and re-read when it changes (a copy: callers may edit it)."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        return read_config(p)  # the error
    return dict(_cached(p / CONFIG_NAME, "config", lambda f: read_config(f.parent)))


def _direction_table(f: Path) -> dict[str, dict[str, Any]]:
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    with safe_open(str(f), framework="numpy") as sf:
        meta = sf.metadata() or {}
        for name in sf.keys():
            m = json.loads(meta[name]) if name in meta else {}
            vec = sf.get_tensor(name).astype(float).tolist()
            out[name] = {"name": name, "attribute": m.get("attribute"), "intercept": m.get("intercept"), "vector": vec}
    return out


def direction_names(model_dir: str | os.PathLike) -> list[str]:
    """The names of a model directory's stored latent directions; [] for none or an unreadable file."""
    f = Path(model_dir) / DIRECTIONS_NAME
    if not f.is_file():
        return []
    try:
        return sorted(_cached(f, "directions", _direction_table))
    except Exception:  # noqa: BLE001 - an unreadable directions file lists none rather than breaking /models
        return []


def read_direction(model_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """A stored direction as plain JSON (name, attribute, intercept, vector), or None."""
    f = Path(model_dir) / DIRECTIONS_NAME
    if not f.is_file():
        return None
    try:
        d = _cached(f, "directions", _direction_table).get(name)
    except Exception:  # noqa: BLE001
        return None
    if d is None or d["attribute"] is None or d["intercept"] is None:
        return None
    return dict(d, vector=list(d["vector"]))


def read_weights(
    path: str | os.PathLike, name: str = WEIGHTS_NAME, parts: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``path/name``; with ``parts``, only those of these top-level sub-networks
    (keys ``part.*``), read from the file without reading the others."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(path) / name
    if not f.is_file():
        raise ModelDirError(f"{f}: missing")
    try:
        if parts is None:
            return load_file(str(f))
        with safe_open(str(f), framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys() if k.split(".", 1)[0] in parts}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelDirError(f"{f}: unreadable safetensors file ({e})") from e


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_model_dir(
    path: str | os.PathLike,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    extra_files: dict[str, bytes] | None = None,
    keep_existing: tuple[str, ...] = (DIRECTIONS_NAME, "README.md"),
) -> Path:
    """Write a model directory atomically (build in a sibling temp dir, then swap it in).

    Files named in ``keep_existing`` that already exist in the target (learned directions, the
    model card) are carried over unless ``extra_files`` replaces them.
    """
    from safetensors.torch import save_file

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    config = {"format_version": FORMAT_VERSION, **{k: v for k, v in config.items() if k != "format_version"}}
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / WEIGHTS_NAME))
        for name in keep_existing:
            if (dst / name).is_file() and not (extra_files and name in extra_files):
                shutil.copy2(dst / name, tmp / name)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put the finished directory ``tmp`` in place of ``dst`` (a sibling): renames only, so a
    reader sees the old directory or the new one, each complete; the old one is deleted after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def register_model(run_model: str | os.PathLike, models_dir: str | os.PathLike, name: str) -> Path:
    """Copy a finished model directory (a run's ``RUN/model``) into the served models folder as
    ``models_dir/name``, atomically: the copy is assembled under a hidden temporary name (GET /models
    skips dot-names) and renamed into place, so the folder never holds a half-copied model."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        shutil.copytree(run_model, tmp, dirs_exist_ok=True)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ------------------------------------------------------------------ optimizer state (training checkpoints)
def optimizer_tensors(
    opts: dict[str, torch.optim.Optimizer], prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizers' state as flat tensors ``{prefix}{name}.{param index}.{key}`` (for safetensors)
    plus their param groups (JSON), so a training checkpoint holds no pickles."""
    import torch

    tensors, meta = {}, {}
    for name, opt in opts.items():
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{prefix}{name}.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        meta[name] = sd["param_groups"]
    return tensors, meta


def load_optimizer_tensors(
    opts: dict[str, torch.optim.Optimizer],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str = "",
) -> None:
    """Inverse of ``optimizer_tensors``.  Each moment buffer is placed on its parameter's device and
    in its parameter's memory layout (as a fresh optimizer creates it), so that a resumed run
    computes exactly what the uninterrupted one would; ``step`` counters stay as saved."""
    import torch

    for name, opt in opts.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if not key.startswith(f"{prefix}{name}."):
                continue
            idx, k = key[len(prefix) + len(name) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta[name]})
        for p, st in opt.state.items():
            for k, v in st.items():
                if k != "step" and torch.is_tensor(v) and v.shape == p.shape:
                    st[k] = torch.empty_like(p).copy_(v)


# ------------------------------------------------------------------ training checkpoints (the layout: module docstring)
TRAIN_TENSORS_NAME = "train.safetensors"
TRAIN_STATE_NAME = "state.json"
TRAIN_FORMAT_VERSION = 2  # of a training checkpoint; 1: the families' own layouts, before format_version
LATEST_NAME = "latest.json"
_OPTIM_V1_NAME = "optim.safetensors"  # format 1 of HA-GAN and alpha-WGAN


def checkpoint_dir(run: str | os.PathLike, iteration: int) -> Path:
    """``RUN/checkpoints/iter_NNNNNNN``: where the checkpoint of ``iteration`` goes."""
    return Path(run) / "checkpoints" / f"iter_{iteration:07d}"


def latest_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint ``RUN/latest.json`` names; ValueError where there is none to resume."""
    ptr = Path(run) / LATEST_NAME
    if not ptr.is_file():
        raise ValueError(f"{run}: nothing to resume (no {LATEST_NAME})")
    return Path(run) / "checkpoints" / json.loads(ptr.read_text())["checkpoint"]


def save_training_checkpoint(
    run: str | os.PathLike,
    iteration: int,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    *,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    numpy_rng: np.random.Generator,
    options: dict[str, Any],
    device: torch.device | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``iteration`` (the model directory of ``config`` and ``weights``,
    ``train.safetensors`` and ``state.json``), then ``RUN/model`` and, last, ``RUN/latest.json``; each
    file atomically.  ``generators`` are the trainer's CPU generators (``rng.<name>``), ``device`` the
    training device (its generator is kept on CUDA), ``extra`` the family's other tensors
    (``extra.<name>``) and ``state`` its own ``state.json`` fields.  Returns the checkpoint's folder."""
    import torch

    ck = checkpoint_dir(run, iteration)
    tensors, meta = optimizer_tensors(optimizers, prefix="optim.")
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if device is not None and device.type == "cuda":
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(device)
    tensors |= {f"rng.{name}": g.get_state() for name, g in generators.items()}
    tensors |= {f"extra.{k}": v for k, v in (extra or {}).items()}
    doc = {
        "format_version": TRAIN_FORMAT_VERSION,
        "iteration": iteration,
        "options": {k: v for k, v in options.items() if k != "resume"},
        "optimizers": meta,
        "numpy_rng": numpy_rng.bit_generator.state,
        **(state or {}),
    }
    save_model_dir(ck, config, weights)
    save_tensors_atomic(ck / TRAIN_TENSORS_NAME, tensors)
    write_json_atomic(ck / TRAIN_STATE_NAME, doc)
    save_model_dir(Path(run) / "model", config, weights)
    write_json_atomic(Path(run) / LATEST_NAME, {"checkpoint": ck.name, "iteration": iteration})
    return ck


@dataclass
class TrainingCheckpoint:
    """A training checkpoint as read (``read_training_checkpoint``): its folder, ``state.json`` and
    the tensors of ``train.safetensors`` under this format's keys, whatever the format it was written in."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])

    def weights(self) -> dict[str, torch.Tensor]:
        """The model directory's weights (what the run served at this iteration)."""
        return read_weights(self.path)

    def config(self) -> dict[str, Any]:
        return read_config(self.path)

    def extra(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The family's tensors saved as ``extra``, those under ``prefix``, with ``prefix`` removed."""
        head = f"extra.{prefix}"
        return {k[len(head) :]: v for k, v in self.tensors.items() if k.startswith(head)}

    def restore(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        generators: dict[str, torch.Generator],
        numpy_rng: np.random.Generator,
        device: torch.device | None = None,
    ) -> int:
        """Put the optimizers' state and the RNG states back (torch's global generator, the CUDA one
        where saved and ``device`` is on CUDA, ``generators``, ``numpy_rng``); returns the iteration.
        A generator the checkpoint has no state for keeps its seeded state (HA-GAN's augmentation
        generator, in checkpoints from before it)."""
        import torch

        load_optimizer_tensors(optimizers, self.tensors, self.state["optimizers"], prefix="optim.")
        torch.set_rng_state(self.tensors["rng.torch_cpu"])
        if device is not None and device.type == "cuda" and "rng.torch_cuda" in self.tensors:
            torch.cuda.set_rng_state(self.tensors["rng.torch_cuda"], device)
        for name, g in generators.items():
            if f"rng.{name}" in self.tensors:
                g.set_state(self.tensors[f"rng.{name}"])
        numpy_rng.bit_generator.state = self.state["numpy_rng"]
        return self.iteration


def read_training_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """A training checkpoint's ``state.json`` and tensors, those of format 1 renamed to this format's keys
    (ModelDirError for a missing or unreadable one, or one of a newer format)."""
    ck = Path(path)
    f = ck / TRAIN_STATE_NAME
    if not f.is_file():
        raise ModelDirError(f"{f}: missing; not a training checkpoint")
    state, version = _read_versioned_json(f, 1, TRAIN_FORMAT_VERSION, "training checkpoints")
    if version >= 2:
        return TrainingCheckpoint(ck, state, read_weights(ck, TRAIN_TENSORS_NAME))
    if (ck / _OPTIM_V1_NAME).is_file():
        return TrainingCheckpoint(ck, state, _keys_from_optim_v1(read_weights(ck, _OPTIM_V1_NAME), state))
    return TrainingCheckpoint(ck, state, _keys_from_train_v1(read_weights(ck, TRAIN_TENSORS_NAME)))


def _keys_from_optim_v1(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HA-GAN's and alpha-WGAN's format 1 (``optim.safetensors``): optimizer state under the optimizer's
    name, ``rng.torch_global`` (torch's CPU generator), ``rng.torch_<name>`` (the trainer's), the rest
    (HA-GAN's ``live.*``) the family's own."""
    out = {}
    for k, v in tensors.items():
        if k == "rng.torch_global":
            out["rng.torch_cpu"] = v
        elif k.startswith("rng.torch_"):
            out["rng." + k.removeprefix("rng.torch_")] = v
        elif k.split(".", 1)[0] in state["optimizers"]:
            out["optim." + k] = v
        else:
            out["extra." + k] = v
    return out


def _keys_from_train_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """StyleGAN's format 1 (``train.safetensors``): optimizer state under ``opt.``, the RNG states
    already as now, the rest (``G_raw.*``, ``pl_mean``) the family's own."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            out["optim." + k.removeprefix("opt.")] = v
        elif k.startswith("rng."):
            out[k] = v
        else:
            out["extra." + k] = v
    return out


# ------------------------------------------------------------------ weights users supply
def read_user_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a PyTorch checkpoint read with
    ``torch.load(weights_only=True)`` (a plain state dict, or one under ``"state_dict"``), so a file
    carrying pickled code is refused rather than run; a ``module.`` prefix (DataParallel) is removed."""
    import torch
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such weights file")
    if p.suffix == ".safetensors":
        try:
            sd: Any = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{p}: unreadable safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable or non-weights file
            raise ValueError(f"{p}: not a weights-only PyTorch checkpoint ({e})") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p}: expected a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in sd.items()}
