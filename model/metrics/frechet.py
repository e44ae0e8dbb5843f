"""Frechet distance between Gaussians fitted to two sets of feature vectors (the FID formula).

``FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.  The trace of the matrix square
root is computed as the sum of the square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``
(symmetric positive semi-definite, float64 ``eigh``), which is stable when a covariance is
rank-deficient.  With fewer samples than feature dimensions (the usual case: 64 volumes, 2048
Inception features) the same value is computed exactly from the small matrices instead: with
``A`` and ``B`` the centred features divided by ``sqrt(n - 1)`` (so ``S_a = A^T A``),
``tr(S_a) = ||A||_F^2`` and ``tr((S_a S_b)^(1/2)) = ||A B^T||_*`` (the nonzero eigenvalues of
``S_a S_b`` are the squared singular values of ``A B^T``), at O(m n d) cost.  The value
depends on the feature extractor: numbers from different extractors are not comparable.
"""

from __future__ import annotations

import torch


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d] and unbiased covariance [d, d] (float64) of the rows of ``x`` [n, d]."""
    x = torch.as_tensor(x).flatten(1).double()
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 samples")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_stats(mu_a: torch.Tensor, s_a: torch.Tensor, mu_b: torch.Tensor, s_b: torch.Tensor) -> float:
    ra = _sqrt_psd(s_a.double())
    m = ra @ s_b.double() @ ra
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d = float(((mu_a.double() - mu_b.double()) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_sqrt)
    return max(d, 0.0)


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 samples")
    mu = x.mean(0)
    return mu, (x - mu) / (len(x) - 1) ** 0.5


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between feature sets ``a`` [m, d] and ``b`` [n, d] (m, n >= 2)."""
    a, b = torch.as_tensor(a).flatten(1), torch.as_tensor(b).flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))
    (mu_a, ca), (mu_b, cb) = _centred(a), _centred(b)
    nuclear = torch.linalg.svdvals(ca @ cb.T).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + (ca**2).sum() + (cb**2).sum() - 2 * nuclear)
    return max(d, 0.0)
