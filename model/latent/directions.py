"""Attribute directions in latent space (HA-GAN paper, section IV-E).

Measure an attribute on volumes (generated from sampled latents, or real scans with their encoded
latents), fit a linear model latent -> attribute (ridge regression), and move a latent along the
model's coefficient vector: the prediction changes by ``alpha * |w|`` per unit step, so a target
value is reached in closed form.  Directions live in the model directory as
``directions.safetensors``: one vector per name, its fit described in the file's metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import DIRECTIONS_NAME, ModelDirError, save_tensors_atomic


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    modality: str
    lo: float
    hi: float
    description: str


# Windows are in the model's physical units (CT: HU; MRI: the model's [0, 1] a.u. scale, where 1
# is the training data's 99.9th percentile).
ATTRIBUTES: dict[str, AttributeSpec] = {
    a.name: a
    for a in [
        AttributeSpec("bone_volume_ml", "ct", 300.0, float("inf"), "volume of voxels above 300 HU, mL"),
        AttributeSpec("lung_volume_ml", "ct", -950.0, -500.0, "volume of voxels in -950..-500 HU, mL"),
        AttributeSpec("soft_tissue_ml", "ct", -100.0, 100.0, "volume of voxels in -100..100 HU, mL"),
        AttributeSpec("bright_tissue_ml", "mri", 0.6, float("inf"), "MRI volume above 0.6 (white-matter-like), mL"),
        AttributeSpec("mid_tissue_ml", "mri", 0.3, 0.6, "MRI volume in 0.3..0.6 (grey-matter-like), mL"),
        AttributeSpec("dark_tissue_ml", "mri", 0.05, 0.3, "MRI volume in 0.05..0.3 (CSF-like), mL"),
    ]
}


def measure_attribute(volume: np.ndarray, spacing: tuple[float, float, float], name: str) -> float:
    """Volume in mL of the voxels inside the attribute's window (lo <= v < hi), physical units."""
    spec = ATTRIBUTES.get(name)
    if spec is None:
        raise ValueError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTES)}")
    v = np.asarray(volume)
    count = int(np.count_nonzero((v >= spec.lo) & (v < spec.hi)))
    return count * float(np.prod(spacing)) / 1000.0


@dataclass
class Direction:
    name: str
    attribute: str
    vector: torch.Tensor  # the fitted coefficient vector w, [latent]
    intercept: float
    r2: float
    r2_cv: float | None
    n: int

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() @ self.vector.float() + self.intercept

    def meta(self) -> dict[str, Any]:
        return {
            "attribute": self.attribute,
            "intercept": self.intercept,
            "r2": self.r2,
            "r2_cv": self.r2_cv,
            "n": self.n,
            "norm": float(self.vector.norm()),
        }


def fit_linear(latents: np.ndarray, values: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, float, float]:
    """Ridge regression values ~ latents @ w + b -> (w, b, in-sample R^2)."""
    z = np.asarray(latents, np.float64)
    y = np.asarray(values, np.float64)
    zm, ym = z.mean(0), y.mean()
    zc = z - zm
    w = np.linalg.solve(zc.T @ zc + ridge * np.eye(z.shape[1]), zc.T @ (y - ym))
    b = ym - zm @ w
    ss = ((y - ym) ** 2).sum()
    r2 = 1.0 - ((y - (z @ w + b)) ** 2).sum() / ss if ss > 0 else 0.0
    return w, float(b), float(r2)


def cross_validated_r2(latents: np.ndarray, values: np.ndarray, ridge: float = 1.0, folds: int = 5) -> float | None:
    n = len(values)
    if n < 2 * folds:
        return None
    idx = np.arange(n)
    pred = np.empty(n)
    for k in range(folds):
        test = idx % folds == k
        w, b, _ = fit_linear(latents[~test], values[~test], ridge)
        pred[test] = latents[test] @ w + b
    ss = ((values - values.mean()) ** 2).sum()
    return float(1.0 - ((values - pred) ** 2).sum() / ss) if ss > 0 else None


def fit_direction(
    model: Any,
    attribute: str,
    *,
    name: str | None = None,
    n: int = 64,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    volumes: list[np.ndarray] | None = None,
    ridge: float = 1.0,
    progress: Callable[[int, int, str], None] | None = None,
) -> Direction:
    """Sample (or take) latents, generate (or take) volumes, measure, fit.  With ``volumes`` (model
    space, (R, R, R)) the latents are their encodings, as for real scans."""
    spec = ATTRIBUTES.get(attribute)
    if spec is None:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
    if spec.modality != model.modality:
        raise ValueError(
            f"attribute {attribute!r} is for {spec.modality.upper()} models; this model is {model.modality}"
        )
    cfg = model.config
    zs, ys = [], []
    if volumes is not None:
        items = len(volumes)
        for i, v in enumerate(volumes):
            zs.append(model.encode(torch.from_numpy(np.asarray(v, np.float32))[None, None])[0])
            ys.append(measure_attribute(cfg.intensity.to_physical(np.asarray(v)), cfg.spacing, attribute))
            if progress:
                progress(i + 1, items, "encode and measure")
    else:
        z_all = latents if latents is not None else model.sample_latents(n, seed)
        items = z_all.shape[0]
        for i in range(items):
            vol = model.generate(z_all[i : i + 1])[0, 0].numpy()
            zs.append(z_all[i])
            ys.append(measure_attribute(cfg.intensity.to_physical(vol), cfg.spacing, attribute))
            if progress:
                progress(i + 1, items, "generate and measure")
    z = torch.stack(zs).double().numpy()
    y = np.asarray(ys, np.float64)
    if np.ptp(y) == 0:
        raise ValueError(f"{attribute} is the same ({y[0]:.3f}) on every volume: nothing to fit")
    w, b, r2 = fit_linear(z, y, ridge)
    return Direction(
        name or attribute, attribute, torch.from_numpy(w).float(), b, r2, cross_validated_r2(z, y, ridge), len(y)
    )


def load_directions(model_dir: str | os.PathLike) -> dict[str, Direction]:
    f = Path(model_dir) / DIRECTIONS_NAME
    if not f.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            out = {}
            for k in sf.keys():
                m = json.loads(meta[k])
                out[k] = Direction(
                    k,
                    m["attribute"],
                    sf.get_tensor(k),
                    float(m["intercept"]),
                    float(m["r2"]),
                    m.get("r2_cv"),
                    int(m["n"]),
                )
            return out
    except Exception as e:
        raise ModelDirError(f"{f}: unreadable directions file ({e})") from e


def save_direction(model_dir: str | os.PathLike, direction: Direction) -> None:
    """Add or replace one direction in the model directory (atomic file replacement)."""
    existing = load_directions(model_dir)
    existing[direction.name] = direction
    tensors = {k: d.vector.float().contiguous() for k, d in existing.items()}
    meta = {k: json.dumps(d.meta()) for k, d in existing.items()}
    save_tensors_atomic(Path(model_dir) / DIRECTIONS_NAME, tensors, meta)


def traverse(
    model: Any,
    z0: torch.Tensor,
    direction: Direction,
    steps: list[float] | None = None,
    target: float | None = None,
    n_steps: int = 5,
) -> list[dict[str, Any]]:
    """Latents along the unit direction u = w/|w|: z0 + alpha*u.  With ``target``, the alphas run
    evenly from 0 to the alpha whose prediction equals the target."""
    w = direction.vector.float()
    norm = float(w.norm())
    if norm == 0:
        raise ValueError(f"direction {direction.name!r} is zero")
    u = w / norm
    z0 = z0.float().reshape(1, -1)
    if (steps is None) == (target is None):
        raise ValueError("give either steps (a list of alphas) or a target value")
    if target is not None:
        alpha_star = (float(target) - float(direction.predict(z0)[0])) / norm
        steps = [alpha_star * i / (n_steps - 1) for i in range(n_steps)] if n_steps > 1 else [alpha_star]
    out = []
    for a in steps or []:
        z = z0 + float(a) * u
        out.append({"alpha": float(a), "latent": z, "predicted": float(direction.predict(z)[0])})
    return out
