"""Feature extractors for the distribution distances, all offline (nothing is downloaded).

Every 3D extractor takes volumes [N, 1, D, H, W] in model space ([-1, 1]) on the evaluation grid
and returns float32 features [N, d] on the CPU:

* ``PooledIntensity`` -- fixed, model-free: the volume area-averaged to a small cube (8^3 -> 512
  numbers).  Compares coarse anatomy and intensity layout; blind to texture.
* ``EncoderFeatures`` -- the latent code of a trained voxgen model with an amortised encoder
  (HA-GAN's hierarchical encoder, alpha-WGAN-GP's encoder): a learned 3D feature map that works
  offline.  Use the *same* reference model for every model you compare.
* ``MedicalNetFeatures`` (model/metrics/medicalnet.py) -- a Med3D ResNet with user-supplied
  weights, the extractor the HA-GAN paper uses for FID and MMD.

``PooledSlices`` is the 2D extractor of the slice-wise figures: a middle slice area-averaged to
16 x 16 (256 numbers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from model import families
from model.data.grid import resample

PLANES = ("axial", "coronal", "sagittal")


def middle_slices(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The middle axial [N, H, W], coronal [N, D, W] and sagittal [N, D, H] slices of [N, 1, D, H, W]
    (depth is the axial axis, height anterior-posterior, width left-right)."""
    d, h, w = x.shape[2:]
    return {"axial": x[:, 0, d // 2], "coronal": x[:, 0, :, h // 2], "sagittal": x[:, 0, :, :, w // 2]}


class PooledIntensity:
    """Fixed features: the volume area-averaged to ``size``^3."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.name = f"pooled{size}"
        self.description = (
            f"fixed features: each volume area-averaged to {size}^3 ({size**3} values in [-1, 1]); model-free, "
            "sensitive to coarse anatomy and intensity layout, blind to fine texture"
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool3d(x.float(), self.size).flatten(1).cpu()


class PooledSlices:
    """Fixed 2D features of a slice: area-averaged to ``size`` x ``size``."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.name = f"slice-pooled{size}"
        self.description = (
            f"fixed 2D features: the middle slice area-averaged to {size}x{size} ({size * size} values); these are "
            "not Inception features, so the slice-wise Frechet distances are not FIDs"
        )

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(s.float()[:, None], self.size).flatten(1).cpu()


AMORTISED_ENCODERS = families.with_encoder("amortised")


class EncoderFeatures:
    """The latent code of a trained voxgen model with an amortised encoder."""

    def __init__(self, model: Any, path: str | os.PathLike | None = None) -> None:
        if model.family not in AMORTISED_ENCODERS:
            raise ValueError(
                f"a reference encoder must be an amortised encoder ({', '.join(AMORTISED_ENCODERS)}); "
                f"{model.family} encodes by projection, an optimisation that is not a fixed feature map"
            )
        self.model = model
        self.name = f"encoder-{model.family}"
        where = f" at {path}" if path else ""
        self.description = (
            f"learned 3D features: the {model.latent_dim}-d latent code of the {model.family} encoder{where} "
            f"(input resampled to its {'x'.join(map(str, model.output_shape))} grid)"
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = resample(x.float(), self.model.output_shape)
        return self.model.encode(v, steps=0).float().cpu()  # the encoder alone: a fixed feature map
