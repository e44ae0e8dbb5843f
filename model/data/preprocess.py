"""The one preprocessing path from a scan in physical units to a model's cube, and back.

``prepare`` (training data), ``encode``, ``reconstruct``, ``/encode`` and ``fit-direction
--source encode`` all call ``to_model_space`` (model/data/volumes.py) with the model's cube
(``config.cube()``, model/config_base.py: the R^3 grid, voxel size, intensity and preprocessing the
training data were prepared with), which takes this path where ``preprocess.mode = "physical"``:

1. intensity window of the config: CT clipped to [lo, hi] HU and mapped to [-1, 1]; MRI scaled
   so that the 99.9th percentile of its positive voxels is 1 (then [0, 1] -> [-1, 1], clipped);
2. the scan is already RAS (``read_volume`` reorients it); it is resampled to the model's voxel
   spacing (trilinear, with a Gaussian anti-alias of sigma (factor - 1) / 2 input voxels along
   every axis that shrinks), never stretched: the brain keeps its physical size;
3. the model's field of view (resolution x spacing) is centred on the middle of the foreground's
   extent (the 0.5th to 99.5th percentile of its voxel coordinates along each axis, so stray noise
   voxels do not move it) and cropped / padded with background.

``info`` receives the mapping between the cube and the input's voxel grid, so a reconstruction
can be put back onto the input's grid (``to_input_grid``: from the cube, or from a network's grid
resampled from it).  A family whose network works on another grid (alpha-WGAN-GP, the style-based
ones) resamples the cube to it with ``model.data.grid.resample``, in training and serving alike.
Models trained by the authors' recipe (``mode = "stretch"``, the default of older configs) keep
their preprocessing: blank axial slices trimmed and the rest resized to the cube, aspect ratio lost.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PHYSICAL, STRETCH = "physical", "stretch"
# model-space foreground thresholds: 5% of the MRI scale, -618 HU on the default CT window
FOREGROUND = {"mri": -0.9, "ct": -0.5}


def _kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float | tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian smoothing of [N, 1, D, H, W] by ``sigma`` voxels (one value, or one per
    axis D, H, W; 0 leaves that axis alone), with replicated borders."""
    sig = (float(sigma),) * 3 if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    y = x.float()
    for axis, s in enumerate(sig):
        if s <= 0:
            continue
        k = _kernel(s).to(y.device)
        r = (len(k) - 1) // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y


def cube_of(config: Any) -> Any:
    """What the preprocessing reads from a model's config: its cube (``config.cube()``,
    ``model.config_base.Cube``: resolution, spacing, modality, intensity, preprocess); an object
    without ``cube`` that has those attributes itself is used as it is."""
    cube = getattr(config, "cube", None)
    return cube() if callable(cube) else config


def options(config: Any) -> dict[str, Any]:
    """The config's preprocessing record (``{"mode": "stretch"}`` for configs that predate it)."""
    p = getattr(config, "preprocess", None) or {}
    return {"mode": STRETCH} | dict(p)


def window(array: np.ndarray, config: Any, copy: bool = True) -> np.ndarray:
    """Physical units -> model space [-1, 1] (float32), NaN to the background; a new array, or
    ``array`` itself overwritten when it is float32 and ``copy`` is False."""
    from model.data.volumes import VolumeError

    a = np.asarray(array, dtype=np.float32)
    if config.modality == "ct":
        lo, hi = float(config.intensity.lo), float(config.intensity.hi)
        v = np.nan_to_num(a, copy=copy, nan=lo, posinf=hi, neginf=lo)
        np.clip(v, lo, hi, out=v)
        v -= lo
        v *= 2.0 / (hi - lo)
        v -= 1.0
        return v
    v = np.nan_to_num(a, copy=copy, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(v, 0.0, None, out=v)
    pos = v[v > 0]
    if pos.size == 0:
        raise VolumeError("the MRI volume is blank (no positive voxel); expected non-negative intensities")
    if pos.size > 1 << 22:  # a strided subsample is plenty for a percentile, and bounds the memory
        pos = pos[:: pos.size // (1 << 22) + 1]
    top = float(np.percentile(pos, 99.9))
    if not top > 0:
        raise VolumeError("the MRI volume is blank (its 99.9th percentile is 0)")
    np.clip(v, 0.0, top, out=v)
    v *= 2.0 / top
    v -= 1.0
    return v


def foreground_centre(v: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """The middle of the foreground's extent (voxel index z, y, x): along each axis, halfway between
    the 0.5th and 99.5th percentiles of the foreground voxels' coordinates."""
    from model.data.volumes import VolumeError

    fg = v > threshold
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        counts = fg.sum(axis=other).astype(np.float64)
        total = counts.sum()
        if total == 0:
            raise VolumeError("the volume is blank after windowing (no voxel above the background)")
        cdf = np.cumsum(counts) / total
        lo, hi = np.searchsorted(cdf, 0.005), np.searchsorted(cdf, 0.995)
        centre.append((float(lo) + float(hi)) / 2)
    return centre[0], centre[1], centre[2]


def foreground_extent_mm(v: np.ndarray, spacing: tuple[float, float, float], threshold: float) -> list[float]:
    """The foreground's extent in mm along x, y, z (0.5th to 99.5th percentile of its coordinates)."""
    fg = v > threshold
    ext = []
    for axis, sp in zip((2, 1, 0), spacing, strict=True):
        other = tuple(a for a in range(3) if a != axis)
        counts = fg.sum(axis=other).astype(np.float64)
        if counts.sum() == 0:
            return [0.0, 0.0, 0.0]
        cdf = np.cumsum(counts) / counts.sum()
        ext.append(float(np.searchsorted(cdf, 0.995) - np.searchsorted(cdf, 0.005) + 1) * float(sp))
    return ext


def auto_spacing(extents_mm: list[list[float]], resolution: int, margin: float = 1.25) -> float:
    """An isotropic voxel size whose field of view (resolution x spacing) holds the largest
    foreground extent of the data times ``margin`` (room for the training augmentation's scale of
    up to 1.15 and shifts), rounded up to 0.05 mm."""
    largest = max(max(e) for e in extents_mm)
    return math.ceil(largest * margin / resolution * 20) / 20


def _resample_axis(x: torch.Tensor, axis: int, pos: torch.Tensor, fill: float) -> torch.Tensor:
    """Linear interpolation of ``x`` [D, H, W] along ``axis`` at fractional indices ``pos``;
    positions outside [0, n - 1] take ``fill``."""
    n = x.shape[axis]
    padded = F.pad(x.movedim(axis, -1), (1, 1), value=fill)  # index i -> i + 1
    p = (pos + 1).clamp(0, n + 1)
    i0 = p.floor().long().clamp(0, n)
    w = (p - i0).to(x.dtype)
    a, b = padded.index_select(-1, i0), padded.index_select(-1, i0 + 1)
    return (a + (b - a) * w).movedim(-1, axis)


def _positions(n_out: int, centre_out: float, centre_in: float, ratio: float) -> torch.Tensor:
    """Fractional input indices of output voxels 0..n_out-1: in = centre_in + (out - centre_out) * ratio."""
    return centre_in + (torch.arange(n_out, dtype=torch.float64) - centre_out) * ratio


def physical(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    config: Any,
    info: dict[str, Any] | None = None,
    copy: bool = True,
) -> np.ndarray:
    """A RAS scan (z, y, x) with voxel size ``spacing`` (x, y, z mm) -> the model's cube (R, R, R)
    float32 in [-1, 1]: window, anti-alias, resample to the cube's spacing, centre the field of
    view on the foreground and crop / pad (see the module docstring).  ``info`` receives
    ``grid_spacing`` (the cube's), the centre (input voxel index), the input shape and spacing.
    ``copy=False`` lets the windowing overwrite a float32 ``array`` (no second full-size copy)."""
    from model.data.volumes import VolumeError

    config = cube_of(config)
    a = np.asarray(array)
    if a.ndim != 3 or a.size == 0:
        raise VolumeError(f"expected a non-empty 3D array (z, y, x), got shape {a.shape}")
    v = window(a, config, copy=copy)
    opts = options(config)
    thr = float(opts.get("foreground", FOREGROUND.get(config.modality, -0.9)))
    centre = foreground_centre(v, thr)
    r = int(config.resolution)
    src = (float(spacing[2]), float(spacing[1]), float(spacing[0]))  # z, y, x
    dst = (float(config.spacing[2]), float(config.spacing[1]), float(config.spacing[0]))
    ratio = [d / s for d, s in zip(dst, src, strict=True)]  # input voxels per model voxel
    t = torch.from_numpy(v)
    sig = tuple(max(0.0, (k - 1) / 2) for k in ratio)
    if any(s > 0 for s in sig):
        t = gaussian_blur(t[None, None], sig)[0, 0]
    for axis in range(3):
        t = _resample_axis(t, axis, _positions(r, (r - 1) / 2, centre[axis], ratio[axis]), -1.0)
    if info is not None:
        info.update(
            grid_spacing=[float(s) for s in config.spacing],
            centre_index=[float(c) for c in centre],
            input_shape=[int(s) for s in a.shape],
            input_spacing=[float(s) for s in spacing],
        )
    return t.clamp_(-1.0, 1.0).numpy().astype(np.float32, copy=False)


def to_input_grid(v_model: np.ndarray, info: dict[str, Any], config: Any) -> np.ndarray:
    """The inverse resampling: a model-space volume -> the input's voxel grid (z, y, x, RAS),
    trilinear; voxels outside the model's field of view take the background (-1).  ``v_model`` is
    the cube (R, R, R) or a grid (D, H, W) that ``model.data.grid.resample`` made from it (a
    network's): both span the cube's field of view with their voxel centres where resample puts
    them, so a voxel along an axis of n measures the cube's spacing x R / n, centred alike."""
    cube = cube_of(config)
    shape, centre = info["input_shape"], info["centre_index"]
    sp = info["input_spacing"]
    src = (float(sp[2]), float(sp[1]), float(sp[0]))
    cube_sp = (float(cube.spacing[2]), float(cube.spacing[1]), float(cube.spacing[0]))
    t = torch.from_numpy(np.ascontiguousarray(v_model, dtype=np.float32))
    size, r = tuple(t.shape), int(cube.resolution)
    for axis in range(3):
        n = size[axis]
        dst = cube_sp[axis] if n == r else cube_sp[axis] * r / n  # mm per voxel of v_model
        ratio = src[axis] / dst  # model voxels per input voxel
        pos = (n - 1) / 2 + (torch.arange(shape[axis], dtype=torch.float64) - centre[axis]) * ratio
        t = _resample_axis(t, axis, pos, -1.0)
    return t.numpy()
