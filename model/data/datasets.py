"""Prepared datasets: one float16 ``.npy`` per scan on the model grid (memory-mapped when read) and
a ``manifest.json`` with the source, spacing, labels and attributes.  ``prepare_dataset`` uses the
same reading and normalisation code as inference (model/data/volumes.py)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from model.config_base import Cube, Intensity
from model.data.volumes import VolumeError, dicom_series, is_dicom_file, read_volume, to_model_space

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # a folder with such files is listed even if none reads
# files that are never DICOM slices: not opened when looking for DICOM by content
NOT_DICOM_SUFFIXES = (
    *SCAN_SUFFIXES,
    *(".raw", ".img", ".hdr", ".zip", ".gz", ".npy", ".npz", ".csv", ".json", ".txt", ".md", ".xml", ".html"),
    *(".htm", ".pdf", ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".log", ".ini", ".inf", ".exe"),
)
DICOM_SAMPLE = 16  # files of a folder opened (132 bytes each) to tell whether it holds DICOM


def _holds_dicom(folder: Path, files: list[str]) -> bool:
    """Whether a folder holds DICOM files, by their names (.dcm, .IMA) or else by the content of
    its first DICOM_SAMPLE files that could be DICOM (names without extension, UIDs, anything but
    known other formats, hidden files and DICOMDIR, an index rather than a slice)."""
    if any(f.lower().endswith(DICOM_SUFFIXES) for f in files):
        return True
    candidates = [
        f
        for f in files
        if not f.startswith(".") and f.upper() != "DICOMDIR" and not f.lower().endswith(NOT_DICOM_SUFFIXES)
    ]
    return any(is_dicom_file(folder / f) for f in candidates[:DICOM_SAMPLE])


def find_scans(src: Path) -> list[Path]:
    """Scan files, and folders holding DICOM files (found by content: UID names without extension,
    ``.IMA``, ``.dcm``, anything), under ``src``.  A folder may hold several series
    (``find_series`` lists them)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        r = Path(root)
        names = sorted(files)
        out += [r / f for f in names if f.lower().endswith(SCAN_SUFFIXES)]
        if _holds_dicom(r, names):
            out.append(r)
    return out


def find_series(src: Path, series_uids: Collection[str] | None = None) -> tuple[list[tuple[Path, str | None]], int]:
    """The scans ``prepare`` reads: ``(path, None)`` for a scan file or a DICOM folder of one series
    (or one that cannot be scanned: reading it reports why), ``(folder, uid)`` for each series of a
    folder holding several.  With ``series_uids``, DICOM series are only those with these UIDs
    (scan files are all kept); the second value counts the series left out.  ValueError if a UID
    asked for is found nowhere."""
    wanted = set(series_uids) if series_uids else None
    found: set[str] = set()
    out: list[tuple[Path, str | None]] = []
    left_out = 0
    for p in find_scans(src):
        if not p.is_dir():
            out.append((p, None))
            continue
        try:
            uids = [s["series_uid"] for s in dicom_series(p, details=False)]
        except VolumeError:
            uids = []
        keep = uids if wanted is None else [u for u in uids if u in wanted]
        found.update(keep)
        left_out += len(uids) - len(keep)
        if len(uids) == 1 and keep:
            out.append((p, None))  # a folder of one series keeps its own name
        elif wanted is None and not uids:
            out.append((p, None))  # reading it says why it holds no series
        else:
            out += [(p, u) for u in keep]
    if wanted is not None and (missing := sorted(wanted - found)):
        raise ValueError(f"{src}: no DICOM series with the UID {', '.join(missing)} under it")
    return out, left_out


def source_name(src: Path, path: Path, series_uid: str | None) -> str:
    """How ``prepare`` names a scan: its path under ``src``, plus ``#<SeriesInstanceUID>`` for a
    series picked from a DICOM folder (``patient1#1.2.840...``)."""
    rel = str(path.relative_to(src))
    return f"{rel}#{series_uid}" if series_uid else rel


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
    series_uids: Collection[str] | None = None,
) -> dict[str, Any]:
    """Read every scan under ``src``, bring it to the model grid, write the dataset.  Unreadable
    inputs are listed in ``report.json`` and skipped; nothing under ``src`` is modified.

    Every DICOM series is a scan: a folder holding several gives one volume per series, its source
    ``folder#<SeriesInstanceUID>`` (a folder of one series keeps its own name).  ``series_uids``
    restricts the DICOM series to those UIDs (scan files are all read; the report counts the series
    left out).  A labels CSV row is found by the source, ``name#uid`` or the folder or file name."""
    src, out = Path(src), Path(output)
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder of scans")
    table = _read_labels(Path(labels_csv) if labels_csv else None)
    scans, left_out = find_series(src, series_uids)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    from model.data import preprocess as pp

    mode = pp.options(config)["mode"]
    if mode == pp.PHYSICAL and getattr(config, "spacing", None) in (None, "auto"):
        config.spacing = _auto_spacing(scans, config, progress)
    items, skipped = [], []
    for i, (p, uid) in enumerate(scans):
        rel = source_name(src, p, uid)
        try:
            arr, spacing = read_volume(p, series_uid=uid)
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
            keys = [rel, f"{p.name}#{uid}"] if uid else [rel]
            row = next((table[k] for k in [*keys, str(p.relative_to(src)), p.name] if k in table), {})
            items.append(
                {
                    "file": f"volumes/{name}",
                    "source": rel,
                    **({"series_uid": uid} if uid else {}),
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
    report: dict[str, Any] = {"prepared": len(items), "skipped": skipped}
    if series_uids:
        report["series_left_out"] = left_out
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if not items:
        raise ValueError(f"{src}: no readable scans ({len(skipped)} skipped; see {out / 'report.json'})")
    return report


def _auto_spacing(
    scans: list[tuple[Path, str | None]], config: Any, progress: Callable[[int, int, str], None] | None
) -> list[float]:
    """A first pass over the scans: the isotropic spacing whose field of view holds the largest
    foreground (``preprocess.auto_spacing``)."""
    from model.data import preprocess as pp

    thr = pp.options(config).get("foreground", pp.FOREGROUND.get(config.modality, -0.9))
    extents = []
    for i, (p, uid) in enumerate(scans):
        try:
            arr, spacing = read_volume(p, series_uid=uid)
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

    def cube(self) -> Cube:
        """The dataset's preprocessing as ``to_model_space`` takes it (``model.config_base.Cube``):
        a scan read through it lands where ``prepare`` put the dataset's scans.  A model trained on
        the dataset records it in its config (``preprocess``, the cube's resolution and voxel size),
        so that its ``config.cube()`` is this."""
        mf = self.manifest
        modality = str(mf.get("modality", "ct"))
        inten = Intensity(**mf["intensity"]) if mf.get("intensity") else Intensity.for_modality(modality)
        spacing = self.grid_spacing() or (1.0, 1.0, 1.0)
        return Cube(self.resolution, spacing, modality, inten, dict(mf.get("preprocess") or {}))

    def label(self, i: int) -> int | None:
        lab = self.items[i].get("label")
        return self.class_names.index(lab) if lab in self.class_names else None
