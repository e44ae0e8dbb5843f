"""Bringing volumes to a style-based model's grid.

Prepared datasets (``voxgen prepare``) and input scans (``to_model_space``) are cubes R^3 in
[-1, 1]; this family works on a grid ``shape = (D, H, W)`` that is usually smaller and not a cube
(32x64x64).  ``resample`` maps one onto the other: area averaging (the mean of the source voxels
each target voxel covers) when every axis shrinks, trilinear interpolation otherwise.  Training
and projection use the same function, so a scan is seen by ``encode`` as the training volumes
were seen by the discriminator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[N, C, *S] -> [N, C, *shape] (2 or 3 spatial axes), float32; the input is returned as
    float32 when it already has ``shape``."""
    x = x.float()
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if len(shape) != x.ndim - 2:
        raise ValueError(f"cannot resample a {x.ndim - 2}D grid {list(x.shape[2:])} to {list(shape)}")
    if all(t <= s for t, s in zip(shape, x.shape[2:], strict=True)):
        return F.interpolate(x, size=shape, mode="area")
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(x, size=shape, mode=mode, align_corners=False)


def volume_to_grid(v: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """One (R, R, R) model-space array (e.g. float16 memory map) -> (D, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.asarray(v, dtype=np.float32))[None, None]
    return resample(t, shape)[0, 0].clamp_(-1.0, 1.0).numpy()


def grid_spacing(cube_spacing: tuple[float, float, float], cube: int, shape: tuple[int, int, int]) -> tuple[float, ...]:
    """Voxel size (x, y, z mm) on ``shape`` = (D, H, W) of a cube R^3 whose voxels measure
    ``cube_spacing`` (x, y, z): the field of view is kept, so each axis scales by R / size."""
    d, h, w = shape
    sx, sy, sz = cube_spacing
    return (sx * cube / w, sy * cube / h, sz * cube / d)
