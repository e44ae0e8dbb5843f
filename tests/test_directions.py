"""Latent directions: attribute measurement, fitting, traversal, storage, and the CLI verbs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import ModelDirError
from model.hagan.config import HAGANConfig
from model.hagan.infer import HAGANModel
from model.latent.directions import (
    Direction,
    fit_direction,
    fit_linear,
    load_directions,
    measure_attribute,
    save_direction,
    traverse,
)


def test_measure_attribute_counts_voxels_in_the_window() -> None:
    v = np.full((10, 10, 10), -1000.0)
    v[:2, :5, :5] = 700.0  # 50 bone voxels
    v[5:, :, :] = -700.0  # 500 lung voxels
    assert measure_attribute(v, (1.0, 2.0, 0.5), "bone_volume_ml") == pytest.approx(50 * 1.0 / 1000)
    assert measure_attribute(v, (2.0, 2.0, 2.0), "lung_volume_ml") == pytest.approx(500 * 8 / 1000)
    with pytest.raises(ValueError, match="unknown attribute"):
        measure_attribute(v, (1, 1, 1), "height")


def test_fit_recovers_a_planted_linear_relation() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 12))
    w_true = rng.normal(size=12)
    y = z @ w_true + 3.0 + rng.normal(scale=0.01, size=200)
    w, b, r2 = fit_linear(z, y, ridge=1e-6)
    assert np.allclose(w, w_true, atol=0.01) and b == pytest.approx(3.0, abs=0.01) and r2 > 0.999


def test_traverse_reaches_the_target_and_steps_are_along_the_direction() -> None:
    d = Direction("d", "bone_volume_ml", torch.tensor([3.0, 4.0, 0.0]), 1.0, 1.0, None, 10)
    z0 = torch.tensor([[1.0, 1.0, 1.0]])
    rows = traverse(None, z0, d, target=20.0, n_steps=4)
    assert rows[0]["alpha"] == 0 and torch.equal(rows[0]["latent"], z0)
    assert d.predict(rows[-1]["latent"]).item() == pytest.approx(20.0, abs=1e-4)
    assert [r["predicted"] for r in rows] == sorted(r["predicted"] for r in rows)
    rows = traverse(None, z0, d, steps=[-1.0, 2.0])
    assert torch.allclose(rows[1]["latent"] - z0, torch.tensor([[1.2, 1.6, 0.0]]))  # 2 * unit vector
    with pytest.raises(ValueError, match="either"):
        traverse(None, z0, d)


def test_fit_on_a_model_store_and_load(tmp_path: Path) -> None:
    m = HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=8), seed=0)
    m.save_pretrained(tmp_path / "m")
    d = fit_direction(m, "soft_tissue_ml", n=12, seed=1)
    assert d.vector.shape == (8,) and d.n == 12 and np.isfinite(d.r2)
    save_direction(tmp_path / "m", d)
    save_direction(tmp_path / "m", Direction("other", "bone_volume_ml", torch.ones(8), 2.0, 0.5, None, 3))
    got = load_directions(tmp_path / "m")
    assert set(got) == {"soft_tissue_ml", "other"}
    assert torch.equal(got["soft_tissue_ml"].vector, d.vector) and got["other"].intercept == 2.0
    # re-saving the model keeps its directions
    m.save_pretrained(tmp_path / "m")
    assert set(load_directions(tmp_path / "m")) == {"soft_tissue_ml", "other"}
    with pytest.raises(ValueError, match="MRI"):
        fit_direction(m, "bright_tissue_ml", n=4)
    (tmp_path / "m" / "directions.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelDirError, match="directions"):
        load_directions(tmp_path / "m")


def test_cli_fit_direction_and_traverse(tmp_path: Path) -> None:
    m = HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=8), seed=0)
    m.save_pretrained(tmp_path / "m")

    def run(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "model.cli", *args], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    out = json.loads(
        run(
            "fit-direction",
            "--model",
            str(tmp_path / "m"),
            "--attribute",
            "soft_tissue_ml",
            "--n",
            "10",
            "--name",
            "soft",
        )
    )
    assert out["attribute"] == "soft_tissue_ml" and out["n"] == 10
    target = load_directions(tmp_path / "m")["soft"].predict(m.sample_latents(1, 3)).item() + 5.0
    run(
        "traverse",
        "--model",
        str(tmp_path / "m"),
        "--direction",
        "soft",
        "--seed",
        "3",
        "--target",
        str(target),
        "--n-steps",
        "3",
        "-o",
        str(tmp_path / "t"),
    )
    steps = json.loads((tmp_path / "t" / "steps.json").read_text())["steps"]
    assert len(steps) == 3 and steps[-1]["predicted"] == pytest.approx(target, abs=1e-3)
    assert all((tmp_path / "t" / f"step_{i:02d}.nii.gz").is_file() for i in range(3))
