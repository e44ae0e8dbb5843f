"""One resampler for model-space volumes: from the cube R^3 that ``voxgen prepare`` and
``to_model_space`` make (in [-1, 1]) to the grid a network or a metric works on.

The scan -> model-space step (physical units, the model's spacing and field of view) is
``model.data.preprocess``; this module is the second, purely grid-to-grid step, and every caller
uses it the same way in training and serving:

* the style-based families (training data and projection targets: ``shape`` = (D, H, W));
* alpha-WGAN-GP (its 64^3 grid, in training and when encoding);
* the evaluation's features and the training quality monitor.

Rule: area averaging (the mean of the source voxels each target voxel covers; ``avg_pool`` where
every axis shrinks by a whole factor) when no axis grows, linear interpolation (align_corners=False)
otherwise.  Shrinking by averaging low-passes before it subsamples, so a downsampled volume does not
alias.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[N, C, *S] -> [N, C, *shape] (2 or 3 spatial axes), float32; ``x`` itself (as float32) when
    it already has ``shape``."""
    x = x.float()
    shape = tuple(int(s) for s in shape)
    src = tuple(x.shape[2:])
    if src == shape:
        return x
    if len(shape) != x.ndim - 2 or len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"cannot resample a {x.ndim - 2}D grid {list(src)} to {list(shape)}")
    if all(t <= s for t, s in zip(shape, src, strict=True)):
        if all(s % t == 0 for t, s in zip(shape, src, strict=True)):
            k = tuple(s // t for t, s in zip(shape, src, strict=True))
            return F.avg_pool3d(x, k) if len(shape) == 3 else F.avg_pool2d(x, k)
        return F.interpolate(x, size=shape, mode="area")
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(x, size=shape, mode=mode, align_corners=False)


def volume_to_grid(v: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """One (R, R, R) model-space array (e.g. a float16 memory map) -> (D, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.asarray(v, dtype=np.float32))[None, None]
    return resample(t, shape)[0, 0].clamp_(-1.0, 1.0).numpy()


def grid_spacing(cube_spacing: tuple[float, float, float], cube: int, shape: tuple[int, int, int]) -> tuple[float, ...]:
    """Voxel size (x, y, z mm) on ``shape`` = (D, H, W) of a cube R^3 whose voxels measure
    ``cube_spacing`` (x, y, z): the field of view is kept, so each axis scales by R / size."""
    d, h, w = shape
    sx, sy, sz = cube_spacing
    return (sx * cube / w, sy * cube / h, sz * cube / d)
