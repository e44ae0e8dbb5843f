"""HA-GAN training: data preparation, the amortised iteration, checkpoints and exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.data.datasets import VolumeDataset, prepare_dataset
from model.hagan.config import HAGANConfig
from model.hagan.train import Trainer
from model.registry import from_pretrained
from tests.helpers import straight_and_resumed

OPTS = {
    "iterations": 2,
    "batch": 1,
    "width": 0.25,
    "latent_dim": 16,
    "checkpoint_every": 2,
    "preview_every": 100,
    "device": "cpu",
    "seed": 3,
}


def _scan(i: int) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 36)] * 3, indexing="ij")
    body = x**2 + (y * 1.2) ** 2 + (z * 0.9 + 0.05 * i) ** 2 < 0.6
    v = np.where(body, 40.0, -1000.0)
    v[body & (x**2 + (y * 1.2) ** 2 > 0.45)] = 700.0  # a bone ring
    return v.astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for i in range(3):
        nib.save(nib.Nifti1Image(_scan(i), np.eye(4)), src / f"scan{i}.nii.gz")
    out = tmp_path_factory.mktemp("ds") / "ds"
    prepare_dataset(src, out, HAGANConfig(resolution=128))
    return out


def test_prepare_skips_bad_inputs_reads_dicom_and_leaves_src_alone(tmp_path: Path) -> None:
    from tests.test_volumes import save_dicom_series

    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(_scan(0), np.eye(4)), src / "good.nii.gz")
    (src / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + b"nonsense" * 20)
    save_dicom_series(src / "patient1", np.rint(_scan(1).transpose(2, 1, 0)))
    (src / "labels.csv").write_text("file,label,age\ngood.nii.gz,healthy,50\npatient1,copd,61\n")
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    report = prepare_dataset(src, tmp_path / "ds", HAGANConfig(resolution=128), labels_csv=src / "labels.csv")
    assert report["prepared"] == 2
    assert [s["source"] for s in report["skipped"]] == ["corrupt.nii.gz"]
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before
    ds = VolumeDataset(tmp_path / "ds")
    assert len(ds) == 2 and ds.class_names == ["copd", "healthy"]
    v = ds.volume(0)
    assert v.shape == (128, 128, 128) and v.dtype == np.float16 and -1 <= v.min() < v.max() <= 1
    assert json.loads((tmp_path / "ds" / "report.json").read_text())["skipped"][0]["reason"]


def test_prepare_reads_every_series_of_a_folder_and_series_uid_restricts_it(tmp_path: Path) -> None:
    from tests.test_volumes import save_dicom_series

    src = tmp_path / "src"
    a, b = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"
    for i, uid in enumerate((a, b)):  # one study folder, two series, files named by their UIDs
        save_dicom_series(src / "study", np.rint(_scan(i + 1).transpose(2, 1, 0)), uid=uid, name="{uid}.{k}")
    save_dicom_series(src / "single", np.rint(_scan(3).transpose(2, 1, 0)), uid="1.2.3.9", name="IM{k:04d}.IMA")
    nib.save(nib.Nifti1Image(_scan(0), np.eye(4)), src / "good.nii.gz")
    (src / "labels.csv").write_text(f"file,label\nstudy#{b},copd\nstudy,healthy\nsingle,copd\n")
    cfg = HAGANConfig(resolution=128)
    report = prepare_dataset(src, tmp_path / "ds", cfg, labels_csv=src / "labels.csv")
    assert report == {"prepared": 4, "skipped": []}
    ds = VolumeDataset(tmp_path / "ds")
    rows = {it["source"]: it for it in ds.items}
    assert set(rows) == {"good.nii.gz", f"study#{a}", f"study#{b}", "single"}
    assert rows[f"study#{a}"]["series_uid"] == a and "series_uid" not in rows["single"]
    # labels: by folder#uid first, else by the folder's name
    assert rows[f"study#{b}"]["label"] == "copd" and rows[f"study#{a}"]["label"] == "healthy"
    va, vb = (np.asarray(ds.volume(ds.items.index(rows[f"study#{u}"]))) for u in (a, b))
    assert not np.array_equal(va, vb)  # each series its own volume
    report = prepare_dataset(src, tmp_path / "ds_b", cfg, series_uids=[b])
    assert report == {"prepared": 2, "skipped": [], "series_left_out": 2}
    picked = VolumeDataset(tmp_path / "ds_b")
    assert [it["source"] for it in picked.items] == ["good.nii.gz", f"study#{b}"]
    assert np.array_equal(np.asarray(picked.volume(1)), vb)
    with pytest.raises(ValueError, match="no DICOM series with the UID 9.9.9"):
        prepare_dataset(src, tmp_path / "ds_x", cfg, series_uids=[b, "9.9.9"])
    assert not (tmp_path / "ds_x").exists()  # refused before anything is written


def test_iterations_change_the_weights_and_write_checkpoints(dataset: Path, tmp_path: Path) -> None:
    t = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "run")})
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    t.fit()
    after = t.net.state_dict()
    for prefix in ("ga.", "gh.", "gl.", "dh.", "dl.", "eh.", "eg."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    m = from_pretrained(tmp_path / "run" / "model")
    assert m.config.resolution == 128 and m.latent_dim == 16
    # the sources are 36^3 at 1 mm: the model writes 128^3 volumes of the same field of view
    assert m.spacing == pytest.approx((36 / 128,) * 3)
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002" / "train.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2]
    assert list((tmp_path / "run" / "previews").glob("*.png"))


def test_resume_equals_uninterrupted(dataset: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(Trainer, OPTS | {"data": str(dataset)}, tmp_path, stop=2, total=4)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_encoder_training_lowers_the_reconstruction_loss(dataset: Path, tmp_path: Path) -> None:
    t = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "r"), "lr_e": 2e-3})
    x = torch.from_numpy(np.asarray(VolumeDataset(dataset).volume(0), np.float32))[None, None]
    crop = x[:, :, 32:48]

    def rec_loss() -> float:
        with torch.no_grad():
            return float(F.l1_loss(t.net.gh(t.net.eh(crop)), crop))

    first = rec_loss()
    for _ in range(6):
        t.step()
    assert rec_loss() < first


def test_a_kill_mid_checkpoint_leaves_the_last_good_one(dataset: Path, tmp_path: Path) -> None:
    t = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "k")})
    t.fit()
    # a checkpoint being written when the process died: a temporary folder, no pointer update
    (tmp_path / "k" / "checkpoints" / ".iter_0000004.partial").mkdir()
    (tmp_path / "k" / "checkpoints" / ".iter_0000004.partial" / "model.safetensors").write_bytes(b"half")
    r = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "k"), "iterations": 3, "resume": True})
    assert r.iteration == 2
    r.fit()
    assert json.loads((tmp_path / "k" / "latest.json").read_text())["iteration"] == 3


def test_cli_prepare_and_train(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(_scan(i), np.eye(4)), src / f"s{i}.nii.gz")

    def run(*a: str) -> str:
        p = subprocess.run([sys.executable, "-m", "model.cli", *a], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout + p.stderr

    run("prepare", str(src), "-o", str(tmp_path / "ds"), "--modality", "ct", "--resolution", "128")
    from tests.test_volumes import save_dicom_series

    for i, uid in enumerate(("1.2.3.41", "1.2.3.42")):
        save_dicom_series(src / "study", np.rint(_scan(i).transpose(2, 1, 0)), uid=uid, name="{uid}.{k}")
    out = run("prepare", str(src), "-o", str(tmp_path / "ds2"), "--modality", "ct", "--resolution", "128")
    assert '"prepared": 4' in out  # two files and the folder's two series
    args = ("prepare", str(src), "-o", str(tmp_path / "ds3"), "--modality", "ct", "--resolution", "128")
    out = run(*args, "--series-uid", "1.2.3.42")
    assert '"prepared": 3' in out and '"series_left_out": 1' in out
    assert [it["source"] for it in VolumeDataset(tmp_path / "ds3").items] == [
        "s0.nii.gz",
        "s1.nii.gz",
        "study#1.2.3.42",
    ]
    out = run(
        "train",
        "--data",
        str(tmp_path / "ds"),
        "-o",
        str(tmp_path / "run"),
        "--iterations",
        "1",
        "--batch",
        "1",
        "--width",
        "0.25",
        "--latent-dim",
        "16",
        "--device",
        "cpu",
    )
    assert "[1/1]" in out and "it/s" in out
    assert from_pretrained(tmp_path / "run" / "model").config.latent_dim == 16


def test_fused_and_literal_upsample_convs_train_the_same(dataset: Path, tmp_path: Path) -> None:
    """The training speed-ups (one transposed conv per upsample + conv, the mixed memory layout,
    Adam's fused kernel) change only the order of the arithmetic.  Compared where a bound holds for
    any CPU: the D losses of an iteration (forward passes before its first update) to 1e-5, on the
    initial weights and again on the weights one fast iteration updated (the literal trainer is
    given the fast one's weights, Adam moments and random streams); the generator gradients to
    0.5%; fused and default Adam give the same update from the same gradients (below).

    Losses after an update are not compared: training amplifies rounding.  Measured on AMD AVX2,
    the e_g loss of the first iteration differs by 1.5e-4 relative between the paths (2.7e-4 in
    the second), on Intel AMX by 1.04e-3, and swapping Adam for SGD does not remove it, so no
    tolerance there would follow from the arithmetic."""
    trainers = []
    for fast in (True, False):
        opts = OPTS | {"channels_last": "on" if fast else "off", "fused_adam": "on" if fast else "off"}
        t = Trainer(opts | {"data": str(dataset), "output": str(tmp_path / str(fast)), "iterations": 2})
        t.net.set_fused_upconv(fast)
        assert t.channels_last is fast and t.net.ga.mixed_layout is fast
        assert all(o.defaults["fused"] is (True if fast else None) for o in t.opts.values())
        trainers.append(t)
    fast_t, literal_t = trainers
    d_losses = ("d_real", "d_fake")
    first = [t.step() for t in trainers]
    assert [first[0][k] for k in d_losses] == pytest.approx([first[1][k] for k in d_losses], rel=1e-5)
    # the literal trainer continues from exactly the fast trainer's state
    literal_t.net.load_state_dict(fast_t.net.state_dict())
    for k, o in fast_t.opts.items():
        p_fast = [p for g in o.param_groups for p in g["params"]]
        p_lit = [p for g in literal_t.opts[k].param_groups for p in g["params"]]
        literal_t.opts[k].state.clear()
        for a, b in zip(p_fast, p_lit, strict=True):
            if a in o.state:
                literal_t.opts[k].state[b] = {n: v.clone() for n, v in o.state[a].items()}
    literal_t.gen.set_state(fast_t.gen.get_state())
    literal_t.rng.bit_generator.state = fast_t.rng.bit_generator.state
    second = [t.step() for t in trainers]
    assert [second[0][k] for k in d_losses] == pytest.approx([second[1][k] for k in d_losses], rel=1e-5)
    assert second[0]["d_real"] != first[0]["d_real"]  # the second iteration ran on updated weights

    net = t.net
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for fused in (True, False):
        net.set_fused_upconv(fused)
        net.zero_grad(set_to_none=True)
        hi, lo = net.generate_train(z, 16, None)
        (hi.square().mean() + lo.abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(n.startswith("ga.convs") for n in grads[0])
    for n, g in grads[0].items():
        # a conv bias in front of a GroupNorm has a zero gradient in exact arithmetic (noise here)
        tol = 5e-3 * g.norm() + (1e-6 if n.endswith("bias") else 1e-9)
        assert (g - grads[1][n]).norm() <= tol, n  # fp32 summation order only


def test_fused_adam_makes_the_default_adams_update() -> None:
    """Adam's fused kernel (the trainer's fused_adam) and the default one take the same step from the
    same gradients: two steps with the trainer's betas, to float32 rounding of the update."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=g)
    grads = [torch.randn(64, 32, generator=g) * s for s in (1.0, 1e-3)]
    out = []
    for fused in (True, None):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.Adam([w], lr=1e-2, betas=(0.0, 0.999), eps=1e-8, fused=fused)
        for gr in grads:
            w.grad = gr.clone()
            opt.step()
        out.append(w.detach())
    assert (out[0] - w0).abs().max() > 1e-3  # the weights really moved
    assert (out[0] - out[1]).abs().max() <= 1e-6  # update ~2e-2; float32 rounding of w ~ 4e-7


def test_mixed_precision_iterations_run_and_learn(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--amp on (bf16 autocast; on this CPU the same code path CUDA takes): finite losses, fp32
    weights that change, and a model directory that loads; on a CPU without native bf16 the user is
    told it runs emulated (and slower), on one with it not."""
    from model.precision import cpu_has_bf16

    capsys.readouterr()
    t = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "amp"), "amp": "on", "iterations": 1})
    assert t.amp_dtype == torch.bfloat16
    assert ("no native bf16" in capsys.readouterr().err) == (not cpu_has_bf16())
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    t.fit()
    after = t.net.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("ga."))
    rows = [json.loads(x) for x in (tmp_path / "amp" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if k not in ("iteration", "time"))
    assert from_pretrained(tmp_path / "amp" / "model").latent_dim == 16
    off = Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "off")})
    assert off.amp_dtype is None  # auto: fp32 on the CPU
    with pytest.raises(ValueError, match="amp"):
        Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "bad"), "amp": "fp8"})


def test_bad_speed_options_are_refused(dataset: Path, tmp_path: Path) -> None:
    """The trainer's tuning options take only their documented values, with a message naming them."""
    for key, bad in (("tune_malloc", "auto"), ("channels_last", "yes"), ("fused_adam", 1), ("amp", "fp16")):
        with pytest.raises(ValueError, match=key):
            Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / key), key: bad})
