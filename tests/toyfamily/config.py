"""A toy family's config: a 16^3 volume from an 8-value latent (tests/test_families.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from model.config_base import BaseConfig


@dataclass
class ToyConfig(BaseConfig):
    resolution: int = 16
    latent_dim: int = 8
    family: str = "toy"

    label: ClassVar[str] = "a toy"
    json_keys: ClassVar[tuple[str, ...]] = ("family", "resolution", "latent_dim", "modality", "spacing", "intensity")

    def validate(self) -> None:
        super().validate()
        self.check_positive_int("resolution", "latent_dim")
