"""Maximum mean discrepancy between two sets of feature vectors.

Two estimators, as the papers use them:

* ``mmd2`` -- the kernel two-sample statistic of Gretton et al. (JMLR 2012) with a Gaussian
  kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``.  By default ``sigma`` is the median
  pairwise Euclidean distance among the *reference* (real) set (the median heuristic), so every
  model compared with the same real set is measured with the same kernel.  The unbiased
  estimator (U-statistic, diagonal terms left out) is the default; it can be slightly negative
  when the two sets come from the same distribution.  ``unbiased=False`` gives the V-statistic,
  which is exactly 0 for identical sets.  With the bandwidth fixed by the real set, a model whose
  samples all lie far from the real ones (at that scale) gets k(gen, real) ~ 0, and MMD^2 saturates
  at mean k(real, real') + mean k(gen, gen'): it then mostly says how alike the generated samples
  are to each other, so compare such models by the Frechet distance instead.
* ``batch_mmd2`` -- the batch-wise MMD^2 with a dot-product kernel of Kwon et al. (MICCAI 2019)
  and Hong et al. (3D-StyleGAN): for a batch of B generated and B real flattened volumes,
  ``|sum g.g' + sum r.r' - 2 sum g.r| / B^2``, which equals ``||mean(g) - mean(r)||^2``;
  averaged over batches.  It is a sum over voxels, so its scale grows with the grid size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], float64, never negative."""
    a, b = a.double(), b.double()
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_min_(0.0)


def median_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: median Euclidean distance between distinct rows of ``x``."""
    x = torch.as_tensor(x).flatten(1)
    if len(x) < 2:
        raise ValueError("the median heuristic needs at least 2 samples")
    d2 = _sq_dists(x, x)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    med = float(d2[iu[0], iu[1]].median().sqrt())
    return med if med > 0 else 1.0


def mmd2(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, unbiased: bool = True
) -> tuple[float, float]:
    """MMD^2 between rows of ``x`` [m, d] and ``y`` [n, d] (Gaussian kernel); returns (value, sigma).

    ``bandwidth`` None: the median pairwise distance among ``y`` (pass the real set as ``y``).
    """
    x, y = torch.as_tensor(x).flatten(1), torch.as_tensor(y).flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD^2 needs at least 2 samples per set, got {m} and {n}")
    sigma = float(bandwidth) if bandwidth is not None else median_bandwidth(y)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be positive, got {sigma}")
    g = 1.0 / (2.0 * sigma * sigma)
    kxx = torch.exp(-g * _sq_dists(x, x))
    kyy = torch.exp(-g * _sq_dists(y, y))
    kxy = torch.exp(-g * _sq_dists(x, y))
    if unbiased:
        txx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        tyy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    else:
        txx, tyy = kxx.mean(), kyy.mean()
    return float(txx + tyy - 2.0 * kxy.mean()), sigma


def batch_mmd2_single(g: torch.Tensor, r: torch.Tensor) -> float:
    """Kwon et al.'s batch MMD^2 (dot-product kernel) of one batch of generated ``g`` and real ``r``."""
    g, r = g.flatten(1).double(), r.flatten(1).double()
    if g.shape != r.shape:
        raise ValueError(f"batches must have the same shape, got {list(g.shape)} and {list(r.shape)}")
    b = len(g)
    total = (g @ g.T).sum() + (r @ r.T).sum() - 2.0 * (g @ r.T).sum()
    return float(total.abs() / (b * b))


def batch_mmd2_from_means(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Batch MMD^2 values from (mean of the generated batch, mean of the real batch) pairs:
    ``||mean(g) - mean(r)||^2`` equals the dot-product form above, with memory for two vectors."""
    return [float(((mg.double() - mr.double()) ** 2).sum()) for mg, mr in pairs]


def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kernel Inception Distance's estimator (Binkowski et al., ICLR 2018) on any features: the
    unbiased MMD^2 with the polynomial kernel ``k(a, b) = (a.b / d + 1)^3`` between the rows of
    ``x`` [m, d] and ``y`` [n, d] (m, n >= 2).  Unbiased at every sample size: its expectation is 0
    for two samples of one distribution, so small sets do not inflate it as they do the Frechet
    distance; it can be slightly negative."""
    x, y = torch.as_tensor(x).flatten(1).double(), torch.as_tensor(y).flatten(1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    txx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    tyy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(txx + tyy - 2.0 * kxy.mean())
