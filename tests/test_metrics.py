"""Metric code checked against known values: MMD^2, batch MMD^2, Frechet distance, 3D MS-SSIM,
resampling, middle slices, the embedding's fitted ellipses and MedicalNet weight loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.metrics.features import middle_slices, resample
from model.metrics.frechet import frechet_distance
from model.metrics.mmd import batch_mmd2_from_means, batch_mmd2_single, median_bandwidth, mmd2
from model.metrics.msssim import _blur, _gauss, mean_pairwise_ms_ssim, ms_ssim_3d, n_scales, pairwise_ms_ssim
from model.metrics.plots import ellipse, pca_2d


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- MMD^2
def test_mmd2_known_value_and_identical_sets() -> None:
    x = torch.zeros(2, 1)
    y = torch.ones(2, 1)
    # unbiased, two points per set: k_xx = k_yy = 1 (off-diagonal), k_xy = exp(-1 / (2 sigma^2))
    v, sigma = mmd2(x, y, bandwidth=1.0)
    assert sigma == 1.0 and v == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)
    a = torch.randn(30, 8, generator=_g())
    assert mmd2(a, a, unbiased=False)[0] == pytest.approx(0.0, abs=1e-12)
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [2.0]])) == pytest.approx(1.0)


def test_mmd2_same_distribution_near_zero_and_grows_with_the_shift() -> None:
    a = torch.randn(60, 16, generator=_g(1))
    b = torch.randn(60, 16, generator=_g(2))
    same, sigma = mmd2(a, b)
    assert sigma == pytest.approx(median_bandwidth(b))  # the bandwidth comes from the reference set
    shifted = [mmd2(a + s, b, bandwidth=sigma)[0] for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.02
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 5 * abs(same)


def test_batch_mmd2_is_the_squared_distance_of_batch_means() -> None:
    g = torch.randn(8, 1, 4, 4, 4, generator=_g(3)).double()
    r = torch.randn(8, 1, 4, 4, 4, generator=_g(4)).double()
    direct = batch_mmd2_single(g, r)
    assert direct == pytest.approx(float(((g.mean(0) - r.mean(0)) ** 2).sum()), rel=1e-9)
    assert batch_mmd2_from_means([(g.flatten(1).mean(0), r.flatten(1).mean(0))])[0] == pytest.approx(direct)
    assert batch_mmd2_single(g, g) == pytest.approx(0.0, abs=1e-9)
    assert batch_mmd2_single(g + 0.5, r) > direct


# ---------------------------------------------------------------------------------------- Frechet
def test_frechet_known_values() -> None:
    a = torch.randn(200, 5, generator=_g(5)).double()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a shift by c (same covariance): ||c||^2
    assert frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 5, rel=1e-6)
    # a scaled by 2 about its mean: tr(S + 4S - 2 * 2S) = tr(S)
    b = (a - a.mean(0)) * 2 + a.mean(0)
    cov = torch.cov(a.T)
    assert frechet_distance(a, b) == pytest.approx(float(torch.trace(cov)), rel=1e-6)
    # fewer samples than dimensions (rank-deficient covariances) still gives a finite value >= 0
    c, d = torch.randn(6, 40, generator=_g(6)), torch.randn(6, 40, generator=_g(7))
    v = frechet_distance(c, d)
    assert math.isfinite(v) and v > 0 and frechet_distance(c, c) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_of_a_volume_with_itself_is_one_and_falls_with_noise() -> None:
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, 32)] * 3, indexing="ij")
    v = (torch.sin(4 * x) * torch.cos(3 * y) + z).clamp(-1, 1)[None, None]
    assert float(ms_ssim_3d(v, v)[0]) == 1.0
    noisy = [v + s * torch.randn(v.shape, generator=_g(8)) for s in (0.05, 0.2, 0.8)]
    vals = [float(ms_ssim_3d(v, nv)[0]) for nv in noisy]
    assert 1.0 > vals[0] > vals[1] > vals[2] > 0.0
    assert float(ms_ssim_3d(noisy[1], v)[0]) == pytest.approx(vals[1], rel=1e-6)  # symmetric
    assert n_scales((64, 64, 64)) == 5 and n_scales((32, 64, 64)) == 4 and n_scales((8, 8, 8)) == 2


def test_separable_filter_equals_a_3d_convolution() -> None:
    g = _gauss(5, 1.5, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 1, 9, 10, 11, generator=_g(9))
    k3 = g[:, None, None] * g[None, :, None] * g[None, None, :]
    ref = F.conv3d(x, k3[None, None])
    assert torch.allclose(_blur(x, g), ref, atol=1e-6)


def test_pairwise_diversity_identical_set_is_one_and_noise_set_is_low() -> None:
    v = torch.rand(1, 1, 16, 16, 16, generator=_g(10)) * 2 - 1
    same = mean_pairwise_ms_ssim([v.repeat(3, 1, 1, 1, 1)])
    assert same["mean"] == pytest.approx(1.0) and same["pairs"] == 3
    diverse = mean_pairwise_ms_ssim([torch.rand(4, 1, 16, 16, 16, generator=_g(11)) * 2 - 1])
    assert diverse["pairs"] == 6 and diverse["mean"] < 0.5
    four = torch.rand(4, 1, 16, 16, 16, generator=_g(11)) * 2 - 1
    capped = pairwise_ms_ssim(four, max_pairs=3)  # (0, 1), (1, 2), (2, 3)
    assert capped == pytest.approx([float(ms_ssim_3d(four[i : i + 1], four[i + 1 : i + 2])[0]) for i in range(3)])


# ---------------------------------------------------------------------------------------- helpers
def test_resample_and_middle_slices() -> None:
    x = torch.arange(8 * 8 * 8, dtype=torch.float32).view(1, 1, 8, 8, 8)
    assert resample(x, (8, 8, 8)) is x
    assert torch.equal(resample(x, (4, 4, 4)), F.avg_pool3d(x, 2))  # area averaging for integer factors
    assert resample(x, (6, 6, 6)).shape == (1, 1, 6, 6, 6)
    v = torch.zeros(1, 1, 6, 8, 10)
    v[0, 0, 3] = 1.0  # the middle axial slice
    s = middle_slices(v)
    assert s["axial"].shape == (1, 8, 10) and s["coronal"].shape == (1, 6, 10) and s["sagittal"].shape == (1, 6, 8)
    assert float(s["axial"].min()) == 1.0 and float(s["coronal"][0, 3].min()) == 1.0


def test_embedding_ellipse_is_two_sigma() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5000, 2)) * np.array([3.0, 1.0]) + np.array([10.0, -2.0])
    e = ellipse(pts)
    assert np.abs(e[:, 0] - 10).max() == pytest.approx(6.0, rel=0.05)
    assert np.abs(e[:, 1] + 2).max() == pytest.approx(2.0, rel=0.05)
    emb, explained = pca_2d({"a": rng.normal(size=(20, 6)), "b": rng.normal(size=(10, 6)) + 3})
    assert emb["a"].shape == (20, 2) and emb["b"].shape == (10, 2)
    assert explained[0] >= explained[1] > 0
    assert abs(emb["a"][:, 0].mean() - emb["b"][:, 0].mean()) > 2  # the shifted group separates on PC1


# ---------------------------------------------------------------------------------------- MedicalNet
def test_medicalnet_weights_in_the_authors_layout_load_and_code_pickles_are_refused(tmp_path: Path) -> None:
    from model.metrics.medicalnet import Med3DResNet, MedicalNetFeatures

    torch.manual_seed(0)
    net = Med3DResNet([1, 1, 1, 1], bottleneck=False, shortcut="B").eval()  # ResNet-10
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    sd["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)  # the segmentation head is ignored
    torch.save({"state_dict": sd, "epoch": 5}, tmp_path / "resnet_10.pth")
    fx = MedicalNetFeatures(tmp_path / "resnet_10.pth", device="cpu")
    x = torch.rand(2, 1, 32, 32, 32, generator=_g(12))
    xs = (x - x.flatten(1).mean(1).view(-1, 1, 1, 1, 1)) / x.flatten(1).std(1).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(fx(x), net(xs), atol=1e-5)
    assert fx(x).shape == (2, 512)

    class Payload:
        def __reduce__(self) -> tuple:  # would run code if unpickled without weights_only
            return (print, ("unpickled",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        MedicalNetFeatures(tmp_path / "evil.pth")
