"""Prepared datasets: one float16 ``.npy`` per scan on the model grid (memory-mapped when read) and
a ``manifest.json`` with the source, spacing, labels and attributes.  ``prepare_dataset`` uses the
same reading and normalisation code as inference (model/data/volumes.py)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.data.volumes import VolumeError, read_volume, to_model_space

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_scans(src: Path) -> list[Path]:
    """Scan files, and folders holding DICOM files (one series per folder), under ``src``."""
    out: list[Path] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        r = Path(root)
        scans = [r / f for f in sorted(files) if f.lower().endswith(SCAN_SUFFIXES)]
        out += scans
        if any(f.lower().endswith(".dcm") for f in files) or (files and not scans and all("." not in f for f in files)):
            out.append(r)
    return out


def _read_labels(csv_path: Path | None) -> dict[str, dict[str, str]]:
    if csv_path is None:
        return {}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0]:
        raise ValueError(f"{csv_path}: needs a header with a 'file' column (plus 'label' and attribute columns)")
    return {r["file"]: r for r in rows}


def prepare_dataset(
    src: str | os.PathLike,
    output: str | os.PathLike,
    config: Any,
    labels_csv: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Read every scan under ``src``, bring it to the model grid, write the dataset.  Unreadable
    inputs are listed in ``report.json`` and skipped; nothing under ``src`` is modified."""
    src, out = Path(src), Path(output)
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder of scans")
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    table = _read_labels(Path(labels_csv) if labels_csv else None)
    scans = find_scans(src)
    from model.data import preprocess as pp

    mode = pp.options(config)["mode"]
    if mode == pp.PHYSICAL and getattr(config, "spacing", None) in (None, "auto"):
        config.spacing = _auto_spacing(scans, config, progress)
    items, skipped = [], []
    for i, p in enumerate(scans):
        rel = str(p.relative_to(src))
        try:
            arr, spacing = read_volume(p)
            info: dict[str, Any] = {}
            v = to_model_space(arr, spacing, config, info=info)
        except VolumeError as e:
            skipped.append({"source": rel, "reason": str(e)})
        else:
            name = f"{len(items):05d}.npy"
            tmp = out / "volumes" / f".{name}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, v.astype(np.float16))
            os.replace(tmp, out / "volumes" / name)
            row = table.get(rel) or table.get(p.name) or {}
            items.append(
                {
                    "file": f"volumes/{name}",
                    "source": rel,
                    "spacing": list(spacing),
                    "grid_spacing": info.get("grid_spacing"),
                    "label": row.get("label"),
                    "attributes": {k: v for k, v in row.items() if k not in ("file", "label")},
                }
            )
        if progress:
            progress(i + 1, len(scans), "prepare")
    class_names = sorted({it["label"] for it in items if it["label"]})
    prep: dict[str, Any] = {"mode": mode}
    if mode == pp.PHYSICAL:
        sp = [float(s) for s in config.spacing]
        prep |= {
            "spacing": sp,
            "field_of_view_mm": [s * config.resolution for s in sp],
            "centre": "foreground",
            "foreground": pp.options(config).get("foreground", pp.FOREGROUND.get(config.modality, -0.9)),
            "orientation": "RAS",
            "resampling": "trilinear, Gaussian anti-alias sigma (factor - 1) / 2 where it shrinks",
        }
    manifest = {
        "created": time.time(),
        "source": str(src.resolve()),
        "resolution": config.resolution,
        "modality": config.modality,
        "preprocess": prep,
        "intensity": config.to_dict()["intensity"],
        "dtype": "float16",
        "class_names": class_names,
        "items": items,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report = {"prepared": len(items), "skipped": skipped}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if not items:
        raise ValueError(f"{src}: no readable scans ({len(skipped)} skipped; see {out / 'report.json'})")
    return report


def _auto_spacing(scans: list[Path], config: Any, progress: Callable[[int, int, str], None] | None) -> list[float]:
    """A first pass over the scans: the isotropic spacing whose field of view holds the largest
    foreground (``preprocess.auto_spacing``)."""
    from model.data import preprocess as pp

    thr = pp.options(config).get("foreground", pp.FOREGROUND.get(config.modality, -0.9))
    extents = []
    for i, p in enumerate(scans):
        try:
            arr, spacing = read_volume(p)
            extents.append(pp.foreground_extent_mm(pp.window(arr, config), spacing, thr))
        except VolumeError:
            pass  # reported by the main pass
        if progress:
            progress(i + 1, len(scans), "measure")
    if not extents or max(max(e) for e in extents) == 0:
        raise ValueError("no readable scan with a foreground to size the field of view; give --spacing")
    s = pp.auto_spacing(extents, int(config.resolution))
    return [s, s, s]


class VolumeDataset:
    """A prepared dataset, read lazily through memory maps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        mf = self.root / "manifest.json"
        if not mf.is_file():
            raise ValueError(f"{self.root}: not a prepared dataset (no manifest.json); run voxgen prepare")
        self.manifest = json.loads(mf.read_text())
        self.items = self.manifest["items"]
        self.class_names: list[str] = self.manifest.get("class_names", [])
        self.resolution = int(self.manifest["resolution"])

    def __len__(self) -> int:
        return len(self.items)

    def volume(self, i: int) -> np.ndarray:
        return np.load(self.root / self.items[i]["file"], mmap_mode="r")

    def grid_spacing(self) -> tuple[float, float, float] | None:
        """The voxel size (x, y, z mm) of the prepared cubes: the model's spacing for a dataset
        prepared in physical units, else the median of the stretched cubes' voxel sizes (None for a
        dataset prepared before it was recorded).  A model trained on the dataset writes its
        volumes with it."""
        prep = self.manifest.get("preprocess") or {}
        if prep.get("mode") == "physical":
            return tuple(float(v) for v in prep["spacing"])  # type: ignore[return-value]
        rows = [it["grid_spacing"] for it in self.items if it.get("grid_spacing")]
        if not rows:
            return None
        med = np.median(np.asarray(rows, dtype=np.float64), axis=0)
        return (float(med[0]), float(med[1]), float(med[2]))

    def label(self, i: int) -> int | None:
        lab = self.items[i].get("label")
        return self.class_names.index(lab) if lab in self.class_names else None
