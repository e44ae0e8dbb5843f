"""model/families.py: the one list of model families that the CLI, the API, the loader and the
trainer lookup read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from model import families


def test_every_entry_names_parts_that_exist_and_agree() -> None:
    for name, f in families.FAMILIES.items():
        assert f.name == name
        model_class = f.model_class()
        assert getattr(model_class, "family", name) in families.sharing_config(f.config)  # may serve several
        assert model_class.config_class is f.config_class()
        assert callable(f.trainer_module().train) and callable(f.init_function())
        assert f.encoder in ("amortised", "projection")
    assert families.with_encoder("amortised") == ("hagan", "alphawgan")
    assert families.multi_process() == ("hagan", "splitshuffle", "stylegan3d")  # alpha-WGAN trains in one process
    assert set(families.get("splitshuffle").variant_names()) >= {"baseline", "split-shuffle"}
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: hagan"):
        families.get("nope")


def test_the_cli_the_api_the_loader_and_the_trainer_read_it() -> None:
    from model.cli import build_parser
    from model.registry import FAMILIES, family_class
    from model.training import trainer_module
    from service.schemas import TrainRequest

    parser = build_parser()
    for verb in ("init", "train"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--family", "nope", "-o", "x", "--modality", "ct", "--data", "d"])
    assert FAMILIES == families.NAMES
    for name in families.NAMES:
        assert family_class(name) is families.get(name).model_class()
        assert trainer_module(name) is families.get(name).trainer_module()
        TrainRequest(family=name, data="d", name="m")
    with pytest.raises(ValidationError):
        TrainRequest(family="nope", data="d", name="m")


def test_reading_the_registry_imports_no_torch() -> None:
    code = "import sys, model.families, service.schemas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


TOY = """
import io, json, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from model import families

# the one line a new family needs (its four files are tests/toyfamily/)
families.register(families.Family(name="toy", config="tests.toyfamily.config:ToyConfig",
    model="tests.toyfamily.model:ToyModel", trainer="tests.toyfamily.train", init="tests.toyfamily.model:init_cli",
    encoder="amortised", summary="a toy: one linear layer each way"))

from fastapi.testclient import TestClient

from model.cli import main
from model.data.datasets import prepare_dataset
from model.data.phantoms import write_phantom
from model.hagan.config import HAGANConfig
from model.registry import from_pretrained
from service.app import create_app
from service.settings import Settings

d = Path(sys.argv[1])
models = d / "models"
# init, generate, save, load
assert main(["init", "--family", "toy", "--modality", "ct", "--seed", "4", "-o", str(models / "toy")]) == 0
m = from_pretrained(models / "toy")
assert type(m).__name__ == "ToyModel" and m.output_shape == (16, 16, 16)
v = m.generate(m.sample_latents(2, 7))
assert v.shape == (2, 1, 16, 16, 16) and v.abs().max() <= 1
m.save_pretrained(d / "again")
assert torch.equal(from_pretrained(d / "again").generate(m.sample_latents(2, 7)), v)
assert json.loads((models / "toy" / "config.json").read_text())["family"] == "toy"
# train
src = d / "scans"
for i in range(3):
    write_phantom(src / f"s{i}.nii.gz", "ct", shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0), seed=i)
prepare_dataset(src, d / "ds", HAGANConfig(resolution=128))
assert main(["train", "--family", "toy", "--data", str(d / "ds"), "-o", str(d / "run"), "--iterations", "5"]) == 0
assert from_pretrained(d / "run" / "model").config.family == "toy"
# serve through the embedded queue: listed, generated, encoded
settings = Settings(models_dir=models, storage_dir=d / "storage", redis_url=None)
with TestClient(create_app(settings)) as c:
    listed = {x["name"]: x for x in c.get("/models").json()}
    assert listed["toy"]["family"] == "toy", listed
    jid = c.post("/generate", json={"model": "toy", "seed": 7, "n": 2}).json()["job_id"]
    s = c.get(f"/jobs/{jid}?wait=60").json()
    assert s["state"] == "succeeded", s
    files = {f["name"]: f["url"] for f in s["result"]["files"]}
    (d / "v.nii.gz").write_bytes(c.get(files["volume_001.nii.gz"]).content)
    served = np.asarray(nib.load(d / "v.nii.gz").dataobj).transpose(2, 1, 0)
    expect = np.rint(-1024 + (v[1, 0].numpy() + 1) / 2 * 1624)
    assert np.abs(served - expect).max() <= 1
    write_phantom(d / "scan.nii.gz", "ct", shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0), seed=9)
    with open(d / "scan.nii.gz", "rb") as f:
        r = c.post("/encode", files={"file": ("scan.nii.gz", f.read())}, data={"model": "toy"})
    assert r.status_code == 202, r.text
    s = c.get(f"/jobs/{r.json()['job_id']}?wait=60").json()
    assert s["state"] == "succeeded", s
    z = np.load(io.BytesIO(c.get(f"/jobs/{s['job_id']}/files/latent.npy").content))
    assert z.shape == (1, 8) and np.isfinite(z).all()
print("toy family ok")
"""


def test_a_fourth_family_from_the_registry_alone(tmp_path: Path) -> None:
    """A family in four files (tests/toyfamily/) and one registry line: init, generate, save, load,
    train and serve (generate and encode through the embedded queue), in a fresh process so the
    registry of this one stays as it is."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", TOY, str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "toy family ok" in out.stdout
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.get("hagan"))


def test_every_family_serves_without_its_discriminators(tmp_path: Path) -> None:
    """A serving load (worker, CLI) of each family reads its generator only and its encoder on first
    use; what it generates and encodes is bit for bit what a whole load gives."""
    import torch

    from model.alphawgan.config import AlphaWGANConfig
    from model.alphawgan.model import AlphaWGANModel
    from model.registry import from_pretrained
    from model.stylegan3d.config import StyleGAN3DConfig
    from model.stylegan3d.model import StyleGAN3DModel

    style = StyleGAN3DConfig.for_variant(
        "splitshuffle", "split-shuffle", shape=(8, 16, 16), channels=8, z_dim=16, w_dim=16, mapping_width=16
    )
    cases = [
        (AlphaWGANModel.init(AlphaWGANConfig(width=1 / 16, latent_dim=16, code_hidden=32)), ["e", "d", "c"], True),
        (StyleGAN3DModel.init(style), ["D"], False),
    ]
    for m, unloaded, encodes in cases:
        d = tmp_path / m.family
        m.save_pretrained(d)
        s = from_pretrained(d, serving=True)
        assert s.unloaded_parts() == unloaded
        z = m.sample_latents(2, 1)
        v = m.generate(z)
        assert torch.equal(s.generate(z), v)
        if encodes:
            assert torch.equal(s.encode(v), m.encode(v))
            assert s.unloaded_parts() == ["d", "c"]
