"""One entry point for training whatever the family: ``train(options, progress)``.

Each family's trainer lives in ``model/<family>/train.py`` and exposes
``train(options: dict, progress=None) -> Path`` returning the finished model directory
(``RUN/model``).  Options common to every family: ``data``, ``output``, ``iterations``, ``batch``,
``device``, ``resume``, ``seed``, ``checkpoint_every``, ``preview_every``; a family ignores the
options that are not its own, and an option given as None takes the family's default.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAINERS: dict[str, str] = {
    "hagan": "model.hagan.train",
    "splitshuffle": "model.stylegan3d.train",
    "stylegan3d": "model.stylegan3d.train",
    "alphawgan": "model.alphawgan.train",
}


def trainer_module(family: str) -> Any:
    """The training module of a family; a clear error for unknown or not-yet-available ones."""
    if family not in TRAINERS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(TRAINERS)}")
    try:
        return importlib.import_module(TRAINERS[family])
    except ModuleNotFoundError as e:
        if e.name == TRAINERS[family]:
            raise ValueError(f"training of family {family!r} is not available in this version") from e
        raise


def train(options: dict[str, Any], progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Train (or resume, with ``options['resume']``) a run of ``options['family']`` (default hagan)."""
    family = options.get("family") or "hagan"
    return trainer_module(family).train(dict(options, family=family), progress)
