"""Writing generated volumes in the formats hospitals and toolkits read: NRRD and MetaImage (through
SimpleITK) and DICOM series (through pydicom), each with the geometry of the NIfTI output and
marked as synthetic.

Geometry.  A model-space volume is a (D, H, W) = (z, y, x) array whose NIfTI affine
(``volume_affine``: the model's voxel spacing, centred on 0) maps the index (x, y, z) to RAS mm.
ITK and DICOM use LPS (x and y negated).  NRRD / MHA keep the NIfTI index order, so SimpleITK reads
the very origin, spacing and direction it reads from the ``.nii.gz``.  A DICOM series is written the
way a scanner writes an axial series: rows of each slice run towards the patient's left, columns
towards posterior (ImageOrientationPatient 1\\0\\0\\0\\1\\0 for the model's diagonal affine),
slices from inferior to superior; the voxels are the NIfTI's in that order, so every voxel keeps its
world position (the same grid, indexed as viewers expect) and a reader reoriented to RAS gets the
NIfTI's array and affine back.

Values.  CT: int16 Hounsfield units, RescaleSlope 1, RescaleIntercept 0, RescaleType HU (the
NIfTI's voxels).  MRI: int16 ``0..MR_STORED_MAX`` with RescaleSlope ``(hi - lo) / MR_STORED_MAX``
and RescaleIntercept ``lo``, so slope * stored + intercept is the model's intensity (its
``intensity.units``, quantised to 1/32000 of its range ``[lo, hi]``).  Window centre / width: the
model's intensity window."""

from __future__ import annotations

import datetime as _dt
import io
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MR_STORED_MAX = 32000  # MRI stored values 0..32000: 1/32000 of the intensity range per step
PATIENT_NAME = "SYNTHETIC^VOXGEN"
SYNTHETIC_INTENT = "SYNTHETIC"  # NIfTI intent_name (16 bytes; 9 + NUL, for readers that want one)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def voxgen_version() -> str:
    """The installed voxgen version (``unknown`` when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voxgen")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class VolumeSource:
    """What made one volume, for the marks written into it: the model's name, the seed (None when
    the latent was given), which volume of the request it is."""

    model: str = ""
    seed: int | None = None
    index: int = 0
    count: int = 1
    what: str = "volume"  # "volume", "step" (a traverse step), "reconstruction"

    def text(self) -> str:
        """One line: ``model tiny, seed 5, volume 1 of 2`` (``latent given`` without a seed)."""
        parts = [f"model {self.model}" if self.model else "model (unnamed)"]
        if self.what == "reconstruction":
            return f"{parts[0]}, reconstruction of an encoded scan"
        parts.append(f"seed {self.seed}" if self.seed is not None else "latent given")
        if self.count > 1 or self.what != "volume":
            parts.append(f"{self.what} {self.index + 1} of {self.count}")
        return ", ".join(parts)


def nifti_description(config: Any, source: VolumeSource | None = None, kind: str | None = None) -> bytes:
    """The NIfTI ``descrip`` of a generated volume: ``SYNTHETIC voxgen <family> <modality|kind>
    (<units>)`` and, as far as the 80-byte field allows (79 and a NUL), what made it."""
    desc = f"SYNTHETIC voxgen {config.family} {kind or config.modality} ({config.intensity.units})"
    if source is not None:
        desc += f" {source.text()}"
    return desc.encode("ascii", "replace")[:79]


def mark_nifti_synthetic(header: Any, config: Any, source: VolumeSource | None = None, kind: str | None = None) -> None:
    """Mark a NIfTI-1 header as synthetic: ``descrip`` (``nifti_description``) and intent_name
    ``SYNTHETIC`` (intent code none: the voxels are plain intensities)."""
    header["descrip"] = nifti_description(config, source, kind)
    header.set_intent("none", name=SYNTHETIC_INTENT)


# ------------------------------------------------------------------------------------ geometry
def _check(v_model: np.ndarray) -> np.ndarray:
    from model.data.volumes import VolumeError

    v = np.asarray(v_model, dtype=np.float32)
    if v.ndim != 3 or v.size == 0:
        raise VolumeError(f"expected a non-empty 3D volume (D, H, W), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise VolumeError("the volume has NaN or infinite values; refusing to write it")
    return v


def lps_affine(shape_dhw: tuple[int, int, int], config: Any) -> np.ndarray:
    """The model's NIfTI affine (RAS, index (x, y, z)) expressed in LPS, ITK's and DICOM's frame."""
    from model.data.volumes import volume_affine

    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume_affine(shape_dhw, config.spacing)


def sitk_image(v_model: np.ndarray, config: Any) -> Any:
    """A SimpleITK image of a model-space volume in physical units (CT int16 HU, MRI float32),
    with the NIfTI output's geometry (origin, spacing, direction in LPS)."""
    import SimpleITK as sitk

    from model.data.volumes import _physical

    v = _check(v_model)
    img = sitk.GetImageFromArray(np.ascontiguousarray(_physical(v, config.intensity)))  # index (x, y, z)
    m = lps_affine(v.shape, config)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(c) for c in (m[:3, :3] / spacing).ravel()))
    img.SetOrigin(tuple(float(o) for o in m[:3, 3]))
    return img


def write_sitk_volume(
    path: str | os.PathLike, v_model: np.ndarray, config: Any, source: VolumeSource | None = None
) -> None:
    """Write a model-space volume as a single-file ``.nrrd`` or ``.mha`` (data attached, compressed)
    with the NIfTI output's geometry and values; a ``voxgen`` header field says it is synthetic.
    Atomic: written under a temporary name in the same folder, then renamed."""
    import SimpleITK as sitk

    from model.data.volumes import VolumeError, _suffix

    p = Path(path)
    ext = _suffix(p)
    if ext not in (".nrrd", ".mha"):
        raise VolumeError(f"{p.name}: write_sitk_volume writes .nrrd or .mha")
    img = sitk_image(v_model, config)
    img.SetMetaData("voxgen", nifti_description(config, source).decode("ascii"))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp{ext}")  # ITK picks its writer by the extension
    try:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("NrrdImageIO" if ext == ".nrrd" else "MetaImageIO")
        writer.SetFileName(str(tmp))
        writer.UseCompressionOn()
        writer.Execute(img)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ DICOM
def _ds(x: float) -> Any:
    from pydicom.valuerep import DSfloat

    # 10 significant digits (float noise such as 63.50000000000001 dropped), at most 16 characters
    return DSfloat(float(f"{float(x):.10g}") + 0.0, auto_format=True)  # + 0.0: no "-0"


def _rescale(config: Any) -> tuple[float, float]:
    """(slope, intercept) from stored int16 values to the model's physical units, as DS writes them."""
    it = config.intensity
    if it.dtype == "int16":  # CT: the stored values are the HU themselves
        return 1.0, 0.0
    return float(_ds((float(it.hi) - float(it.lo)) / MR_STORED_MAX)), float(_ds(float(it.lo)))


class DicomWriter:
    """Model-space volumes -> DICOM series (one file per axial slice), all of one study and one
    frame of reference (fresh UIDs from ``pydicom.uid.generate_uid``), each series marked
    synthetic: PatientName ``SYNTHETIC^VOXGEN``, SeriesDescription and ImageComments naming voxgen,
    the model and the seed, BurnedInAnnotation ``NO``, ImageType DERIVED\\SECONDARY."""

    def __init__(self, config: Any, study_description: str = "SYNTHETIC voxgen volumes") -> None:
        from pydicom.uid import generate_uid

        if config.modality not in ("ct", "mri"):
            raise ValueError(f"DICOM output needs a ct or mri model, not {config.modality!r}")
        self.config = config
        self.study_uid = generate_uid()
        self.frame_uid = generate_uid()
        self.study_description = study_description[:64]
        self.when = _dt.datetime.now(_dt.timezone.utc)
        self.version = voxgen_version()
        self.series_number = 0

    def datasets(self, v_model: np.ndarray, source: VolumeSource | None = None) -> Iterator[tuple[str, Any]]:
        """(file name, pydicom FileDataset) per slice of one new series, inferior to superior."""
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

        from model.data.volumes import _physical

        cfg, src = self.config, source or VolumeSource()
        v = _check(v_model)
        phys = _physical(v, cfg.intensity)
        slope, intercept = _rescale(cfg)
        if cfg.intensity.dtype == "int16":
            stored = phys.astype(np.int16, copy=False)
        else:
            stored = np.clip(np.rint((phys.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)
        d, h, w = v.shape
        flip = np.array([[-1.0, 0, 0, w - 1], [0, -1.0, 0, h - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
        m = lps_affine(v.shape, cfg) @ flip  # (column, row, slice) of the written slices -> LPS mm
        col_step, row_step = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
        slice_step = float(np.linalg.norm(m[:3, 2]))
        orientation = [*(m[:3, 0] / col_step), *(m[:3, 1] / row_step)]
        ct = cfg.modality == "ct"
        sop_class = CT_IMAGE_STORAGE if ct else MR_IMAGE_STORAGE
        self.series_number += 1
        series_uid = generate_uid()
        date, time_ = self.when.strftime("%Y%m%d"), self.when.strftime("%H%M%S")
        lo, hi = float(cfg.intensity.lo), float(cfg.intensity.hi)
        comment = (
            f"SYNTHETIC image generated by voxgen {self.version} ({cfg.family} GAN), {src.text()}; "
            "not a scan of a patient"
        )
        for k in range(d):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time_
            ds.Modality = "CT" if ct else "MR"
            ds.Manufacturer = "voxgen"
            ds.ManufacturerModelName = f"voxgen {cfg.family}"[:64]
            ds.SoftwareVersions = self.version[:64]
            ds.ReferringPhysicianName = ""
            ds.AccessionNumber = ""
            ds.StudyDescription = self.study_description
            ds.SeriesDescription = f"SYNTHETIC voxgen {src.text()}"[:64]
            ds.DerivationDescription = f"synthesised by a generative model (voxgen {cfg.family}); no acquisition"
            ds.PatientName = PATIENT_NAME
            ds.PatientID = "SYNTHETIC"
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyInstanceUID = self.study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "VOXGEN"
            ds.SeriesNumber = self.series_number
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = k + 1
            ds.FrameOfReferenceUID = self.frame_uid
            ds.PositionReferenceIndicator = ""
            position = m @ np.array([0.0, 0.0, float(k), 1.0])
            ds.ImagePositionPatient = [_ds(x) for x in position[:3]]
            ds.ImageOrientationPatient = [_ds(c) for c in orientation]
            ds.PixelSpacing = [_ds(row_step), _ds(col_step)]  # between rows, between columns
            ds.SliceThickness = _ds(slice_step)
            ds.SpacingBetweenSlices = _ds(slice_step)
            ds.SliceLocation = _ds(position[2])
            ds.BurnedInAnnotation = "NO"
            ds.RecognizableVisualFeatures = "NO"
            ds.LossyImageCompression = "00"
            ds.ImageComments = comment
            if ct:
                ds.KVP = ""
                ds.RescaleType = "HU"
            else:
                ds.ScanningSequence = "RM"  # research mode: no pulse sequence made these voxels
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = "3D"
                ds.RepetitionTime = ""
                ds.EchoTime = ""
                ds.EchoTrainLength = ""
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.WindowCenter = _ds((lo + hi) / 2)
            ds.WindowWidth = _ds(hi - lo)
            ds.set_pixel_data(np.ascontiguousarray(stored[k, ::-1, ::-1]), "MONOCHROME2", 16)
            yield f"IM{k + 1:05d}.dcm", ds

    def write_zip_member(
        self, zf: zipfile.ZipFile, folder: str, v_model: np.ndarray, source: VolumeSource | None = None
    ) -> dict[str, Any]:
        """Add one series to an open zip under ``folder/``; its description (``series_info``)."""
        uid = None
        n = 0
        for name, ds in self.datasets(v_model, source):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            zf.writestr(f"{folder}/{name}", buf.getvalue())
            uid, n = ds.SeriesInstanceUID, n + 1
        return self.series_info(folder, uid, n)

    def write_folder(
        self, folder: str | os.PathLike, v_model: np.ndarray, source: VolumeSource | None = None
    ) -> dict[str, Any]:
        """Write one series into ``folder`` (created; an existing one is replaced), built under a
        temporary name beside it and renamed into place when complete."""
        dst = Path(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
        try:
            tmp.mkdir()
            uid, n = None, 0
            for name, ds in self.datasets(v_model, source):
                ds.save_as(tmp / name, enforce_file_format=True)
                uid, n = ds.SeriesInstanceUID, n + 1
            if dst.is_dir():
                os.replace(dst, old)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return self.series_info(dst.name, uid, n)

    def series_info(self, folder: str, series_uid: str | None, slices: int) -> dict[str, Any]:
        return {"folder": folder, "series_uid": str(series_uid), "study_uid": str(self.study_uid), "slices": slices}


class DicomZip:
    """A zip of DICOM series, one folder per volume, written under a temporary name beside
    ``path`` and renamed over it on ``close`` (a reader never sees a half-written zip; on an error
    nothing is left).  ``add(folder, v_model, source)`` writes one series; ``series`` lists them."""

    def __init__(
        self, path: str | os.PathLike, config: Any, study_description: str = "SYNTHETIC voxgen volumes"
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = DicomWriter(config, study_description)
        self.series: list[dict[str, Any]] = []
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        self._zf: zipfile.ZipFile | None = zipfile.ZipFile(self._tmp, "x", zipfile.ZIP_DEFLATED, compresslevel=1)

    def add(self, folder: str, v_model: np.ndarray, source: VolumeSource | None = None) -> dict[str, Any]:
        if self._zf is None:
            raise ValueError("the DICOM zip is closed")
        info = self.writer.write_zip_member(self._zf, folder, v_model, source)
        self.series.append(info)
        return info

    def close(self) -> None:
        if self._zf is None:
            return
        self._zf.close()
        self._zf = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DicomZip:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = [
    "VolumeSource",
    "DicomWriter",
    "DicomZip",
    "write_sitk_volume",
    "sitk_image",
    "lps_affine",
    "mark_nifti_synthetic",
    "nifti_description",
    "voxgen_version",
    "MR_STORED_MAX",
    "PATIENT_NAME",
]
