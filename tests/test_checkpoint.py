"""Model directories: the format version in config.json, and the torch-free cached readers the API uses;
register_model; the training-checkpoint layout every family writes, and the older layouts resuming exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import (
    FORMAT_VERSION,
    TRAIN_FORMAT_VERSION,
    TRAIN_STATE_NAME,
    TRAIN_TENSORS_NAME,
    ModelDirError,
    latest_checkpoint,
    read_config,
    read_config_cached,
    read_training_checkpoint,
    read_weights,
    register_model,
)
from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.registry import from_pretrained


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    HAGANModel.init(HAGANConfig(resolution=128, latent_dim=8, width=0.25), seed=0).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_config_json_carries_its_format_version_and_older_directories_load(model_dir: Path) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and next(iter(raw)) == "format_version"
    assert "format_version" not in read_config(model_dir)  # the family's config, as it was
    m = from_pretrained(model_dir)
    del raw["format_version"]  # a directory written before format versions (format 0)
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert from_pretrained(model_dir).config.to_dict() == m.config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(raw | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ModelDirError, match="format_version"):
        from_pretrained(model_dir)


def test_the_cached_config_is_re_read_when_the_file_changes(model_dir: Path) -> None:
    first = read_config_cached(model_dir)
    first["description"] = "edited by a caller"  # a copy: the cache is not touched
    assert read_config_cached(model_dir)["description"] != "edited by a caller"
    raw = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(raw | {"description": "a new card line"}))
    st = (model_dir / "config.json").stat()
    os.utime(model_dir / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock
    assert read_config_cached(model_dir)["description"] == "a new card line"


def test_reading_configs_and_directions_imports_no_torch(model_dir: Path) -> None:
    code = (
        "import sys; from model.checkpoint import read_config_cached, direction_names; "
        f"c = read_config_cached({str(model_dir)!r}); print(c['family'], direction_names({str(model_dir)!r}), "
        "'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["hagan", "[]", "False"]


# ------------------------------------------------------------------ register_model
def test_register_model_swaps_a_complete_copy_in_and_imports_no_torch(model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    code = (
        "import sys; from pathlib import Path; from model.checkpoint import register_model; "
        f"print(register_model(Path({str(model_dir)!r}), Path({str(models)!r}), 'mine'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(models / "mine"), "False"]
    assert from_pretrained(models / "mine").config.to_dict() == from_pretrained(model_dir).config.to_dict()
    (models / "mine" / "stale.txt").write_text("from the model registered before")
    assert register_model(model_dir, models, "mine") == models / "mine"  # a re-registration replaces it whole
    assert sorted(p.name for p in (models / "mine").iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert [p.name for p in models.iterdir()] == ["mine"]  # no temporary or old copy left behind
    with pytest.raises(FileNotFoundError):
        register_model(tmp_path / "nowhere", models, "other")
    assert [p.name for p in models.iterdir()] == ["mine"]


# ------------------------------------------------------------------ training checkpoints
HAGAN_OPTS = {"width": 0.25, "latent_dim": 16, "ema": 0.9, "augment": "on", "checkpoint_every": 100}
ALPHA_OPTS = {"family": "alphawgan", "width": 1 / 16, "latent_dim": 16, "code_hidden": 32, "checkpoint_every": 100}
STYLEGAN_OPTS = {"shape": "8x16x16", "channels": 8, "latent_dim": 16, "mapping_width": 16, "checkpoint_every": 100}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four CT phantoms prepared at 128^3 (every family trains on them)."""
    from model.data.datasets import prepare_dataset
    from model.data.phantoms import write_phantom

    root = tmp_path_factory.mktemp("ck-phantoms")
    for i in range(4):
        write_phantom(root / "src" / f"chest{i}.nii.gz", "ct", (40, 48, 48), (1.5, 1.0, 1.0), seed=i)
    prepare_dataset(root / "src", root / "ds", HAGANConfig(resolution=128))
    return root / "ds"


def _as_format_1(ck: Path, file: str) -> None:
    """Rewrite a checkpoint of today's layout as the code before format 2 wrote it: HA-GAN and alpha-WGAN
    (``file`` optim.safetensors) with the optimizer state under the optimizer's name, ``rng.torch_global``
    and ``rng.torch_<generator>``, HA-GAN's live G as ``live.*``; StyleGAN (train.safetensors) with
    ``opt.<optimizer>...``, ``rng.torch_cpu``, ``rng.<generator>``, ``G_raw.*`` and ``pl_mean``; and a
    state.json without format_version."""
    import torch
    from safetensors.torch import save_file

    state = json.loads((ck / TRAIN_STATE_NAME).read_text())
    assert state.pop("format_version") == TRAIN_FORMAT_VERSION
    new = read_weights(ck, TRAIN_TENSORS_NAME)
    assert {k.split(".")[0] for k in new} <= {"optim", "rng", "extra"}
    old: dict[str, torch.Tensor] = {}
    for k, v in new.items():
        if file == "optim.safetensors":
            k = "rng.torch_global" if k == "rng.torch_cpu" else k.replace("rng.", "rng.torch_", 1)
            k = k.removeprefix("optim.").removeprefix("extra.")
        else:
            k = k.replace("optim.", "opt.", 1) if k.startswith("optim.") else k.removeprefix("extra.")
        old[k] = v
    (ck / TRAIN_TENSORS_NAME).unlink()
    save_file(old, str(ck / file))
    (ck / TRAIN_STATE_NAME).write_text(json.dumps(state))


def _resumed_from_format_1(trainer: type, opts: dict, out: Path, file: str) -> tuple:
    """A run of 3 iterations, and one stopped at 2, its checkpoint rewritten in format 1 (``file``),
    resumed to 3; their metrics are the same, and the resumed run writes today's layout."""
    a = trainer(opts | {"output": str(out / "a"), "iterations": 3})
    a.fit()
    b = trainer(opts | {"output": str(out / "b"), "iterations": 2})
    b.fit()
    ck = latest_checkpoint(out / "b")
    assert ck.name == "iter_0000002"
    _as_format_1(ck, file)
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", file, "state.json"}
    del b
    b = trainer(opts | {"output": str(out / "b"), "iterations": 3, "resume": True})
    assert b.iteration == 2
    b.fit()
    rows = [
        [_no_time(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (out / "a", out / "b")
    ]
    assert rows[0] == rows[1] and [r["iteration"] for r in rows[1]] == [1, 2, 3]
    last = latest_checkpoint(out / "b")
    assert json.loads((last / TRAIN_STATE_NAME).read_text())["format_version"] == TRAIN_FORMAT_VERSION
    assert (last / TRAIN_TENSORS_NAME).is_file() and not (last / "optim.safetensors").exists()
    return a, b


def _no_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time"}


def _same(a: dict, b: dict) -> list[str]:
    import torch

    return [k for k in a if not torch.equal(a[k], b[k])]


def test_every_family_writes_one_training_checkpoint_layout(phantoms: Path, tmp_path: Path) -> None:
    from model.alphawgan.train import Trainer as AlphaWGANTrainer
    from model.hagan.train import Trainer as HAGANTrainer
    from model.stylegan3d.train import Trainer as StyleGANTrainer

    common = {"data": str(phantoms), "iterations": 1, "batch": 2, "device": "cpu", "seed": 1, "preview_every": 100}
    runs = {
        "hagan": HAGANTrainer(common | HAGAN_OPTS | {"output": str(tmp_path / "h")}),
        "alphawgan": AlphaWGANTrainer(common | ALPHA_OPTS | {"output": str(tmp_path / "a")}),
        "splitshuffle": StyleGANTrainer(common | STYLEGAN_OPTS | {"output": str(tmp_path / "s")}),
    }
    extra = {"hagan": {"live"}, "alphawgan": set(), "splitshuffle": {"G_raw", "pl_mean"}}
    for family, t in runs.items():
        t.fit()
        ck = latest_checkpoint(t.run)
        assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "train.safetensors", "state.json"}
        state = json.loads((ck / "state.json").read_text())
        assert next(iter(state)) == "format_version" and state["format_version"] == TRAIN_FORMAT_VERSION
        assert {"iteration", "options", "optimizers", "numpy_rng"} <= set(state) and state["iteration"] == 1
        keys = read_weights(ck, "train.safetensors")
        assert {k.split(".")[0] for k in keys} == {"optim", "rng"} | ({"extra"} if extra[family] else set()), family
        assert {k.split(".")[1] for k in keys if k.startswith("optim.")} == set(t.opts), family
        assert any(k.startswith("optim.") and k.endswith(".step") for k in keys), family  # the step counters
        rngs = {"rng.torch_cpu", "rng.latents", "rng.augment"}  # augment: the small-data recipe's draws
        assert {k for k in keys if k.startswith("rng.")} == rngs, family
        assert {k.split(".")[1] for k in keys if k.startswith("extra.")} == extra[family], family
        tc = read_training_checkpoint(ck)
        assert tc.iteration == 1 and "format_version" not in tc.state and tc.tensors.keys() == keys.keys()


def test_a_hagan_checkpoint_of_format_1_resumes_exactly(phantoms: Path, tmp_path: Path) -> None:
    """optim.safetensors with rng.torch_global (and the EMA's live G, the augmentation generator)."""
    from model.hagan.train import Trainer

    opts = HAGAN_OPTS | {"data": str(phantoms), "batch": 1, "device": "cpu", "seed": 3, "preview_every": 100}
    a, b = _resumed_from_format_1(Trainer, opts, tmp_path, "optim.safetensors")
    assert _same(a.net.state_dict(), b.net.state_dict()) == []
    ea, eb = a.ema.state_dict(), b.ema.state_dict()  # the EMA's G (its D and E copies are not used)
    assert [k for k in _same(ea, eb) if k.split(".")[0] in ("ga", "gl", "gh")] == []


def test_an_alphawgan_checkpoint_of_format_1_resumes_exactly(phantoms: Path, tmp_path: Path) -> None:
    """optim.safetensors with rng.torch_global, as HA-GAN's."""
    from model.alphawgan.train import Trainer

    opts = ALPHA_OPTS | {"data": str(phantoms), "batch": 2, "device": "cpu", "seed": 5, "preview_every": 100}
    a, b = _resumed_from_format_1(Trainer, opts, tmp_path, "optim.safetensors")
    assert _same(a.net.state_dict(), b.net.state_dict()) == []


def test_a_stylegan_checkpoint_of_format_1_resumes_exactly(phantoms: Path, tmp_path: Path) -> None:
    """train.safetensors with rng.torch_cpu, opt.*, G_raw.* and pl_mean, and no format_version."""
    import torch

    from model.stylegan3d.train import Trainer

    opts = STYLEGAN_OPTS | {"data": str(phantoms), "batch": 2, "device": "cpu", "seed": 3, "preview_every": 100}
    a, b = _resumed_from_format_1(Trainer, opts, tmp_path, "train.safetensors")
    assert _same(a.net.state_dict(), b.net.state_dict()) == []
    assert _same(a.G_ema.state_dict(), b.G_ema.state_dict()) == []
    assert torch.equal(a.pl_mean, b.pl_mean)


def test_a_training_checkpoint_of_a_newer_format_is_refused(phantoms: Path, tmp_path: Path) -> None:
    from model.alphawgan.train import Trainer

    opts = ALPHA_OPTS | {"data": str(phantoms), "output": str(tmp_path / "r"), "iterations": 1, "device": "cpu"}
    Trainer(opts | {"batch": 2, "preview_every": 100}).fit()
    f = latest_checkpoint(tmp_path / "r") / TRAIN_STATE_NAME
    f.write_text(json.dumps(json.loads(f.read_text()) | {"format_version": TRAIN_FORMAT_VERSION + 1}))
    with pytest.raises(ModelDirError, match="format_version"):
        Trainer(opts | {"batch": 2, "iterations": 2, "resume": True})
    with pytest.raises(ValueError, match="nothing to resume"):
        latest_checkpoint(tmp_path / "empty")
