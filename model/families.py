"""The model families: one entry each, read by the CLI, the API's schemas, the loader, the worker
and the trainer lookup.  Nothing else lists families.

Importing this module imports neither torch nor any family: an entry names its parts as
``"module:attribute"`` strings, imported on first use (the API process in Celery mode never loads
torch).  A new family is its package (``config.py``, ``networks.py``, ``model.py``, ``train.py``) and
one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Family:
    """One model family.

    ``config``, ``model``: the config class and the loaded-model class (``from_pretrained``,
    ``generate``, ``encode``); ``trainer``: the module whose ``train(options, progress)`` trains it;
    ``init``: the CLI's ``voxgen init`` for it, a function of the parsed arguments; ``variants``:
    where the architecture variants it accepts are named (a mapping or sequence; "" for none);
    ``encoder``: "amortised" (a network maps a volume to its latent) or "projection" (an
    optimisation finds it); ``summary``: one line for help texts; ``multi_process``: whether its
    trainer takes part in torchrun training with several processes (the others refuse it)."""

    name: str
    config: str
    model: str
    trainer: str
    init: str
    encoder: Literal["amortised", "projection"]
    summary: str
    variants: str = ""
    multi_process: bool = False  # its trainer runs under torchrun with several processes (model/distributed.py)

    def config_class(self) -> Any:
        return load(self.config)

    def model_class(self) -> Any:
        return load(self.model)

    def trainer_module(self) -> Any:
        return importlib.import_module(self.trainer)

    def init_function(self) -> Any:
        return load(self.init)

    def variant_names(self) -> tuple[str, ...]:
        return tuple(load(self.variants)) if self.variants else ()


def load(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported on first use)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr) if attr else importlib.import_module(module)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="hagan",
            config="model.hagan.config:HAGANConfig",
            model="model.hagan.model:HAGANModel",
            trainer="model.hagan.train",
            init="model.hagan.model:init_cli",
            encoder="amortised",
            summary="HA-GAN: hierarchical amortised GAN, 128-512^3, hierarchical encoder",
            multi_process=True,
        ),
        Family(
            name="splitshuffle",
            config="model.stylegan3d.config:StyleGAN3DConfig",
            model="model.stylegan3d.model:StyleGAN3DModel",
            trainer="model.stylegan3d.train",
            init="model.stylegan3d.model:init_cli",
            encoder="projection",
            summary="3D Split&Shuffle-GAN: 3D StyleGAN2 with channel split & shuffle convolutions",
            variants="model.stylegan3d.config:VARIANTS",
            multi_process=True,
        ),
        Family(
            name="stylegan3d",
            config="model.stylegan3d.config:StyleGAN3DConfig",
            model="model.stylegan3d.model:StyleGAN3DModel",
            trainer="model.stylegan3d.train",
            init="model.stylegan3d.model:init_cli",
            encoder="projection",
            summary="3D-StyleGAN baseline (no split/shuffle), projection and style mixing",
            variants="model.stylegan3d.config:VARIANTS",
            multi_process=True,
        ),
        Family(
            name="alphawgan",
            config="model.alphawgan.config:AlphaWGANConfig",
            model="model.alphawgan.model:AlphaWGANModel",
            trainer="model.alphawgan.train",
            init="model.alphawgan.model:init_cli",
            encoder="amortised",
            summary="3D alpha-WGAN-GP baseline, 64^3, with an encoder",
        ),
    )
}

NAMES: tuple[str, ...] = tuple(FAMILIES)


def register(family: Family) -> None:
    """Add a family to the registry (a family kept outside this package, or a test's).  Call it
    before the CLI parser, the service's schemas or the loader are first imported: they read the
    registry when they are built.  Refuses a name already taken."""
    global NAMES
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    NAMES = tuple(FAMILIES)


def get(name: str) -> Family:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(NAMES)}") from None


def with_encoder(kind: Literal["amortised", "projection"]) -> tuple[str, ...]:
    """The families whose encoder is of this kind."""
    return tuple(n for n, f in FAMILIES.items() if f.encoder == kind)


def multi_process() -> tuple[str, ...]:
    """The families whose trainers run under torchrun with several processes."""
    return tuple(n for n, f in FAMILIES.items() if f.multi_process)


def sharing_config(config: str) -> tuple[str, ...]:
    """The families built from one config class (``"module:Class"``), e.g. the style-based ones."""
    return tuple(n for n, f in FAMILIES.items() if f.config == config)
