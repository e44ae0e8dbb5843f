"""Volumes in and out: read NIfTI / NRRD / MHA / DICOM series, bring them to the model grid, write
NIfTI in physical units.  The same code prepares training data and reads uploads at inference.

Conventions: arrays are indexed (z, y, x) = (D, H, W) with z the axial (slice) axis; indices
increase towards Right, Anterior, Superior (NIfTI's RAS+).  Spacing is given as (x, y, z) in mm.

Reading is defensive because uploads are untrusted: sizes are checked from headers before any
voxel is allocated (a NIfTI header is read before its gzip stream is inflated), gzip and zip
payloads are measured by streaming with a cap (never inflated into memory first), NRRD / MetaImage
text headers are parsed to their end (at most 1 MiB), zip members and detached data files may not
point outside their folder, and every failure is a ``VolumeError`` whose message says what was
wrong and what is accepted.  With ``untrusted=True`` (uploads) an image must be one file: a header
naming any separate data file is refused, and messages name no path on this machine.

Working memory stays near one float32 copy of the volume: NIfTI voxels are streamed slab by slab
into the output array, NaN checks and percentiles never make full-size float64 (or boolean) copies.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import sys
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MIN_SIZE = 8  # voxels along each axis; smaller is not a 3D scan
DEFAULT_MAX_VOXELS = 1024**3
MAX_ZIP_MEMBERS = 10_000  # files in a zip of DICOM files
SERIES_DESCRIBED = 20  # series of a folder described (modality, description, slices) in a message
SERIES_LISTED = 100  # series UIDs a message lists at most
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than 1032:1; more declared means truncated
MAX_HEADER_BYTES = 1 << 20  # a NRRD / MetaImage text header must end within this many bytes
SLAB_VOXELS = 1 << 20  # voxels converted at a time (a few MiB of temporaries, whatever the volume)
PERCENTILE_SAMPLES = 1 << 24  # percentiles of larger volumes come from an even subsample of this size


class VolumeError(ValueError):
    """The input is not a usable 3D volume; the message says what is wrong and what is accepted."""


class VolumeTooLarge(VolumeError):
    """The volume's header declares more voxels or voxel bytes than the limits allow (the service
    answers 413 for it; every other ``VolumeError`` is a 422)."""


ACCEPTED = (
    "a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "or a folder or .zip of DICOM files (any names; one series, or one picked by its series UID)"
)
_SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".npy", ".nrrd", ".mha")  # what write_volume writes
INPUT_SPACE_SUFFIXES = (".nii.gz", ".nii")  # what write_in_input_space writes (the upload's affine)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".npy"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _default_max_bytes(max_voxels: int) -> int:
    return max_voxels * 8 + (1 << 20)  # float64 voxels plus headers


def _itk_upload_bytes(max_voxels: int) -> int:
    """The voxel bytes an upload read through SimpleITK (NRRD, MetaImage, DICOM) may hold: ITK keeps
    the image in its stored type while the float32 copy is made, so 2 bytes a voxel (int16 scans at
    the voxel limit, float32 ones at half of it) keep that at 1.5 float32 copies.  NIfTI is streamed
    into the float32 array and needs no such bound."""
    return max_voxels * 2 + (1 << 20)


_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[/\\][^\s'\"<>|,;()\[\]{}]+")


def scrub_paths(message: str, path: str | os.PathLike) -> str:
    """``message`` with ``path`` (as given, absolute or resolved) replaced by its base name and any
    other absolute path replaced by ``(a path)``: what an upload's error may show its sender."""
    p = Path(path)
    names = {os.fspath(path), str(p), str(p.absolute())}
    try:
        names.add(str(p.resolve()))
    except OSError:
        pass
    for s in sorted(names, key=len, reverse=True):
        message = message.replace(s, p.name)
    return _ABS_PATH.sub("(a path)", message)


# ------------------------------------------------------------------------------------ safety checks
def check_gzip(path: str | os.PathLike, max_bytes: int) -> int:
    """Refuse a gzip file whose content would exceed ``max_bytes`` or which is truncated or corrupt,
    by streaming decompression with a cap.  Never inflates into memory: at most a few MiB are held
    at a time.  Returns the uncompressed size.

    The size the trailer declares (ISIZE) is only a hint: a cut file ends in arbitrary bytes, so a
    large ISIZE is reported ("declares ... over the limit") only once the stream really passes the
    cap; a stream that ends early is reported as truncated, whatever its last four bytes say."""
    path = Path(path)
    size = path.stat().st_size
    if size < 18:
        raise VolumeError(f"{path.name}: truncated gzip file ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        declared = struct.unpack("<I", f.read(4))[0]  # ISIZE: the last member's size modulo 2^32
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
                if total > max_bytes and declared > max_bytes:
                    raise VolumeError(
                        f"{path.name}: declares {declared} uncompressed bytes, over the limit of {max_bytes}"
                    )
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
        raise VolumeError(f"{path.name}: not a readable zip file ({e}); expected a .zip of DICOM files") from e
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise VolumeError(f"{path.name}: the zip is empty; expected DICOM files")
        if len(members) > MAX_ZIP_MEMBERS:
            raise VolumeError(f"{path.name}: {len(members)} files, over the limit of {MAX_ZIP_MEMBERS} per zip")
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


_LINE_END = re.compile(rb"\r\n|\r|\n")  # NrrdIO ends a line at any of them
# One MetaImage header line as MetaIO reads it without surprises: a key, '=' or ':', and a value
# that starts on the same line.  MetaIO skips whitespace, newlines included, before a value, and
# reads a value up to '\n' only: a line without a separator or with an empty value makes it take
# the next line as that value, so it could see an ElementDataFile we did not.  Such lines are
# refused.
_MHA_LINE = re.compile(
    r"[ \t]*([^\x00-\x20\x7f=:][^\x00-\x08\x0a-\x1f\x7f=:]*?)[ \t]*[=:]"  # key (no control characters)
    r"[ \t]*([^\s=:][^\x00-\x08\x0a-\x1f\x7f]*?)[ \t\r]*"  # value: starts on this line
)
_MHA_LOCAL = ("LOCAL", "Local", "local")  # the data follow the header (MetaIO compares exactly these)
SINGLE_FILE = "upload a single-file .nrrd or .mha with the data attached (or a .nii.gz)"


def _read_head(path: Path) -> tuple[bytes, bool]:
    """The first MAX_HEADER_BYTES of a file, and whether that is the whole file."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES + 1)
    return head[:MAX_HEADER_BYTES], len(head) <= MAX_HEADER_BYTES


def _nrrd_header(name: str, head: bytes, whole: bool) -> list[str]:
    """A NRRD header's lines, the magic first: up to the first blank line, or to the end of a file
    that has none (a detached header).  Refused when no end is found within MAX_HEADER_BYTES."""
    if not head.startswith(b"NRRD"):
        raise VolumeError(f"{name}: does not start with a NRRD magic line (NRRD000x); expected {ACCEPTED}")
    lines, pos = [], 0
    for m in _LINE_END.finditer(head):
        line, pos = head[pos : m.start()], m.end()
        if not line:
            return lines
        lines.append(line.decode("latin-1"))
    if not whole:
        raise VolumeError(
            f"{name}: its NRRD header has no end (a blank line) within {MAX_HEADER_BYTES >> 20} MiB; not a valid header"
        )
    if pos < len(head):
        lines.append(head[pos:].decode("latin-1"))
    return lines


def _mha_header(name: str, head: bytes, whole: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """A MetaImage header's (key, value) pairs up to and including ElementDataFile, which ends it
    (binary data may follow), and the text lines after it (the file names of ``LIST``)."""
    lines = head.decode("latin-1").split("\n")
    if not whole:
        lines = lines[:-1]  # the last piece may be cut by the read limit
    fields: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        if not line.strip(" \t\r"):
            continue  # blank lines are skipped by MetaIO too
        m = _MHA_LINE.fullmatch(line)
        if m is None:
            raise VolumeError(
                f"{name}: line {i + 1} of its MetaImage header is not 'Key = value' on one line; not a valid header"
            )
        key, value = m.groups()
        fields.append((key, value))
        if key.lower() == "elementdatafile":
            if key != "ElementDataFile":  # MetaIO would skip it and read on into the data
                raise VolumeError(f"{name}: its MetaImage header spells {key!r} (ElementDataFile); not a valid header")
            return fields, lines[i + 1 :]
    raise VolumeError(
        f"{name}: no ElementDataFile line within the first {MAX_HEADER_BYTES >> 20} MiB of its MetaImage header; "
        "not a valid header"
    )


def _header_fields(path: Path) -> tuple[list[str], bool, float | None]:
    """From a NRRD / MetaImage header, parsed to its end (it must end within MAX_HEADER_BYTES): the
    data files it refers to ([] when the data are in the file itself), whether they are a numbered
    pattern (``slice%03d.raw 1 40 1``: only the pattern's folder part can be checked), and the
    largest ratio of voxel bytes to stored bytes its encoding allows (raw 1, text 4, deflate ~1032;
    None when unknown).  Keys are compared in lower case without spaces or punctuation, so every
    spelling a reader might take for a data file counts as one."""
    head, whole = _read_head(path)
    nrrd = path.name.lower().endswith((".nrrd", ".nhdr"))
    refs: list[str] = []
    pattern = False
    ratio: float | None = 1.0  # NRRD and MetaImage store raw voxels unless told otherwise
    if nrrd:
        lines = _nrrd_header(path.name, head, whole)
        for i, line in enumerate(lines[1:], 1):
            if line.startswith("#"):
                continue  # a comment (NrrdIO: '#' in the first column)
            key, sep, value = line.partition(":")
            if not sep or value.startswith("="):  # NRRD "key:=value" pairs are free text
                continue
            key, value = re.sub(r"[^a-z]", "", key.lower()), value.strip()
            if key == "encoding":
                enc = value.lower()
                ratio = {"raw": 1.0, "ascii": 4.0, "text": 4.0, "txt": 4.0, "hex": 0.5}.get(enc)
                if enc in ("gzip", "gz"):
                    ratio = MAX_DEFLATE_RATIO
            if key != "datafile":
                continue
            words = value.split()  # every data file line counts, should a reader take another one
            if words and words[0].upper() == "LIST":  # the file names follow, one a line, to the end
                refs += [s.strip() for s in lines[i + 1 :] if s.strip()] or ["LIST"]
                break
            if words and "%" in words[0] and len(words) >= 4:
                refs, pattern = [*refs, words[0]], True
            else:
                refs.append(value)
        return refs, pattern, ratio
    fields, rest = _mha_header(path.name, head, whole)
    for key, value in fields:
        if key.lower() == "compresseddata":
            ratio = MAX_DEFLATE_RATIO if value.lower() in ("true", "1") else 1.0
    value = fields[-1][1]  # ElementDataFile's
    words = value.split()
    if value in _MHA_LOCAL:
        return [], False, ratio
    if value.startswith("LIST"):  # the file names follow the header, one a line
        return [s.strip() for s in rest if s.strip()] or ["LIST"], False, ratio
    if "%" in words[0] and len(words) >= 4:
        return [words[0]], True, ratio
    return [value], False, ratio


def _check_data_files(path: Path, untrusted: bool = False) -> tuple[int | None, float | None]:
    """Refuse detached data files: every one when ``untrusted`` (an upload is one file and must
    not read any other), otherwise those outside the header's folder or missing.  Returns the bytes
    stored to hold voxel data (None when that cannot be known: numbered file patterns) and the
    encoding's largest expansion."""
    refs, pattern, ratio = _header_fields(path)
    if not refs:
        return path.stat().st_size, ratio
    if untrusted:
        raise VolumeError(f"{path.name}: its header refers to a separate data file; {SINGLE_FILE}")
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
    n = math.prod(int(k) for k in shape)
    if n > max_voxels:
        raise VolumeTooLarge(f"{name}: {dims} = {n} voxels, over the limit of {max_voxels}")


def _check_bytes(
    name: str, declared: int, max_bytes: int, stored: int | None = None, ratio: float | None = None
) -> None:
    """Refuse images needing more than ``max_bytes``, and images whose stored bytes cannot hold
    the declared voxels (a header that lies about its size would make us allocate for nothing)."""
    if declared > max_bytes:
        raise VolumeTooLarge(f"{name}: needs {declared} bytes of voxel data, over the limit of {max_bytes}")
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
    untrusted: bool = False,
    geometry: dict[str, Any] | None = None,
    series_uid: str | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a scan -> (array float32 indexed (z, y, x), RAS, physical units; spacing (x, y, z) mm).

    Accepts NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), or a folder or a
    .zip of DICOM files.  DICOM files are found by their content, whatever their names (UIDs
    without an extension, Siemens ``.IMA``, ``.dcm``).  A folder or zip holding one series is read;
    one holding several needs ``series_uid`` (its SeriesInstanceUID): without it, or with a UID it
    does not hold, the VolumeError lists every series (UID, modality, description, slices).
    ``series_uid`` given for anything but a DICOM folder or zip is refused.  ``max_voxels`` (None: the default, 1024^3)
    bounds the image size; ``max_bytes`` (default ``8 * max_voxels`` + 1 MiB) bounds decompressed
    and allocated bytes.  Both are checked from the header, before any voxel data is inflated or
    allocated (``VolumeTooLarge``).  Refuses
    (VolumeError): missing files, unknown formats, corrupt or truncated files, 2D and 4D images,
    images smaller than 8 voxels along an axis, all-NaN images, gzip or zip bombs, unsafe zip member
    paths, NRRD / MetaImage headers without an end within 1 MiB, detached data files outside the
    header's folder.  Isolated NaN/inf voxels are replaced by the minimum finite value.

    ``untrusted=True`` is for uploads: the image must be a single file (a header naming any other
    data file is refused), error messages name no path on this machine (the file's own path
    becomes its base name, any other absolute path ``(a path)``), a NIfTI's gzip stream may not
    inflate past what its header needs (+ 1 MiB), and unless ``max_bytes`` is given, NRRD /
    MetaImage / DICOM voxel data are bounded at 2 bytes per allowed voxel (ITK holds them in their
    stored type beside the float32 copy; NIfTI is streamed and takes float64 at the voxel limit).
    """
    p = Path(path)
    max_voxels = max_voxels or DEFAULT_MAX_VOXELS
    itk_bytes = max_bytes or (_itk_upload_bytes(max_voxels) if untrusted else _default_max_bytes(max_voxels))
    max_bytes = max_bytes or _default_max_bytes(max_voxels)
    try:
        uid = _clean_uid(series_uid)
        return _read_volume(p, max_voxels, max_bytes, itk_bytes, untrusted, geometry, uid)
    except VolumeError as e:
        if not untrusted:
            raise
        raise type(e)(scrub_paths(str(e), p)) from None


def _clean_uid(series_uid: str | None) -> str | None:
    """A series UID as given (surrounding spaces and NUL padding removed), or None."""
    if series_uid is None:
        return None
    uid = str(series_uid).strip(" \t\r\n\0")
    if not uid:
        raise VolumeError("the series UID is empty; give a SeriesInstanceUID such as 1.2.840.113619.2.55.3")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uid) or len(uid) > 128:
        raise VolumeError(f"series UID {uid[:80]!r}: not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def _read_volume(
    p: Path,
    max_voxels: int,
    max_bytes: int,
    itk_bytes: int,
    untrusted: bool,
    geometry: dict[str, Any] | None = None,
    series_uid: str | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    ext = _suffix(p)
    if p.is_dir():
        img = _read_dicom_dir(p, p.name, max_voxels, itk_bytes, series_uid)
        return _from_sitk(img, p.name, max_voxels, geometry)
    if not p.is_file():
        raise VolumeError(f"{p.name}: not a regular file; expected {ACCEPTED}")
    if ext == ".zip":
        with tempfile.TemporaryDirectory(prefix="voxgen-dicom-") as tmp:
            _safe_extract_zip(p, Path(tmp), itk_bytes)
            img = _read_dicom_dir(Path(tmp), p.name, max_voxels, itk_bytes, series_uid)
        return _from_sitk(img, p.name, max_voxels, geometry)
    if series_uid is not None:
        raise VolumeError(f"{p.name}: a series UID picks one series of a DICOM folder or .zip; this is not one")
    if ext not in (".nii.gz", ".nii", *_SITK_SUFFIXES):
        raise VolumeError(f"{p.name}: unknown format {ext or '(no extension)'}; expected {ACCEPTED}")
    if p.stat().st_size == 0:
        raise VolumeError(f"{p.name}: empty file (0 bytes); expected {ACCEPTED}")
    with open(p, "rb") as f:
        magic = f.read(2)
    gz = magic == b"\x1f\x8b"
    if ext == ".nii.gz" and not gz:
        raise VolumeError(f"{p.name}: named .nii.gz but not gzip-compressed (corrupt?)")
    if ext in (".nii.gz", ".nii"):
        return _read_nifti(p, gz, max_voxels, max_bytes, untrusted, geometry)
    if gz:
        check_gzip(p, itk_bytes)
    return _from_sitk(_read_sitk(p, max_voxels, itk_bytes, untrusted), p.name, max_voxels, geometry)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether a file is DICOM by its content, whatever its name (a UID without extension, a
    Siemens ``.IMA``, ``.dcm``): the 128-byte preamble followed by ``DICM``, or, for a file written
    without the preamble, a first data element of group 0002 or 0008 and a header GDCM reads as an
    image's.  Reads 132 bytes (plus the header in the second case) of a regular file (a pipe or a
    device is never opened); never raises."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    if len(head) < 8 or int.from_bytes(head[:2], "little") not in (0x0002, 0x0008):
        return False
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


def _series_ids(folder: Path, label: str) -> list[str]:
    """The SeriesInstanceUIDs of the DICOM files in ``folder`` (not its subfolders), as GDCM groups
    them; files are found by content, whatever their names."""
    import SimpleITK as sitk

    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as e:
        raise VolumeError(f"{label}: cannot scan for DICOM files ({_last_line(e)})") from e


def _text(value: str, limit: int = 64) -> str:
    """A header's free text fit for a message: printable, one line, at most ``limit`` characters."""
    s = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _describe_series(folder: Path, uid: str) -> dict[str, Any]:
    """One series of ``folder``: its UID, and where its first file says so its modality, its
    description and its number of slices."""
    import SimpleITK as sitk

    out: dict[str, Any] = {"series_uid": uid}
    try:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    except RuntimeError:
        return out
    if not files:
        return out
    out["slices"] = len(files)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()
        if len(size) > 2 and size[2] > 1:  # multi-frame files
            out["slices"] = len(files) * int(size[2])
        for key, tag in (("modality", "0008|0060"), ("description", "0008|103e")):
            if reader.HasMetaDataKey(tag) and (value := _text(reader.GetMetaData(tag))):
                out[key] = value
    except (RuntimeError, UnicodeDecodeError):
        pass
    return out


def dicom_series(folder: str | os.PathLike, details: bool = True) -> list[dict[str, Any]]:
    """The DICOM series in ``folder`` (its own files, found by content): one dict a series with
    ``series_uid`` and, unless ``details`` is False (one scan of the folder instead of one more a
    series), where the files say so ``modality``, ``description`` and ``slices``.  An empty list
    when it holds none; VolumeError when it cannot be scanned."""
    p = Path(folder)
    if not p.is_dir():
        raise VolumeError(f"{p}: not a folder")
    ids = _series_ids(p, p.name)
    return [_describe_series(p, uid) if details else {"series_uid": uid} for uid in ids]


def _series_listing(folder: Path, ids: list[str]) -> str:
    """The series of a folder for a message: each UID, the first SERIES_DESCRIBED with their
    modality, description and slices; at most SERIES_LISTED UIDs."""
    parts = []
    for i, uid in enumerate(ids[:SERIES_LISTED]):
        if i >= SERIES_DESCRIBED:
            parts.append(uid)
            continue
        d = _describe_series(folder, uid)
        details = [d["modality"]] if "modality" in d else []
        details += [repr(d["description"])] if "description" in d else []
        details += [f"{d['slices']} slices"] if "slices" in d else []
        parts.append(f"{uid} ({', '.join(details)})" if details else uid)
    if len(ids) > SERIES_LISTED:
        parts.append(f"and {len(ids) - SERIES_LISTED} more")
    return "; ".join(parts)


def _read_dicom_dir(folder: Path, label: str, max_voxels: int, max_bytes: int, series_uid: str | None = None) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = _series_ids(folder, label)
    if not series:
        raise VolumeError(f"{label}: no DICOM series found; expected {ACCEPTED}")
    if series_uid is not None and series_uid not in series:
        raise VolumeError(
            f"{label}: holds no DICOM series with the UID {series_uid!r}; its {len(series)} series: "
            f"{_series_listing(folder, series)}"
        )
    if series_uid is None and len(series) > 1:
        raise VolumeError(
            f"{label}: holds {len(series)} DICOM series; pick one by its series UID (series_uid, --series-uid): "
            f"{_series_listing(folder, series)}"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series_uid or series[0])
    info = sitk.ImageFileReader()
    info.SetImageIO("GDCMImageIO")  # never another reader's guess from the file's bytes
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{label}: unreadable DICOM file ({_last_line(e)})") from e
    size = tuple(info.GetSize())
    shape = (size[0], size[1], (size[2] if len(size) > 2 else 1) * len(files))
    _check_shape(label, shape, max_voxels)
    _check_bytes(label, math.prod(shape) * _bytes_per_voxel(info.GetPixelID(), 1), max_bytes)
    if info.GetNumberOfComponents() != 1:
        raise VolumeError(f"{label}: {info.GetNumberOfComponents()} components per voxel (colour?); expected scalar")
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{label}: unreadable DICOM series ({_last_line(e)})") from e


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else "read error"


def _read_sitk(path: Path, max_voxels: int, max_bytes: int, untrusted: bool = False) -> Any:
    """NRRD / MetaImage through SimpleITK: the header is checked before any voxel is allocated,
    and read by the reader its name asks for (never one guessed from the file's bytes)."""
    import SimpleITK as sitk

    stored, ratio = _check_data_files(path, untrusted)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO" if path.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImageIO")
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
    declared = math.prod(shape) * _bytes_per_voxel(reader.GetPixelID(), comps)
    _check_bytes(path.name, declared, max_bytes, stored, ratio)
    try:
        return reader.Execute()
    except (RuntimeError, MemoryError) as e:
        msg = f"{path.name}: unreadable, truncated or corrupt ({_last_line(e)}); expected {ACCEPTED}"
        raise VolumeError(msg) from e


def _slabs(n: int, per_slab: int) -> list[tuple[int, int]]:
    step = max(1, SLAB_VOXELS // max(1, per_slab))
    return [(k, min(n, k + step)) for k in range(0, n, step)]


def _finite(name: str, arr: np.ndarray) -> np.ndarray:
    """Replace NaN / inf voxels of a C-contiguous float32 array in place by its smallest finite
    value; refuse an array with none.  Temporaries are one slab at a time."""
    lo, hi = arr.min(), arr.max()  # NaN propagates through both; inf shows in one
    if np.isfinite(lo) and np.isfinite(hi):
        return arr
    per_slab = arr[0].size
    fill = None
    for a, b in _slabs(arr.shape[0], per_slab):
        s = arr[a:b]
        ok = s[np.isfinite(s)]
        if ok.size:
            m = float(ok.min())
            fill = m if fill is None else min(fill, m)
    if fill is None:
        raise VolumeError(f"{name}: every voxel is NaN or infinite; expected a volume with finite values")
    for a, b in _slabs(arr.shape[0], per_slab):
        s = arr[a:b]
        s[~np.isfinite(s)] = fill
    return arr


def _nifti_header(p: Path, gz: bool) -> Any:
    """The NIfTI-1 or NIfTI-2 header of a single-file .nii / .nii.gz, from its first 540 bytes only
    (for .nii.gz: a few hundred bytes inflated, whatever the data behind them).  Extensions are not
    read: the voxel data are found by the header's offset."""
    import nibabel as nib

    try:
        with gzip.open(p, "rb") if gz else open(p, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeError(f"{p.name}: unreadable, truncated or corrupt NIfTI ({e}); expected {ACCEPTED}") from e
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    klass, n = (nib.Nifti2Header, 540) if 540 in sizes else (nib.Nifti1Header, 348)
    if not sizes & {348, 540}:
        raise VolumeError(f"{p.name}: unreadable or corrupt NIfTI (no header size 348 or 540); expected {ACCEPTED}")
    if len(head) < n:
        raise VolumeError(f"{p.name}: truncated NIfTI header ({len(head)} of {n} bytes)")
    try:
        hdr = klass(binaryblock=head[:n], check=True)
    except Exception as e:  # nibabel's HeaderDataError and friends: a header that cannot be used
        raise VolumeError(f"{p.name}: corrupt NIfTI header ({e}); expected {ACCEPTED}") from e
    magic = bytes(hdr["magic"]).rstrip(b"\0")
    if magic in (b"ni1", b"ni2"):
        raise VolumeError(f"{p.name}: the header of a .hdr/.img pair; upload a single-file .nii or .nii.gz")
    if magic not in (b"n+1", b"n+2"):
        raise VolumeError(f"{p.name}: unreadable or corrupt NIfTI (magic {magic!r}); expected {ACCEPTED}")
    return hdr


def _read_nifti(
    p: Path,
    gz: bool,
    max_voxels: int,
    max_bytes: int,
    untrusted: bool = False,
    geometry: dict[str, Any] | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """NIfTI, read by the header and then streamed: the header is checked (shape, type, bytes)
    before the gzip stream is inflated, then the voxels go slab by slab, scaled (slope/intercept in
    float64 one slab at a time) into one float32 array already in RAS order.  Nothing of the file's
    size is held besides that array.  (ITK's reader turns NaN into 0, which would hide an all-NaN
    file; nibabel reads the header.)"""
    from nibabel.orientations import io_orientation

    hdr = _nifti_header(p, gz)
    try:
        shape = tuple(int(k) for k in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(hdr.get_data_offset())
        slope, inter = hdr.get_slope_inter()
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as e:
        raise VolumeError(f"{p.name}: corrupt NIfTI header ({e}); expected {ACCEPTED}") from e
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]  # trailing singleton dimensions (a 4D file holding one volume)
    _check_shape(p.name, shape, max_voxels)
    if dtype.kind not in "iuf" or dtype.names:
        raise VolumeError(f"{p.name}: voxels of type {dtype} (complex or colour); expected a scalar volume")
    declared = math.prod(shape) * dtype.itemsize
    _check_bytes(p.name, declared, max_bytes)
    cap = min(max_bytes, offset + declared + (1 << 20)) if untrusted else max_bytes
    stored = (check_gzip(p, cap) if gz else p.stat().st_size) - offset
    _check_bytes(p.name, declared, max_bytes, stored, 1.0)
    if not np.isfinite(affine).all():
        raise VolumeError(f"{p.name}: its affine (qform/sform) is not finite; corrupt header")
    try:
        ornt = io_orientation(affine)  # file axis i -> RAS axis ornt[i, 0], reversed where ornt[i, 1] < 0
    except Exception as e:
        raise VolumeError(f"{p.name}: its affine cannot be oriented ({e}); corrupt header") from e
    # voxel sizes from the affine (the columns' lengths), which is what orients the data
    lengths = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.isnan(ornt).any() or not lengths.min() > 0:
        raise VolumeError(f"{p.name}: voxel sizes must be positive, got {tuple(float(x) for x in lengths)}")
    axes = [int(a) for a in ornt[:, 0]]
    spacing = [0.0, 0.0, 0.0]
    ras_shape = [0, 0, 0]
    for i, a in enumerate(axes):
        spacing[a], ras_shape[a] = float(lengths[i]), shape[i]
    out = np.empty(ras_shape[::-1], dtype=np.float32)  # (z, y, x) in RAS
    # the same memory seen in the file's axis order (x fastest): slab k of the file is view[k]
    view = out.transpose(2, 1, 0).transpose(axes)
    for i in range(3):
        if ornt[i, 1] < 0:
            view = np.flip(view, axis=i)
    view = view.transpose(2, 1, 0)
    nx, ny, nz = shape
    scale = slope is not None and (slope != 1 or inter != 0)
    try:
        with gzip.open(p, "rb") if gz else open(p, "rb") as f:
            if gz:
                left = offset
                while left > 0:  # a gzip stream is skipped by reading it (it was checked above)
                    got = len(f.read(min(left, 1 << 22)))
                    if not got:
                        break  # the slab read below reports the file as truncated
                    left -= got
            else:
                f.seek(offset)
            for a, b in _slabs(nz, nx * ny):
                raw = f.read((b - a) * nx * ny * dtype.itemsize)
                if len(raw) < (b - a) * nx * ny * dtype.itemsize:
                    raise VolumeError(f"{p.name}: truncated NIfTI (the voxel data end at slice {a} of {nz})")
                chunk = np.frombuffer(raw, dtype=dtype).reshape(b - a, ny, nx)
                if scale:  # in float64, one slab at a time (as nibabel scales, then rounded once)
                    chunk = chunk.astype(np.float64)
                    chunk *= float(slope)
                    chunk += float(inter)
                view[a:b] = chunk
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeError(f"{p.name}: unreadable, truncated or corrupt NIfTI ({e}); expected {ACCEPTED}") from e
    _record_geometry(geometry, affine, ornt, shape)
    return _finite(p.name, out), (spacing[0], spacing[1], spacing[2])


def _record_geometry(geometry: dict[str, Any] | None, affine: np.ndarray, ornt: np.ndarray, shape: Any) -> None:
    """Where the RAS array read lies in the world: ``affine`` maps its voxel index (x, y, z) =
    (W, H, D) to RAS mm (the file's own grid, reordered), ``source_affine`` / ``source_shape`` /
    ``orientation`` describe the file as stored."""
    if geometry is None:
        return
    from nibabel.orientations import inv_ornt_aff

    shape3 = tuple(int(k) for k in tuple(shape)[:3])
    geometry.update(
        affine=(affine @ inv_ornt_aff(ornt, shape3)).tolist(),
        source_affine=np.asarray(affine).tolist(),
        source_shape=list(shape3),
        orientation=np.asarray(ornt).tolist(),
    )


def _from_sitk(
    img: Any, name: str, max_voxels: int, geometry: dict[str, Any] | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A SimpleITK image -> float32 (z, y, x) RAS with one copy: the axes are permuted and reversed
    as views of the image's buffer (by its direction matrix), then converted once."""
    import SimpleITK as sitk
    from nibabel.orientations import apply_orientation, io_orientation

    size = list(img.GetSize())
    dim = img.GetDimension()
    if dim == 4 and size[3] == 1:
        size = size[:3]
    _check_shape(name, tuple(size), max_voxels)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{name}: has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected scalar")
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    # ITK's physical space is LPS: negating x and y gives RAS, the frame NIfTI affines use
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(spacing)
    try:
        ornt = io_orientation(affine)
    except Exception as e:
        raise VolumeError(f"{name}: its direction matrix cannot be oriented ({e}); corrupt header") from e
    if np.isnan(ornt).any():
        raise VolumeError(f"{name}: its direction matrix or voxel sizes are degenerate; corrupt header")
    view = sitk.GetArrayViewFromImage(img)  # (k, j, i); (1, k, j, i) for a 4D image of one volume
    if view.ndim == 4:
        view = view[0]
    ras = apply_orientation(view.transpose(2, 1, 0), ornt)  # (x, y, z) RAS, still a view
    arr = np.array(ras.transpose(2, 1, 0), dtype=np.float32, order="C")
    del view, ras  # the image buffer stays alive (``img``) until the copy above is made
    out_spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        out_spacing[int(ornt[i, 0])] = float(spacing[i])
    if geometry is not None:
        affine[:3, 3] = np.array([-1.0, -1.0, 1.0]) * np.asarray(img.GetOrigin(), dtype=np.float64)[:3]  # LPS -> RAS
        _record_geometry(geometry, affine, ornt, size)
    return _finite(name, arr), (out_spacing[0], out_spacing[1], out_spacing[2])


# ------------------------------------------------------------------------------------ to the model grid
def _percentile(v: np.ndarray, q: float, floor: float | None = None) -> float:
    """The ``q``-th percentile of a float32 array (of ``max(v, floor)`` when ``floor`` is given):
    exact up to PERCENTILE_SAMPLES voxels (256^3), otherwise of an even, deterministic subsample of
    that many.  Temporaries: copies of at most that many float32 values (64 MiB)."""
    flat = v.reshape(-1)
    if flat.size > PERCENTILE_SAMPLES:
        flat = flat[:: -(-flat.size // PERCENTILE_SAMPLES)]
    if floor is not None:
        flat = np.maximum(flat, np.float32(floor))
    return float(np.percentile(flat, q))


def check_not_blank(
    arr: np.ndarray, modality: str, window: tuple[float, float] | None = None, name: str = "the volume"
) -> None:
    """Refuse (VolumeError) a volume the model-space mapping of ``to_model_space`` would leave
    blank: every voxel equal; MRI: a 99.9th percentile (of the non-negative values) of 0; CT: no
    voxel above the window's minimum ``window[0]``.  Torch-free and without full-size copies: the
    service runs it on an upload before queueing the job."""
    lo_v, hi_v = float(arr.min()), float(arr.max())
    if lo_v == hi_v:
        raise VolumeError(f"{name}: every voxel has the value {lo_v:g}: a blank volume; expected a scan")
    if modality == "mri":
        if hi_v <= 0 or not _percentile(arr, 99.9, floor=0.0) > 0:
            raise VolumeError(f"{name}: the MRI volume is blank (its 99.9th percentile is 0); expected a scan")
    elif window is not None:
        lo = float(window[0])
        hi = float(window[1])
        if not hi_v > lo + 0.5e-6 * (hi - lo):
            raise VolumeError(
                f"{name}: no voxel above the CT window's minimum ({lo:g}): blank after windowing; expected a CT scan"
            )


def to_model_space(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    config: Any,
    *,
    trim_blank: bool = True,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Physical units -> the model's cube (R, R, R) float32 in [-1, 1]: the one path every caller
    takes, training data (``voxgen prepare``) and served scans alike.

    What it reads from ``config`` is its cube (``config.cube()``, model/config_base.py: R, the
    cube's voxel size, modality, intensity and the dataset's preprocessing), the one the model's
    training data were prepared on; a family whose network works on another grid resamples the
    cube to it (``model.data.grid.resample``) as its trainer does.  A cube with
    ``preprocess.mode = "physical"`` (every model trained on a dataset prepared by this version)
    goes through model/data/preprocess.py: window, resample to the cube's spacing, field of view
    centred on the foreground; ``info`` receives the mapping back to the input grid.  Older configs
    (``"stretch"``, the authors' recipe) take the paper's preprocessing below.

    CT: clip to the config's window (default [-1024, 600] HU) and map linearly to [-1, 1]
    (NaN -> the window's minimum).  MRI: clip at the 99.9th percentile and scale [0, p99.9] ->
    [-1, 1] (NaN -> 0).  Then trim blank axial slices at both ends (every voxel at -1) and resize
    the rest to the R^3 cube (trilinear), as the authors do: the cube does not keep the physical
    aspect ratio, so ``spacing`` is accepted for the record but does not change the result.
    ``info``, when given, receives ``grid_spacing``: the voxel size (x, y, z mm) of the cube, i.e.
    the kept field of view divided by R along each axis.  The caller's array is not changed (one
    float32 copy is worked on in place; percentiles of volumes over 256^3 come from a subsample).
    """
    a = np.asarray(array)
    if a.ndim != 3 or a.size == 0:
        raise VolumeError(f"expected a non-empty 3D array (z, y, x), got shape {a.shape}")
    return _to_model_space(np.array(a, dtype=np.float32, order="C"), spacing, config, trim_blank, info)


def _nan_to_num(v: np.ndarray, nan: float, posinf: float, neginf: float) -> None:
    """``np.nan_to_num`` in place, one slab at a time (its masks are a byte a voxel each)."""
    if np.isfinite(v.min()) and np.isfinite(v.max()):
        return
    for a, b in _slabs(v.shape[0], v[0].size):
        np.nan_to_num(v[a:b], copy=False, nan=nan, posinf=posinf, neginf=neginf)


def _to_model_space(
    v: np.ndarray,
    spacing: tuple[float, float, float],
    config: Any,
    trim_blank: bool = True,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """``to_model_space`` on a C-contiguous float32 array it may overwrite."""
    from model.data import preprocess

    config = preprocess.cube_of(config)
    if preprocess.options(config)["mode"] == preprocess.PHYSICAL:  # the one path (see to_model_space)
        return preprocess.physical(v, spacing, config, info=info, copy=False)
    import torch
    import torch.nn.functional as F

    if config.modality == "ct":
        lo, hi = float(config.intensity.lo), float(config.intensity.hi)
        _nan_to_num(v, nan=lo, posinf=hi, neginf=lo)
        np.clip(v, lo, hi, out=v)
        v -= lo
        v *= 2.0 / (hi - lo)
        v -= 1.0
    else:
        _nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(v, 0.0, None, out=v)
        top = _percentile(v, 99.9)
        if not top > 0:
            raise VolumeError("the MRI volume is blank (its 99.9th percentile is 0); expected non-negative intensities")
        np.clip(v, 0.0, top, out=v)
        v *= 2.0 / top
        v -= 1.0
    input_shape = list(v.shape)
    kept = [0, v.shape[0]]
    if trim_blank:
        keep = v.reshape(v.shape[0], -1).max(axis=1) > -1.0 + 1e-6  # per axial slice, no full-size mask
        if not keep.any():
            raise VolumeError("the volume is blank after windowing (every voxel at the window's minimum)")
        idx = np.nonzero(keep)[0]
        kept = [int(idx[0]), int(idx[-1]) + 1]
        v = v[idx[0] : idx[-1] + 1]
    r = config.resolution
    if info is not None:
        sx, sy, sz = (float(s) for s in spacing)
        info["grid_spacing"] = [v.shape[2] * sx / r, v.shape[1] * sy / r, v.shape[0] * sz / r]
        info.update(mode="stretch", input_shape=input_shape, kept_slices=kept, input_spacing=[sx, sy, sz])
    t = torch.from_numpy(np.ascontiguousarray(v))[None, None]
    out = F.interpolate(t, size=(r, r, r), mode="trilinear", align_corners=False)
    return out[0, 0].clamp_(-1.0, 1.0).numpy().astype(np.float32, copy=False)


def to_input_grid(v_model: np.ndarray, info: dict[str, Any], config: Any) -> np.ndarray:
    """A model-space volume back onto the grid of the scan ``info`` describes (``to_model_space``'s
    or ``load_for_model``'s ``info``): (z, y, x) RAS model space, background where the model grid
    does not reach.  ``v_model`` is the model's cube or its network's grid (D, H, W), which spans
    the cube's field of view (``model.data.grid.resample``).  Physical mode: the inverse
    resampling; stretch mode: the volume resized back to the kept slices and padded with the
    trimmed blank ones."""
    from model.data import preprocess

    if info.get("mode") != "stretch":
        return preprocess.to_input_grid(v_model, info, config)
    import torch
    import torch.nn.functional as F

    a, b = info["kept_slices"]
    d, h, w = info["input_shape"]
    t = torch.from_numpy(np.ascontiguousarray(v_model, dtype=np.float32))[None, None]
    mid = F.interpolate(t, size=(b - a, h, w), mode="trilinear", align_corners=False)[0, 0].numpy()
    out = np.full((d, h, w), -1.0, dtype=np.float32)
    out[a:b] = mid
    return out


def write_in_input_space(path: str | os.PathLike, v_model: np.ndarray, config: Any, info: dict[str, Any]) -> None:
    """Write a model-space volume (the cube, or the network's grid: a reconstruction) as .nii /
    .nii.gz on the input scan's own grid and affine (the upload's voxels, reordered to RAS: a viewer
    overlays it on the upload in world space), in the model's physical units (CT: int16 HU).
    Atomic, as ``write_volume``."""
    import nibabel as nib

    geo = info.get("geometry") or {}
    if "affine" not in geo:
        raise ValueError("the input's geometry was not recorded (load it with load_for_model(..., info={}))")
    p = Path(path)
    ext = _suffix(p)
    if ext not in INPUT_SPACE_SUFFIXES:
        raise VolumeError(f"{p.name}: a reconstruction in the input's space is written as .nii.gz or .nii")
    data = _physical(to_input_grid(v_model, info, config), config.intensity)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(geo["affine"], dtype=np.float64))
    img.header.set_xyzt_units("mm")
    from model.data.export import mark_nifti_synthetic

    mark_nifti_synthetic(img.header, config, kind="reconstruction")  # descrip and intent_name: SYNTHETIC
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    _write_atomic(p, lambda f: _write_nifti_bytes(f, img.to_bytes(), ext == ".nii.gz"))


def _physical(v: np.ndarray, it: Any) -> np.ndarray:
    """Model space -> the model's physical units and file dtype (CT: int16 HU, rounded and clipped)."""
    phys = it.to_physical(np.clip(v, -1.0, 1.0))
    if it.dtype == "int16":
        return np.clip(np.rint(phys), -32768, 32767).astype(np.int16)
    return phys.astype(np.float32)


def _write_nifti_bytes(f: Any, raw: bytes, gz: bool) -> None:
    if gz:
        with gzip_writer(f, len(raw)) as g:
            g.write(raw)
    else:
        f.write(raw)


GZIP_THREADED_MIN_BYTES = 16 << 20  # smaller streams gain nothing from the threaded writer


def gzip_writer(f: Any, nbytes: int, threads: int | None = None) -> Any:
    """A gzip stream (level 1) onto the open binary file ``f`` for about ``nbytes`` of data: Intel's
    ISA-L (python-isal) where installed, 6-13x faster than zlib at level 1 for a similar size, with
    ``threads`` (default: torch's intra-op thread count where torch is loaded, the job's) compressing blocks in parallel
    for large streams; the standard library's zlib otherwise.  Any gzip reader reads either."""
    try:
        from isal import igzip, igzip_threaded
    except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel
        return gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0)
    if threads is None:  # the API process never imports torch; a worker has pinned its threads
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1
    if threads > 1 and nbytes >= GZIP_THREADED_MIN_BYTES:
        return igzip_threaded.open(f, "wb", compresslevel=1, threads=threads)
    return igzip.IGzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0)


def _nifti_header_bytes(img: Any) -> bytes:
    """The 352 bytes before a single-file NIfTI-1's voxels: the header, vox_offset 352, no extensions."""
    hdr = img.header.copy()
    hdr.set_data_offset(352)
    hdr["magic"] = b"n+1"
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def _write_nifti_stream(f: Any, v: np.ndarray, it: Any, img: Any, gz: bool, slab_bytes: int = 8 << 20) -> None:
    """Header, then the model-space (D, H, W) volume converted to physical units a slab of depth
    rows at a time, written straight into the (gzip) stream: no full-size physical copy, no bytes
    copy of the whole file.  (D, H, W) C order is NIfTI's (x, y, z) voxel order."""
    d = v.shape[0]
    dtype = np.dtype(np.int16 if it.dtype == "int16" else np.float32)
    rows = max(1, slab_bytes // max(1, v[0].size * 4))
    out = gzip_writer(f, v.size * dtype.itemsize) if gz else contextlib.nullcontext(f)
    with out as w:
        w.write(_nifti_header_bytes(img))
        for s in range(0, d, rows):
            w.write(memoryview(np.ascontiguousarray(_physical(v[s : s + rows], it))).cast("B"))


def _write_atomic(p: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``p``, renamed over ``p`` when complete: a reader
    never sees a half-written file and a failed write leaves an existing file untouched."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")  # unique: concurrent writers never share it
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def load_for_model(
    path: str | os.PathLike, config: Any, info: dict[str, Any] | None = None, **read_kw: Any
) -> np.ndarray:
    """Read a scan and bring it to the model's cube (``config.cube()``): (R, R, R) float32 in
    [-1, 1], what the model's training data were prepared on (a family with another network grid
    resamples it, see ``to_model_space``).  The array read is worked on in place (no second
    full-size copy); ``read_kw`` go to ``read_volume``.  ``info``
    receives the mapping between the model grid and the scan (``to_model_space``) and the scan's
    place in the world (``geometry``), what ``write_in_input_space`` needs."""
    geometry: dict[str, Any] | None = {} if info is not None else None
    arr, spacing = read_volume(path, geometry=geometry, **read_kw)
    v = _to_model_space(arr, spacing, config, info=info)
    if info is not None:
        info["geometry"] = geometry
    return v


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
    sform codes set (scanner), units mm.  The image holds a (x, y, z) view of the array, no copy."""
    import nibabel as nib

    img = nib.Nifti1Image(data_dhw.transpose(2, 1, 0), volume_affine(data_dhw.shape, spacing_xyz))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = description.encode()[:79]
    return img


def write_volume(path: str | os.PathLike, v_model: np.ndarray, config: Any, source: Any = None) -> None:
    """Write a model-space (D, H, W) volume: .nii/.nii.gz in physical units with the RAS affine
    (CT: int16 HU, rounded and clipped; MRI: float32), its header marked synthetic (``descrip``
    names voxgen and, from ``source`` (an ``export.VolumeSource``), the model and seed;
    intent_name ``SYNTHETIC``); .nrrd / .mha the same voxels and geometry through SimpleITK
    (model/data/export.py); .npy the raw float32 array.  Atomic: a temporary file in the same
    folder is renamed over ``path``, so a reader never sees a half-written file and a failed write
    leaves an existing file untouched."""
    p = Path(path)
    ext = _suffix(p)
    if ext not in WRITE_SUFFIXES:
        raise VolumeError(f"{p.name}: cannot write {ext or '(no extension)'}; use .nii.gz, .nii, .nrrd, .mha or .npy")
    v = np.asarray(v_model, dtype=np.float32)
    if v.ndim != 3 or v.size == 0:
        raise VolumeError(f"expected a non-empty 3D volume (D, H, W), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise VolumeError(f"{p.name}: the volume has NaN or infinite values; refusing to write it")
    from model.data.export import mark_nifti_synthetic, write_sitk_volume

    if ext in (".nrrd", ".mha"):
        write_sitk_volume(p, v, config, source)
        return

    def write(f: Any) -> None:
        if ext == ".npy":
            np.save(f, v)
            return
        # the header of the file's dtype and shape, on a zero-stride stand-in for the voxels
        dtype = np.int16 if config.intensity.dtype == "int16" else np.float32
        img = nifti_image(np.broadcast_to(np.zeros((), dtype), v.shape), config.spacing)
        mark_nifti_synthetic(img.header, config, source)
        _write_nifti_stream(f, v, config.intensity, img, ext == ".nii.gz")

    _write_atomic(p, write)


__all__ = [
    "VolumeError",
    "read_volume",
    "is_dicom_file",
    "dicom_series",
    "VolumeTooLarge",
    "check_not_blank",
    "scrub_paths",
    "to_model_space",
    "load_for_model",
    "write_volume",
    "volume_affine",
    "nifti_image",
    "check_gzip",
]
