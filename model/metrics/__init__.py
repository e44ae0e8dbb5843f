"""Evaluation metrics: MMD^2 and batch MMD^2, Frechet distance on features, 3D MS-SSIM diversity,
slice-wise figures, and ``voxgen evaluate`` (model/metrics/evaluate.py)."""

from model.metrics.frechet import frechet_distance
from model.metrics.mmd import batch_mmd2_single, median_bandwidth, mmd2
from model.metrics.msssim import mean_pairwise_ms_ssim, ms_ssim_3d

__all__ = ["batch_mmd2_single", "frechet_distance", "mean_pairwise_ms_ssim", "median_bandwidth", "mmd2", "ms_ssim_3d"]
