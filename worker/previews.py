"""PNG previews of result volumes: the middle axial, coronal and sagittal slices side by side.

Orientation: volumes are (z, y, x) arrays whose indices increase towards Superior, Anterior and
Right (RAS+, see model/data/volumes.py).  Each plane is drawn as a radiologist reads it from the
patient's feet/front/left but in the *neurological* convention (the patient's right on the image's
right): axial with anterior up, coronal and sagittal with superior up (sagittal: anterior on the
right).  The convention and the intensity scaling are written on the image.

Intensity: CT in a fixed window in Hounsfield units (default the model's own window, the range it
was trained in); MRI (arbitrary units) from the 1st to the 99.5th percentile of the volume.
Each tile is stretched to the physical aspect ratio when the voxel spacing is anisotropic.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

LABEL_HEIGHT = 14


def _window(phys: np.ndarray, config: Any) -> tuple[float, float, str]:
    if getattr(config, "modality", "") == "ct":
        lo, hi = float(config.intensity.lo), float(config.intensity.hi)
        return lo, hi, f"CT {lo:g}..{hi:g} HU"
    lo, hi = (float(x) for x in np.percentile(phys, [1.0, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, "MRI p1-p99.5"


def _tile(plane: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resample a 2D slice so its pixels are square in millimetres (nearest neighbour)."""
    if abs(row_mm - col_mm) < 1e-6:
        return plane
    r, c = plane.shape
    if row_mm > col_mm:
        idx = np.minimum((np.arange(round(r * row_mm / col_mm)) * col_mm / row_mm).astype(int), r - 1)
        return plane[idx]
    idx = np.minimum((np.arange(round(c * col_mm / row_mm)) * row_mm / col_mm).astype(int), c - 1)
    return plane[:, idx]


def render_preview(v_model: np.ndarray, config: Any) -> np.ndarray:
    """(D, H, W) model-space volume -> uint8 image (rows, cols): three planes and a caption."""
    from PIL import Image, ImageDraw

    v = np.asarray(v_model, dtype=np.float32)
    phys = np.asarray(config.intensity.to_physical(np.clip(v, -1.0, 1.0)), dtype=np.float32)
    lo, hi, how = _window(phys, config)
    sx, sy, sz = (float(s) for s in config.spacing)
    cz, cy, cx = (n // 2 for n in phys.shape)
    tiles = [
        _tile(phys[cz][::-1], sy, sx),  # axial (y, x): anterior up, right on the right
        _tile(phys[:, cy][::-1], sz, sx),  # coronal (z, x): superior up, right on the right
        _tile(phys[:, :, cx][::-1], sz, sy),  # sagittal (z, y): superior up, anterior on the right
    ]
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0)), constant_values=lo) for t in tiles]
    img = np.concatenate(padded, axis=1)
    img = ((np.clip(img, lo, hi) - lo) / (hi - lo) * 255.0).round().astype(np.uint8)
    canvas = Image.new("L", (img.shape[1], img.shape[0] + LABEL_HEIGHT), 0)
    canvas.paste(Image.fromarray(img), (0, LABEL_HEIGHT))
    caption = f"ax | cor | sag, R on right (neurological), {how}"
    ImageDraw.Draw(canvas).text((2, 1), caption, fill=255)
    return np.asarray(canvas)


def write_preview(path: str | os.PathLike, v_model: np.ndarray, config: Any) -> None:
    """Write the preview PNG atomically (temporary name in the same folder, then rename)."""
    from PIL import Image

    p = Path(path)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    try:
        Image.fromarray(render_preview(v_model, config)).save(tmp, format="PNG")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
