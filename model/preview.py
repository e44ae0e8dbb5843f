"""Slice previews: the one way every part of voxgen turns a volume into a picture.

Volumes are (z, y, x) arrays whose indices increase towards Superior, Anterior and Right (RAS+,
see model/data/volumes.py).  ``display_planes`` takes the middle axial, coronal and sagittal
slices in the *neurological* convention (the one NiiVue, the service's web viewer, uses): the
patient's right on the image's right in the axial and coronal planes, axial with anterior up,
coronal and sagittal with superior up, sagittal with anterior on the right.  Used by the service's
result previews (worker/previews.py, which adds physical units, aspect and labels), the training
previews of every family and the evaluation's montages (``montage_png``).

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np

PLANES = ("axial", "coronal", "sagittal")


def display_planes(v: np.ndarray) -> list[np.ndarray]:
    """(D, H, W) -> [axial (H, W), coronal (D, W), sagittal (D, H)] middle slices, flipped so that
    anterior (axial) and superior (coronal, sagittal) are up; a 2D (H, W) image -> [itself flipped]."""
    v = np.asarray(v)
    if v.ndim == 2:
        return [v[::-1]]
    if v.ndim != 3:
        raise ValueError(f"a preview needs a 2D or 3D array, got shape {list(v.shape)}")
    cz, cy, cx = (n // 2 for n in v.shape)
    return [v[cz][::-1], v[:, cy][::-1], v[:, :, cx][::-1]]


def to_uint8(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Values in [lo, hi] -> 0..255 (clipped, rounded)."""
    return ((np.clip(np.asarray(x, np.float32), lo, hi) - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)


def montage(rows: list[list[np.ndarray]], min_tile: int = 128, gap: int = 2) -> np.ndarray:
    """uint8 tiles, a list per row -> one uint8 image: each tile in a cell of the largest tile's
    size, all scaled up by a whole factor until the largest side is at least ``min_tile``, cells
    ``gap`` black pixels apart."""
    th = max(t.shape[0] for row in rows for t in row)
    tw = max(t.shape[1] for row in rows for t in row)
    cols = max(len(row) for row in rows)
    k = max(1, math.ceil(min_tile / max(th, tw)))
    canvas = np.zeros((len(rows) * (th * k + gap) - gap, cols * (tw * k + gap) - gap), np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            t = np.kron(t, np.ones((k, k), np.uint8))
            y, x = i * (th * k + gap), j * (tw * k + gap)
            canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
    return canvas


def save_png(img: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 image as PNG atomically (a temporary name in the same folder, then rename):
    a reader never sees half a file."""
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def montage_png(volumes: list[np.ndarray] | np.ndarray, path: str | os.PathLike, min_tile: int = 128) -> Path:
    """One row per model-space volume ([-1, 1], (D, H, W) or 2D): its ``display_planes`` side by
    side; the training previews and the evaluation's montages."""
    rows = [[to_uint8(p) for p in display_planes(v)] for v in volumes]
    return save_png(montage(rows, min_tile), path)
