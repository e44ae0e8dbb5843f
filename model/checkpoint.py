"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``directions.safetensors``,
``README.md``).  Nothing is ever unpickled.  Writes are atomic: a directory is assembled under a
temporary name and renamed into place, so a reader never sees a half-written model.

``config.json`` carries ``format_version`` (``FORMAT_VERSION``; a directory without one is of format
0 and loads the same); ``read_config`` checks it and returns the family's config without it.
Importing this module imports no torch: the API reads configs and direction names through
``read_config_cached``, ``direction_names`` and ``read_direction`` (cached, re-read when the
file changes); the functions that handle tensors import torch when called.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

if TYPE_CHECKING:
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
    try:
        d = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{cfg}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or "family" not in d:
        raise ModelDirError(f"{cfg}: no 'family' key; cannot tell which network this is")
    version = d.pop("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
        raise ModelDirError(
            f"{cfg}: format_version {version!r}; this voxgen reads model directories of format 0..{FORMAT_VERSION} "
            "(a newer voxgen wrote it?)"
        )
    return d


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


def read_weights(path: str | os.PathLike, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = Path(path) / name
    if not f.is_file():
        raise ModelDirError(f"{f}: missing")
    try:
        return load_file(str(f))
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
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
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
