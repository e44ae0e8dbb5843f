"""Metric code checked against known values: MMD^2, batch MMD^2, Frechet distance, 3D MS-SSIM,
resampling, middle slices, the embedding's fitted ellipses, MedicalNet and InceptionV3 weight loading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.data.grid import resample
from model.metrics.features import middle_slices
from model.metrics.frechet import frechet_distance
from model.metrics.mmd import batch_mmd2_from_means, batch_mmd2_single, median_bandwidth, mmd2
from model.metrics.msssim import _blur, _gauss, mean_pairwise_ms_ssim, ms_ssim_3d, n_scales, pairwise_ms_ssim
from model.metrics.plots import ellipse, pca_2d

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
def test_frechet_small_sample_path_equals_the_covariance_formula() -> None:
    """Fewer samples than dimensions takes the small-matrix path; it must give the FID formula's value."""
    from model.metrics.frechet import feature_stats, frechet_distance_from_stats

    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 40, generator=g)
    b = torch.randn(9, 40, generator=g) * 1.5 + 0.3
    full = frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))
    assert full > 1.0
    assert frechet_distance(a, b) == pytest.approx(full, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


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


# ---------------------------------------------------------------------------------------- InceptionV3
def _random_inception(seed: int = 0) -> torch.nn.Module:
    """The FID InceptionV3 with random convolutions and BatchNorm statistics set from one batch of
    noise (so activations keep a sane scale through the 94 layers)."""
    from model.metrics.inception import InceptionV3Features

    torch.manual_seed(seed)
    net = InceptionV3Features(tf_pooling=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats := this batch's statistics
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299, generator=_g(seed)) * 2 - 1)
    return net.eval()


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("inception")
    net = _random_inception()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    fid = sd | {"fc.weight": torch.randn(1008, 2048) * 0.01, "fc.bias": torch.zeros(1008)}
    torch.save(fid, root / "pt_inception-2015-12-05.pth")
    save_file(fid, str(root / "pt_inception.safetensors"))
    return {"root": root, "net": net, "sd": sd}


def test_inception_in_pytorch_fid_layout_loads_strictly_and_gives_slice_fids(inception_files: dict[str, Any]) -> None:
    from model.metrics.inception import InceptionSlices

    sd, net = inception_files["sd"], inception_files["net"]
    # the names and shapes of pytorch-fid's pt_inception-2015-12-05 file (torchvision's Inception3 layout)
    assert sum(k.endswith(".conv.weight") for k in sd) == 94
    for k, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.bn.running_var": (32,),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    }.items():
        assert tuple(sd[k].shape) == shape, k

    s = torch.rand(3, 20, 28, generator=_g(20)) * 2 - 1  # non-square, like coronal slices of a D != H grid
    fx = InceptionSlices(inception_files["root"] / "pt_inception-2015-12-05.pth", device="cpu", chunk=2)
    assert fx.kind == "pytorch-fid" and fx.net.tf_pooling and fx.name == "slice-inception"
    assert "InceptionV3" in fx.description and "FID" in fx.description
    f = fx(s)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and f.device.type == "cpu"
    # pytorch-fid's input handling: bilinear 299x299 (align_corners=False), grey replicated to RGB
    x = F.interpolate(s[:, None], size=(299, 299), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert torch.allclose(f, net(x), rtol=1e-4, atol=1e-4)
    st = InceptionSlices(inception_files["root"] / "pt_inception.safetensors", device="cpu")
    assert torch.allclose(st(s), f, rtol=1e-4, atol=1e-4)

    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6 * float(f.var(0).sum()))
    shifted = fx((s + 0.5).clamp(-1, 1))
    assert frechet_distance(f, shifted) > 1e-3 * float(f.var(0).sum())


def test_inception_torchvision_weights_load_and_bad_files_are_refused(
    inception_files: dict[str, Any], tmp_path: Path
) -> None:
    from model.metrics.inception import InceptionSlices

    sd = inception_files["sd"]
    tv = sd | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    tv |= {"AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1), "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    torch.save(tv, tmp_path / "inception_v3_google.pth")
    fx = InceptionSlices(tmp_path / "inception_v3_google.pth", device="cpu")
    assert fx.kind == "torchvision" and not fx.net.tf_pooling and "torchvision" in fx.description
    s = torch.rand(2, 16, 16, generator=_g(21)) * 2 - 1
    fid = InceptionSlices(inception_files["root"] / "pt_inception.safetensors", device="cpu")
    assert fx(s).shape == (2, 2048) and not torch.allclose(fx(s), fid(s))  # torchvision pools differently

    missing = {k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7dbl_3.bn.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"Mixed_6c\.branch7x7dbl_3\.bn\.running_var.*missing"):
        InceptionSlices(tmp_path / "missing.pth", device="cpu")
    wrong = sd | {"Mixed_5d.branch_pool.conv.weight": torch.zeros(32, 288, 1, 1)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"Mixed_5d\.branch_pool\.conv\.weight.*\[32, 288, 1, 1\].*\[64, 288, 1, 1\]"):
        InceptionSlices(tmp_path / "wrong.pth", device="cpu")
    torch.save(sd | {"Mixed_8a.conv.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Mixed_8a"):
        InceptionSlices(tmp_path / "extra.pth", device="cpu")

    class Payload:
        def __reduce__(self) -> tuple:  # would run code if unpickled without weights_only
            return (print, ("unpickled",))

    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        InceptionSlices(tmp_path / "evil.pth", device="cpu")


def test_kid_is_the_unbiased_polynomial_mmd_and_grows_with_a_shift() -> None:
    from model.metrics.mmd import kid

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g), torch.randn(40, 5, generator=g)
    k = lambda a, b: (a.double() @ b.double().T / 5 + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    want = (kxx.sum() - kxx.trace()) / (30 * 29) + (kyy.sum() - kyy.trace()) / (40 * 39) - 2 * k(x, y).mean()
    assert kid(x, y) == pytest.approx(float(want), rel=1e-12)
    same = [kid(torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g)) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))  # unbiased: mean 0 within its error
    assert kid(x + 2.0, y) > kid(x + 1.0, y) > float(np.percentile(same, 99))
    with pytest.raises(ValueError, match="at least 2"):
        kid(x[:1], y)


def test_texture_features_see_blur_blocks_and_contrast() -> None:
    """Each group of the texture bank moves the way its docstring says: blur lowers fine gradients,
    band energy and the top of the spectrum; 2x nearest-neighbour blocks raise the block ratios;
    an intensity shift moves the foreground mean; a larger ellipsoid has a larger foreground."""
    from model.metrics.calibration import degrade
    from model.metrics.texture import TextureBank, names

    g = torch.Generator().manual_seed(0)
    lin = torch.linspace(-1, 1, 32)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    inside = (z**2 + y**2 + x**2) < 0.7
    pattern = 0.3 * torch.sin(9 * x) * torch.cos(7 * y) + 0.05 * torch.randn(32, 32, 32, generator=g)
    v = torch.where(inside, pattern, -1)
    vols = v[None, None].clamp(-1, 1)
    big = torch.where((z**2 + y**2 + x**2) < 0.85, v.clamp(-1, 1) * 0 + 0.3, -1.0)[None, None]
    f = dict(
        zip(
            names(),
            TextureBank()(
                torch.cat([vols, degrade(vols, "blur1"), degrade(vols, "blocky"), degrade(vols, "shift"), big])
            ).T,
            strict=True,
        )
    )
    assert len(names()) == 52
    assert f["grad_s0_p90"][1] < 0.6 * f["grad_s0_p90"][0] and f["band_0_1"][1] < 0.5 * f["band_0_1"][0]
    assert f["laplacian"][1] < 0.5 * f["laplacian"][0]
    assert f["spectrum_band7"][1] < f["spectrum_band7"][0] - 1  # a decade less power in the top band
    for ax in "dhw":
        assert f[f"block2_{ax}"][2] > 1.0 > 0.2 > abs(f[f"block2_{ax}"][0])
    assert float(f["fg_mean"][3]) == pytest.approx(float(f["fg_mean"][0]) + 0.2, abs=0.02)
    assert f["fg_fraction"][4] > 1.1 * f["fg_fraction"][0] and f["extent_1"][4] > f["extent_1"][0]
