"""The configuration of a 3D alpha-WGAN-GP model (Kwon et al., MICCAI 2019).  Stored as
``config.json`` in a model directory; it describes the networks fully."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from model.hagan.config import Intensity

RESOLUTION = 64


@dataclass
class AlphaWGANConfig:
    resolution: int = RESOLUTION
    latent_dim: int = 1000
    # channel multiplier: 1.0 = the paper's 64-128-256-512 (D, E) and 512-256-128-64 (G)
    width: float = 1.0
    code_hidden: int = 4096  # units of the code discriminator's hidden layers (the authors' notebook)
    modality: str = "mri"
    # voxel size in mm along x (W), y (H), z (D); RAS orientation
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: Intensity = field(default_factory=lambda: Intensity.for_modality("mri"))
    class_names: list[str] = field(default_factory=list)
    description: str = ""
    family: str = "alphawgan"

    def __post_init__(self) -> None:
        if isinstance(self.intensity, dict):
            self.intensity = Intensity(**self.intensity)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.validate()

    @property
    def channels(self) -> list[int]:
        """Channels of the four strided convolutions of D and E (G uses them in reverse)."""
        return [round(c * self.width) for c in (64, 128, 256, 512)]

    @property
    def output_shape(self) -> tuple[int, int, int]:
        r = self.resolution
        return (r, r, r)

    @property
    def num_classes(self) -> int:
        return 0

    def validate(self) -> None:
        if self.family != "alphawgan":
            raise ValueError(f"not an alpha-WGAN-GP config (family={self.family!r})")
        if self.resolution != RESOLUTION:
            raise ValueError(f"resolution must be {RESOLUTION} (the paper's grid), got {self.resolution}")
        if not (isinstance(self.latent_dim, int) and self.latent_dim > 0):
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not (self.width > 0 and min(self.channels) >= 1 and abs(self.channels[0] - 64 * self.width) < 1e-6):
            raise ValueError(f"width must make 64*width a positive integer (1/64, ..., 0.25, 0.5, 1), got {self.width}")
        if not (isinstance(self.code_hidden, int) and self.code_hidden > 0):
            raise ValueError(f"code_hidden must be a positive integer, got {self.code_hidden!r}")
        if self.class_names:
            raise ValueError("alpha-WGAN-GP models are not class-conditional (class_names must be empty)")
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if self.intensity.hi <= self.intensity.lo:
            raise ValueError("intensity.hi must exceed intensity.lo")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlphaWGANConfig:
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown alpha-WGAN-GP config keys: {sorted(unknown)}")
        return cls(**d)
