"""PNG previews of result volumes: the middle axial, coronal and sagittal slices side by side.

Orientation: the slices of model/preview.py ``display_planes`` (the *neurological* convention, as
NiiVue, the service's web viewer, shows them).  A band above the tiles says so: one line with the
convention and the intensity scaling, and above each tile its plane and which way is up / right.

Intensity: CT in a fixed window in Hounsfield units (the model's own window, the range it was
trained in); MRI (arbitrary units) from the 1st to the 99.5th percentile of the volume (of every
voxel up to 2^18 of them, else of an even sample of about 2^18: a preview is written with every
result, so it costs milliseconds, not a pass over the whole volume), so a few bright voxels do not
darken the image.  Each tile is stretched to the physical aspect ratio when
the voxel spacing is anisotropic.  The tiles sit edge to edge: the image is exactly as wide as the
three tiles, and the picture starts LABEL_HEIGHT rows from the top.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.preview import display_planes, save_png

LABEL_HEIGHT = 28  # rows above the tiles: the caption line and the per-tile orientation line
_LINE = 14  # height of one text line in the label band

# per plane: the texts to try, longest first; the first that fits the tile's width is drawn
_PLANE_LABELS = (
    ("axial: A up, R right", "ax: A up, R right", "ax A^ R>", "ax"),
    ("coronal: S up, R right", "cor: S up, R right", "cor S^ R>", "cor"),
    ("sagittal: S up, A right", "sag: S up, A right", "sag S^ A>", "sag"),
)


PERCENTILE_SAMPLE = 1 << 18  # voxels the MRI display range is taken from, at most


def _window(v: np.ndarray, config: Any) -> tuple[float, float, str]:
    """The display range (lo, hi) in physical units and how it was chosen, in words; ``v`` is the
    model-space volume (the physical map is linear and increasing, so its percentiles map too)."""
    if getattr(config, "modality", "") == "ct":
        lo, hi = float(config.intensity.lo), float(config.intensity.hi)
        return lo, hi, f"CT window {lo:g}..{hi:g} HU"
    flat = v.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE)]
    q = np.clip(np.percentile(sample, [1.0, 99.5]), -1.0, 1.0)
    lo, hi = (float(x) for x in config.intensity.to_physical(q))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, "MRI 1st-99.5th percentile"


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


def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):  # older Pillow / no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fitting(font: Any, texts: tuple[str, ...], width: int) -> str:
    """The first of ``texts`` that fits ``width`` pixels, or '' when none does."""
    for t in texts:
        if font.getlength(t) <= width - 2:
            return t
    return ""


def render_preview(v_model: np.ndarray, config: Any) -> np.ndarray:
    """(D, H, W) model-space volume -> uint8 image (LABEL_HEIGHT + rows, cols): a label band above
    the axial, coronal and sagittal middle slices, side by side."""
    from PIL import Image, ImageDraw

    v = np.asarray(v_model, dtype=np.float32)
    lo, hi, how = _window(v, config)
    sx, sy, sz = (float(s) for s in config.spacing)
    axial, coronal, sagittal = display_planes(v)

    def phys(plane: np.ndarray) -> np.ndarray:  # only the three slices are mapped, not the volume
        return np.asarray(config.intensity.to_physical(np.clip(plane, -1.0, 1.0)), dtype=np.float32)

    tiles = [
        _tile(phys(axial), sy, sx),  # (y, x)
        _tile(phys(coronal), sz, sx),  # (z, x)
        _tile(phys(sagittal), sz, sy),  # (z, y)
    ]
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0)), constant_values=lo) for t in tiles]
    img = np.concatenate(padded, axis=1)
    img = ((np.clip(img, lo, hi) - lo) / (hi - lo) * 255.0).round().astype(np.uint8)

    canvas = Image.new("L", (img.shape[1], img.shape[0] + LABEL_HEIGHT), 0)
    canvas.paste(Image.fromarray(img), (0, LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(canvas), _font()
    caption = _fitting(
        font,
        (
            f"neurological convention (patient's R on image right), {how}",
            f"neurological (R on right), {how}",
            f"neurological, {how}",
            "neurological (R on right)",
            "neurological",
            "neuro",
        ),
        img.shape[1],
    )
    draw.text((2, 0), caption, fill=255, font=font)
    x0 = 0
    for tile, texts in zip(tiles, _PLANE_LABELS, strict=True):
        label = _fitting(font, texts, tile.shape[1])
        if label:
            # each tile's label is drawn on its own strip so that it can never spill over a neighbour
            strip = Image.new("L", (tile.shape[1], LABEL_HEIGHT - _LINE), 0)
            ImageDraw.Draw(strip).text((1, 0), label, fill=200, font=font)
            canvas.paste(strip, (x0, _LINE))
        x0 += tile.shape[1]
    return np.asarray(canvas)


def write_preview(path: str | os.PathLike, v_model: np.ndarray, config: Any) -> None:
    """Write the preview PNG atomically (temporary name in the same folder, then rename)."""
    save_png(render_preview(v_model, config), path)
