"""A fixed bank of texture, intensity and shape features per volume: the default 3D features of
``voxgen evaluate``.  Nothing here is learned, so the features never come from the model being
judged, and each group responds to a failure that pooled voxels miss:

* multi-scale gradient magnitude (after Gaussian smoothing by sigma 0, 1 and 2 voxels): mean,
  standard deviation and 90th percentile inside the foreground -- blur lowers them;
* band-pass energy: mean |G_a x - G_b x| for (a, b) = (0, 1), (1, 2), (2, 4) voxels and the mean
  absolute 6-neighbour Laplacian -- high-frequency detail (sulci, the cortical ribbon);
* the radially averaged power spectrum in 8 bands of width 1/16 cycle per voxel, each as log10 of
  its share of the total power -- the spectrum's shape, independent of contrast;
* block-boundary ratios: along each axis, the log ratio of the largest to the smallest mean
  absolute neighbour difference among the index phases modulo 2 and modulo 4 (about 0 for real
  data; large for nearest-neighbour upsampled, blocky or checkerboard volumes);
* the intensity histogram inside the foreground (16 bins over [-0.95, 1], square-rooted shares),
  the foreground's mean and standard deviation -- contrast and intensity shifts;
* foreground volume fraction, centroid (3) and the square roots of the eigenvalues of its
  coordinates' covariance (3) -- size, position and elongation.

Volumes are model space ([-1, 1], background at -1) on the evaluation grid; the foreground is
every voxel above -0.95.  52 numbers per volume; ``names()`` lists them.  Evaluate standardises
each feature by the real set's mean and standard deviation before taking distances.
"""

from __future__ import annotations

import math

import torch

from model.data.preprocess import gaussian_blur

FOREGROUND = -0.95
__all__ = ["TextureBank", "gaussian_blur", "names"]
GRAD_SIGMAS = (0.0, 1.0, 2.0)
DOG_SIGMAS = (0.0, 1.0, 2.0, 4.0)
SPECTRUM_BANDS = 8
HIST_BINS = 16
BLOCK_PERIODS = (2, 4)
_QUANTILE_MAX = 1 << 22  # torch.quantile's input limit is 2^24; larger sets are strided


def names() -> list[str]:
    """The feature names, in the order of ``TextureBank``'s columns."""
    out = []
    for s in GRAD_SIGMAS:
        out += [f"grad_s{s:g}_mean", f"grad_s{s:g}_std", f"grad_s{s:g}_p90"]
    out += [f"band_{a:g}_{b:g}" for a, b in zip(DOG_SIGMAS[:-1], DOG_SIGMAS[1:], strict=True)] + ["laplacian"]
    out += [f"spectrum_band{i}" for i in range(SPECTRUM_BANDS)]
    out += [f"block{p}_{ax}" for p in BLOCK_PERIODS for ax in "dhw"]
    out += [f"hist{i:02d}" for i in range(HIST_BINS)] + ["fg_mean", "fg_std"]
    out += ["fg_fraction", "centroid_d", "centroid_h", "centroid_w", "extent_1", "extent_2", "extent_3"]
    return out


def _masked_stats(v: torch.Tensor, m: torch.Tensor) -> list[float]:
    sel = v[m]
    if sel.numel() < 2:
        return [0.0, 0.0, 0.0]
    q = sel if sel.numel() <= _QUANTILE_MAX else sel[:: sel.numel() // _QUANTILE_MAX + 1]
    return [float(sel.mean()), float(sel.std()), float(torch.quantile(q, 0.9))]


def _spectrum(x: torch.Tensor) -> list[float]:
    d, h, w = x.shape
    p = torch.fft.rfftn(x - x.mean()).abs().square()
    fd = torch.fft.fftfreq(d)[:, None, None]
    fh = torch.fft.fftfreq(h)[None, :, None]
    fw = torch.fft.rfftfreq(w)[None, None, :]
    r = (fd * fd + fh * fh + fw * fw).sqrt()
    total = float(p.sum()) + 1e-12
    edges = torch.linspace(0, 0.5, SPECTRUM_BANDS + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = float(p[(r >= lo) & (r < hi)].sum())
        out.append(math.log10(band / total + 1e-12))
    return out


def _block_ratios(x: torch.Tensor, m: torch.Tensor) -> list[float]:
    out = []
    for p in BLOCK_PERIODS:
        for axis in range(3):
            n = x.shape[axis]
            diff = (x.narrow(axis, 1, n - 1) - x.narrow(axis, 0, n - 1)).abs()
            inside = m.narrow(axis, 1, n - 1) & m.narrow(axis, 0, n - 1)
            means = []
            for j in range(p):
                idx = torch.arange(j, n - 1, p)
                dj, mj = diff.index_select(axis, idx), inside.index_select(axis, idx)
                means.append(float(dj[mj].mean()) if mj.any() else 0.0)
            out.append(math.log((max(means) + 1e-3) / (min(means) + 1e-3)))
    return out


def _shape(m: torch.Tensor) -> list[float]:
    """Foreground fraction, centroid and extents from coordinate moments (no coordinate lists)."""
    d, h, w = m.shape
    mf = m.double()
    total = float(mf.sum())
    if total < 4:
        return [total / m.numel(), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    cz, cy, cx = (torch.linspace(-1, 1, n, dtype=torch.float64) for n in (d, h, w))
    p_zy, p_zx, p_yx = mf.sum(2), mf.sum(1), mf.sum(0)
    pz, py, px = p_zy.sum(1), p_zy.sum(0), p_zx.sum(0)
    mu = [float((pz * cz).sum()) / total, float((py * cy).sum()) / total, float((px * cx).sum()) / total]
    ezz, eyy, exx = ((p * c * c).sum() / total for p, c in ((pz, cz), (py, cy), (px, cx)))
    ezy = (p_zy * cz[:, None] * cy[None, :]).sum() / total
    ezx = (p_zx * cz[:, None] * cx[None, :]).sum() / total
    eyx = (p_yx * cy[:, None] * cx[None, :]).sum() / total
    e2 = torch.stack([torch.stack([ezz, ezy, ezx]), torch.stack([ezy, eyy, eyx]), torch.stack([ezx, eyx, exx])])
    mv = torch.tensor(mu, dtype=torch.float64)
    cov = e2 - mv[:, None] * mv[None, :]
    ext = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().flip(0)
    return [total / m.numel(), *mu, *(float(v) for v in ext)]


def _one(x: torch.Tensor) -> list[float]:
    """The 52 features of one volume [D, H, W]."""
    m = x > FOREGROUND
    inner = m[1:-1, 1:-1, 1:-1]
    feats: list[float] = []
    blurred = {s: gaussian_blur(x[None, None], s)[0, 0] for s in sorted(set(GRAD_SIGMAS) | set(DOG_SIGMAS))}
    for s in GRAD_SIGMAS:
        b = blurred[s]
        gd = (b[2:, 1:-1, 1:-1] - b[:-2, 1:-1, 1:-1]) / 2
        gh = (b[1:-1, 2:, 1:-1] - b[1:-1, :-2, 1:-1]) / 2
        gw = (b[1:-1, 1:-1, 2:] - b[1:-1, 1:-1, :-2]) / 2
        feats += _masked_stats((gd * gd + gh * gh + gw * gw).sqrt(), inner)
    for a, b in zip(DOG_SIGMAS[:-1], DOG_SIGMAS[1:], strict=True):
        dog = (blurred[a] - blurred[b]).abs()
        feats.append(float(dog[m].mean()) if m.any() else 0.0)
    c = x[1:-1, 1:-1, 1:-1]
    lap = (
        (x[2:, 1:-1, 1:-1] + x[:-2, 1:-1, 1:-1] + x[1:-1, 2:, 1:-1] + x[1:-1, :-2, 1:-1] + x[1:-1, 1:-1, 2:])
        + x[1:-1, 1:-1, :-2]
        - 6 * c
    )
    feats.append(float(lap.abs()[inner].mean()) if inner.any() else 0.0)
    feats += _spectrum(x)
    feats += _block_ratios(x, m)
    fg = x[m]
    if fg.numel():
        hist = torch.histc(fg.clamp(FOREGROUND, 1.0), bins=HIST_BINS, min=FOREGROUND, max=1.0)
        feats += (hist / hist.sum()).sqrt().tolist()
        feats += [float(fg.mean()), float(fg.std()) if fg.numel() > 1 else 0.0]
    else:
        feats += [0.0] * (HIST_BINS + 2)
    feats += _shape(m)
    return feats


class TextureBank:
    """Fixed texture, intensity and shape features (see the module docstring): [N, 52] float32."""

    name = "texture"
    description = (
        "fixed, model-free features per volume (52): multi-scale gradient magnitude, band-pass and Laplacian "
        "energy, the radially averaged power spectrum in 8 bands, block-boundary ratios (mod 2 and 4, per axis), "
        "the foreground intensity histogram, mean and spread, foreground volume, centroid and extents; "
        "standardised by the real set's mean and standard deviation"
    )
    standardise = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu()
        with torch.no_grad():
            rows = [_one(v[0]) for v in x]
        return torch.tensor(rows, dtype=torch.float32)
