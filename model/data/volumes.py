"""Volumes in and out: read NIfTI / NRRD / MHA / DICOM series, bring them to the model grid, write
NIfTI in physical units.  The same code prepares training data and reads uploads at inference.

Conventions: arrays are indexed (z, y, x) = (D, H, W) with z the axial (slice) axis; indices
increase towards Right, Anterior, Superior (NIfTI's RAS+).  Spacing is given as (x, y, z) in mm.

Reading is defensive because uploads are untrusted: sizes are checked from headers before any
voxel is allocated, gzip and zip payloads are measured by streaming with a cap (never inflated
into memory first), zip members and detached data files may not point outside their folder, and
every failure is a ``VolumeError`` whose message says what was wrong and what is accepted.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MIN_SIZE = 8  # voxels along each axis; smaller is not a 3D scan
DEFAULT_MAX_VOXELS = 1024**3
MAX_ZIP_MEMBERS = 10_000  # files in a zipped DICOM series
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than 1032:1; more declared means truncated


class VolumeError(ValueError):
    """The input is not a usable 3D volume; the message says what is wrong and what is accepted."""


ACCEPTED = (
    "a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "a folder with one DICOM series, or a .zip of one DICOM series"
)
_SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".npy"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _default_max_bytes(max_voxels: int) -> int:
    return max_voxels * 8 + (1 << 20)  # float64 voxels plus headers


# ------------------------------------------------------------------------------------ safety checks
def check_gzip(path: str | os.PathLike, max_bytes: int) -> int:
    """Refuse a gzip file whose content would exceed ``max_bytes`` (by its declared size, then by
    streaming decompression with a cap) or which is truncated or corrupt.  Never inflates into
    memory: at most a few MiB are held at a time.  Returns the uncompressed size."""
    path = Path(path)
    size = path.stat().st_size
    if size < 18:
        raise VolumeError(f"{path.name}: truncated gzip file ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        declared = struct.unpack("<I", f.read(4))[0]  # ISIZE: the last member's size modulo 2^32
    if declared > max_bytes:
        raise VolumeError(f"{path.name}: declares {declared} uncompressed bytes, over the limit of {max_bytes}")
    total, members = 0, 0
    d, fresh = zlib.decompressobj(16 + zlib.MAX_WBITS), True
    try:
        with open(path, "rb") as f:
            pending = b""
            while True:
                if not pending:
                    pending = f.read(1 << 20)
                    if not pending:
                        break
                if d.eof:  # another gzip member follows (gzip readers concatenate them)
                    d, fresh = zlib.decompressobj(16 + zlib.MAX_WBITS), True
                fresh = False
                total += len(d.decompress(pending, 1 << 22))
                if total > max_bytes:
                    raise VolumeError(
                        f"{path.name}: decompresses to more than {max_bytes} bytes (a gzip bomb?); refused"
                    )
                if d.eof:
                    members += 1
                    pending = d.unused_data
                else:
                    pending = d.unconsumed_tail
    except zlib.error as e:
        raise VolumeError(f"{path.name}: corrupt gzip data ({e})") from e
    if members == 0 or not (fresh or d.eof):
        raise VolumeError(f"{path.name}: truncated gzip file (the compressed stream ends early)")
    return total


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return norm.startswith("/") or ".." in norm.split("/") or ":" in norm


def _safe_extract_zip(path: Path, dest: Path, max_bytes: int) -> None:
    """Extract the files of a zip into ``dest`` under new flat names, checking member paths,
    encryption, the declared sizes and the actual sizes (streamed, capped)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise VolumeError(f"{path.name}: not a readable zip file ({e}); expected a .zip of one DICOM series") from e
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise VolumeError(f"{path.name}: the zip is empty; expected one DICOM series")
        if len(members) > MAX_ZIP_MEMBERS:
            raise VolumeError(f"{path.name}: {len(members)} files, over the limit of {MAX_ZIP_MEMBERS} per series")
        for m in zf.infolist():
            if _unsafe_member(m.filename):
                raise VolumeError(f"{path.name}: member {m.filename!r} has an unsafe path (absolute or '..'); refused")
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise VolumeError(f"{path.name}: declares {declared} uncompressed bytes, over the limit of {max_bytes}")
        total = 0
        for i, m in enumerate(members):
            if m.flag_bits & 0x1:
                raise VolumeError(f"{path.name}: member {m.filename!r} is encrypted; upload an unencrypted zip")
            target = dest / f"{i:06d}.dcm"
            try:
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise VolumeError(f"{path.name}: decompresses to more than {max_bytes} bytes; refused")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                raise VolumeError(f"{path.name}: corrupt or unsupported zip member {m.filename!r} ({e})") from e


def _header_text(path: Path, limit: int = 1 << 16) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(limit)
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        head = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]  # an attached NRRD header ends at a blank line
    return head.decode("latin-1").splitlines()


def _header_fields(path: Path) -> tuple[list[str], bool, float | None]:
    """From a NRRD / MetaImage header: the data files it refers to ([] when the data are in the file
    itself), whether they are a numbered pattern (``slice%03d.raw 1 40 1``: only the pattern's
    folder part can be checked), and the largest ratio of voxel bytes to stored bytes its encoding
    allows (raw 1, text 4, deflate ~1032; None when unknown)."""
    lines = _header_text(path)
    nrrd = bool(lines) and lines[0].startswith("NRRD")
    refs: list[str] = []
    pattern = False
    ratio: float | None = 1.0  # NRRD and MetaImage store raw voxels unless told otherwise
    for i, line in enumerate(lines):
        key, sep, value = line.partition(":" if nrrd else "=")
        if not sep or value.startswith("="):  # NRRD "key:=value" pairs are free text
            continue
        key, value = key.strip().lower(), value.strip()
        if key in (("encoding",) if nrrd else ("compresseddata",)):
            enc = value.lower()
            ratio = {"raw": 1.0, "false": 1.0, "ascii": 4.0, "text": 4.0, "txt": 4.0, "hex": 0.5}.get(enc)
            if enc in ("gzip", "gz", "true"):
                ratio = MAX_DEFLATE_RATIO
        if key not in (("data file", "datafile") if nrrd else ("elementdatafile",)):
            continue
        words = value.split()
        if words and words[0].upper() == "LIST":  # the file names follow, one a line, to the end
            refs = [s.strip() for s in lines[i + 1 :] if s.strip()]
        elif words and "%" in words[0] and len(words) >= 4:
            refs, pattern = [words[0]], True
        elif words and words[0].upper() != "LOCAL":
            refs = [value]
        if not nrrd or (words and words[0].upper() == "LIST"):
            break  # MetaImage: ElementDataFile is the last header line; binary data may follow
    return refs, pattern, ratio


def _check_data_files(path: Path) -> tuple[int | None, float | None]:
    """Refuse detached data files that lie outside the header's folder (an upload must not read
    the server's files) or that are missing.  Returns the bytes stored to hold voxel data (None
    when that cannot be known: numbered file patterns) and the encoding's largest expansion."""
    refs, pattern, ratio = _header_fields(path)
    if not refs:
        return path.stat().st_size, ratio
    folder = path.parent.resolve()
    total = 0
    for ref in refs:
        norm = ref.replace("\\", "/")
        if norm.startswith("/") or ".." in norm.split("/") or ":" in norm:
            raise VolumeError(
                f"{path.name}: refers to the data file {ref!r} outside its folder; detached data must sit "
                "beside the header (or upload a single-file .nrrd, .mha or .nii.gz)"
            )
        if pattern:
            continue
        target = (path.parent / norm).resolve()
        if not target.is_relative_to(folder):
            raise VolumeError(f"{path.name}: its data file {ref!r} resolves outside its folder; refused")
        if not target.is_file():
            raise VolumeError(f"{path.name}: its data file {ref!r} is missing (upload a single-file .nrrd or .mha)")
        total += target.stat().st_size
    return (None if pattern else total), ratio


def _bytes_per_voxel(pixel_id: int, components: int) -> int:
    import SimpleITK as sitk

    text = sitk.GetPixelIDValueAsString(pixel_id)
    m = re.search(r"(\d+)-bit", text)
    bits = int(m.group(1)) if m else 64
    return max(1, bits // 8) * (2 if "complex" in text else 1) * max(1, components)


def _check_shape(name: str, shape: tuple[int, ...], max_voxels: int) -> None:
    dims = "x".join(map(str, shape))
    if len(shape) == 4:
        raise VolumeError(f"{name}: a 4D image ({dims}); expected one 3D volume")
    if len(shape) != 3:
        raise VolumeError(f"{name}: a {len(shape)}D image ({dims}); expected a 3D volume")
    if 0 in shape:
        raise VolumeError(f"{name}: an empty image ({dims} voxels); expected a 3D volume")
    if min(shape) < MIN_SIZE:
        kind = "a 2D image (one slice)" if sorted(shape)[1] > 1 and min(shape) == 1 else "too small"
        raise VolumeError(f"{name}: {dims} voxels, {kind}; at least {MIN_SIZE} along each axis needed")
    if int(np.prod(shape)) > max_voxels:
        raise VolumeError(f"{name}: {int(np.prod(shape))} voxels, over the limit of {max_voxels}")


def _check_bytes(
    name: str, declared: int, max_bytes: int, stored: int | None = None, ratio: float | None = None
) -> None:
    """Refuse images needing more than ``max_bytes``, and images whose stored bytes cannot hold
    the declared voxels (a header that lies about its size would make us allocate for nothing)."""
    if declared > max_bytes:
        raise VolumeError(f"{name}: needs {declared} bytes of voxel data, over the limit of {max_bytes}")
    if stored is not None and ratio is not None and declared > ratio * stored:
        raise VolumeError(
            f"{name}: declares {declared} bytes of voxel data but holds only {stored} bytes; truncated or corrupt"
        )


# ------------------------------------------------------------------------------------ reading
def read_volume(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a scan -> (array float32 indexed (z, y, x), RAS, physical units; spacing (x, y, z) mm).

    Accepts NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a folder holding
    one DICOM series, or a .zip of one DICOM series.  ``max_voxels`` (None: the default, 1024^3)
    bounds the image size; ``max_bytes`` (default ``8 * max_voxels`` + 1 MiB) bounds decompressed
    and allocated bytes.  Refuses (VolumeError): missing files, unknown formats, corrupt or
    truncated files, 2D and 4D images, images smaller than 8 voxels along an axis, all-NaN images,
    gzip or zip bombs, unsafe zip member paths, detached data files outside the header's folder.
    Isolated NaN/inf voxels are replaced by the minimum finite value.
    """

    p = Path(path)
    max_voxels = max_voxels or DEFAULT_MAX_VOXELS
    max_bytes = max_bytes or _default_max_bytes(max_voxels)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    ext = _suffix(p)
    if p.is_dir():
        return _from_sitk(_read_dicom_dir(p, p.name, max_voxels, max_bytes), p.name, max_voxels)
    if not p.is_file():
        raise VolumeError(f"{p.name}: not a regular file; expected {ACCEPTED}")
    if ext == ".zip":
        with tempfile.TemporaryDirectory(prefix="voxgen-dicom-") as tmp:
            _safe_extract_zip(p, Path(tmp), max_bytes)
            img = _read_dicom_dir(Path(tmp), p.name, max_voxels, max_bytes)
        return _from_sitk(img, p.name, max_voxels)
    if ext not in (".nii.gz", ".nii", *_SITK_SUFFIXES):
        raise VolumeError(f"{p.name}: unknown format {ext or '(no extension)'}; expected {ACCEPTED}")
    if p.stat().st_size == 0:
        raise VolumeError(f"{p.name}: empty file (0 bytes); expected {ACCEPTED}")
    with open(p, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        check_gzip(p, max_bytes)
    elif ext == ".nii.gz":
        raise VolumeError(f"{p.name}: named .nii.gz but not gzip-compressed (corrupt?)")
    if ext in (".nii.gz", ".nii"):
        return _read_nifti(p, max_voxels, max_bytes)
    return _from_sitk(_read_sitk(p, max_voxels, max_bytes), p.name, max_voxels)


def _read_dicom_dir(folder: Path, label: str, max_voxels: int, max_bytes: int) -> Any:
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
    info = sitk.ImageFileReader()
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{label}: unreadable DICOM file ({_last_line(e)})") from e
    size = tuple(info.GetSize())
    shape = (size[0], size[1], (size[2] if len(size) > 2 else 1) * len(files))
    _check_shape(label, shape, max_voxels)
    _check_bytes(label, int(np.prod(shape)) * _bytes_per_voxel(info.GetPixelID(), 1), max_bytes)
    if info.GetNumberOfComponents() != 1:
        raise VolumeError(f"{label}: {info.GetNumberOfComponents()} components per voxel (colour?); expected scalar")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{label}: unreadable DICOM series ({_last_line(e)})") from e


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else "read error"


def _read_sitk(path: Path, max_voxels: int, max_bytes: int) -> Any:
    """NRRD / MetaImage through SimpleITK: the header is checked before any voxel is allocated."""
    import SimpleITK as sitk

    stored, ratio = _check_data_files(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{path.name}: unreadable or corrupt file ({_last_line(e)}); expected {ACCEPTED}") from e
    size = tuple(reader.GetSize())
    shape = size[:3] if len(size) == 4 and size[3] == 1 else size
    _check_shape(path.name, shape, max_voxels)
    comps = reader.GetNumberOfComponents()
    if comps != 1:
        raise VolumeError(f"{path.name}: has {comps} components per voxel; expected a scalar volume")
    declared = int(np.prod(shape)) * _bytes_per_voxel(reader.GetPixelID(), comps)
    _check_bytes(path.name, declared, max_bytes, stored, ratio)
    try:
        return reader.Execute()
    except (RuntimeError, MemoryError) as e:
        msg = f"{path.name}: unreadable, truncated or corrupt ({_last_line(e)}); expected {ACCEPTED}"
        raise VolumeError(msg) from e


def _finite(name: str, arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.any():
        raise VolumeError(f"{name}: every voxel is NaN or infinite; expected a volume with finite values")
    if not finite.all():
        arr[~finite] = arr[finite].min()
    return arr


def _read_nifti(p: Path, max_voxels: int, max_bytes: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """NIfTI through nibabel (ITK's reader turns NaN into 0, which would hide an all-NaN file)."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            img = nib.funcs.squeeze_image(img)
            shape = tuple(int(n) for n in img.shape)
        _check_shape(p.name, shape, max_voxels)
        dtype = img.get_data_dtype()
        if dtype.kind not in "iuf" or dtype.names:
            raise VolumeError(f"{p.name}: voxels of type {dtype} (complex or colour); expected a scalar volume")
        _check_bytes(p.name, int(np.prod(shape)) * dtype.itemsize, max_bytes)
        img = nib.as_closest_canonical(img)  # RAS+
        data = np.asarray(img.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as e:  # nibabel raises many kinds for truncated / corrupt files
        raise VolumeError(f"{p.name}: unreadable, truncated or corrupt NIfTI ({e}); expected {ACCEPTED}") from e
    # voxel sizes from the affine (the columns' lengths), which is what orients the data
    sx, sy, sz = (float(s) for s in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
    if not min(sx, sy, sz) > 0:
        raise VolumeError(f"{p.name}: voxel sizes must be positive, got {(sx, sy, sz)}")
    arr = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    return _finite(p.name, arr), (sx, sy, sz)


def _from_sitk(img: Any, name: str, max_voxels: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    import SimpleITK as sitk

    size = list(img.GetSize())
    if img.GetDimension() == 4 and size[3] == 1:
        img = img[:, :, :, 0]
        size = size[:3]
    _check_shape(name, tuple(size), max_voxels)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{name}: has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected scalar")
    # reorient: ITK's "LPS" gives an identity direction (index increasing towards Left, Posterior,
    # Superior); reversing x and y then gives RAS+ as NIfTI uses it
    img = sitk.DICOMOrient(img, "LPS")
    view = sitk.GetArrayViewFromImage(img)  # (z, y, x), x -> L, y -> P
    arr = np.array(view[:, ::-1, ::-1], dtype=np.float32, order="C")  # x -> R, y -> A: RAS+
    sx, sy, sz = (float(s) for s in img.GetSpacing())
    return _finite(name, arr), (sx, sy, sz)


# ------------------------------------------------------------------------------------ to the model grid
def to_model_space(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    config: Any,
    *,
    trim_blank: bool = True,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Physical units -> (R, R, R) float32 in [-1, 1]: the paper's preprocessing.

    CT: clip to the config's window (default [-1024, 600] HU) and map linearly to [-1, 1]
    (NaN -> the window's minimum).  MRI: clip at the 99.9th percentile and scale [0, p99.9] ->
    [-1, 1] (NaN -> 0).  Then trim blank axial slices at both ends (every voxel at -1) and resize
    the rest to the R^3 cube (trilinear), as the authors do: the cube does not keep the physical
    aspect ratio, so ``spacing`` is accepted for the record but does not change the result.
    ``info``, when given, receives ``grid_spacing``: the voxel size (x, y, z mm) of the cube, i.e.
    the kept field of view divided by R along each axis.
    """
    import torch
    import torch.nn.functional as F

    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 3 or a.size == 0:
        raise VolumeError(f"expected a non-empty 3D array (z, y, x), got shape {a.shape}")
    if config.modality == "ct":
        lo, hi = float(config.intensity.lo), float(config.intensity.hi)
        v = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)  # a copy: the caller's array is untouched
        np.clip(v, lo, hi, out=v)
        v -= lo
        v *= 2.0 / (hi - lo)
        v -= 1.0
    else:
        v = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(v, 0.0, None, out=v)
        top = float(np.percentile(v, 99.9))
        if not top > 0:
            raise VolumeError("the MRI volume is blank (its 99.9th percentile is 0); expected non-negative intensities")
        np.clip(v, 0.0, top, out=v)
        v *= 2.0 / top
        v -= 1.0
    if trim_blank:
        keep = (v > -1.0 + 1e-6).any(axis=(1, 2))
        if not keep.any():
            raise VolumeError("the volume is blank after windowing (every voxel at the window's minimum)")
        idx = np.nonzero(keep)[0]
        v = v[idx[0] : idx[-1] + 1]
    r = config.resolution
    if info is not None:
        sx, sy, sz = (float(s) for s in spacing)
        info["grid_spacing"] = [v.shape[2] * sx / r, v.shape[1] * sy / r, v.shape[0] * sz / r]
    t = torch.from_numpy(np.ascontiguousarray(v))[None, None]
    out = F.interpolate(t, size=(r, r, r), mode="trilinear", align_corners=False)
    return out[0, 0].clamp_(-1.0, 1.0).numpy().astype(np.float32, copy=False)


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


def nifti_image(data_dhw: np.ndarray, spacing_xyz: tuple[float, float, float], description: str = "") -> Any:
    """A NIfTI-1 image of a (D, H, W) array already in its output dtype: RAS affine, qform and
    sform codes set (scanner), units mm."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(data_dhw.transpose(2, 1, 0)), volume_affine(data_dhw.shape, spacing_xyz))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = description.encode()[:79]
    return img


def write_volume(path: str | os.PathLike, v_model: np.ndarray, config: Any) -> None:
    """Write a model-space (D, H, W) volume: .nii/.nii.gz in physical units with the RAS affine
    (CT: int16 HU, rounded and clipped; MRI: float32), .npy as the raw float32 array.  Atomic: a
    temporary file in the same folder is renamed over ``path``, so a reader never sees a
    half-written file and a failed write leaves an existing file untouched."""
    p = Path(path)
    ext = _suffix(p)
    if ext not in (".npy", ".nii.gz", ".nii"):
        raise VolumeError(f"{p.name}: cannot write {ext or '(no extension)'}; use .nii.gz, .nii or .npy")
    v = np.asarray(v_model, dtype=np.float32)
    if v.ndim != 3 or v.size == 0:
        raise VolumeError(f"expected a non-empty 3D volume (D, H, W), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise VolumeError(f"{p.name}: the volume has NaN or infinite values; refusing to write it")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")  # unique: concurrent writers never share it
    try:
        with open(tmp, "xb") as f:
            if ext == ".npy":
                np.save(f, v)
            else:
                it = config.intensity
                phys = it.to_physical(np.clip(v, -1.0, 1.0))
                if it.dtype == "int16":
                    data = np.clip(np.rint(phys), -32768, 32767).astype(np.int16)
                else:
                    data = phys.astype(np.float32)
                desc = f"voxgen {config.family} {config.modality} ({it.units})"
                raw = nifti_image(data, config.spacing, desc).to_bytes()
                if ext == ".nii.gz":
                    with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
                        gz.write(raw)
                else:
                    f.write(raw)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


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
    "nifti_image",
    "check_gzip",
]
