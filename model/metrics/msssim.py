"""3D multi-scale structural similarity (MS-SSIM, Wang, Simoncelli & Bovik 2003) and the diversity
figure of Kwon et al. and 3D-StyleGAN: the mean MS-SSIM over pairs of volumes of one set.

At each scale, SSIM statistics come from a separable Gaussian window (sigma 1.5, 11 taps, applied
'valid' along depth, height and width, in float32); the window is shortened (to an odd size) where a scale is
smaller than 11 voxels.  Between scales the volume is average-pooled by 2.  The number of scales is
``min(5, 1 + floor(log2(min_side / 4)))`` (5 at 64^3 and above) with Wang et al.'s weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), renormalised when fewer scales fit.  Contrast-structure
terms of the coarser scales and the SSIM of the coarsest are clamped at 0 before the powers.
``data_range`` is 2 for model-space volumes in [-1, 1].  MS-SSIM(x, x) = 1 exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gauss(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """[n, n - k + 1] matrix whose columns are the window at each 'valid' position."""
    k = len(g)
    m = torch.zeros(n, n - k + 1, dtype=g.dtype, device=g.device)
    for j in range(n - k + 1):
        m[j : j + k, j] = g
    return m


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of [..., D, H, W] along the three axes, as three
    products with banded matrices (several times faster than conv3d on the CPU)."""
    d, h, w = x.shape[-3:]
    x = x @ _band(w, g)
    x = (x.transpose(-1, -2) @ _band(h, g)).transpose(-1, -2)
    return (x.transpose(-1, -3) @ _band(d, g)).transpose(-1, -3)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my, exx, eyy, exy = _blur(torch.stack([x, y, x * x, y * y, x * y]), g)
    mx2, my2, mxy = mx * mx, my * my, mx * my
    cs = (2 * (exy - mxy) + c2) / ((exx - mx2) + (eyy - my2) + c2)
    ssim = (2 * mxy + c1) / (mx2 + my2 + c1) * cs
    return ssim.flatten(1).double().mean(1), cs.flatten(1).double().mean(1)


def n_scales(shape: tuple[int, ...]) -> int:
    """Scales used for a volume of this (D, H, W) shape."""
    side = min(shape)
    if side < 4:
        raise ValueError(f"MS-SSIM needs at least 4 voxels per axis, got {tuple(shape)}")
    return min(len(WEIGHTS), 1 + int(math.floor(math.log2(side / 4))))


def ms_ssim_3d(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """MS-SSIM of volume pairs: ``x``, ``y`` [N, 1, D, H, W] (or [D, H, W]) -> [N] (float64)."""
    if x.shape != y.shape:
        raise ValueError(f"volumes must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    if x.ndim == 3:
        x, y = x[None, None], y[None, None]
    if x.ndim != 5:
        raise ValueError(f"expected [N, C, D, H, W] or [D, H, W], got {list(x.shape)}")
    x, y = x.float(), y.float()  # float32 filtering; the per-scale means are taken in float64
    s = n_scales(tuple(x.shape[2:]))
    w = torch.tensor(WEIGHTS[:s], dtype=torch.float64)
    w = w / w.sum()
    out = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    w = w.to(x.device)
    for i in range(s):
        size = min(win, min(x.shape[2:]))
        size -= 1 - size % 2  # odd
        ssim, cs = _ssim_cs(x, y, _gauss(size, sigma, x.device, x.dtype), data_range)
        if i < s - 1:
            out = out * cs.clamp_min(0) ** w[i]
            x = F.avg_pool3d(x, 2, ceil_mode=True)
            y = F.avg_pool3d(y, 2, ceil_mode=True)
        else:
            out = out * ssim.clamp_min(0) ** w[i]
    return out


def pairwise_ms_ssim(volumes: torch.Tensor, max_pairs: int | None = None, **kw: float) -> list[float]:
    """MS-SSIM of unordered pairs of the volumes [N, 1, D, H, W]: every pair, or the first
    ``max_pairs`` taken in order of index distance ((0, 1), (1, 2), ..., then (0, 2), ...)."""
    n = volumes.shape[0]
    pairs = [(i, i + d) for d in range(1, n) for i in range(n - d)]
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    return [float(ms_ssim_3d(volumes[i : i + 1], volumes[j : j + 1], **kw)[0]) for i, j in pairs]


def mean_pairwise_ms_ssim(chunks: Iterable[torch.Tensor], **kw: float) -> dict[str, float | int]:
    """Diversity over a set given in chunks: MS-SSIM of every pair within each chunk, pooled.

    Every pair is two independent draws, so the mean estimates the expected MS-SSIM between two
    samples of the set; lower means more diverse."""
    vals: list[float] = []
    for c in chunks:
        vals += pairwise_ms_ssim(c, **kw)
    if not vals:
        raise ValueError("MS-SSIM diversity needs at least one pair of volumes")
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "pairs": len(vals)}
