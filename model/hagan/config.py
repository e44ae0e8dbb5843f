"""The configuration of an HA-GAN model: everything needed to rebuild the network and to map its
output to physical units.  Stored as ``config.json`` in a model directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RESOLUTIONS = (128, 256, 512)

CT_WINDOW = (-1024.0, 600.0)  # the paper's CT window, mapped to [-1, 1]


@dataclass
class Intensity:
    """Linear map between model space [-1, 1] and physical units.

    ``physical = lo + (v + 1) / 2 * (hi - lo)``; CT volumes are written as int16 Hounsfield units,
    MRI volumes as float32 in the units of the training data (arbitrary units).
    """

    lo: float = CT_WINDOW[0]
    hi: float = CT_WINDOW[1]
    units: str = "HU"
    dtype: str = "int16"

    def to_physical(self, v):  # works for numpy arrays and torch tensors
        return self.lo + (v + 1.0) * 0.5 * (self.hi - self.lo)

    def to_model(self, x):
        return (x - self.lo) / (self.hi - self.lo) * 2.0 - 1.0

    @classmethod
    def for_modality(cls, modality: str) -> Intensity:
        if modality == "ct":
            return cls(CT_WINDOW[0], CT_WINDOW[1], "HU", "int16")
        if modality == "mri":
            return cls(0.0, 1.0, "a.u.", "float32")
        raise ValueError(f"unknown modality {modality!r}; use 'ct' or 'mri'")


@dataclass
class HAGANConfig:
    resolution: int = 256
    latent_dim: int = 1024
    width: float = 1.0
    class_names: list[str] = field(default_factory=list)
    modality: str = "ct"
    # voxel size in mm along x (W), y (H), z (D, the axial/slice axis); RAS orientation
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: Intensity = field(default_factory=Intensity)
    description: str = ""
    family: str = "hagan"
    # GroupNorm keeps at least this many channels per group (1: the authors' layers, which turn into
    # instance norm at reduced width)
    norm_min_group: int = 1
    # the one preprocessing path (model/data/preprocess.py): {"mode": "physical", ...}; older
    # configs (the authors' recipe) read as {"mode": "stretch"}
    preprocess: dict[str, Any] = field(default_factory=dict)
    # how the weights were trained (recipe, departures from the paper), for the record
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.intensity, dict):
            self.intensity = Intensity(**self.intensity)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        r = self.resolution
        return (r, r, r)

    def validate(self) -> None:
        if self.family != "hagan":
            raise ValueError(f"not an HA-GAN config (family={self.family!r})")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        if not (isinstance(self.latent_dim, int) and self.latent_dim > 0):
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        c = round(32 * self.width)
        if self.width <= 0 or c < 8 or c % 8 or abs(c - 32 * self.width) > 1e-6:
            raise ValueError(f"width must make 32*width a multiple of 8 (>= 8): 0.25, 0.5, 1, ...; got {self.width}")
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if self.intensity.hi <= self.intensity.lo:
            raise ValueError("intensity.hi must exceed intensity.lo")
        if not (isinstance(self.norm_min_group, int) and 1 <= self.norm_min_group <= 8):
            raise ValueError(f"norm_min_group must be an integer in 1..8, got {self.norm_min_group!r}")
        mode = (self.preprocess or {}).get("mode", "stretch")
        if mode not in ("stretch", "physical"):
            raise ValueError(f"preprocess.mode must be 'stretch' or 'physical', got {mode!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HAGANConfig:
        d = dict(d)
        d.pop("num_classes", None)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HA-GAN config keys: {sorted(unknown)}")
        return cls(**d)
