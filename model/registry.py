"""Model families by name, and loading / saving model directories whatever the family."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from model import families
from model.checkpoint import ModelDirError, read_config


class GenerativeModel(Protocol):
    """What every family exposes to the worker and the CLI."""

    family: str
    device: torch.device

    @property
    def latent_dim(self) -> int: ...
    @property
    def output_shape(self) -> tuple[int, int, int]: ...
    @property
    def spacing(self) -> tuple[float, float, float]: ...
    @property
    def modality(self) -> str: ...
    @property
    def class_names(self) -> list[str]: ...
    @property
    def config(self) -> Any: ...

    def info(self) -> dict[str, Any]: ...
    def sample_latents(self, n: int, seed: int) -> torch.Tensor: ...
    def generate(self, z: torch.Tensor, label: Any = None, **kw: Any) -> torch.Tensor: ...
    def encode(self, x: torch.Tensor, progress: Any = None, *, steps: int | None = None) -> torch.Tensor: ...
    def save_pretrained(self, path: str | os.PathLike) -> Path: ...


FAMILIES = families.NAMES


def family_class(family: str) -> type:
    """The loaded-model class of a family (model/families.py)."""
    try:
        return families.get(family).model_class()
    except ValueError as e:
        raise ModelDirError(str(e)) from None


def from_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu", serving: bool = False
) -> GenerativeModel:
    """Load any model directory (the family is read from its config.json); ``serving``: without the
    discriminators, the encoders on first use (``VolumeModel.from_pretrained``)."""
    family = read_config(path)["family"]
    return family_class(family).from_pretrained(path, device=device, serving=serving)


def resolve_device(device: str | None) -> torch.device:
    """'auto' / None -> cuda if available else cpu; refuses a CUDA device that is not there."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return d
