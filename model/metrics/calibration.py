"""Known-bad versions of real volumes, to check that an evaluation ranks them below real data.

``degrade(x, kind)`` takes model-space volumes [N, 1, D, H, W] ([-1, 1], background -1) and
returns a degraded copy:

* ``blur1`` / ``blur2`` -- Gaussian blur by sigma 1 / 2 voxels (lost sulci and cortical ribbon);
* ``blocky`` -- 2x area-averaged, then nearest-neighbour upsampled back (2-voxel blocks, as a
  generator with a checkerboard or a low-resolution branch produces);
* ``shift`` -- the foreground's intensities shifted by +0.2 (a contrast / calibration error);
* ``collapse`` -- every volume replaced by the first one (a generator that ignores its latent).

``benchmarks/eval_calibration.py`` scores these against real templates; tests/test_evaluate.py
scores them on volumes the test makes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.metrics.texture import FOREGROUND, gaussian_blur

KINDS = ("blur1", "blur2", "blocky", "shift", "collapse")


def degrade(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A degraded copy of ``x`` [N, 1, D, H, W] (see the module docstring for ``kind``)."""
    x = x.float()
    if kind in ("blur1", "blur2"):
        return gaussian_blur(x, float(kind[-1])).clamp(-1, 1)
    if kind == "blocky":
        if any(s % 2 for s in x.shape[2:]):
            raise ValueError(f"blocky needs even sizes, got {list(x.shape[2:])}")
        return F.interpolate(F.avg_pool3d(x, 2), scale_factor=2, mode="nearest")
    if kind == "shift":
        return torch.where(x > FOREGROUND, (x + 0.2).clamp(-1, 1), x)
    if kind == "collapse":
        return x[:1].expand_as(x).clone()
    raise ValueError(f"unknown degradation {kind!r}; use one of {', '.join(KINDS)}")
