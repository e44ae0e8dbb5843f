"""What the config classes of every family share: ``Intensity`` (model space <-> physical units) and
``BaseConfig`` (the shared fields, their checks and the ``config.json`` round trip).  Re-exported by
``model.base``, the import for code that runs models; the family config modules import it from here.

Importing this module imports no torch (nor numpy): a family's config module stays as light as
``model.checkpoint`` and ``model.families``, so a config can be read and checked in a process that
never loads torch (the API in Celery mode).

``config.json`` of a model directory is ``{"format_version": N, **config.to_dict()}``: the version is
of the model directory's layout (``model.checkpoint.FORMAT_VERSION``), not of a family's config, and
``model.checkpoint`` handles it -- ``save_model_dir`` writes it as the first key, ``read_config``
removes it, reads a directory without one as format 0 (the same) and refuses a newer one with
``ModelDirError``.  ``to_dict`` / ``from_dict`` never see it.  A family keeps older config.json
files loading by giving each new field a default that means what the files without it meant (e.g.
HA-GAN's ``preprocess``: none is the authors' stretch); a key it drops or renames needs a
``format_version`` bump and its reading in ``model.checkpoint.read_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from model import families

CT_WINDOW = (-1024.0, 600.0)  # the paper's CT window, mapped to [-1, 1]
MODALITIES = ("ct", "mri")

C = TypeVar("C", bound="BaseConfig")


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

    def to_physical(self, v: Any) -> Any:  # works for numbers, numpy arrays and torch tensors
        return self.lo + (v + 1.0) * 0.5 * (self.hi - self.lo)

    def to_model(self, x: Any) -> Any:
        return (x - self.lo) / (self.hi - self.lo) * 2.0 - 1.0

    @classmethod
    def for_modality(cls, modality: str) -> Intensity:
        if modality == "ct":
            return cls(CT_WINDOW[0], CT_WINDOW[1], "HU", "int16")
        if modality == "mri":
            return cls(0.0, 1.0, "a.u.", "float32")
        raise ValueError(f"unknown modality {modality!r}; use 'ct' or 'mri'")


@dataclass
class BaseConfig:
    """The fields and checks every family's config has; a family's config is a dataclass subclass
    that adds its own fields (and redeclares a shared one to change its default), its own checks in
    ``validate`` (after ``super().validate()``) and ``json_keys``.

    Every family also provides ``latent_dim`` and ``resolution`` (a field or a property); the
    default ``output_shape`` is the cube of ``resolution``.  Which family names a class accepts is
    read from the registry (``model.families``: the entries whose ``config`` is this class).
    """

    family: str = ""
    modality: str = "ct"
    # voxel size in mm along x (W), y (H), z (D, the axial/slice axis); RAS orientation
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: Intensity = field(default_factory=Intensity)
    description: str = ""

    # the family's name for messages, with its article ("an HA-GAN")
    label: ClassVar[str] = "a model"
    # config.json's keys in their order (the one each family wrote before this class, so the files
    # stay byte-for-byte the same): the fields (any left out follow at the end), and derived values
    # (properties) written for readers of config.json -- the service -- and dropped when loading
    json_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.intensity, dict):
            self.intensity = Intensity(**self.intensity)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.validate()

    @classmethod
    def family_names(cls) -> tuple[str, ...]:
        """The family names this config class describes (model/families.py)."""
        return families.sharing_config(f"{cls.__module__}:{cls.__qualname__}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        r: int = self.resolution  # type: ignore[attr-defined]
        return (r, r, r)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 for an unconditional one."""
        return 0

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """The shared checks (ValueError naming the field); a family's ``validate`` runs these first."""
        names = self.family_names()
        if self.family not in names:
            use = f"; use one of {names}" if len(names) > 1 else ""
            raise ValueError(f"not {self.label} config (family={self.family!r}){use}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if self.intensity.hi <= self.intensity.lo:
            raise ValueError("intensity.hi must exceed intensity.lo")

    def check_positive_int(self, *names: str) -> None:
        """ValueError for the first of these fields that is not a positive integer."""
        for k in names:
            v = getattr(self, k)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    # ---------------------------------------------------------------- config.json
    def to_dict(self) -> dict[str, Any]:
        """The config.json content (without ``format_version``, which ``save_model_dir`` adds):
        plain JSON values, tuples as lists, in ``json_keys`` order."""
        values = asdict(self)
        out: dict[str, Any] = {}
        for k in (*self.json_keys, *(k for k in values if k not in self.json_keys)):
            v = values[k] if k in values else getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """The config of a ``to_dict`` (as ``model.checkpoint.read_config`` returns config.json):
        derived keys are dropped, unknown ones refused, missing ones take their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - set(cls.json_keys)
        if unknown:
            raise ValueError(f"unknown {cls.label.split(' ', 1)[-1]} config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})
