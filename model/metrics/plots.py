"""PNG figures without a plotting library (PIL only): the 2D embedding of real and generated
features with fitted 2-sigma ellipses (as in the HA-GAN paper's Fig. 4), and slice montages."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def pca_2d(features: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[float]]:
    """Project every group's features [n, d] onto the first two principal axes of all of them
    together (features standardised per dimension first).  Returns the 2D points per group and the
    fraction of variance each axis explains.  (Classical MDS of Euclidean distances gives the same
    embedding up to rotation.)"""
    names = list(features)
    allf = np.concatenate([np.asarray(features[k], np.float64) for k in names], 0)
    mu, sd = allf.mean(0), allf.std(0)
    sd[sd == 0] = 1.0
    z = (allf - mu) / sd
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    k = min(2, vt.shape[0])
    axes = vt[:k]
    var = s**2
    explained = [float(v / var.sum()) if var.sum() > 0 else 0.0 for v in var[:k]]
    out, i = {}, 0
    for name in names:
        n = len(features[name])
        p = z[i : i + n] @ axes.T
        if p.shape[1] < 2:
            p = np.concatenate([p, np.zeros((n, 2 - p.shape[1]))], 1)
        out[name] = p
        i += n
    while len(explained) < 2:
        explained.append(0.0)
    return out, explained


def ellipse(points: np.ndarray, n_sigma: float = 2.0, steps: int = 90) -> np.ndarray | None:
    """The n-sigma ellipse of a Gaussian fitted to 2D points (None for fewer than 3 points)."""
    if len(points) < 3:
        return None
    mu = points.mean(0)
    cov = np.cov(points.T)
    w, v = np.linalg.eigh(cov)
    w = np.sqrt(np.clip(w, 0, None))
    t = np.linspace(0, 2 * math.pi, steps)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    return mu + n_sigma * (circle * w) @ v.T


def embedding_plot(
    points: dict[str, np.ndarray], path: str | os.PathLike, title: str = "", axis_labels: tuple[str, str] = ("", "")
) -> Path:
    """Scatter plot of 2D points per group, each with its fitted 2-sigma ellipse, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, ml, mr, mt, mb = 720, 560, 70, 170, 40, 50
    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ells = {k: ellipse(p) for k, p in points.items()}
    every = [p for p in points.values() if len(p)] + [e for e in ells.values() if e is not None]
    allp = np.concatenate(every, 0)
    lo, hi = allp.min(0), allp.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    pw, ph = width - ml - mr, height - mt - mb

    def px(p: np.ndarray) -> np.ndarray:
        x = ml + (p[:, 0] - lo[0]) / (hi[0] - lo[0]) * pw
        y = mt + (hi[1] - p[:, 1]) / (hi[1] - lo[1]) * ph
        return np.stack([x, y], 1)

    dr.rectangle([ml, mt, ml + pw, mt + ph], outline="black")
    for i in range(5):  # ticks
        fx = lo[0] + (hi[0] - lo[0]) * i / 4
        fy = lo[1] + (hi[1] - lo[1]) * i / 4
        x = ml + pw * i / 4
        y = mt + ph - ph * i / 4
        dr.line([x, mt + ph, x, mt + ph + 4], fill="black")
        dr.text((x - 12, mt + ph + 6), f"{fx:.2g}", fill="black", font=font)
        dr.line([ml - 4, y, ml, y], fill="black")
        dr.text((ml - 44, y - 5), f"{fy:.2g}", fill="black", font=font)
    dr.text((ml, 12), title, fill="black", font=font)
    dr.text((ml + pw // 2 - 30, height - 20), axis_labels[0], fill="black", font=font)
    dr.text((6, mt - 16), axis_labels[1], fill="black", font=font)
    for i, (name, p) in enumerate(points.items()):
        c = COLOURS[i % len(COLOURS)]
        for x, y in px(p):
            dr.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        e = ells[name]
        if e is not None:
            dr.line([tuple(q) for q in px(e)] + [tuple(px(e)[0])], fill=c, width=2)
        ly = mt + 10 + 20 * i
        dr.ellipse([ml + pw + 15, ly, ml + pw + 25, ly + 10], fill=c)
        dr.text((ml + pw + 32, ly), f"{name} (n={len(p)})", fill="black", font=font)
    dr.text((ml + pw + 15, mt + 20 + 20 * len(points)), "ellipses: fitted 2-sigma", fill="gray", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
