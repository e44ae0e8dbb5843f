"""The configuration of a 3D alpha-WGAN-GP model (Kwon et al., MICCAI 2019).  Stored as
``config.json`` in a model directory; it describes the networks fully.  The fields every family
shares and the round trip are ``model.config_base.BaseConfig``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.config_base import BaseConfig, Intensity

RESOLUTION = 64


@dataclass
class AlphaWGANConfig(BaseConfig):
    resolution: int = RESOLUTION
    latent_dim: int = 1000
    # channel multiplier: 1.0 = the paper's 64-128-256-512 (D, E) and 512-256-128-64 (G)
    width: float = 1.0
    code_hidden: int = 4096  # units of the code discriminator's hidden layers (the authors' notebook)
    modality: str = "mri"
    intensity: Intensity = field(default_factory=lambda: Intensity.for_modality("mri"))
    class_names: list[str] = field(default_factory=list)  # always empty: kept for readers of config.json
    family: str = "alphawgan"
    # the cube R^3 the training data were prepared on (``voxgen prepare``), averaged down to the
    # 64^3 grid by ``model.data.grid.resample`` in training and when encoding; 64 (configs that
    # predate it): scans are brought to the grid itself
    data_resolution: int = RESOLUTION
    # how the weights were trained where it departs from the paper (``recipe: small-data``), for the record
    training: dict[str, Any] = field(default_factory=dict)

    label: ClassVar[str] = "an alpha-WGAN-GP"
    json_keys: ClassVar[tuple[str, ...]] = tuple(
        "resolution latent_dim width code_hidden modality spacing intensity class_names description family "
        "preprocess data_resolution training".split()
    )
    json_optional: ClassVar[tuple[str, ...]] = ("preprocess", "data_resolution", "training")

    @property
    def cube_resolution(self) -> int:
        return self.data_resolution

    @property
    def channels(self) -> list[int]:
        """Channels of the four strided convolutions of D and E (G uses them in reverse)."""
        return [round(c * self.width) for c in (64, 128, 256, 512)]

    def validate(self) -> None:
        super().validate()
        if self.resolution != RESOLUTION:
            raise ValueError(f"resolution must be {RESOLUTION} (the paper's grid), got {self.resolution}")
        self.check_positive_int("latent_dim")
        if not (self.width > 0 and min(self.channels) >= 1 and abs(self.channels[0] - 64 * self.width) < 1e-6):
            raise ValueError(f"width must make 64*width a positive integer (1/64, ..., 0.25, 0.5, 1), got {self.width}")
        self.check_positive_int("code_hidden")
        r = self.data_resolution
        if not (isinstance(r, int) and r >= RESOLUTION and r % RESOLUTION == 0):
            raise ValueError(
                f"data_resolution must be a multiple of {RESOLUTION} (the prepared cube, averaged down to the "
                f"{RESOLUTION}^3 grid), got {r!r}"
            )
        if self.class_names:
            raise ValueError("alpha-WGAN-GP models are not class-conditional (class_names must be empty)")
