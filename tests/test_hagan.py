"""HA-GAN networks, inference paths, model directories and the conversion of the authors' checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import ModelDirError
from model.hagan.config import HAGANConfig
from model.hagan.convert import CheckpointError, import_authors_checkpoints
from model.hagan.model import HAGANModel, reference_generate
from model.hagan.networks import HAGAN, parameter_counts
from model.hagan.reference import authors_encode, authors_generate
from model.registry import from_pretrained

AUTHORS = json.loads((Path(__file__).parent / "data" / "hagan_authors_state_dicts.json").read_text())


def tiny(resolution: int = 128, **kw) -> HAGANModel:
    m = HAGANModel.init(HAGANConfig(resolution=resolution, width=0.25, latent_dim=32, **kw), seed=0)
    # non-trivial GroupNorm affines, so that a wrong normalisation cannot pass unnoticed
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.net.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) * 0.6 - 0.3)
    return m


# ------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("res", [128, 256])
def test_parameter_counts_equal_the_authors(res: int) -> None:
    pc = parameter_counts(HAGAN(HAGANConfig(resolution=res)))
    ref = AUTHORS["state_dict_shapes"][str(res)]["parameter_counts"]
    assert pc["G"] == ref["G"] == 52_518_210
    assert pc["D"] == ref["D"]
    assert pc["E^H"] == ref["E"] == 161_152
    assert pc["E^G"] == ref["Sub_E"]
    if res == 256:
        assert (pc["ga"], pc["gl"], pc["gh"]) == (52_392_256, 69_697, 56_257)
        assert (pc["dh"], pc["dl"]) == (4_630_833, 2_771_425)
        assert pc["D"] == 7_402_258 and pc["E^G"] == 19_663_264


@pytest.mark.parametrize("res", [128, 256, 512])
def test_training_shapes_and_batch_of_one(res: int) -> None:
    net = HAGAN(HAGANConfig(resolution=res, width=0.25, latent_dim=16, class_names=["a", "b", "c"]))
    r = res // 2
    with torch.no_grad():
        hi, lo = net.generate_train(torch.randn(1, 16), r, label=torch.tensor([2]))
        assert hi.shape == (1, 1, res // 8, res, res)
        assert lo.shape == (1, 1, 64 if res == 512 else res // 4, *(2 * (64 if res == 512 else res // 4,)))
        logit, cls = net.discriminate(hi, lo, r)  # a batch of one: the authors' D fails here
        assert logit.shape == (1, 1) and cls.shape == (1, 3)
        feats = net.eh(hi)
        assert feats.shape[1:] == net.features(torch.randn(1, 16), torch.tensor([0]))[:, :, : feats.shape[2]].shape[1:]


def test_class_conditional_label_changes_output_and_is_checked() -> None:
    m = tiny(class_names=["healthy", "copd"])
    z = m.sample_latents(1, 0)
    a, b = m.generate(z, 0), m.generate(z, 1)
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class-conditional"):
        m.generate(z)
    with pytest.raises(ValueError, match="label must be in"):
        m.generate(z, 5)


# ------------------------------------------------------------------------------ inference
def test_folded_generation_equals_the_plain_network() -> None:
    m = tiny(128)
    z = m.sample_latents(2, 3)
    ours = m.generate(z, mode="whole")
    plain = reference_generate(m.net, z)
    assert ours.shape == (2, 1, 128, 128, 128)
    assert (ours - plain).abs().max().item() <= 1e-4


@pytest.mark.parametrize("res,rows", [(128, 13), (256, 40), (512, 72)])
def test_slab_generation_equals_whole_volume(res: int, rows: int) -> None:
    m = tiny(res)
    z = m.sample_latents(1, 11)
    whole = m.generate(z, mode="whole")
    slabs = m.generate(z, mode="slab", slab_rows=rows)
    assert (whole - slabs).abs().max().item() <= 1e-4
    assert whole.std() > 0.01  # not a constant volume


def test_slabs_are_written_into_the_result_itself() -> None:
    """The slab path (the default at 512^3) writes each slab into the returned volume, so a request
    never holds a second full-size copy (512 MiB at 512^3 in float32; benchmarks/RESULTS.md), and
    two volumes of one request are those of their latents alone."""
    m = tiny(128)
    z = m.sample_latents(2, 3)
    with torch.inference_mode():  # as generate runs it
        f = m.features(z[:1])
        dest = torch.full((1, 1, 128, 128, 128), 7.0)
        got = m._gh_slabs(f, 2**20, 24, None, dest)
        assert got is dest and (dest.abs() <= 1).all()
        assert torch.equal(dest, m._gh_slabs(f, 2**20, 24, None))
        with pytest.raises(ValueError, match="float32"):
            m._gh_slabs(f, 2**20, 24, None, torch.empty(1, 1, 64, 128, 128))
    dests = []
    slabs = m._gh_slabs
    m._gh_slabs = lambda *a: dests.append(a[-1]) or slabs(*a)  # type: ignore[method-assign]
    both = m.generate(z, mode="slab", slab_rows=24)
    del m._gh_slabs
    # generate hands each volume's place in the result to the slab path
    assert [d.data_ptr() for d in dests] == [both[i].data_ptr() for i in range(2)]
    assert torch.equal(both[1:], m.generate(z[1:], mode="slab", slab_rows=24))


def test_auto_mode_uses_slabs_when_the_budget_is_small() -> None:
    m = tiny(256)
    calls = []
    m.generate(m.sample_latents(1, 0), budget_mb=8, progress=lambda d, t, s: calls.append(s))
    assert "statistics" in calls  # the slab path gathers GroupNorm statistics first


def test_same_seed_same_volume_different_seed_different() -> None:
    m = tiny(128)
    a = m.generate(m.sample_latents(1, 5))
    b = m.generate(m.sample_latents(1, 5))
    c = m.generate(m.sample_latents(1, 6))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_thread_count_changes_a_volume_by_float_rounding_only() -> None:
    """The README's promise across thread counts and CPU kinds: the same seed gives the same volume
    to within 1e-4 on the model's [-1, 1] scale (on the CT scale 1e-4 is 0.08 HU, under the 1 HU
    step of the int16 files, so a written voxel can differ by at most one step at a rounding edge).
    Bitwise equality is promised only at an equal thread count on one CPU kind (the service pins
    it); on Intel AVX-512 / AMX the kernels' summation order follows the thread count."""
    m = tiny(128)
    z = m.sample_latents(1, 5)
    n = torch.get_num_threads()
    try:
        vols = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            vols.append(m.generate(z))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(vols[0], vols[2])  # same thread count, same process: bit for bit
    assert (vols[0] - vols[1]).abs().max() <= 1e-4


def test_a_latent_gives_the_same_volume_alone_and_in_a_batch() -> None:
    """A volume does not depend on how many were asked for with it: generation runs one sample at a
    time (batching G^A changes the last bits, benchmarks/bench_batch_ga.py), so the i-th volume of a
    request is bit for bit the volume of its latent asked for alone."""
    m = tiny(128)
    z = m.sample_latents(3, 7)
    together = m.generate(z)
    assert all(torch.equal(together[i : i + 1], m.generate(z[i : i + 1])) for i in range(3))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3"])
def test_bad_seeds_are_refused(seed) -> None:
    with pytest.raises(ValueError, match="seed"):
        tiny(128).sample_latents(1, seed)


def test_bad_latents_are_refused() -> None:
    m = tiny(128)
    with pytest.raises(ValueError, match="shape"):
        m.generate(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="NaN"):
        m.generate(torch.full((1, 32), float("nan")))


def test_encode_and_reconstruct_shapes() -> None:
    m = tiny(128)
    x = m.generate(m.sample_latents(2, 0))
    z = m.encode(x)
    assert z.shape == (2, 32) and torch.isfinite(z).all()
    rec = m.reconstruct(x[:1])
    assert rec.shape == (1, 1, 128, 128, 128)
    with pytest.raises(ValueError, match="shape"):
        m.encode(torch.zeros(1, 1, 64, 64, 64))


# ------------------------------------------------------------------------------ model directories
def test_save_load_round_trip(tmp_path: Path) -> None:
    m = tiny(128, class_names=["a", "b"], modality="mri", spacing=(1.5, 1.5, 2.0))
    m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    m2 = from_pretrained(tmp_path / "m")
    assert m2.config.to_dict() == m.config.to_dict()
    for k, v in m.net.state_dict().items():
        assert torch.equal(v, m2.net.state_dict()[k]), k
    z = m.sample_latents(1, 2)
    assert torch.equal(m.generate(z, 1), m2.generate(z, 1))


def test_a_serving_load_reads_g_now_the_encoders_when_needed_and_never_d(tmp_path: Path) -> None:
    """What the worker and the CLI load (``serving=True``): G^A and G^H, E^H and E^G on the first
    encode, never the discriminators or G^L (training only); the same volumes and latents as a
    whole load, and saving it still writes every sub-network."""
    m = tiny(128, class_names=["a", "b"])
    m.save_pretrained(tmp_path / "m")
    s = from_pretrained(tmp_path / "m", serving=True)
    assert s.unloaded_parts() == ["gl", "dh", "dl", "eh", "eg"]
    loaded = sum(p.numel() for p in s.net.parameters() if not p.is_meta)
    assert loaded == sum(p.numel() for part in (m.net.ga, m.net.gh) for p in part.parameters())
    z = m.sample_latents(2, 4)
    v = m.generate(z, 1)
    assert torch.equal(s.generate(z, 1), v)
    assert torch.equal(s.encode(v[:1]), m.encode(v[:1]))
    assert s.unloaded_parts() == ["gl", "dh", "dl"]
    s.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again").net.state_dict()
    for k, t in m.net.state_dict().items():
        assert torch.equal(t, again[k]), k
    (tmp_path / "m" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ModelDirError, match="model.safetensors"):
        from_pretrained(tmp_path / "m", serving=True)


def test_broken_model_directories_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a model directory"):
        from_pretrained(tmp_path / "nothing")
    m = tiny(128)
    m.save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelDirError, match="model.safetensors"):
        from_pretrained(tmp_path / "m")
    m.save_pretrained(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["latent_dim"] = 64
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="does not match"):
        from_pretrained(tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="config.json"):
        from_pretrained(tmp_path / "m2")


# ------------------------------------------------------------------------------ authors' checkpoints
def _fake_authors_files(tmp_path: Path, res: int, scale: float = 0.02) -> dict[str, Path]:
    """Checkpoints with exactly the authors' key names and shapes (from tests/data), random values."""
    g = torch.Generator().manual_seed(res)
    out = {}
    for name, shapes in AUTHORS["state_dict_shapes"][str(res)].items():
        if name == "parameter_counts":
            continue
        sd = {}
        for k, shape in shapes.items():
            if k.endswith(".sv0"):
                t = torch.ones(shape)
            elif k.startswith(("bn", "sub_G.bn")) and k.endswith(".weight"):
                t = torch.rand(shape, generator=g) + 0.5
            else:
                t = torch.randn(shape, generator=g) * scale
            sd["module." + k] = t
        p = tmp_path / f"{name}_iter80000.pth"
        torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}}, p)
        out[name] = p
    return out


def _authors_sd(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True)["model"].items()}


def test_conversion_of_the_authors_128_checkpoints_reproduces_their_outputs(tmp_path: Path) -> None:
    f = _fake_authors_files(tmp_path, 128)
    out = import_authors_checkpoints(f["G"], f["E"], f["Sub_E"], f["D"], "ct", tmp_path / "converted")
    m = from_pretrained(out)
    assert m.config.resolution == 128 and m.latent_dim == 1024 and m.modality == "ct"
    z = m.sample_latents(1, 0)
    theirs = authors_generate(_authors_sd(f["G"]), z, 128)
    ours = m.generate(z)
    assert (ours - theirs).abs().max().item() <= 1e-4
    x = ours.clone()
    z_theirs = authors_encode(_authors_sd(f["E"]), _authors_sd(f["Sub_E"]), x)
    assert (m.encode(x) - z_theirs).abs().max().item() <= 1e-4
    # D: the spectral-norm buffers and weights land where our D^L / D^H read them
    d = _authors_sd(f["D"])
    assert torch.equal(m.net.state_dict()["dl.out.u0"], d["sub_D.conv5.u0"])
    assert torch.equal(m.net.state_dict()["dh.convs.0.weight"], d["conv2.weight"])


def test_conversion_maps_every_key_of_the_256_layout(tmp_path: Path) -> None:
    f = _fake_authors_files(tmp_path, 256)
    m = from_pretrained(import_authors_checkpoints(f["G"], f["E"], f["Sub_E"], f["D"], "mri", tmp_path / "c"))
    assert m.config.resolution == 256
    sd = m.net.state_dict()
    g = _authors_sd(f["G"])
    assert torch.equal(sd["gh.convs.1.weight"], g["tp_conv7.weight"])  # G^H's last conv is their tp_conv7
    assert torch.equal(sd["gl.convs.2.weight"], g["sub_G.tp_conv3.weight"])  # G^L is their sub_G
    assert torch.equal(sd["eg.out.weight"], _authors_sd(f["Sub_E"])["conv5.weight"])
    assert torch.equal(sd["dh.convs.0.weight"], _authors_sd(f["D"])["conv1.weight"])


def test_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path: Path) -> None:
    f128 = _fake_authors_files(tmp_path / "a", 128) if (tmp_path / "a").mkdir() is None else None
    f256 = _fake_authors_files(tmp_path / "b", 256) if (tmp_path / "b").mkdir() is None else None
    truncated = tmp_path / "G_trunc.pth"
    truncated.write_bytes(f128["G"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="G_trunc.pth"):
        import_authors_checkpoints(truncated, f128["E"], f128["Sub_E"], None, "ct", tmp_path / "o")
    junk = tmp_path / "E_junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="E_junk.pth"):
        import_authors_checkpoints(f128["G"], junk, f128["Sub_E"], None, "ct", tmp_path / "o")
    # an object that is not tensors is refused by weights_only loading, never executed
    evil = tmp_path / "Sub_E_obj.pth"
    torch.save({"model": {"x": Path("/")}}, evil)
    with pytest.raises(CheckpointError, match="Sub_E_obj.pth"):
        import_authors_checkpoints(f128["G"], f128["E"], evil, None, "ct", tmp_path / "o")
    # a 256^3 D with 128^3 encoders
    with pytest.raises(CheckpointError, match="disagree"):
        import_authors_checkpoints(f128["G"], f128["E"], f128["Sub_E"], f256["D"], "ct", tmp_path / "o")
    with pytest.raises(CheckpointError, match="no such file"):
        import_authors_checkpoints(tmp_path / "missing.pth", f128["E"], f128["Sub_E"], None, "ct", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_fused_upsample_conv_equals_upsample_then_conv() -> None:
    """The training path's stride-2 transposed conv equals nearest x2 upsampling + a 3x3x3 conv with
    padding 1, values and gradients, borders included (a grid of >= FUSE_MIN_VOXELS, below which
    the fused path is the literal one)."""
    from model.hagan.networks import FUSE_MIN_VOXELS, up_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(5, 3, 3, padding=1)
    x = torch.randn(2, 5, 7, 8, 10, requires_grad=True)
    assert 7 * 8 * 10 >= FUSE_MIN_VOXELS
    outs, grads = [], []
    for fused in (True, False):
        y = up_conv(x, conv, fused)
        (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x])
        outs.append(y.detach())
        grads.append(g)
    assert outs[0].shape == (2, 3, 14, 16, 20)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("res", [128, 256])
def test_batched_slab_encoding_equals_encoding_each_slab(res: int) -> None:
    """encode_features runs every slab of every volume through E^H at once (channels-last on the
    CPU); the feature map must equal E^H applied slab by slab and concatenated along depth."""
    m = tiny(res)
    x = torch.rand(2, 1, res, res, res, generator=torch.Generator().manual_seed(2)) * 2 - 1
    d = m.net.sub_depth
    with torch.no_grad():
        ref = torch.cat([m.net.eh(x[:, :, i : i + d]) for i in range(0, res, d)], dim=2)
        for kw in ({}, {"channels_last": False}, {"slabs_per_call": 3}):
            got = m.net.encode_features(x, **kw)
            assert got.shape == ref.shape == (2, m.net.ga.convs[-1].out_channels, res // 4, res // 4, res // 4)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("res", [128, 256])
def test_served_encoding_equals_the_encoder_modules(res: int) -> None:
    """``HAGANModel.encode`` (fp32) runs E^H and E^G its own way (weights taken once, GroupNorm in
    place, E^G's last layer as one matrix product): its latents must be the modules' (E^G on
    ``encode_features``), which training computes, up to float summation order."""
    m = tiny(res)
    m.set_precision("fp32")
    x = torch.rand(2, 1, res, res, res, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = m.net.eg(m.net.encode_features(x))
    got = m.encode(x, steps=0)
    assert got.shape == ref.shape == (2, m.config.latent_dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mixed_layout_puts_large_grids_channels_last_and_keeps_the_values() -> None:
    """set_mixed_layout: conv inputs on grids of >= 16^3 voxels go channels-last, smaller ones stay in
    the standard layout, the parameters are untouched, and the outputs equal the plain path's."""
    from model.hagan.networks import CL_MIN_VOXELS

    net = HAGAN(HAGANConfig(resolution=128, width=0.25, latent_dim=16)).eval()
    seen: dict[str, bool] = {}

    def hook(name: str):
        def pre(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            seen[name] = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()

        return pre

    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv3d):
            m.register_forward_pre_hook(hook(name))
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 1, 128, 128, 128) * 2 - 1
    outs = []
    for on in (False, True):
        net.set_mixed_layout(on)
        with torch.no_grad():
            hi, lo = net.generate_train(z, 32)
            outs.append((hi, lo, net.discriminate(hi, lo, 32)[0], net.eg(net.encode_features(x, channels_last=False))))
        if on:
            assert seen["ga.convs.0"] is False  # 4^3: weights dominate, standard layout
            assert seen["ga.convs.4"] is True  # 32^3
            assert seen["eg.convs.0"] is True and seen["eg.out"] is False
            assert seen["dl.convs.1"] is True and seen["dl.convs.2"] is False  # 16^3 vs 8^3 = 512 < CL_MIN_VOXELS
        else:
            assert not any(seen.values())
    assert CL_MIN_VOXELS == 16**3
    assert all(p.is_contiguous() for p in net.parameters())
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # fp32 summation order only


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_statistics_in_either_layout(dtype: torch.dtype, layout: torch.memory_format) -> None:
    """Transposed convs (G^H, and G^A in float32) leave activations channels-last, folded ones contiguous; GroupNorm
    statistics come from chunked per-channel sums (more voxels than a chunk here) and must equal the
    group statistics of the same values."""
    from model.hagan.folding import STATS_ROWS, group_stats

    torch.manual_seed(0)
    h = (torch.randn(2, 16, 40, 40, 24) * torch.linspace(0.5, 3, 16)[None, :, None, None, None] + 1).to(dtype)
    assert h[0, 0].numel() > STATS_ROWS
    mean, var = group_stats(h.contiguous(memory_format=layout), 4)
    ref_var, ref_mean = torch.var_mean(h.double().reshape(2, 4, -1), dim=-1, correction=0)
    # float32 sums per channel (the mean) and per chunk (squares about it), chunks added in float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
