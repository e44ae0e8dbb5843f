"""3D alpha-WGAN-GP: networks, model directories, the training step, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.model import AlphaWGANModel, init_model_dir
from model.alphawgan.networks import AlphaWGAN
from model.alphawgan.train import Trainer, gradient_penalty
from model.base import Intensity
from model.checkpoint import ModelDirError
from model.data.volumes import load_for_model
from model.hagan.config import HAGANConfig
from model.registry import from_pretrained
from tests.helpers import check_served_as_trained, phantom_dataset, straight_and_resumed

TINY = {"width": 1 / 16, "latent_dim": 16, "code_hidden": 32}
OPTS = TINY | {"batch": 2, "device": "cpu", "seed": 5, "checkpoint_every": 1, "preview_every": 100}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = HAGANConfig(resolution=128, modality="mri", intensity=Intensity.for_modality("mri"))
    return phantom_dataset(tmp_path_factory.mktemp("aw"), "mri", (40, 40, 40), config=cfg)


def test_networks_follow_the_paper_layout() -> None:
    cfg = AlphaWGANConfig(**TINY)
    assert AlphaWGANConfig().channels == [64, 128, 256, 512] and AlphaWGANConfig().latent_dim == 1000
    net = AlphaWGAN(cfg)
    convs = net.d.convs
    assert len(convs) == 5 and all(c.kernel_size == (4, 4, 4) for c in convs)
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    x = torch.rand(3, 1, 64, 64, 64) * 2 - 1
    assert net.d(x).shape == (3, 1) and net.e(x).shape == (3, 16)
    v = net.g(torch.randn(3, 16))
    assert v.shape == (3, 1, 64, 64, 64) and v.abs().max() <= 1
    assert net.c(torch.randn(3, 16)).shape == (3, 1)
    with pytest.raises(ValueError, match="resolution"):
        AlphaWGANConfig(resolution=128)


def test_model_directory_round_trip_and_served_surface(tmp_path: Path) -> None:
    m = init_model_dir(tmp_path / "m", **TINY, modality="ct", seed=3)  # voxgen init
    assert m.config.intensity.units == "HU" and "UNTRAINED" in m.config.description
    m2 = from_pretrained(tmp_path / "m")
    assert m2.family == "alphawgan" and m2.latent_dim == 16 and m2.output_shape == (64, 64, 64)
    z = m2.sample_latents(2, seed=9)
    assert torch.equal(z, m.sample_latents(2, seed=9))
    v = m2.generate(z)
    assert torch.equal(v, m.generate(z)) and v.shape == (2, 1, 64, 64, 64)
    assert m2.encode(v).shape == (2, 16)
    with pytest.raises(ValueError, match="shape"):
        m2.encode(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="class-conditional"):
        m2.generate(z, label=1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"latent_dim": 8}))
    with pytest.raises(ModelDirError, match="does not match"):
        from_pretrained(tmp_path / "m")


def test_gradient_penalty_known_values() -> None:
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    lin = torch.nn.Linear(16, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.ones(1, 16) / 4.0)  # gradient norm 1 everywhere
    assert float(gradient_penalty(lin, a, b).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        lin.weight.mul_(3.0)  # norm 3: penalty (3 - 1)^2
    assert float(gradient_penalty(lin, a, b).detach()) == pytest.approx(4.0, rel=1e-5)


def test_training_changes_every_network_and_writes_the_run(dataset: Path, tmp_path: Path) -> None:
    from model.training import train

    run = tmp_path / "run"
    cfg = AlphaWGANConfig(**TINY)
    torch.manual_seed(OPTS["seed"])
    before = AlphaWGAN(cfg).state_dict()  # the trainer's initial weights (same seed)
    # options as `voxgen train` passes them: other families' options are ignored, None = default
    opts = OPTS | {"family": "alphawgan", "data": str(dataset), "output": str(run), "iterations": 1}
    out = train(opts | {"resolution": None, "amp": "auto", "lr": None, "shape": None, "preview_every": 1})
    assert out == run / "model"
    m = from_pretrained(out)
    after = m.net.state_dict()
    assert set(after) == set(before)
    for net in ("g.", "e.", "d.", "c."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(net)), net
    assert m.config.modality == "mri" and m.config.intensity.units == "a.u."
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in rows[0].items() if k != "time")
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "iter_0000001"
    assert (run / "checkpoints" / "iter_0000001" / "train.safetensors").is_file()
    assert list((run / "previews").glob("*.png"))


def test_resume_equals_uninterrupted(dataset: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(Trainer, OPTS | {"data": str(dataset)}, tmp_path, stop=1, total=2)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # weights and BatchNorm statistics
    ma = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    mb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in ma.items() if k != "time"} == {k: v for k, v in mb.items() if k != "time"}
    with pytest.raises(ValueError, match="config differs"):
        Trainer(OPTS | {"data": str(dataset), "output": str(tmp_path / "b"), "resume": True, "latent_dim": 8})


def test_served_by_the_service_generate_and_encode(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.conftest import service_nifti_upload, service_wait

    models = tmp_path / "models"
    AlphaWGANModel.init(AlphaWGANConfig(**TINY, modality="ct", intensity=Intensity.for_modality("ct"))).save_pretrained(
        models / "alpha"
    )
    s = Settings(models_dir=models, storage_dir=tmp_path / "storage", redis_url=None, admin_token="t", max_upload_mb=1)
    with TestClient(create_app(s)) as c:
        info = next(m for m in c.get("/models").json() if m["name"] == "alpha")
        assert info["family"] == "alphawgan" and info["output_shape"] == [64, 64, 64]
        r = c.post("/generate", json={"model": "alpha", "seed": 3})
        assert r.status_code == 202, r.text
        assert service_wait(c, r.json()["job_id"])["state"] == "succeeded"
        files = {"file": ("scan.nii.gz", service_nifti_upload(tmp_path), "application/gzip")}
        r = c.post("/encode", data={"model": "alpha", "reconstruct": "true"}, files=files)
        assert r.status_code == 202, r.text
        done = service_wait(c, r.json()["job_id"])
        assert done["state"] == "succeeded", done
        assert len(done["result"]["latent"]) == TINY["latent_dim"]  # the encoder E serves /encode


def _encoder_input(m: AlphaWGANModel, x: torch.Tensor) -> torch.Tensor:
    """What the encoder E gets when ``m.encode(x)`` runs."""
    got: list[torch.Tensor] = []
    hook = m.net.e.register_forward_pre_hook(lambda _, args: got.append(args[0].detach().cpu()))
    try:
        m.encode(x)
    finally:
        hook.remove()
    return torch.cat(got)


def test_a_scan_is_encoded_as_the_trainer_saw_it(brain_ds: Path, tmp_path: Path) -> None:
    """Trained on a dataset prepared in physical units (128^3 cubes of 2 mm): the config records the
    dataset's preprocessing and cube, and a scan reaches the encoder as the trainer's 64^3 volume of
    it (tests/helpers.py ``check_served_as_trained``)."""
    t = Trainer(OPTS | {"data": str(brain_ds), "output": str(tmp_path / "run"), "iterations": 2})
    m = from_pretrained(t.fit())
    cfg = m.config
    assert cfg.data_resolution == 128 and cfg.preprocess["mode"] == "physical" and cfg.spacing == (4.0, 4.0, 4.0)
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["data_resolution"] == 128
    check_served_as_trained(brain_ds, m, t.volume(0)[0].numpy(), lambda x: _encoder_input(m, x), tmp_path)
    with pytest.raises(ValueError, match=r"shape \[n, 1, 128, 128, 128\] or \[n, 1, 64, 64, 64\]"):
        m.encode(torch.zeros(1, 1, 32, 32, 32))


def test_an_older_model_directory_reads_and_encodes_as_before(tmp_path: Path) -> None:
    """A config.json without ``preprocess`` and ``data_resolution`` (every directory written before
    them, and any untrained one): the authors' stretch straight to the 64^3 grid, no resampling, and
    the file re-saved byte for byte."""
    m = init_model_dir(tmp_path / "m", **TINY, modality="ct", seed=1)
    text = (tmp_path / "m" / "config.json").read_text()
    assert '"preprocess"' not in text and '"data_resolution"' not in text
    old = from_pretrained(tmp_path / "m")
    assert old.config.data_resolution == 64 and old.config.preprocess == {}
    assert old.config.cube().resolution == 64 and old.config.cube().spacing == old.config.spacing
    old.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == text
    from model.data.phantoms import write_phantom

    write_phantom(tmp_path / "scan.nii.gz", "ct", (40, 48, 48), (1.0, 1.0, 1.5), seed=2)
    info: dict = {}
    x = torch.from_numpy(load_for_model(tmp_path / "scan.nii.gz", old.config, info=info))[None, None]
    assert x.shape == (1, 1, 64, 64, 64) and info["mode"] == "stretch"
    assert torch.equal(_encoder_input(old, x), x)  # the grid itself reaches E
    assert torch.equal(old.encode(x), m.net.e(x))
    cfg = AlphaWGANConfig(**TINY, data_resolution=128, spacing=(4.0, 4.0, 4.0))
    assert json.loads(json.dumps(cfg.to_dict()))["data_resolution"] == 128 and cfg.cube().spacing == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="data_resolution must be a multiple of 64"):
        AlphaWGANConfig(data_resolution=96)
