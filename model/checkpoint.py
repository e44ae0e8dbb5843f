"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``directions.safetensors``,
``README.md``).  Nothing is ever unpickled.  Writes are atomic: a directory is assembled under a
temporary name and renamed into place, so a reader never sees a half-written model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIRECTIONS_NAME = "directions.safetensors"


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
    return d


def read_weights(path: str | os.PathLike, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
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
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
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
