"""3D-StyleGAN / Split&Shuffle-GAN: parameter counts against Liu et al. 2022, layer math, the
split/shuffle wiring, weight inflation, projection, style mixing, storage and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.cli import main as voxgen
from model.registry import from_pretrained
from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.inflate import STRATEGIES, inflate_network, inflate_state_dict, inflate_weight
from model.stylegan3d.layers import SplitConv, SplitSynthesisLayer, channel_shuffle, modulated_conv
from model.stylegan3d.model import StyleGAN3DModel
from model.stylegan3d.networks import StyleGAN3D, parameter_counts
from model.stylegan3d.project import project, style_mix

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(variant: str = "split-shuffle", dims: int = 3, **kw) -> StyleGAN3DConfig:
    kw = {"shape": (8, 16, 16), "channels": 8, "z_dim": 16, "w_dim": 16, "mapping_width": 16, **kw}
    return StyleGAN3DConfig.for_variant("splitshuffle", variant, dims=dims, **kw)


def make(cfg: StyleGAN3DConfig, seed: int = 0) -> StyleGAN3D:
    torch.manual_seed(seed)
    return StyleGAN3D(cfg).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ counts
# The paper's #param (Tables III, V, VI) counts G (mapping + synthesis) and D together: the
# "-D" variants change only D and still lower #param (0.600M -> 0.434M/0.367M/0.416M), and the
# 64^3 models exceed the 32x64x64 ones by 0.033M, which is exactly the larger constant (+1,024)
# plus the larger input of D's FC after the last block (+32,768).
PAPER = [
    ("stylegan3d", "baseline", "32x64x64", 0.600e6),
    ("splitshuffle", "split-shuffle", "32x64x64", 0.291e6),
    ("splitshuffle", "split-shuffle", "64x64x64", 0.325e6),
]


def cli_counts(tmp_path: Path, capsys: pytest.CaptureFixture, family: str, variant: str, shape: str) -> dict:
    out = tmp_path / f"{family}-{variant}-{shape}"
    assert voxgen(["init", "--family", family, "--variant", variant, "--shape", shape, "-o", str(out)]) == 0
    capsys.readouterr()
    assert voxgen(["info", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family,variant,shape,paper", PAPER)
def test_parameter_counts_match_the_paper(tmp_path, capsys, family, variant, shape, paper):
    info = cli_counts(tmp_path, capsys, family, variant, shape)
    p = info["parameters"]
    assert p["total_parameters"] == p["G"] + p["D"]
    assert p["G"] == p["mapping"] + p["synthesis"]
    assert abs(p["total_parameters"] - paper) / paper < 0.01, (p, paper)
    assert info["config"]["family"] == family and info["variant"] == variant


def test_split_shuffle_is_half_of_baseline_and_ablation_counts():
    def total(variant: str, shape=(32, 64, 64)) -> int:
        return parameter_counts(StyleGAN3D(StyleGAN3DConfig.for_variant("splitshuffle", variant, shape=shape)))[
            "total_parameters"
        ]

    base, ss = total("baseline"), total("split-shuffle")
    assert abs(ss / base - 0.485) < 0.005
    # Table III ablations and Table VI's 3D-StyleGAN2 on 64^3, within 1%
    for variant, paper in [
        ("group-d", 0.434e6),
        ("depthwise-d", 0.367e6),
        ("split-shuffle-d", 0.416e6),
        ("split", 0.291e6),
    ]:
        assert abs(total(variant) - paper) / paper < 0.01, variant
    assert abs(total("baseline", (64, 64, 64)) - 0.633e6) / 0.633e6 < 0.01


# ------------------------------------------------------------------------------------ layer math
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_per_sample_reference(dims, demodulate):
    g = torch.Generator().manual_seed(0)
    b, ci, co = 3, 5, 4
    x = torch.randn(b, ci, *([6] * dims), generator=g)
    w = torch.randn(co, ci, *([3] * dims), generator=g)
    s = torch.rand(b, ci, generator=g) + 0.5
    got = modulated_conv(x, w, s, demodulate=demodulate)
    conv = F.conv3d if dims == 3 else F.conv2d
    for n in range(b):
        wn = w.clone()
        for i in range(ci):  # eq. (1): w'_ijk = s_i * w_ijk
            wn[:, i] = w[:, i] * s[n, i]
        if demodulate:  # eq. (2): w''_ijk = w'_ijk / sqrt(sum_{i,k} w'^2 + eps)
            for j in range(co):
                wn[j] = wn[j] / torch.sqrt((wn[j] ** 2).sum() + 1e-8)
        ref = conv(x[n : n + 1], wn, padding=1)
        torch.testing.assert_close(got[n : n + 1], ref, rtol=1e-4, atol=1e-5)


def test_channel_shuffle_permutation():
    m = 5
    x = torch.arange(2 * m, dtype=torch.float32).reshape(1, 2 * m, 1, 1, 1)
    y = channel_shuffle(x, 2).flatten()
    for h in range(2):
        for j in range(m):  # channel j of half h -> position 2j + h
            assert y[2 * j + h] == h * m + j
    assert sorted(y.tolist()) == x.flatten().tolist()


@pytest.mark.parametrize("shuffle", [True, False])
def test_split_generator_layer_wiring(shuffle):
    torch.manual_seed(0)
    c = 8
    layer = SplitSynthesisLayer(c, c, 16, (4, 4, 4), shuffle=shuffle).requires_grad_(False)
    with torch.no_grad():
        for br in layer.branches:
            br.bias.normal_()
    x = torch.randn(2, c, 4, 4, 4)
    w = torch.randn(2, 16)
    y0 = layer(x, w, "const")
    x2 = x.clone()
    x2[:, : c // 2] += torch.randn(2, c // 2, 4, 4, 4)  # change only the first half's inputs
    y1 = layer(x2, w, "const")
    changed = (y1 - y0).abs().flatten(2).amax(-1).amax(0) > 1e-6  # per output channel
    if shuffle:  # the first branch's outputs sit at the even positions
        expect = torch.tensor([i % 2 == 0 for i in range(c)])
    else:
        expect = torch.tensor([i < c // 2 for i in range(c)])
    assert torch.equal(changed, expect)
    # each branch is a plain SynthesisLayer on its half
    torch.testing.assert_close(
        y0[:, 0::2] if shuffle else y0[:, : c // 2], layer.branches[0](x[:, : c // 2], w, "const")
    )


def test_split_discriminator_conv_wiring():
    torch.manual_seed(0)
    conv = SplitConv(8, 8, dims=3, shuffle=True).requires_grad_(False)
    x = torch.randn(1, 8, 5, 5, 5)
    y0 = conv(x)
    x2 = x.clone()
    x2[:, 4:, 2, 2, 2] += 3.0  # the 1x1x1 branch's inputs, one voxel
    d = (conv(x2) - y0).abs()
    assert d[:, 0::2].max() == 0  # the 3x3x3 branch (even positions) does not see them
    odd = d[:, 1::2].amax(1)[0]
    assert odd[2, 2, 2] > 0 and odd.sum() == odd[2, 2, 2]  # the 1x1x1 branch: that voxel only
    x3 = x.clone()
    x3[:, :4, 2, 2, 2] += 3.0  # the 3x3x3 branch's inputs
    d = (conv(x3) - y0).abs()
    assert d[:, 1::2].max() == 0
    even = d[:, 0::2].amax(1)[0]
    assert (even[1:4, 1:4, 1:4] > 0).all() and even[0].max() == 0  # a 3x3x3 neighbourhood


@pytest.mark.parametrize("variant", ["baseline", "split-shuffle", "split", "split-shuffle-d", "group-d", "depthwise-d"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_variant_runs(variant, dims):
    net = make(tiny(variant, dims))
    img = net.G(torch.randn(2, 16))
    assert img.shape == (2, 1, *net.config.image_shape)
    assert net.D(img).shape == (2, 1)


# ------------------------------------------------------------------------------------- inflation
G_CONV = "G.synthesis.blocks.1.conv0.branches.0.weight"
D_CONV = "D.blocks.0.conv0.conv3.weight"


def expected_slices(strategy: str, w2: torch.Tensor, w3: torch.Tensor) -> None:
    """Assert the formulas of the issue on one weight; the untouched taps keep N(0, 0.1)."""
    set_mask = torch.zeros(w3.shape[2:], dtype=torch.bool)
    if strategy == "inflate-1":
        assert torch.equal(w3[:, :, 1], w2)
        set_mask[1] = True
    elif strategy == "inflate-2":
        assert torch.equal(w3[:, :, 0], w2) and torch.equal(w3[:, :, 1], w2)
        set_mask[:2] = True
    elif strategy == "inflate-3":
        for i in range(3):
            assert torch.equal(w3[:, :, i], w2)
        set_mask[:] = True
    elif strategy == "inflate-asc":
        assert torch.equal(w3[:, :, :, :, 1], w2) and torch.equal(w3[:, :, :, 1, :], w2)
        assert torch.equal(w3[:, :, 1, :, 0], w2[:, :, :, 0]) and torch.equal(w3[:, :, 1, :, 2], w2[:, :, :, 2])
        set_mask[1], set_mask[:, 1], set_mask[:, :, 1] = True, True, True
    elif strategy == "inflate-nwi":
        torch.testing.assert_close(w3[:, :, 1], w2 * 5 / 3)
        torch.testing.assert_close(w3[:, :, 0], -w2 / 3)
        torch.testing.assert_close(w3[:, :, 2], -w2 / 3)
        set_mask[:] = True
    rest = w3[:, :, ~set_mask]
    if rest.numel():
        assert 0.05 < rest.std() < 0.2  # drawn from N(0, 0.1)
        assert not torch.isin(rest, w2).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inflation_formulas_on_G_and_D(strategy):
    net2 = make(tiny(dims=2), seed=1)
    net3 = make(tiny(), seed=2)
    sd2 = net2.state_dict()
    sd3 = inflate_state_dict(sd2, net3, strategy, parts=("G", "D"), seed=0)
    for key in (G_CONV, D_CONV, "D.conv.conv3.weight"):
        assert sd2[key].shape[2:] == (3, 3) and sd3[key].shape[2:] == (3, 3, 3)
        expected_slices(strategy, sd2[key], sd3[key])
    for key in ("G.synthesis.blocks.0.torgb.weight", "D.blocks.0.fromrgb.weight", "D.conv.conv1.weight"):
        assert torch.equal(sd3[key][:, :, 0], sd2[key])  # 1-tap kernels are copied by every strategy
    for key in (  # non-convolution weights are copied
        "G.mapping.layers.0.weight",
        "G.mapping.w_avg",
        "G.synthesis.blocks.1.conv1.branches.1.affine.weight",
        "G.synthesis.blocks.1.conv1.branches.1.bias",
        "G.synthesis.blocks.1.conv1.branches.1.noise_strength",
        "D.out.weight",
        "D.blocks.0.conv0.conv3.bias",
    ):
        assert torch.equal(sd3[key], sd2[key]), key
    assert torch.equal(sd3["G.synthesis.blocks.0.const"][:, 0], sd2["G.synthesis.blocks.0.const"])


def test_inflation_of_one_part_leaves_the_other_random():
    net2 = make(tiny(dims=2), seed=1)
    net3 = make(tiny(), seed=2)
    sd3_init = net3.state_dict()
    sd_g = inflate_state_dict(net2.state_dict(), net3, "inflate-1", parts=("G",))
    sd_d = inflate_state_dict(net2.state_dict(), net3, "inflate-1", parts=("D",))
    assert torch.equal(sd_g[D_CONV], sd3_init[D_CONV]) and torch.equal(sd_g["D.out.weight"], sd3_init["D.out.weight"])
    assert torch.equal(sd_g[G_CONV][:, :, 1], net2.state_dict()[G_CONV])
    assert torch.equal(sd_d[G_CONV], sd3_init[G_CONV])
    assert torch.equal(sd_d[D_CONV][:, :, 1], net2.state_dict()[D_CONV])
    with pytest.raises(ValueError):
        inflate_weight(torch.zeros(2, 2, 3, 3), "inflate-7")


def test_inflated_network_starts_from_the_2d_slices():
    """Before any 3D training, the inflated 3D generator's axial slices are close to the 2D images
    (same z, constant noise); a randomly initialised 3D generator's are not."""
    cfg2 = tiny(dims=2, shape=(8, 32, 32), channels=16)
    net2 = make(cfg2, seed=5)
    with torch.no_grad():  # a 2D net that is random but fixed, with non-zero noise and biases
        for n, p in net2.named_parameters():
            if n.endswith("noise_strength") or (n.endswith("bias") and "affine" not in n):
                p.normal_(0, 0.2)
    net3 = inflate_network(net2, "inflate-1", seed=0).eval()
    rand3 = make(cfg2.with_dims(3), seed=6)
    z = torch.randn(4, cfg2.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img2 = net2.G(z, noise_mode="const")  # [4, 1, 32, 32]
        v_inf = net3.G(z, noise_mode="const")  # [4, 1, 8, 32, 32]
        v_rnd = rand3.G(z, noise_mode="const")
    mid = cfg2.shape[0] // 2
    err_inf = F.mse_loss(v_inf[:, :, mid], img2)
    err_rnd = F.mse_loss(v_rnd[:, :, mid], img2)
    corr = torch.corrcoef(torch.stack([v_inf[:, :, mid].flatten(), img2.flatten()]))[0, 1]
    assert img2.std() > 0.05  # the 2D images are not flat
    assert err_inf < 0.25 * err_rnd, (err_inf, err_rnd)
    assert corr > 0.9


# ------------------------------------------------------------------------ projection and mixing
def test_projection_lowers_the_loss_on_a_generated_target():
    net = make(tiny(), seed=3)
    with torch.no_grad():
        z = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
        target = net.G(z, noise_mode="const")
    res = project(net.G, target, steps=40, lr=0.1, seed=0)
    assert res.w.shape == (1, 16) and len(res.losses) == 40
    assert min(res.losses[-5:]) < 0.5 * res.losses[0], res.losses
    noisy = project(net.G, target, steps=10, optimize_noise=True)
    assert any(not torch.equal(noisy.noise[k], b) for k, b in net.G.synthesis.named_buffers() if k in noisy.noise)


def test_style_mixing_takes_coarse_and_fine_blocks():
    m = StyleGAN3DModel(make(tiny(), seed=0))
    za, zb = m.sample_latents(1, 1), m.sample_latents(1, 2)
    wa, wb = m.ws(za), m.ws(zb)
    nb = m.config.num_blocks
    assert torch.equal(style_mix(wa, wb, 0), wb) and torch.equal(style_mix(wa, wb, nb), wa)
    mixed = style_mix(wa, wb, 1)
    assert torch.equal(mixed[:, :1], wa[:, :1]) and torch.equal(mixed[:, 1:], wb[:, 1:])
    va, vb, vm = m.generate(za), m.generate(zb), m.mix(za, zb, 1)
    assert not torch.allclose(vm, va) and not torch.allclose(vm, vb)
    torch.testing.assert_close(m.mix(za, zb, 0), vb)


# ------------------------------------------------------------------------------ model surface
def test_save_load_round_trip_and_same_seed_same_volume(tmp_path):
    m = StyleGAN3DModel.init(tiny(), seed=4)
    z = m.sample_latents(2, seed=7)
    assert torch.equal(z, m.sample_latents(2, seed=7)) and not torch.equal(z, m.sample_latents(2, seed=8))
    v = m.generate(z)
    assert v.shape == (2, 1, 8, 16, 16) and v.dtype == torch.float32
    assert torch.equal(v, m.generate(m.sample_latents(2, seed=7)))
    m.save_pretrained(tmp_path / "m")
    m2 = from_pretrained(tmp_path / "m")
    assert isinstance(m2, StyleGAN3DModel) and m2.family == "splitshuffle"
    assert m2.config.to_dict() == m.config.to_dict()
    assert torch.equal(m2.generate(z), v)
    assert torch.equal(StyleGAN3DModel.init(tiny(), seed=4).generate(z), v)
    for bad in (-1, 2**63, 1.5, "3"):
        with pytest.raises(ValueError):
            m.sample_latents(1, bad)
    with pytest.raises(ValueError):
        m.generate(torch.zeros(1, 5))
    # truncation psi = 0 sends every latent to w_avg
    t = m.generate(m.sample_latents(3, 1), truncation_psi=0.0)
    torch.testing.assert_close(t[0], t[2])


def test_encode_returns_w_that_reconstructs(tmp_path):
    m = StyleGAN3DModel.init(tiny(), seed=4)
    target = m.generate(m.sample_latents(1, 3))
    w = m.encode(target, steps=30)
    assert w.shape == (1, m.w_dim)
    rec = m.generate(w, space="w")
    start = m.generate(m.net.G.mapping.w_avg[None], space="w")
    assert F.mse_loss(rec, target) < F.mse_loss(start, target)
