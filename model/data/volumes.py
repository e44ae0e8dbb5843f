"""Volumes in and out: read NIfTI / NRRD / MHA / DICOM series, bring them to the model grid, write
NIfTI in physical units.  The same code prepares training data and reads uploads at inference.

Conventions: arrays are indexed (z, y, x) = (D, H, W) with z the axial (slice) axis; indices
increase towards Right, Anterior, Superior (NIfTI's RAS+).  Spacing is given as (x, y, z) in mm.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MIN_SIZE = 8  # voxels along each axis; smaller is not a 3D scan
DEFAULT_MAX_VOXELS = 1024**3


class VolumeError(ValueError):
    """The input is not a usable 3D volume; the message says what is wrong and what is accepted."""


ACCEPTED = (
    "a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "a folder with one DICOM series, or a .zip of one DICOM series"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".npy"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


# ------------------------------------------------------------------------------------ safety checks
def check_gzip(path: Path, max_bytes: int) -> None:
    """Refuse a gzip file whose content would exceed ``max_bytes`` (declared size first, then by
    streaming decompression with a cap) or which is truncated/corrupt.  Never inflates into memory."""
    size = path.stat().st_size
    if size < 18:
        raise VolumeError(f"{path.name}: truncated gzip file ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        declared = struct.unpack("<I", f.read(4))[0]  # ISIZE: the size modulo 2^32
    if declared > max_bytes:
        raise VolumeError(f"{path.name}: declares {declared} uncompressed bytes, over the limit of {max_bytes}")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                while chunk:
                    out = d.decompress(chunk, 1 << 22)
                    total += len(out)
                    if total > max_bytes:
                        raise VolumeError(
                            f"{path.name}: decompresses to more than {max_bytes} bytes (a gzip bomb?); refused"
                        )
                    chunk = d.unconsumed_tail
                if d.eof:
                    break
    except zlib.error as e:
        raise VolumeError(f"{path.name}: corrupt gzip data ({e})") from e
    if not d.eof:
        raise VolumeError(f"{path.name}: truncated gzip file (the compressed stream ends early)")


def _safe_extract_zip(path: Path, dest: Path, max_bytes: int) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise VolumeError(f"{path.name}: not a readable zip file ({e})") from e
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise VolumeError(f"{path.name}: the zip is empty; expected one DICOM series")
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise VolumeError(f"{path.name}: declares {declared} uncompressed bytes, over the limit of {max_bytes}")
        total = 0
        for i, m in enumerate(members):
            parts = Path(m.filename).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in m.filename:
                raise VolumeError(f"{path.name}: member {m.filename!r} has an unsafe path; refused")
            target = dest / f"{i:06d}.dcm"
            try:
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise VolumeError(f"{path.name}: decompresses to more than {max_bytes} bytes; refused")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise VolumeError(f"{path.name}: corrupt zip member {m.filename!r} ({e})") from e


# ------------------------------------------------------------------------------------ reading
def _read_dicom_dir(folder: Path, label: str) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise VolumeError(f"{label}: cannot scan for DICOM files ({e})") from e
    if not series:
        raise VolumeError(f"{label}: no DICOM series found; expected {ACCEPTED}")
    if len(series) > 1:
        raise VolumeError(f"{label}: holds {len(series)} DICOM series; upload exactly one series")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{label}: unreadable DICOM series ({str(e).strip().splitlines()[-1]})") from e


def _read_sitk(path: Path) -> Any:
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise VolumeError(
            f"{path.name}: unreadable or corrupt file ({msg[-1] if msg else 'read error'}); expected {ACCEPTED}"
        ) from e


def read_volume(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a scan -> (array float32 indexed (z, y, x), RAS, physical units; spacing (x, y, z) mm).

    Refuses (VolumeError): missing files, unknown formats, corrupt or truncated files, 2D and 4D
    images, images smaller than 8 voxels along an axis, all-NaN images, gzip or zip bombs, unsafe
    zip member paths.  Isolated NaN/inf voxels are replaced by the minimum finite value.
    """

    p = Path(path)
    max_voxels = max_voxels or DEFAULT_MAX_VOXELS
    max_bytes = max_bytes or max_voxels * 8 + (1 << 20)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    ext = _suffix(p)
    if p.is_dir():
        img = _read_dicom_dir(p, p.name)
    elif ext == ".zip":
        with tempfile.TemporaryDirectory(prefix="voxgen-dicom-") as tmp:
            _safe_extract_zip(p, Path(tmp), max_bytes)
            img = _read_dicom_dir(Path(tmp), p.name)
    elif ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if p.stat().st_size == 0:
            raise VolumeError(f"{p.name}: empty file")
        with open(p, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            check_gzip(p, max_bytes)
        elif ext == ".nii.gz":
            raise VolumeError(f"{p.name}: named .nii.gz but not gzip-compressed (corrupt?)")
        if ext in (".nii.gz", ".nii"):
            return _read_nifti(p, max_voxels)
        img = _read_sitk(p)
    else:
        raise VolumeError(f"{p.name}: unknown format {ext or '(no extension)'}; expected {ACCEPTED}")

    return _from_sitk(img, p.name, max_voxels)


def _check_shape(name: str, shape: tuple[int, ...], max_voxels: int) -> None:
    dims = "x".join(map(str, shape))
    if len(shape) == 4:
        raise VolumeError(f"{name}: a 4D image ({dims}); expected one 3D volume")
    if len(shape) != 3:
        raise VolumeError(f"{name}: a {len(shape)}D image ({dims}); expected a 3D volume")
    if min(shape) < MIN_SIZE:
        raise VolumeError(f"{name}: {dims} voxels; at least {MIN_SIZE} along each axis needed")
    if int(np.prod(shape)) > max_voxels:
        raise VolumeError(f"{name}: {int(np.prod(shape))} voxels, over the limit of {max_voxels}")


def _finite(name: str, arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.any():
        raise VolumeError(f"{name}: every voxel is NaN or infinite")
    if not finite.all():
        arr[~finite] = arr[finite].min()
    return arr


def _read_nifti(p: Path, max_voxels: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """NIfTI through nibabel (ITK's reader turns NaN into 0, which would hide an all-NaN file)."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            img = nib.funcs.squeeze_image(img)
            shape = tuple(int(n) for n in img.shape)
        _check_shape(p.name, shape, max_voxels)
        img = nib.as_closest_canonical(img)  # RAS+
        data = np.asarray(img.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as e:  # nibabel raises many kinds for truncated / corrupt files
        raise VolumeError(f"{p.name}: unreadable, truncated or corrupt NIfTI ({e}); expected {ACCEPTED}") from e
    sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
    if min(sx, sy, sz) <= 0:
        raise VolumeError(f"{p.name}: voxel sizes must be positive, got {(sx, sy, sz)}")
    arr = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    return _finite(p.name, arr), (sx, sy, sz)


def _from_sitk(img: Any, name: str, max_voxels: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    import SimpleITK as sitk

    p = Path(name)
    dim = img.GetDimension()
    size = list(img.GetSize())
    if dim == 4 and size[3] == 1:
        img = img[:, :, :, 0]
        dim, size = 3, size[:3]
    _check_shape(p.name, tuple(size), max_voxels)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{p.name}: has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected scalar")
    # reorient: ITK's "LPS" gives an identity direction (index increasing towards Left, Posterior,
    # Superior); flipping x and y then gives RAS+ as NIfTI writers use it
    img = sitk.DICOMOrient(img, "LPS")
    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)  # (z, y, x), x->L, y->P
    arr = np.ascontiguousarray(arr[:, ::-1, ::-1])  # x->R, y->A: RAS+
    sx, sy, sz = (float(s) for s in img.GetSpacing())
    return _finite(p.name, arr), (sx, sy, sz)


# ------------------------------------------------------------------------------------ to the model grid
def to_model_space(
    array: np.ndarray, spacing: tuple[float, float, float], config: Any, *, trim_blank: bool = True
) -> np.ndarray:
    """Physical units -> (R, R, R) float32 in [-1, 1]: the paper's preprocessing.

    CT: clip to the config's window (default [-1024, 600] HU) and map linearly to [-1, 1].
    MRI: clip at the 99.9th percentile, scale [0, p99.9] -> [-1, 1].
    Then trim blank axial slices (every voxel at -1) and resample the rest to the cube (linear).
    """
    import torch
    import torch.nn.functional as F

    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 3:
        raise VolumeError(f"expected a 3D array, got shape {a.shape}")
    if config.modality == "ct":
        it = config.intensity
        v = (np.clip(a, it.lo, it.hi) - it.lo) / (it.hi - it.lo) * 2.0 - 1.0
    else:
        a = np.clip(a, 0.0, None)
        hi = float(np.percentile(a, 99.9))
        if hi <= 0:
            raise VolumeError("the MRI volume is blank (its 99.9th percentile is 0)")
        v = np.clip(a, 0.0, hi) / hi * 2.0 - 1.0
    v = v.astype(np.float32)
    if trim_blank:
        keep = (v > -1.0 + 1e-6).any(axis=(1, 2))
        if not keep.any():
            raise VolumeError("the volume is blank after windowing (every voxel at the window's minimum)")
        idx = np.nonzero(keep)[0]
        v = v[idx[0] : idx[-1] + 1]
    r = config.resolution
    t = torch.from_numpy(np.ascontiguousarray(v))[None, None]
    out = F.interpolate(t, size=(r, r, r), mode="trilinear", align_corners=False)
    return out[0, 0].clamp_(-1.0, 1.0).numpy().astype(np.float32)


def load_for_model(path: str | os.PathLike, config: Any, **read_kw: Any) -> np.ndarray:
    """Read a scan and bring it to the model grid: (R, R, R) float32 in [-1, 1]."""
    arr, spacing = read_volume(path, **read_kw)
    return to_model_space(arr, spacing, config)


# ------------------------------------------------------------------------------------ writing
def volume_affine(shape_dhw: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    """RAS affine for an array written as (x, y, z) = (W, H, D): diagonal spacing, centred on 0."""
    d, h, w = shape_dhw
    sx, sy, sz = spacing_xyz
    aff = np.diag([sx, sy, sz, 1.0])
    aff[:3, 3] = -0.5 * (np.array([w, h, d]) - 1) * np.array([sx, sy, sz])
    return aff


def write_volume(path: str | os.PathLike, v_model: np.ndarray, config: Any) -> None:
    """Write a model-space (D, H, W) volume: .nii/.nii.gz in physical units with the affine,
    .npy as the raw float32 array.  Atomic: a reader never sees a half-written file."""
    import nibabel as nib

    p = Path(path)
    ext = _suffix(p)
    v = np.asarray(v_model, dtype=np.float32)
    if v.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got shape {v.shape}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, v)
        elif ext in (".nii.gz", ".nii"):
            it = config.intensity
            phys = it.to_physical(np.clip(v, -1.0, 1.0))
            if it.dtype == "int16":
                data = np.clip(np.rint(phys), -32768, 32767).astype(np.int16)
            else:
                data = phys.astype(np.float32)
            img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), volume_affine(v.shape, config.spacing))
            img.header.set_xyzt_units("mm", "sec")
            img.header.set_qform(img.affine, code=1)
            img.header.set_sform(img.affine, code=1)
            img.header["descrip"] = f"voxgen {config.family} {config.modality} ({it.units})".encode()[:79]
            if it.dtype == "int16":
                img.header.set_slope_inter(1.0, 0.0)
            if ext == ".nii.gz":
                with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
                    gz.write(img.to_bytes())
            else:
                tmp.write_bytes(img.to_bytes())
        else:
            raise VolumeError(f"{p.name}: cannot write {ext or '(no extension)'}; use .nii.gz, .nii or .npy")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_bytes_nifti(v_model: np.ndarray, config: Any) -> bytes:
    """The .nii.gz bytes write_volume would write (for streaming results)."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "v.nii.gz"
        write_volume(f, v_model, config)
        return f.read_bytes()


__all__ = [
    "VolumeError",
    "read_volume",
    "to_model_space",
    "load_for_model",
    "write_volume",
    "volume_affine",
    "check_gzip",
]
