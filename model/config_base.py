"""What the config classes of every family share: ``Intensity`` (model space <-> physical units),
``Cube`` (the model space a scan is brought to, what the one preprocessing path reads) and
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
``preprocess``: none is the authors' stretch), and keeps re-saved files byte for byte the same by
listing a key added later in ``json_optional`` (written only when it differs from its default); a
key it drops or renames needs a ``format_version`` bump and its reading in
``model.checkpoint.read_config``.

The cube.  ``voxgen prepare`` brings every training scan to a cube R^3 of voxel size ``spacing``
(model/data/preprocess.py); a family trains on that cube (HA-GAN) or on a grid resampled from it
(``model.data.grid.resample``: alpha-WGAN-GP's 64^3, the style-based families' ``shape``).
``BaseConfig.cube()`` describes that cube for every config, and ``to_model_space``,
``load_for_model``, ``to_input_grid`` and ``write_in_input_space`` read it, nothing else: a scan
served to a model lands on the cube its training data were prepared on, and the family resamples it
to its grid exactly as its trainer does.  A family whose grid is not the cube sets
``cube_resolution`` (its ``data_resolution``) and ``grid_shape``; the cube's voxel size follows from
the grid's (``spacing``), as ``model.data.grid.grid_spacing`` made it, inverted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from model import families

CT_WINDOW = (-1024.0, 600.0)  # the paper's CT window, mapped to [-1, 1]
MODALITIES = ("ct", "mri")

C = TypeVar("C", bound="BaseConfig")
PREPROCESS_MODES = ("stretch", "physical")


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


@dataclass(frozen=True)
class Cube:
    """The model space a scan is brought to before a network sees it: the cube ``resolution``^3 of
    voxel size ``spacing`` (x, y, z mm) that ``voxgen prepare`` made the training data on, with the
    intensity mapping (``modality``, ``intensity``) and the dataset's preprocessing record
    (``preprocess``: ``{"mode": "physical", "spacing": ..., ...}``, empty for the authors' stretch).
    What ``model.data.volumes.to_model_space`` & co. read; ``BaseConfig.cube()`` gives a model's,
    ``model.data.datasets.VolumeDataset.cube()`` a prepared dataset's."""

    resolution: int
    spacing: tuple[float, float, float]
    modality: str
    intensity: Intensity
    preprocess: dict[str, Any] = field(default_factory=dict)

    def cube(self) -> Cube:
        """Itself: a ``Cube`` goes wherever a config does."""
        return self


def _tidy(x: float) -> float:
    """``x`` to 12 significant digits: a voxel size scaled to a grid and back (x * R / n * n / R)
    is the recorded value again, not one bit off it."""
    return float(f"{x:.12g}")


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
    # the preprocessing of the dataset the model was trained on (``manifest["preprocess"]`` of
    # ``voxgen prepare``, copied by the trainer): {"mode": "physical", "spacing": ..., ...}; empty
    # (configs that predate it) reads as the authors' stretch (model/data/preprocess.py ``options``)
    preprocess: dict[str, Any] = field(default_factory=dict)

    # the family's name for messages, with its article ("an HA-GAN")
    label: ClassVar[str] = "a model"
    # config.json's keys in their order (the one each family wrote before this class, so the files
    # stay byte-for-byte the same): the fields (any left out follow at the end), and derived values
    # (properties) written for readers of config.json -- the service -- and dropped when loading
    json_keys: ClassVar[tuple[str, ...]] = ()
    # fields added after a family's first config.json: written only when they differ from their
    # default, so a re-saved older file stays byte for byte the same (HA-GAN always writes preprocess)
    json_optional: ClassVar[tuple[str, ...]] = ("preprocess",)

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

    # ---------------------------------------------------------------- the cube (model space)
    @property
    def cube_resolution(self) -> int:
        """R of the cube R^3 a scan is brought to (the prepared data's resolution): ``resolution``,
        the network's own grid, unless a family resamples the cube (its ``data_resolution``)."""
        return int(self.resolution)  # type: ignore[attr-defined]

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The 3D grid (D, H, W) the network works on, resampled from the cube by
        ``model.data.grid.resample``; ``spacing`` is the voxel size on it."""
        return self.output_shape

    def cube(self) -> Cube:
        """The cube this model's training data were prepared on (see the module docstring): its
        voxel size is ``spacing`` where the grid is the cube (HA-GAN), else the grid's voxel size
        scaled back by size / R along each axis (the inverse of ``model.data.grid.grid_spacing``)."""
        r, (d, h, w) = self.cube_resolution, self.grid_shape
        spacing = tuple(float(s) for s in self.spacing)
        if (d, h, w) != (r, r, r):
            spacing = tuple(_tidy(s * n / r) for s, n in zip(spacing, (w, h, d), strict=True))
        return Cube(r, spacing, self.modality, self.intensity, dict(self.preprocess or {}))  # type: ignore[arg-type]

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
        mode = (self.preprocess or {}).get("mode", "stretch")
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess.mode must be 'stretch' or 'physical', got {mode!r}")

    def check_positive_int(self, *names: str) -> None:
        """ValueError for the first of these fields that is not a positive integer."""
        for k in names:
            v = getattr(self, k)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    # ---------------------------------------------------------------- config.json
    def to_dict(self) -> dict[str, Any]:
        """The config.json content (without ``format_version``, which ``save_model_dir`` adds):
        plain JSON values, tuples as lists, in ``json_keys`` order; ``json_optional`` keys only
        where they differ from their default."""
        values = asdict(self)
        defaults = {f.name: f for f in fields(self)}
        out: dict[str, Any] = {}
        for k in (*self.json_keys, *(k for k in values if k not in self.json_keys)):
            v = values[k] if k in values else getattr(self, k)
            if k in self.json_optional and v == _default(defaults[k]):
                continue
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


def _default(f: Any) -> Any:
    """A dataclass field's default value (made by its factory where it has one)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default
