"""scripts/make_demo_data.py: the demo population's augmentation draws the brain's size from --scale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch


def _script():  # noqa: ANN202
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_scale_sets_the_brain_size() -> None:
    """A ball of radius 30 mm in a 160 mm template, augmented at a fixed sampling scale s: its
    foreground (above half the template's intensity) has 1/s^3 the volume, within 5 % (measured: 0.99 at
    each scale, the 3.3 mm voxels' discretisation; the elastic displacement of up to ~4 mm, the bias
    field and the noise move the boundary little on average).  A size of s instead of 1/s would be
    off by s^6 (0.38 or 2.7)."""
    mod = _script()
    n, side = 48, 160.0
    lin = (torch.arange(n, dtype=torch.float32) + 0.5) / n * side - side / 2
    zz, yy, xx = torch.meshgrid(lin, lin, lin, indexing="ij")
    ball = ((xx**2 + yy**2 + zz**2).sqrt() <= 30.0).float()[None, None]
    extent = np.array([side, side, side])
    voxel_ml = (side / n) ** 3 / 1000
    true_ml = 4 / 3 * np.pi * 30.0**3 / 1000
    for s in (0.85, 1.0, 1.18):
        vols = [
            float((mod.augment(ball, extent, side, np.random.default_rng(seed), n, (s, s)) > 0.5).sum()) * voxel_ml
            for seed in range(3)
        ]
        ratio = np.mean(vols) / (true_ml / s**3)
        assert abs(ratio - 1) < 0.05, (s, vols, true_ml / s**3)
