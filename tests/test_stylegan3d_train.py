"""3D-StyleGAN / Split&Shuffle-GAN training: weights change, exact resume, 2D pre-training then a
3D run inflated from it through the CLI, the inflated network's slices, and the service serving a
model of this family (generate, encode by projection, traverse)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.cli import main as voxgen
from model.data.grid import resample
from model.registry import from_pretrained
from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.inflate import inflate_network
from model.stylegan3d.layers import downsample2x_explicit, upsample2x, upsample2x_explicit
from model.stylegan3d.model import StyleGAN3DModel
from model.stylegan3d.networks import StyleGAN3D
from model.stylegan3d.train import Trainer
from tests.helpers import check_served_as_trained, phantom_dataset, straight_and_resumed

TINY = {
    "shape": "8x16x16",
    "channels": 8,
    "latent_dim": 16,
    "mapping_width": 16,
    "batch": 2,
    "device": "cpu",
    "seed": 3,
    "checkpoint_every": 2,
    "preview_every": 100,
    "log_every": 100,
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four CT phantoms (40x48x48 voxels of 1.5 x 1 x 1 mm), prepared at 128^3."""
    return phantom_dataset(tmp_path_factory.mktemp("sg"), "ct", (40, 48, 48), (1.5, 1.0, 1.0))


def opts(dataset: Path, run: Path, **kw) -> dict:
    return TINY | {"data": str(dataset), "output": str(run)} | kw


# ------------------------------------------------------------------------------------- training
def test_a_short_run_changes_weights_and_writes_a_servable_model(dataset: Path, tmp_path: Path) -> None:
    t = Trainer(opts(dataset, tmp_path / "run", iterations=3, preview_every=3))
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    ema_before = {k: v.clone() for k, v in t.G_ema.state_dict().items()}
    calls = []
    model_dir = t.fit()
    t2 = Trainer(opts(dataset, tmp_path / "run2", iterations=1), progress=lambda *a: calls.append(a))
    t2.fit()
    after = t.net.state_dict()
    for prefix in ("G.mapping.", "G.synthesis.", "D."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert any(not torch.equal(ema_before[k], v) for k, v in t.G_ema.state_dict().items())
    assert calls[-1] == (1, 1, "train")
    # the run folder
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert {"g", "d_real", "d_fake", "r1", "pl"} <= set(rows[0]) and all(np.isfinite(r["g"]) for r in rows)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["checkpoint"] == "iter_0000003"
    ck = tmp_path / "run" / "checkpoints" / "iter_0000002"
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "train.safetensors", "state.json"}
    assert list((tmp_path / "run" / "previews").glob("iter_0000003.png"))
    # RUN/model: G_ema + D, loads through the registry, on the grid, spacing from the data
    m = from_pretrained(model_dir)
    assert isinstance(m, StyleGAN3DModel) and m.family == "splitshuffle" and m.config.variant == "split-shuffle"
    ema = t.G_ema.state_dict()
    assert all(torch.equal(m.net.G.state_dict()[k], ema[k].cpu()) for k in ema)
    # 48 x 48 x 40 voxels of 1 x 1 x 1.5 mm (x, y, z), resampled to 16 x 16 x 8
    assert m.spacing == pytest.approx((72 / 16, 48 / 16, 40 / 8))
    v = m.generate(m.sample_latents(2, seed=1))
    assert v.shape == (2, 1, 8, 16, 16) and torch.isfinite(v).all()
    assert torch.equal(v, from_pretrained(model_dir).generate(m.sample_latents(2, seed=1)))


def test_resume_equals_uninterrupted(dataset: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(Trainer, TINY | {"data": str(dataset)}, tmp_path, stop=2, total=4)
    for name in ("net", "G_ema"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert torch.equal(a.pl_mean, b.pl_mean)
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in la] == [
        {k: v for k, v in r.items() if k != "time"} for r in lb
    ]
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(opts(dataset, tmp_path / "empty", iterations=2, resume=True))


def test_2d_run_then_3d_run_inflated_from_it_through_the_cli(dataset: Path, tmp_path: Path, capsys) -> None:
    common = ["--data", str(dataset), "--device", "cpu", "--shape", "8x16x16", "--width", "0.25"]
    common += ["--latent-dim", "16", "--batch", "2", "--checkpoint-every", "100", "--preview-every", "100"]
    run2 = tmp_path / "run2d"
    assert (
        voxgen(["train", "--family", "splitshuffle", "--dims", "2", "-o", str(run2), "--iterations", "3", *common]) == 0
    )
    m2 = from_pretrained(run2 / "model")
    assert m2.config.dims == 2 and m2.config.channels == 8 and m2.output_shape == (1, 16, 16)
    assert m2.generate(m2.sample_latents(1, 0)).shape == (1, 1, 1, 16, 16)
    run3 = tmp_path / "run3d"
    args = ["train", "--family", "splitshuffle", "-o", str(run3), "--iterations", "2", "--init-from", str(run2)]
    assert voxgen([*args, "--inflate", "inflate-3", "--inflate-parts", "g", *common]) == 0
    capsys.readouterr()
    state = json.loads((run3 / "checkpoints" / "iter_0000002" / "state.json").read_text())
    assert state["init"]["strategy"] == "inflate-3" and state["init"]["parts"] == ["G"]
    assert state["lr"] == 0.002  # the paper's learning rate from inflated weights
    m3 = from_pretrained(run3 / "model")
    assert m3.config.dims == 3 and m3.output_shape == (8, 16, 16) and "inflate-3" in m3.config.description
    # the mapping network was copied from the 2D model and then trained for two iterations only:
    # still close to the 2D one, unlike a fresh network's
    k = "G.mapping.layers.0.weight"
    w2, w3 = m2.net.state_dict()[k], m3.net.state_dict()[k]
    fresh = StyleGAN3D(m3.config).state_dict()[k]
    assert (w3 - w2).abs().max() < 0.1 * (fresh - w2).abs().max()
    # the finished model generates through the CLI (NIfTI (x, y, z) = (W, H, D))
    out = tmp_path / "gen.nii.gz"
    assert voxgen(["generate", "--model", str(run3 / "model"), "--seed", "1", "--device", "cpu", "-o", str(out)]) == 0
    import nibabel as nib

    assert nib.load(out).shape == (16, 16, 8)
    # a bad source is refused with a message
    bad = ["train", "--family", "splitshuffle", "-o", str(tmp_path / "x"), "--init-from", str(run3), *common]
    assert voxgen(bad) == 2
    assert "inflation needs a 2D model" in capsys.readouterr().err


def test_inflating_a_trained_2d_network_starts_3d_from_its_slices(dataset: Path, tmp_path: Path) -> None:
    """The issue's claim, on a 2D network trained here on the phantoms' axial slices: before any
    3D training, the inflated generator's axial slices are closer to the 2D model's images (same
    latent, constant noise) than those of a randomly initialised 3D network."""
    Trainer(opts(dataset, tmp_path / "r2", dims=2, iterations=4, batch=4)).fit()
    m2 = from_pretrained(tmp_path / "r2" / "model")
    net3 = inflate_network(m2.net, "inflate-1", ("G", "D"), seed=0).eval()
    rand3 = StyleGAN3D(m2.config.with_dims(3)).eval()
    z = torch.randn(4, m2.config.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img2 = m2.net.G(z, noise_mode="const")  # [4, 1, 16, 16]
        v_inf, v_rnd = net3.G(z, noise_mode="const"), rand3.G(z, noise_mode="const")
    mid = m2.config.shape[0] // 2
    assert img2.std() > 0.01
    err_inf, err_rnd = F.mse_loss(v_inf[:, :, mid], img2), F.mse_loss(v_rnd[:, :, mid], img2)
    assert err_inf < 0.25 * err_rnd, (err_inf, err_rnd)


# ------------------------------------------------------------------------------ supporting code
def test_explicit_resampling_equals_the_library_ops() -> None:
    """The CUDA path (explicit, deterministic backward) computes what the CPU path computes."""
    x = torch.randn(2, 3, 4, 6, 8)
    torch.testing.assert_close(upsample2x_explicit(x), upsample2x(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(upsample2x_explicit(x[:, :, 0]), upsample2x(x[:, :, 0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(downsample2x_explicit(x), F.avg_pool3d(x, 2))
    torch.testing.assert_close(downsample2x_explicit(x[:, :, 0]), F.avg_pool2d(x[:, :, 0], 2))
    # the data grid: area averaging when every axis shrinks
    cube = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(resample(cube, (4, 8, 8)), F.avg_pool3d(cube, (4, 2, 2)))


def test_served_latent_is_w_and_encode_takes_any_grid() -> None:
    cfg = StyleGAN3DConfig.for_variant(
        "splitshuffle", shape=(8, 16, 16), channels=8, z_dim=12, w_dim=16, mapping_width=16
    )
    m = StyleGAN3DModel.init(cfg, seed=0)
    assert m.latent_dim == 16 and cfg.to_dict()["latent_dim"] == 16
    assert StyleGAN3DConfig.from_dict(cfg.to_dict()) == cfg
    w = m.sample_latents(2, seed=5)
    assert w.shape == (2, 16)
    torch.testing.assert_close(w, m.net.G.mapping(m.sample_z(2, 5), broadcast=False))
    torch.testing.assert_close(m.generate(w), m.generate(m.sample_z(2, 5), space="z"))
    # a cube (as load_for_model gives) is resampled to the grid before projection
    target = m.generate(m.sample_latents(1, seed=9))
    cube = F.interpolate(target, size=(32, 32, 32), mode="trilinear", align_corners=False)
    fit = m.generate(m.encode(cube, steps=30))
    start = m.generate(m.net.G.mapping.w_avg[None].cpu())
    assert F.mse_loss(fit, target) < F.mse_loss(start, target)


def test_a_scan_is_projected_as_the_trainer_saw_it(brain_ds: Path, tmp_path: Path, monkeypatch) -> None:
    """Trained on a dataset prepared in physical units (128^3 cubes of 2 mm): the config records the
    dataset's preprocessing and cube, and a scan reaches the projection as the trainer's volume of it
    on the 32x64x64 grid (tests/helpers.py ``check_served_as_trained``)."""
    import model.stylegan3d.model as served

    t = Trainer(opts(brain_ds, tmp_path / "run", shape="32x64x64", iterations=2, checkpoint_every=100))
    m = from_pretrained(t.fit())
    cfg = m.config
    assert cfg.data_resolution == 128 and cfg.preprocess["mode"] == "physical" and cfg.spacing == (4.0, 4.0, 8.0)
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["preprocess"] == cfg.preprocess
    targets: list[torch.Tensor] = []

    def project(G, target, **kw):  # noqa: ANN001, ANN003, ANN202
        targets.append(target.detach().cpu())
        return real(G, target, **kw)

    real = served.project
    monkeypatch.setattr(served, "project", project)

    def seen(x: torch.Tensor) -> torch.Tensor:
        targets.clear()
        m.encode(x, steps=1)
        return targets[0]

    check_served_as_trained(brain_ds, m, t._volume(0), seen, tmp_path)


def test_an_older_config_without_preprocess_reads_and_resaves_as_before(tmp_path: Path) -> None:
    """A config.json without ``preprocess`` (every directory written before it): the authors'
    stretch to its ``data_resolution`` cube, and the file re-saved byte for byte."""
    from model.data.phantoms import write_phantom
    from model.data.volumes import load_for_model

    cfg = StyleGAN3DConfig.for_variant(
        "splitshuffle", shape=(8, 16, 16), channels=8, z_dim=8, w_dim=8, data_resolution=32
    )
    StyleGAN3DModel.init(cfg, seed=0).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text()
    assert '"preprocess"' not in text
    m = from_pretrained(tmp_path / "m")
    assert m.config.preprocess == {} and m.config.cube().resolution == 32
    m.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == text
    write_phantom(tmp_path / "scan.nii.gz", "ct", (40, 48, 48), (1.0, 1.0, 1.5), seed=2)
    info: dict = {}
    x = load_for_model(tmp_path / "scan.nii.gz", m.config, info=info)
    assert x.shape == (32, 32, 32) and info["mode"] == "stretch"
    assert m.encode(torch.from_numpy(x)[None, None], steps=2).shape == (1, 8)


# ------------------------------------------------------------------------------------ service
def nifti(client, job: dict, name: str):  # noqa: ANN001, ANN201
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/jobs/{job['job_id']}/files/{name}").content))


def test_the_service_serves_a_splitshuffle_model(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.conftest import service_nifti_upload, service_wait

    models = tmp_path / "models"
    cfg = StyleGAN3DConfig.for_variant(
        "splitshuffle",
        shape=(8, 16, 16),
        channels=8,
        z_dim=16,
        w_dim=16,
        mapping_width=16,
        data_resolution=32,
        projection_steps=25,
    )
    StyleGAN3DModel.init(cfg, seed=0).save_pretrained(models / "ss")
    s = Settings(models_dir=models, storage_dir=tmp_path / "storage", redis_url=None)
    with TestClient(create_app(s)) as c:
        listed = {m["name"]: m for m in c.get("/models").json()}
        assert listed["ss"]["family"] == "splitshuffle" and listed["ss"]["latent_dim"] == 16
        assert listed["ss"]["output_shape"] == [8, 16, 16]

        r = c.post("/generate", json={"model": "ss", "seed": 3})
        assert r.status_code == 202, r.text
        job = service_wait(c, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        names = {f["name"] for f in job["result"]["files"]}
        assert "volume_000.nii.gz" in names and "latent.npy" in names
        img = nifti(c, job, "volume_000.nii.gz")
        assert img.shape == (16, 16, 8)  # (x, y, z) = (W, H, D)
        lat = np.load(io.BytesIO(c.get(f"/jobs/{job['job_id']}/files/latent.npy").content))
        assert lat.shape == (1, 16)

        # generation from the returned latent reproduces the volume
        r = c.post("/generate", json={"model": "ss", "latent": lat[0].tolist()})
        again = service_wait(c, r.json()["job_id"])
        assert again["state"] == "succeeded", again
        assert np.array_equal(nifti(c, again, "volume_000.nii.gz").get_fdata(), img.get_fdata())

        r = c.post(
            "/encode",
            data={"model": "ss", "reconstruct": "true"},
            files={"file": ("scan.nii.gz", service_nifti_upload(tmp_path), "application/gzip")},
        )
        assert r.status_code == 202, r.text
        enc = service_wait(c, r.json()["job_id"])
        assert enc["state"] == "succeeded", enc
        assert len(enc["result"]["latent"]) == 16
        assert "reconstruction.nii.gz" in {f["name"] for f in enc["result"]["files"]}

        r = c.post(
            "/traverse",
            json={"model": "ss", "job_id": enc["job_id"], "direction": [1.0] + [0.0] * 15, "steps": [0.0, 2.0]},
        )
        assert r.status_code == 202, r.text
        tr = service_wait(c, r.json()["job_id"])
        assert tr["state"] == "succeeded", tr
        steps = tr["result"]["steps"]
        assert [s["alpha"] for s in steps] == [0.0, 2.0]
        assert steps[0]["latent"] == pytest.approx(enc["result"]["latent"], abs=1e-6)
        assert steps[1]["latent"][0] == pytest.approx(steps[0]["latent"][0] + 2.0, abs=1e-5)
