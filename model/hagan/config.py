"""The configuration of an HA-GAN model: everything needed to rebuild the network and to map its
output to physical units.  Stored as ``config.json`` in a model directory; the fields every family
shares (family, modality, spacing, intensity, description) and the round trip are
``model.config_base.BaseConfig``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.config_base import BaseConfig

# a training option HA-GAN refuses (voxgen train --lr, POST /admin/train lr): silently ignored before
LR_REFUSAL = (
    "HA-GAN trains G, D and the encoders at learning rates of their own: give lr_g, lr_d, lr_e "
    "(voxgen train --lr-g/--lr-d/--lr-e), not lr"
)

RESOLUTIONS = (128, 256, 512)


@dataclass
class HAGANConfig(BaseConfig):
    resolution: int = 256
    latent_dim: int = 1024
    width: float = 1.0
    class_names: list[str] = field(default_factory=list)
    family: str = "hagan"
    # GroupNorm keeps at least this many channels per group (1: the authors' layers, which turn into
    # instance norm at reduced width)
    norm_min_group: int = 1
    # (``preprocess``, the dataset's preprocessing, is BaseConfig's; HA-GAN's grid is the cube)
    # how the weights were trained (recipe, departures from the paper), for the record
    training: dict[str, Any] = field(default_factory=dict)
    # encode's latent-fit steps after the encoder when a caller gives none (model/latent/fit.py; 0: the
    # encoder alone)
    encode_steps: int = 0
    # G^H's hidden channels as a width of its own (0: ``width``'s, the authors' layout): the last stage
    # draws every output voxel from these channels at half the output resolution.  Four times the demo
    # model's fitted no faster, at 2.2x the cost (benchmarks/RESULTS.md, "G^H's width")
    gh_width: float = 0.0

    label: ClassVar[str] = "an HA-GAN"
    json_keys: ClassVar[tuple[str, ...]] = tuple(
        "resolution latent_dim width class_names modality spacing intensity description family norm_min_group "
        "preprocess training encode_steps num_classes gh_width".split()
    )
    # preprocess is always written (as before BaseConfig had it); encode_steps only where it is not 0
    json_optional: ClassVar[tuple[str, ...]] = ("encode_steps", "gh_width")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validate(self) -> None:
        super().validate()
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        self.check_positive_int("latent_dim")
        c = round(32 * self.width)
        if self.width <= 0 or c < 8 or c % 8 or abs(c - 32 * self.width) > 1e-6:
            raise ValueError(f"width must make 32*width a multiple of 8 (>= 8): 0.25, 0.5, 1, ...; got {self.width}")
        if self.gh_width:
            ch = round(32 * self.gh_width)
            if self.gh_width < 0 or ch < 8 or ch % 8 or abs(ch - 32 * self.gh_width) > 1e-6:
                raise ValueError(
                    f"gh_width must be 0 (width's) or make 32*gh_width a multiple of 8 (>= 8); got {self.gh_width}"
                )
        if not (isinstance(self.norm_min_group, int) and 1 <= self.norm_min_group <= 8):
            raise ValueError(f"norm_min_group must be an integer in 1..8, got {self.norm_min_group!r}")
        from model.latent import MAX_FIT_STEPS

        ok = isinstance(self.encode_steps, int) and not isinstance(self.encode_steps, bool)
        if not (ok and 0 <= self.encode_steps <= MAX_FIT_STEPS):
            raise ValueError(f"encode_steps must be an integer in 0..{MAX_FIT_STEPS}, got {self.encode_steps!r}")
