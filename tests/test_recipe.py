"""The one preprocessing path in physical units (prepare = encode loader; size kept; the way back
onto the input's grid) and the small-data training recipe (augmentation, DiffAugment, EMA,
encoder terms, quality monitor, best model, pruned checkpoints, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model.base import Intensity
from model.data.augment import RandomAugment, diff_augment
from model.data.datasets import VolumeDataset, prepare_dataset
from model.data.preprocess import foreground_centre, to_input_grid, window
from model.data.volumes import load_for_model, read_volume, to_model_space
from model.hagan.config import HAGANConfig
from model.hagan.train import LATENT_FLOOR, Trainer
from model.registry import from_pretrained

SPACING = (2.0, 2.0, 2.0)


def _brain(shape: tuple[int, int, int] = (60, 72, 56), seed: int = 0) -> np.ndarray:
    """A T1-like head (z, y, x): an off-centre ellipsoid with a darker core and noise, on 0."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = ((z - 0.1) / 0.6) ** 2 + ((y + 0.05) / 0.7) ** 2 + ((x - 0.1) / 0.55) ** 2
    v = np.where(r < 1, 600.0 + 200 * np.cos(6 * x) * np.sin(5 * y), 0.0)
    v[r < 0.2] = 300.0
    return (v + np.random.default_rng(seed).normal(0, 5, shape) * (r < 1)).astype(np.float32)


def _config(resolution: int = 128, spacing: tuple[float, float, float] = SPACING) -> HAGANConfig:
    return HAGANConfig(
        resolution=resolution,
        modality="mri",
        intensity=Intensity.for_modality("mri"),
        spacing=spacing,
        preprocess={"mode": "physical"},
    )


def _save(arr: np.ndarray, path: Path, zooms: tuple[float, float, float] = (1.5, 1.5, 1.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0).copy(), np.diag([*zooms, 1.0])), path)
    return path


def test_prepare_and_the_encode_loader_give_the_same_model_space_array(tmp_path: Path) -> None:
    src = _save(_brain(), tmp_path / "src" / "a.nii.gz")
    prepare_dataset(tmp_path / "src", tmp_path / "ds", _config())
    ds = VolumeDataset(tmp_path / "ds")
    stored = np.asarray(ds.volume(0))
    served = load_for_model(src, _config())
    assert stored.dtype == np.float16 and served.dtype == np.float32 and served.shape == (128, 128, 128)
    assert np.array_equal(stored, served.astype(np.float16))  # identical, up to the dataset's float16 storage
    prep = ds.manifest["preprocess"]
    assert prep["mode"] == "physical" and prep["spacing"] == [2.0, 2.0, 2.0] and prep["field_of_view_mm"][0] == 256
    assert ds.grid_spacing() == (2.0, 2.0, 2.0)


def test_a_scan_scaled_by_1_1_is_1_1_times_larger_in_model_space(tmp_path: Path) -> None:
    """Physical size is kept: the same array with 1.1x larger voxels gives a foreground 1.1x larger
    along every axis (the authors' stretch to the cube gives the same array for both)."""
    arr = _brain()
    cfg = _config()

    def extent(zooms: tuple[float, float, float]) -> np.ndarray:
        a, sp = read_volume(_save(arr, tmp_path / f"{zooms[0]}.nii.gz", zooms))
        v = to_model_space(a, sp, cfg)
        fg = v > -0.9
        return np.array(
            [np.ptp(np.nonzero(fg.any(axis=tuple(b for b in range(3) if b != ax)))[0]) + 1 for ax in range(3)]
        )

    ratio = extent((1.65, 1.65, 1.65)) / extent((1.5, 1.5, 1.5))
    assert ratio == pytest.approx([1.1, 1.1, 1.1], abs=0.04)


def test_the_field_of_view_is_centred_on_the_foreground(tmp_path: Path) -> None:
    a, sp = read_volume(_save(_brain(), tmp_path / "b.nii.gz"))
    v = to_model_space(a, sp, _config())
    assert np.array(foreground_centre(v, -0.9)) == pytest.approx([63.5, 63.5, 63.5], abs=1.5)


def test_the_way_back_overlays_the_input(tmp_path: Path) -> None:
    """A model-grid volume mapped back onto the input's grid covers the input's foreground."""
    a, sp = read_volume(_save(_brain(), tmp_path / "c.nii.gz"))
    cfg, info = _config(), {}
    v = to_model_space(a, sp, cfg, info=info)
    back = to_input_grid(v, info, cfg)
    assert back.shape == a.shape
    fa, fb = window(a, cfg) > -0.5, back > -0.5  # both on the model's intensity scale
    dice = 2 * (fa & fb).sum() / (fa.sum() + fb.sum())
    assert dice > 0.95


def test_every_family_describes_the_cube_its_training_data_were_prepared_on() -> None:
    """``config.cube()``: HA-GAN's grid is the cube (the demo model's config as it is); alpha-WGAN-GP
    and the style-based families resample the cube to their grid, whose voxel size scales back to
    the cube's exactly (as ``model.data.grid.grid_spacing`` made it)."""
    from model.alphawgan.config import AlphaWGANConfig
    from model.checkpoint import read_config
    from model.config_base import Cube
    from model.data.grid import grid_spacing
    from model.stylegan3d.config import StyleGAN3DConfig

    demo = HAGANConfig.from_dict(read_config(Path(__file__).parents[1] / "models" / "demo-brain-mri"))
    assert demo.cube() == Cube(128, (1.6, 1.6, 1.6), "mri", demo.intensity, demo.preprocess)
    assert demo.preprocess["mode"] == "physical" and demo.preprocess["spacing"] == [1.6, 1.6, 1.6]
    prep = {"mode": "physical", "spacing": [1.15, 1.15, 1.15]}
    sg = StyleGAN3DConfig.for_variant(
        "splitshuffle", shape=(96, 64, 64), data_resolution=128, preprocess=prep,
        spacing=grid_spacing((1.15, 1.15, 1.15), 128, (96, 64, 64)),
    )  # fmt: skip
    assert sg.spacing != (1.15, 1.15, 1.15) and sg.cube().spacing == (1.15, 1.15, 1.15)
    assert sg.cube().resolution == 128 and sg.cube().preprocess == prep
    assert sg.with_dims(2).cube() == sg.cube()  # a 2D model's slices are of the same grid
    aw = AlphaWGANConfig(data_resolution=256, spacing=(4.0, 4.0, 6.0), preprocess={"mode": "physical"})
    assert aw.cube().resolution == 256 and aw.cube().spacing == (1.0, 1.0, 1.5)
    assert AlphaWGANConfig(spacing=(2.0, 2.0, 2.0)).cube().spacing == (2.0, 2.0, 2.0)  # older: the grid
    with pytest.raises(ValueError, match="preprocess.mode"):
        AlphaWGANConfig(preprocess={"mode": "squash"})


def test_augmentation_keeps_the_background_and_is_seeded() -> None:
    x = torch.full((2, 1, 32, 32, 32), -1.0)
    x[:, :, 8:24, 8:24, 8:24] = 0.3
    a = RandomAugment()(x, torch.Generator().manual_seed(0))
    b = RandomAugment()(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert (a[:, :, :3] == -1).all() and a.min() >= -1 and a.max() <= 1  # far corners stay background
    assert not torch.equal(a[0], a[1])  # every volume its own draw
    fg = (a > -1).float().mean(dim=(1, 2, 3, 4))
    assert ((fg > 0.05) & (fg < 0.3)).all()  # the cube moved and scaled, not lost
    y = x.clone().requires_grad_(True)
    diff_augment(y, torch.Generator().manual_seed(1)).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # differentiable


SMALL = {"iterations": 2, "batch": 1, "width": 0.25, "latent_dim": 16, "device": "cpu", "seed": 3}
SMALL |= {"recipe": "small-data", "checkpoint_every": 1, "preview_every": 100, "monitor_every": 2, "monitor_n": 2}


def test_small_data_recipe_trains_serves_the_ema_and_keeps_the_best(brain_ds: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    t = Trainer(SMALL | {"data": str(brain_ds), "output": str(run), "iterations": 4, "keep_checkpoints": 2})
    assert t.augment is not None and t.ema is not None and t.o["whole_stats"] == "on"
    t.fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # the monitor's figures join every second iteration's row
        assert {"e_latent", "e_prior"} <= set(r) and all(np.isfinite(v) for k, v in r.items() if k != "time")
        assert ({"q_fd_texture", "q_floor", "q_spread"} <= set(r)) is (r["iteration"] % 2 == 0)
    # the newest two checkpoints are kept; the best model by the monitor is kept apart
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000003", "iter_0000004"]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["q_fd_texture"] == min(r["q_fd_texture"] for r in rows if "q_fd_texture" in r)
    assert best["grid"] == [128, 128, 128]
    # the served model is the EMA of G (not the live G) and records its recipe and preprocessing
    m = from_pretrained(run / "model")
    assert m.config.norm_min_group == 2 and m.config.preprocess["mode"] == "physical"
    assert m.config.training["recipe"] == "small-data" and m.spacing == pytest.approx(SPACING)
    live = t.net.state_dict()
    served = m.net.state_dict()
    assert not torch.equal(live["gh.convs.0.weight"], served["gh.convs.0.weight"])
    assert torch.equal(t.ema.state_dict()["gh.convs.0.weight"], served["gh.convs.0.weight"])
    assert torch.equal(live["eg.out.weight"], served["eg.out.weight"])


def test_small_data_recipe_resumes_exactly(brain_ds: Path, tmp_path: Path) -> None:
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0}
    a = Trainer(opts | {"output": str(tmp_path / "a"), "iterations": 3})
    a.fit()
    b = Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 2})
    b.fit()
    del b
    b = Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 3, "resume": True})
    b.fit()
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    ea, eb = a.ema.state_dict(), b.ema.state_dict()  # the EMA's G (its D and E copies are not used)
    assert [k for k in ea if k.split(".")[0] in ("ga", "gl", "gh") and not torch.equal(ea[k], eb[k])] == []
    # a resumed run takes the learning rates asked for now (a run may continue at another rate)
    c = Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 4, "resume": True, "lr_g": 3e-4})
    assert c.iteration == 3 and c.opts["g"].param_groups[0]["lr"] == 3e-4 and c.opts["d"].param_groups[0]["lr"] == 4e-4


def test_recipe_options_are_checked(brain_ds: Path, tmp_path: Path) -> None:
    for key, bad in (("recipe", "fast"), ("augment", "yes"), ("lowres", "cubic"), ("ema", 1.5), ("d_loss", "sum")):
        with pytest.raises(ValueError, match=key):
            Trainer(SMALL | {"data": str(brain_ds), "output": str(tmp_path / key), key: bad})
    # one learning rate for all (voxgen train --lr, the other families'): refused, naming HA-GAN's three
    with pytest.raises(ValueError, match="lr_g, lr_d, lr_e"):
        Trainer(SMALL | {"data": str(brain_ds), "output": str(tmp_path / "lr"), "lr": 1e-3})


def test_d_loss_each_scores_d_h_and_d_l_apart(brain_ds: Path, tmp_path: Path) -> None:
    """--d-loss each: G's adversarial loss is the mean of a BCE on D^H's logit and one on D^L's, not
    the BCE of their mean (the authors'); recorded in config.json."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 1, "augment": "off", "diffaug": "off"}
    runs = {}
    for mode in ("mean-logit", "each"):
        t = Trainer(opts | {"output": str(tmp_path / mode), "d_loss": mode})
        t.fit()
        runs[mode] = t
        row = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[0])
        assert np.isfinite(row["g"]) and from_pretrained(tmp_path / mode / "model").config.training["d_loss"] == mode
    a, b = runs["mean-logit"].net.state_dict(), runs["each"].net.state_dict()
    assert not torch.equal(a["ga.fc.weight"], b["ga.fc.weight"])  # G learned from another loss


def test_sub_volumes_draws_several_crops_of_one_volume(brain_ds: Path, tmp_path: Path) -> None:
    """--sub-volumes K: G^H's sub-volumes at K starts come from one feature map and are each what
    generate_train gives at that start; a run with K = 2 learns from another loss than K = 1 and
    records K in config.json; K must be a positive integer."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 1, "augment": "off", "diffaug": "off"}
    runs = {}
    for k in (1, 2):
        t = Trainer(opts | {"output": str(tmp_path / f"k{k}"), "sub_volumes": k})
        t.fit()
        runs[k] = t
        assert from_pretrained(tmp_path / f"k{k}" / "model").config.training["sub_volumes"] == k
    a, b = runs[1].net.state_dict(), runs[2].net.state_dict()
    assert not torch.equal(a["gh.convs.0.weight"], b["gh.convs.0.weight"])  # G^H learned from two crops
    net = runs[2].net
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        crops, low = net.generate_train_crops(z, [5, 40], None, True)
        for r, crop in zip((5, 40), crops, strict=True):
            hi, lo = net.generate_train(z, r, None, True)
            assert torch.equal(hi, crop) and torch.equal(lo, low)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sub_volumes"):
            Trainer(opts | {"output": str(tmp_path / "bad"), "sub_volumes": bad})


def _reconstruction_error(t: Trainer) -> float:
    """L1 between the training volumes and their reconstruction by the live G from E^G's codes."""
    x = torch.from_numpy(np.stack([np.asarray(t.data.volume(i), np.float32) for i in range(len(t.data))]))[:, None]
    with torch.no_grad():
        z = t.net.eg(t.net.encode_features(x, 1, t.channels_last))
        return float((t.net.gh(t.net.features(z, None)) - x).abs().mean())


def test_joint_reconstruction_teaches_g_the_real_volumes(brain_ds: Path, tmp_path: Path) -> None:
    """--lambda-rec: G learns to reconstruct the real volumes from their codes beside fooling D, so
    after a few iterations G(E(x)) is much closer to x than when only the encoder learns to invert G.

    Without the term G(E(x)) is whatever the adversarial game made of it, so one short run is a
    noisy reference: at 6 iterations the ratio of the two errors ranged 0.42-0.91 over three seeds
    (it failed at seed 3 on an AMD EPYC), at 12 iterations 0.16-0.75 over six seeds.  The test sums
    two seeds' errors at 12 iterations (the sums of any two of those six: ratio 0.67 at most)."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 12, "augment": "off", "diffaug": "off"}
    opts |= {"lr_g": 1e-3, "lr_e": 1e-3, "checkpoint_every": 12}  # a few iterations have to show it
    errors = {0.0: 0.0, 10.0: 0.0}
    for seed in (3, 4):
        for lam in errors:
            run = tmp_path / f"rec{lam}-{seed}"
            t = Trainer(opts | {"output": str(run), "lambda_rec": lam, "seed": seed})
            t.fit()
            errors[lam] += _reconstruction_error(t)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert all(np.isfinite(r["e_g"]) for r in rows)
    assert from_pretrained(tmp_path / "rec10.0-3" / "model").config.training["lambda_rec"] == 10.0
    assert errors[10.0] < 0.8 * errors[0.0], errors


def test_reconstruction_warmup_trains_g_alone_then_the_gan(brain_ds: Path, tmp_path: Path) -> None:
    """--rec-warmup N: the first N iterations train G and the encoders by reconstruction alone (D keeps
    its initial weights, no adversarial loss is logged), then D and the adversarial term join;
    --rec-region whole reconstructs G^H's whole volume, and its loss is that L1 (with G^L's), which a
    user can recompute; both are recorded in config.json; bad values are refused."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 2, "augment": "off", "diffaug": "off"}
    opts |= {"lambda_rec": 10.0, "rec_region": "whole", "rec_warmup": 2, "output": str(tmp_path / "w")}
    t = Trainer(opts)
    d0 = {k: v.clone() for k, v in t.net.dl.state_dict().items()}
    g0 = t.net.gh.convs[0].weight.detach().clone()
    # the first iteration's loss, recomputed from the starting weights and the same batch
    probe = Trainer(opts | {"output": str(tmp_path / "probe")})
    x, _ = probe._batch()
    with torch.no_grad():
        z = probe.net.eg(probe.net.encode_features(x, 1, probe.channels_last))
        f = probe.net.features(z)
        x_low = torch.nn.functional.avg_pool3d(x, probe.net.feat_scale)
        want = (float((probe.net.gh(f) - x).abs().mean()) + float((probe.net.gl(f) - x_low).abs().mean())) / 2
    first = t.step()
    assert "g" not in first and "d_real" not in first
    assert first["e_g"] == pytest.approx(want, rel=1e-4)  # the same graph in fp32: summation order only
    t.step()
    assert all(torch.equal(v, d0[k]) for k, v in t.net.dl.state_dict().items())  # D idle in the warm-up
    assert not torch.equal(t.net.gh.convs[0].weight, g0)  # G learned
    after = t.step()  # iteration 3: the GAN
    assert {"g", "d_real", "d_fake", "e_g"} <= set(after)
    assert not all(torch.equal(v, d0[k]) for k, v in t.net.dl.state_dict().items())
    t.fit()
    training = from_pretrained(tmp_path / "w" / "model").config.training
    assert training["rec_region"] == "whole" and training["rec_warmup"] == 2
    for bad in ({"rec_warmup": -1}, {"rec_warmup": 1.5}, {"rec_region": "slab"}, {"lambda_rec": 0.0}):
        with pytest.raises(ValueError, match="rec_warmup|rec_region"):
            Trainer(opts | bad | {"output": str(tmp_path / "bad")})


def test_latent_refit_standardises_the_codes_without_changing_the_networks_outputs(
    brain_ds: Path, tmp_path: Path
) -> None:
    """--latent-refit N: every N iterations the codes of the training volumes are made standard normal
    (their fitted mean and covariance folded into E^G's output layer and G^A's first layer, live and EMA),
    so a reconstruction G(E(x)) is what it was, the codes of the real volumes have mean 0 and covariance
    I where they span, and a sampled z is read as a draw from the real codes' Gaussian."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 2, "augment": "off", "diffaug": "off"}
    t = Trainer(opts | {"output": str(tmp_path / "r"), "latent_refit": 2})
    t.step()
    net = t.net.eval()
    x = torch.from_numpy(np.stack([np.asarray(t.data.volume(i), np.float32) for i in range(len(t.data))]))[:, None]

    def codes() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net.eg(net.encode_features(x[i : i + 1], None, t.channels_last)) for i in range(len(x))])

    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    net.train()
    row = t.step()  # iteration 2: the refit, after the step's updates
    assert row["latent_mean_norm"] > 0 and row["latent_std"] > 0
    net.eval()
    c1 = codes()
    # the weights moved in step 2, so compare the refit against the same weights unfolded by hand
    assert torch.allclose(c1.mean(0), torch.zeros(16), atol=1e-4)
    lam = torch.linalg.eigvalsh(torch.cov(c1.T.double()))  # whitened: 1 where the volumes span, less elsewhere
    assert abs(float(lam.max()) - 1.0) < 1e-3 and float(lam.min()) > -1e-6
    # folded exactly: decoding z after the fit = decoding m' + s' * z with the pre-fit layers
    t2 = Trainer(opts | {"output": str(tmp_path / "r2"), "latent_refit": 0})
    t2.step()
    t2.step()  # the same two updates, no refit
    net2 = t2.net.eval()
    with torch.no_grad():
        c2 = torch.cat([net2.eg(net2.encode_features(x[i : i + 1], None, t2.channels_last)) for i in range(len(x))])
        m2 = c2.mean(0)
        lam, vec = torch.linalg.eigh(torch.cov(c2.T.double()))
        lam = lam.clamp_min(LATENT_FLOOR * float(lam.clamp_min(0).mean()) + 1e-12)
        root = ((vec * lam.sqrt()) @ vec.T).float()
        want = net2.gh(net2.features(m2 + z @ root))
        got = net.gh(net.features(z))
        assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
        assert torch.allclose(c1 @ root + m2, c2, atol=1e-4)  # E^G's codes: z = L^-1 (c - m)
        want_ema = t2.ema.eval().gh(t2.ema.features(m2 + z @ root))
        assert torch.allclose(t.ema.eval().gh(t.ema.features(z)), want_ema, atol=1e-4)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="latent_refit"):
            Trainer(opts | {"latent_refit": bad, "output": str(tmp_path / "bad")})


def test_init_from_starts_a_run_from_a_model_directory(brain_ds: Path, tmp_path: Path) -> None:
    """--init-from MODEL: a new run starts from a finished model's weights (its served G as the live G
    and the EMA, its encoders and D), takes its width and latent size, records where it came from, and
    refuses a model that does not fit the dataset or the options; a resumed run keeps its own weights."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 1, "augment": "off"}
    a = Trainer(opts | {"output": str(tmp_path / "a"), "lambda_rec": 10.0})
    a.fit()
    src = from_pretrained(tmp_path / "a" / "model").net.state_dict()
    # width and latent size come from the model (asked for by neither option here)
    given = {k: v for k, v in opts.items() if k not in ("width", "latent_dim")}
    b = Trainer(given | {"output": str(tmp_path / "b"), "init_from": str(tmp_path / "a")})
    assert (b.cfg.width, b.cfg.latent_dim) == (0.25, 16)
    assert b.init_parts == ["dh", "dl", "eg", "eh", "ga", "gh", "gl"] and b.iteration == 0
    live, ema = b.net.state_dict(), b.ema.state_dict()
    assert [k for k in src if not torch.equal(live[k], src[k])] == []  # the served weights, every part
    assert [k for k in src if k.split(".")[0] in ("ga", "gl", "gh") and not torch.equal(ema[k], src[k])] == []
    fresh = Trainer(given | {"output": str(tmp_path / "f"), "width": 0.25, "latent_dim": 16})
    assert not torch.equal(fresh.net.state_dict()["gh.convs.0.weight"], src["gh.convs.0.weight"])
    b.fit()
    # the EMA was the model's G already: it takes the full decay (0.999) at once, not the ramp from 0.1
    g0, g1, e1 = src["gh.convs.0.weight"], b.net.gh.convs[0].weight.detach(), b.ema.gh.convs[0].weight
    assert torch.allclose(e1, g0 + 0.001 * (g1 - g0), atol=1e-7)
    cfg = from_pretrained(tmp_path / "b" / "model").config
    assert cfg.training["init_from"] == "a" and "initialised from the model a" in cfg.description
    # resumed, the run's own checkpoint decides (not the model it started from)
    b2 = Trainer(given | {"output": str(tmp_path / "b"), "init_from": str(tmp_path / "a"), "resume": True})
    got = b2.net.state_dict()
    assert b2.iteration == 1 and torch.equal(got["gh.convs.0.weight"], b.net.state_dict()["gh.convs.0.weight"])
    # refused: an architecture that disagrees, a dataset on another grid, not a model
    with pytest.raises(ValueError, match="latent_dim 16, not 32"):
        Trainer(given | {"output": str(tmp_path / "x"), "init_from": str(tmp_path / "a"), "latent_dim": 32})
    cfg_file = tmp_path / "a" / "model" / "config.json"
    d = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(d | {"preprocess": d["preprocess"] | {"spacing": [1.0, 1.0, 1.0]}}))
    with pytest.raises(ValueError, match="preprocessing is physical at \\[1.0, 1.0, 1.0\\] mm"):
        Trainer(given | {"output": str(tmp_path / "x"), "init_from": str(tmp_path / "a")})
    with pytest.raises(ValueError, match="neither a model directory"):
        Trainer(given | {"output": str(tmp_path / "x"), "init_from": str(tmp_path / "nothing")})


def test_a_wider_gh_starts_from_a_models_narrow_one(brain_ds: Path, tmp_path: Path) -> None:
    """--gh-width with --init-from: the model's G^H is widened by copying channels, so the wider G^H
    draws what the model drew (exactly without the symmetry-breaking noise, nearly with it); the width
    is in the config and a resumed run rebuilds it; narrowing, or a widening whose GroupNorm groups
    would change, is refused."""
    from model.hagan.networks import HAGAN, widen_gh_state

    torch.manual_seed(0)
    narrow = HAGAN(HAGANConfig(resolution=128, latent_dim=8, width=0.5, norm_min_group=2)).eval()
    for n in narrow.gh.norms:  # affine parameters away from their initial 1 and 0
        n.weight.data.uniform_(0.5, 1.5)
        n.bias.data.uniform_(-0.5, 0.5)
    wide = HAGAN(HAGANConfig(resolution=128, latent_dim=8, width=0.5, norm_min_group=2, gh_width=2.0)).eval()
    wide.load_state_dict(widen_gh_state(narrow.state_dict(), 64, 2, noise=0.0))
    f = torch.randn(1, 32, 6, 6, 6)
    with torch.no_grad():
        # the same sums in another order (the copies' weights divided by 4): float32 rounding only
        assert torch.allclose(wide.gh(f), narrow.gh(f), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be widened from 8 to 16"):  # 4 GroupNorm groups -> 8
        quarter = HAGAN(HAGANConfig(resolution=128, latent_dim=8, width=0.25, norm_min_group=2))
        widen_gh_state(quarter.state_dict(), 16, 2)

    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 1, "augment": "off", "width": 0.5}
    Trainer(opts | {"output": str(tmp_path / "a")}).fit()
    given = {k: v for k, v in opts.items() if k not in ("width", "latent_dim")}
    b = Trainer(given | {"output": str(tmp_path / "b"), "init_from": str(tmp_path / "a"), "gh_width": 1.0})
    assert (b.cfg.width, b.cfg.gh_width, b.net.gh.convs[0].out_channels) == (0.5, 1.0, 32)
    src = from_pretrained(tmp_path / "a" / "model")
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = src.net.gh(src.net.features(z))
        got = b.ema.eval().gh(b.ema.features(z))
    assert not torch.equal(got, want)  # the copies were perturbed, so that they can learn apart
    assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.99
    b.fit()
    tuned = from_pretrained(tmp_path / "b" / "model")
    assert tuned.config.gh_width == 1.0 and tuned.net.gh.convs[1].in_channels == 32
    with torch.no_grad():  # the served (folded) paths draw what the plain network draws, as at width's G^H
        plain = tuned.net.eval().gh(tuned.net.features(z))
    for mode in ("whole", "slab"):
        assert (tuned.generate(z, mode=mode, slab_rows=24) - plain).abs().max().item() <= 1e-4
    again = {"output": str(tmp_path / "b"), "init_from": str(tmp_path / "a"), "gh_width": 1.0, "resume": True}
    b2 = Trainer(given | again)
    assert b2.iteration == 1 and torch.equal(b2.net.gh.convs[0].weight, b.net.gh.convs[0].weight)
    with pytest.raises(ValueError, match="G\\^H has width 1.0; it can be widened, not narrowed"):
        Trainer(given | {"output": str(tmp_path / "x"), "init_from": str(tmp_path / "b"), "gh_width": 0.5})


def test_freeze_g_trains_the_encoders_alone(brain_ds: Path, tmp_path: Path) -> None:
    """--freeze-g on: a run from a model trains E^H and E^G through its frozen G; the served G (and D)
    come out bit for bit as they went in, the encoders move and their reconstruction loss is reported;
    it is recorded in the config, and refused without a model to start from."""
    opts = SMALL | {"data": str(brain_ds), "monitor_every": 0, "iterations": 1, "augment": "off"}
    Trainer(opts | {"output": str(tmp_path / "a"), "lambda_rec": 10.0}).fit()
    src = from_pretrained(tmp_path / "a" / "model").net.state_dict()
    given = {k: v for k, v in opts.items() if k not in ("width", "latent_dim")}
    b = Trainer(given | {"output": str(tmp_path / "b"), "init_from": str(tmp_path / "a"), "freeze_g": "on"})
    b.o["iterations"] = 2
    assert b.o["monitor_every"] == 0  # the monitor scores G, which does not change
    losses = b.step()
    assert {"e_h", "e_g"} <= set(losses) and not {"d_real", "d_fake", "g"} & set(losses)
    b.fit()
    out = from_pretrained(tmp_path / "b" / "model").net.state_dict()
    same = [k for k in src if k.split(".")[0] in ("ga", "gl", "gh", "dh", "dl") and not torch.equal(out[k], src[k])]
    assert same == []
    moved = [k for k in src if k.split(".")[0] in ("eh", "eg") and not torch.equal(out[k], src[k])]
    assert moved and {k.split(".")[0] for k in moved} == {"eh", "eg"}
    cfg = from_pretrained(tmp_path / "b" / "model").config
    assert cfg.training["freeze_g"] == "on"
    with pytest.raises(ValueError, match="freeze_g trains the encoders of a trained G: it needs init_from"):
        Trainer(opts | {"output": str(tmp_path / "x"), "freeze_g": "on"})
    with pytest.raises(ValueError, match="freeze_g must be on or off"):
        Trainer(opts | {"output": str(tmp_path / "x"), "freeze_g": "yes"})


def _glo_l1(t: Trainer) -> float:
    """Full-volume L1 of the live G from each training volume's code against the volume."""
    x = torch.from_numpy(np.stack([np.asarray(t.data.volume(i), np.float32) for i in range(len(t.data))]))[:, None]
    with torch.no_grad():
        return float((t.net.gh(t.net.features(t.codes.detach(), None)) - x).abs().mean())


GLO = SMALL | {"objective": "glo", "batch": 2, "monitor_every": 0, "lr_g": 1e-3, "code_noise": 0.3}


def test_glo_fits_g_to_a_code_per_volume_and_serves_their_gaussian(brain_ds: Path, tmp_path: Path) -> None:
    """--objective glo: G alone learns the training volumes from a code each (the L1 of G(code) against
    its volume falls), D and the encoders stay as initialised, the recipe's augmentation is off; the
    served G takes z ~ N(0, I) where the live G takes a code drawn from the codes' Gaussian (folded into
    G^A's first layer: the same features up to float32 rounding of a float64 fold), and the config
    records the objective."""
    run = tmp_path / "glo"
    t = Trainer(GLO | {"data": str(brain_ds), "output": str(run), "iterations": 8, "checkpoint_every": 8})
    assert t.augment is None and t.codes is not None and t.codes.shape == (4, 16)
    idle = {k: v.clone() for k, v in t.net.state_dict().items() if k.split(".")[0] in ("dh", "dl", "eh", "eg")}
    before = _glo_l1(t)
    losses = t.step()
    assert set(losses) == {"rec", "code_prior"}
    t.fit()
    assert _glo_l1(t) < 0.9 * before, (before, _glo_l1(t))
    m = from_pretrained(run / "model")
    served = m.net.state_dict()
    assert [k for k in idle if not torch.equal(idle[k], served[k])] == []
    assert m.config.training["objective"] == "glo" and m.config.training["code_noise"] == 0.3
    assert m.config.training["augment"] == "off" and "generative latent optimisation" in m.config.description
    from model.hagan.networks import code_gaussian

    mean, root, _, _ = code_gaussian(t.codes.detach(), 0.01)
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = t.ema.features((mean + z.double() @ root).float(), None)
        got = m.net.features(z, None)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the codes' Gaussian is not N(0, I): a G that ignored the fold would differ
    with torch.no_grad():
        assert not torch.allclose(t.ema.features(z, None), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_glo_resumes_exactly_and_its_options_are_checked(brain_ds: Path, tmp_path: Path) -> None:
    """A glo run resumed from its checkpoint continues bit for bit (G, the codes, the EMA, the noise
    generator); what glo cannot take is refused, naming the encoders' way afterwards."""
    opts = GLO | {"data": str(brain_ds)}
    a = Trainer(opts | {"output": str(tmp_path / "a"), "iterations": 3})
    a.fit()
    Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 2}).fit()
    b = Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 3, "resume": True})
    assert b.iteration == 2
    b.fit()
    assert torch.equal(a.codes, b.codes)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    ea, eb = a.ema.state_dict(), b.ema.state_dict()
    assert [k for k in ea if k.split(".")[0] in ("ga", "gl", "gh") and not torch.equal(ea[k], eb[k])] == []
    with pytest.raises(ValueError, match="trained with objective glo; resume it with objective glo"):
        Trainer(opts | {"output": str(tmp_path / "b"), "iterations": 4, "resume": True, "objective": "gan"})
    wrong = (("freeze_g", "on"), ("augment", "on"), ("init_from", str(tmp_path / "a")), ("latent_refit", 5))
    for key, bad in (*wrong, ("lambda_rec", 10.0)):
        with pytest.raises(ValueError, match=f"objective glo .* cannot take {key}.*--freeze-g on"):
            Trainer(opts | {"output": str(tmp_path / "x"), key: bad})
    with pytest.raises(ValueError, match="objective must be gan or glo"):
        Trainer(opts | {"output": str(tmp_path / "x"), "objective": "vae"})
    with pytest.raises(ValueError, match="code_noise must be a number >= 0"):
        Trainer(opts | {"output": str(tmp_path / "x"), "code_noise": -1.0})


# ---------------------------------------------------------------- the recipe in the other families
SG = {"family": "stylegan3d", "shape": "16x32x32", "channels": 8, "latent_dim": 16, "mapping_width": 16}
AW = {"width": 0.125, "latent_dim": 16, "code_hidden": 32}
OTHER = {"batch": 2, "device": "cpu", "seed": 0, "recipe": "small-data", "preview_every": 100}
OTHER |= {"checkpoint_every": 1, "monitor_every": 2, "monitor_n": 2}


def _other(family: str) -> tuple[type, dict]:
    if family == "stylegan3d":
        from model.stylegan3d.train import Trainer as SGTrainer

        return SGTrainer, OTHER | SG
    from model.alphawgan.train import Trainer as AWTrainer

    return AWTrainer, OTHER | AW


@pytest.mark.parametrize("family", ["stylegan3d", "alphawgan"])
def test_small_data_recipe_in_the_other_families(family: str, brain_ds: Path, tmp_path: Path) -> None:
    """--recipe small-data in StyleGAN and alpha-WGAN: augmented real volumes, the monitor's figures in
    the metrics, the best model kept, the recipe recorded in config.json, the EMA of G served; and an
    exact resume (the augmentation's generator, the EMA and the best model go with the checkpoint)."""
    trainer, opts = _other(family)
    opts = opts | {"data": str(brain_ds), "monitor_every": 1}
    run = tmp_path / "a"
    t = trainer(opts | {"output": str(run), "iterations": 2})
    assert t.augment is not None and t.o["diffaug"] == "on"
    real = t._batch().cpu()
    grid = [t._volume(i) if family == "stylegan3d" else t.volume(i)[0] for i in range(len(t.data))]
    assert all(not np.allclose(r[0].numpy(), np.asarray(g), atol=1e-3) for r in real for g in grid)  # augmented
    t.rng = np.random.default_rng(int(t.o["seed"]) + 2)  # the batch above drew from the run's generators
    t.aug_gen.manual_seed(int(t.o["seed"]) + (4 if family == "stylegan3d" else 3))
    t.fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert {"q_fd_texture", "q_floor", "q_spread"} <= set(r)
        assert all(np.isfinite(v) for k, v in r.items() if k != "time")
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["q_fd_texture"] == min(r["q_fd_texture"] for r in rows)
    assert from_pretrained(run / "best").config.family == family
    m = from_pretrained(run / "model")
    assert m.config.training["recipe"] == "small-data" and m.config.training["augment"] == "on"
    served = m.net.state_dict()
    if family == "alphawgan":  # the served G is the EMA, E/D/C are the live ones
        assert m.config.training["ema"] == 0.999
        ema, live = t.ema_g.state_dict(), t.net.state_dict()
        assert all(torch.equal(served[f"g.{k}"], v) for k, v in ema.items())
        assert any(not torch.equal(served[f"g.{k}"], live[f"g.{k}"]) for k in ema if k.endswith("weight"))
        assert torch.equal(served["e.convs.0.weight"], live["e.convs.0.weight"])
    else:
        assert all(torch.equal(served[f"G.{k}"], v) for k, v in t.G_ema.state_dict().items())

    trainer(opts | {"output": str(tmp_path / "b"), "iterations": 1}).fit()
    b = trainer(opts | {"output": str(tmp_path / "b"), "iterations": 2, "resume": True})
    assert b.iteration == 1 and b.quality.best is not None and b.quality.best["iteration"] == 1
    b.fit()
    assert b.quality.best == t.quality.best
    ema_a, ema_b = (t.ema_g, b.ema_g) if family == "alphawgan" else (t.G_ema, b.G_ema)
    for na, nb in ((t.net, b.net), (ema_a, ema_b)):
        sa, sb = na.state_dict(), nb.state_dict()
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def test_small_data_recipe_for_slices_and_its_checks(brain_ds: Path, tmp_path: Path) -> None:
    """A --dims 2 StyleGAN run (for inflation) takes the recipe on slices (DiffAugment on [B, C, H, W],
    the volumes augmented before slicing) without the 3D monitor; asking for that monitor is an error,
    as is an unknown recipe or switch in any family."""
    trainer, opts = _other("stylegan3d")
    opts = opts | {"data": str(brain_ds), "dims": 2, "batch": 4, "iterations": 2}
    opts.pop("monitor_every")
    t = trainer(opts | {"output": str(tmp_path / "2d")})
    assert t.o["monitor_every"] == 0 and t.o["diffaug"] == "on" and t._batch().shape == (4, 1, 32, 32)
    t.fit()
    assert not any("q_fd_texture" in ln for ln in (tmp_path / "2d" / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match="3D volumes"):
        trainer(opts | {"output": str(tmp_path / "x"), "monitor_every": 2})
    for family in ("stylegan3d", "alphawgan"):
        trainer, opts = _other(family)
        for key, bad in (("recipe", "fast"), ("diffaug", "yes"), ("augment", 1)):
            with pytest.raises(ValueError, match=key):
                trainer(opts | {"data": str(brain_ds), "output": str(tmp_path / key), key: bad})


@pytest.mark.parametrize("family", ["stylegan3d", "alphawgan"])
def test_a_run_resumed_with_the_recipe_records_it(family: str, brain_ds: Path, tmp_path: Path) -> None:
    """A run trained the authors' way and resumed with --recipe small-data trains and records the
    recipe from then on (alpha-WGAN's EMA starts from the checkpoint's G)."""
    trainer, opts = _other(family)
    opts = opts | {"data": str(brain_ds), "monitor_every": 0, "output": str(tmp_path / "r")}
    trainer(opts | {"recipe": "authors", "iterations": 1}).fit()
    t = trainer(opts | {"iterations": 2, "resume": True})
    assert t.iteration == 1 and t.augment is not None
    if family == "alphawgan":
        assert all(torch.equal(v, t.net.g.state_dict()[k]) for k, v in t.ema_g.state_dict().items())
    t.fit()
    assert from_pretrained(tmp_path / "r" / "model").config.training["recipe"] == "small-data"
