"""The configuration of a style-based 3D model: 3D-StyleGAN (Hong et al. 2021) and its Channel
Split&Shuffle variants (Liu et al. 2022).  Stored as ``config.json`` in a model directory.

``shape`` is always the 3D volume grid (D, H, W), depth = axial axis.  ``dims=2`` is the same
network in 2D, trained on the axial slices (H, W) of that grid and inflated into the 3D one.
The fields every family shares and the round trip are ``model.config_base.BaseConfig``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model import families
from model.config_base import BaseConfig

FAMILIES = families.sharing_config("model.stylegan3d.config:StyleGAN3DConfig")  # the style-based ones
D_VARIANTS = ("baseline", "split-shuffle", "split", "group", "depthwise")

# The paper's ablation variants (Table III): name -> (split_g, shuffle_g, d_variant)
VARIANTS: dict[str, tuple[bool, bool, str]] = {
    "baseline": (False, False, "baseline"),
    "group-d": (False, False, "group"),
    "depthwise-d": (False, False, "depthwise"),
    "split-shuffle-d": (False, False, "split-shuffle"),
    "split": (True, False, "split"),
    "split-shuffle": (True, True, "split-shuffle"),
}
DEFAULT_VARIANT = {"splitshuffle": "split-shuffle", "stylegan3d": "baseline"}


@dataclass
class StyleGAN3DConfig(BaseConfig):
    family: str = "splitshuffle"
    shape: tuple[int, int, int] = (32, 64, 64)
    channels: int = 32
    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 8
    mapping_width: int = 64
    mapping_lr_mult: float = 0.01
    split_g: bool = True
    shuffle_g: bool = True
    d_variant: str = "split-shuffle"
    d_groups: int = 4  # groups of the 'group' D variant (4 reproduces the paper's 0.434M)
    mbstd_group: int = 4
    dims: int = 3
    # the cube size (R^3) input scans are brought to first, as `voxgen prepare` does for the training
    # data (``cube()``, with ``preprocess``); the cube is then resampled to ``shape`` by
    # ``model.data.grid.resample``, in training and projection alike
    data_resolution: int = 128
    # optimisation steps of a projection (``encode``, the service's /encode) unless a caller says
    projection_steps: int = 200
    # how the weights were trained where it departs from the paper (``recipe: small-data``), for the record
    training: dict[str, Any] = field(default_factory=dict)

    label: ClassVar[str] = "a style-based 3D"
    # ``latent_dim`` (= ``w_dim``, the served latent's size) is derived: written for readers of
    # config.json (the service), checked against w_dim when loading
    json_keys: ClassVar[tuple[str, ...]] = tuple(
        "family shape channels z_dim w_dim mapping_layers mapping_width mapping_lr_mult split_g shuffle_g d_variant "
        "d_groups mbstd_group dims modality spacing intensity data_resolution projection_steps description "
        "latent_dim preprocess training".split()
    )
    json_optional: ClassVar[tuple[str, ...]] = ("preprocess", "training")  # written where not the default

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        super().__post_init__()

    @classmethod
    def for_variant(cls, family: str, variant: str | None = None, **kw: Any) -> StyleGAN3DConfig:
        """A config for one of the paper's variants ('baseline', 'split-shuffle', 'group-d', ...)."""
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        variant = variant or DEFAULT_VARIANT[family]
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        split_g, shuffle_g, d_variant = VARIANTS[variant]
        return cls(family=family, split_g=split_g, shuffle_g=shuffle_g, d_variant=d_variant, **kw)

    @property
    def variant(self) -> str | None:
        for name, sw in VARIANTS.items():
            if sw == (self.split_g, self.shuffle_g, self.d_variant):
                return name
        return None

    @property
    def num_blocks(self) -> int:
        """Synthesis blocks (the first one works on the learned constant, in-plane 4x4)."""
        return self.shape[1].bit_length() - 2

    @property
    def const_shape(self) -> tuple[int, ...]:
        f = 2 ** (self.num_blocks - 1)
        s = tuple(n // f for n in self.shape)
        return s if self.dims == 3 else s[1:]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """What the networks produce / see: (D, H, W) in 3D, (H, W) in 2D."""
        return self.shape if self.dims == 3 else self.shape[1:]

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.shape if self.dims == 3 else (1, self.shape[1], self.shape[2])

    @property
    def num_ws(self) -> int:
        return 2 * self.num_blocks

    @property
    def resolution(self) -> int:
        """The cube size ``model.data.volumes.to_model_space`` brings an input scan to (= the
        prepared data's resolution); the model then resamples that cube to ``shape``."""
        return self.data_resolution

    @property
    def cube_resolution(self) -> int:
        return self.data_resolution

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``shape``, also for a 2D model (its slices are axial slices of that grid)."""
        return self.shape

    @property
    def latent_dim(self) -> int:
        """The size of the served latent: w (see ``model.stylegan3d.model``)."""
        return self.w_dim

    def validate(self) -> None:
        super().validate()
        if len(self.shape) != 3 or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be three positive sizes (D, H, W), got {self.shape}")
        d, h, w = self.shape
        if h != w or h < 8 or h & (h - 1):
            raise ValueError(f"shape: H and W must be equal powers of two >= 8, got {h}x{w}")
        f = 2 ** (self.num_blocks - 1)
        if d % f or d // f < 1:
            raise ValueError(f"shape: depth must be a multiple of {f} for {h}x{w} slices, got {d}")
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if self.channels < 2 or self.channels % 2:
            raise ValueError(f"channels must be an even integer >= 2, got {self.channels}")
        self.check_positive_int("z_dim", "w_dim", "mapping_layers", "mapping_width", "mbstd_group")
        if self.d_variant not in D_VARIANTS:
            raise ValueError(f"d_variant must be one of {D_VARIANTS}, got {self.d_variant!r}")
        if self.d_variant == "group" and self.channels % self.d_groups:
            raise ValueError(f"d_groups ({self.d_groups}) must divide channels ({self.channels})")
        if self.shuffle_g and not self.split_g:
            raise ValueError("shuffle_g needs split_g")
        if self.family == "stylegan3d" and (self.split_g or self.d_variant != "baseline"):
            raise ValueError("family 'stylegan3d' is the plain 3D-StyleGAN: no split (use family 'splitshuffle')")
        self.check_positive_int("projection_steps")
        if not (isinstance(self.data_resolution, int) and self.data_resolution >= 8):
            raise ValueError(f"data_resolution must be an integer >= 8, got {self.data_resolution!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StyleGAN3DConfig:
        cfg = super().from_dict(d)
        latent_dim = d.get("latent_dim")
        if latent_dim is not None and latent_dim != cfg.latent_dim:
            raise ValueError(f"latent_dim ({latent_dim}) must equal w_dim ({cfg.w_dim})")
        return cfg

    def with_dims(self, dims: int) -> StyleGAN3DConfig:
        d = self.to_dict()
        d["dims"] = dims
        return StyleGAN3DConfig.from_dict(d)
