"""Output formats (DICOM series, NRRD, MetaImage) with the NIfTI output's geometry, the synthetic
marks in every format, and provenance.json beside every job's results (issue 18, items 1, 2, 4).

The models are tiny HA-GANs (128^3, width 0.25, latent 16, as in tests/conftest.py) with an
anisotropic voxel size, so a swapped or mirrored axis shows in every geometry check."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from tests.conftest import service_wait as wait

pydicom = pytest.importorskip("pydicom")

LATENT = 16
SPACING = {"ct": (0.8, 0.9, 1.25), "mri": (1.0, 1.1, 1.2)}  # x, y, z mm: every axis its own
# NIfTI stores its affine as float32: positions and sizes agree with the exact DICOM / NRRD values
# to float32 precision of ~60 mm coordinates (4e-6 mm); 1e-4 mm is far below any voxel size
GEOMETRY_ATOL = 1e-4
# MRI stored as int16 0..32000 with RescaleSlope (hi - lo) / 32000: at most half a step off the
# NIfTI's float32 value (plus float rounding)
MR_STEP = 1.0 / 32000


def _config(modality: str):
    from model.base import Intensity
    from model.hagan.config import HAGANConfig

    return HAGANConfig(
        resolution=128,
        width=0.25,
        latent_dim=LATENT,
        modality=modality,
        spacing=SPACING[modality],
        intensity=Intensity.for_modality(modality),
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.hagan.model import HAGANModel

    d = tmp_path_factory.mktemp("formats-models")
    for i, modality in enumerate(("ct", "mri")):
        HAGANModel.init(_config(modality), seed=i).save_pretrained(d / modality)
    return d


@pytest.fixture(scope="module")
def client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from service.app import create_app
    from service.settings import Settings

    s = Settings(models_dir=models_dir, storage_dir=tmp_path_factory.mktemp("formats-storage"), redis_url=None)
    with TestClient(create_app(s)) as c:
        yield c


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A model-space volume that is not symmetric along any axis (a mirrored axis shows), with
    values over the whole [-1, 1] range, on the 128^3 grid."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 128, dtype=np.float32)] * 3, indexing="ij")
    rng = np.random.default_rng(0)
    v = 0.6 * x + 0.3 * y - 0.2 * z + 0.3 * np.sin(5 * x * y + 3 * z) + 0.05 * rng.standard_normal(x.shape)
    return np.clip(v, -1, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ helpers
def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _same_grid(a: sitk.Image, b: sitk.Image, atol: float) -> None:
    """Two images on the same physical grid: after both are reoriented to LPS (a viewer's view of
    them), the same size, spacing, origin and direction."""
    a, b = sitk.DICOMOrient(a, "LPS"), sitk.DICOMOrient(b, "LPS")
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-7)


def _pydicom_volume(folder: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """A series read with pydicom alone: the (x, y, z)-indexed volume in rescaled units, the RAS
    affine built from ImageOrientationPatient / ImagePositionPatient / PixelSpacing, the datasets."""
    from pydicom.pixels import apply_modality_lut

    dss = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    row_cos, col_cos = (np.array(dss[0].ImageOrientationPatient[i : i + 3], dtype=float) for i in (0, 3))
    normal = np.cross(row_cos, col_cos)
    dss.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))
    pos = np.array([ds.ImagePositionPatient for ds in dss], dtype=float)
    d_row, d_col = (float(s) for s in dss[0].PixelSpacing)  # between rows, between columns
    step = np.diff(pos, axis=0)
    assert np.allclose(step, step[0], atol=1e-6)  # evenly spaced slices
    assert np.isclose(float(dss[0].SpacingBetweenSlices), np.linalg.norm(step[0]), atol=1e-6)
    assert np.isclose(float(dss[0].SliceThickness), np.linalg.norm(step[0]), atol=1e-6)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * d_col, col_cos * d_row, step[0], pos[0]
    vol = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in dss])  # (slice, row, column)
    return vol.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, dss


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float64), affine))
    return np.asarray(img.dataobj), img.affine


# ------------------------------------------------------------------------------------ writers
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_dicom_series_has_the_nifti_geometry_and_values(tmp_path: Path, volume: np.ndarray, modality: str) -> None:
    from model.data.export import DicomWriter, VolumeSource
    from model.data.volumes import read_volume, write_volume

    cfg = _config(modality)
    src = VolumeSource("my-model", 42, 0, 1)
    write_volume(tmp_path / "v.nii.gz", volume, cfg, source=src)
    info = DicomWriter(cfg).write_folder(tmp_path / "series", volume, src)
    assert info["slices"] == 128 and len(list((tmp_path / "series").iterdir())) == 128
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    nii = nib.load(tmp_path / "v.nii.gz")
    ref = np.asarray(nii.dataobj, dtype=np.float64)
    tol = 0.0 if modality == "ct" else MR_STEP / 2 * (cfg.intensity.hi - cfg.intensity.lo) + 1e-7

    # SimpleITK: the series reader and the NIfTI reader see one grid and the same voxels on it
    a, b = _sitk_series(tmp_path / "series"), sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    _same_grid(a, b, GEOMETRY_ATOL)
    np.testing.assert_allclose(a.GetSpacing(), SPACING[modality], atol=1e-9)  # exact in DICOM's DS strings
    va = sitk.GetArrayFromImage(sitk.DICOMOrient(a, "LPS")).astype(np.float64)
    vb = sitk.GetArrayFromImage(sitk.DICOMOrient(b, "LPS")).astype(np.float64)
    assert np.abs(va - vb).max() <= tol
    # standard axial orientation, slices inferior to superior (what a PACS expects)
    assert a.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    # pydicom alone: the tags give the NIfTI's RAS affine and voxels once both are canonical
    vol, ras, dss = _pydicom_volume(tmp_path / "series")
    (d1, a1), (d2, a2) = _canonical(vol, ras), _canonical(ref, nii.affine)
    np.testing.assert_allclose(a1, a2, atol=GEOMETRY_ATOL)
    assert np.abs(d1 - d2).max() <= tol

    # voxgen's own reader: the same RAS array and affine from the series as from the NIfTI
    g1: dict = {}
    g2: dict = {}
    x1, s1 = read_volume(tmp_path / "series", geometry=g1)
    x2, s2 = read_volume(tmp_path / "v.nii.gz", geometry=g2)
    np.testing.assert_allclose(g1["affine"], g2["affine"], atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(s1, s2, atol=GEOMETRY_ATOL)
    assert np.abs(x1.astype(np.float64) - x2).max() <= tol + 1e-6

    ds = dss[0]
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.2" if modality == "ct" else "1.2.840.10008.5.1.4.1.1.4")
    assert ds.Modality == ("CT" if modality == "ct" else "MR") and ds.file_meta.TransferSyntaxUID.is_little_endian
    assert ds.pixel_array.dtype == np.int16 and ds.PixelRepresentation == 1 and ds.BitsStored == 16


def test_a_non_cubic_grid_keeps_its_axes(tmp_path: Path) -> None:
    """D, H and W all different (a StyleGAN grid is 32x64x64): no axis swapped in DICOM, NRRD or MHA."""
    from model.data.export import DicomWriter
    from model.data.volumes import read_volume, write_volume

    rng = np.random.default_rng(1)
    v = np.clip(rng.standard_normal((20, 24, 28)), -1, 1).astype(np.float32)  # (z, y, x)
    cfg = _config("ct")
    write_volume(tmp_path / "v.nii.gz", v, cfg)
    write_volume(tmp_path / "v.nrrd", v, cfg)
    write_volume(tmp_path / "v.mha", v, cfg)
    DicomWriter(cfg).write_folder(tmp_path / "s", v)
    ds = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[0])
    assert (ds.Rows, ds.Columns, len(list((tmp_path / "s").iterdir()))) == (24, 28, 20)
    ref: dict = {}
    x0, _ = read_volume(tmp_path / "v.nii.gz", geometry=ref)
    for name in ("s", "v.nrrd", "v.mha"):
        g: dict = {}
        x, _ = read_volume(tmp_path / name, geometry=g)
        assert x.shape == (20, 24, 28)
        np.testing.assert_allclose(g["affine"], ref["affine"], atol=GEOMETRY_ATOL)
        np.testing.assert_array_equal(x, x0)


def test_dicom_series_are_marked_synthetic_with_fresh_uids(tmp_path: Path, volume: np.ndarray) -> None:
    from model.data.export import DicomWriter, VolumeSource

    w = DicomWriter(_config("ct"))
    w.write_folder(tmp_path / "a", volume, VolumeSource("my-model", 7, 0, 2))
    w.write_folder(tmp_path / "b", volume, VolumeSource("my-model", 7, 1, 2))
    a = [pydicom.dcmread(f) for f in sorted((tmp_path / "a").iterdir())]
    b = [pydicom.dcmread(f) for f in sorted((tmp_path / "b").iterdir())]
    for ds in a + b:
        assert str(ds.PatientName) == "SYNTHETIC^VOXGEN"
        assert "SYNTHETIC" in ds.SeriesDescription and "voxgen" in ds.SeriesDescription
        assert ds.BurnedInAnnotation == "NO"
        assert "my-model" in ds.ImageComments and "seed 7" in ds.ImageComments and "SYNTHETIC" in ds.ImageComments
        assert "DERIVED" in ds.ImageType and ds.Manufacturer == "voxgen"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert uid.is_valid
    assert "volume 1 of 2" in a[0].ImageComments and "volume 2 of 2" in b[0].ImageComments
    sops = {ds.SOPInstanceUID for ds in a + b}
    assert len(sops) == len(a) + len(b)  # every instance its own UID
    assert {ds.SeriesInstanceUID for ds in a} != {ds.SeriesInstanceUID for ds in b}
    assert len({ds.SeriesInstanceUID for ds in a}) == 1 and len({ds.StudyInstanceUID for ds in a + b}) == 1
    other = DicomWriter(_config("ct"))  # another writer (another job): another study and frame
    assert other.study_uid != w.study_uid and other.frame_uid != w.frame_uid
    # pydicom validates the written values against their VRs (DS at most 16 characters, ...)
    with pydicom.config.strict_reading():
        pydicom.dcmread(sorted((tmp_path / "a").iterdir())[0])


def test_ct_rescale_gives_hounsfield_units(tmp_path: Path, volume: np.ndarray) -> None:
    from pydicom.pixels import apply_modality_lut

    from model.data.export import DicomWriter
    from model.data.volumes import write_volume

    cfg = _config("ct")
    write_volume(tmp_path / "v.nii.gz", volume, cfg)
    DicomWriter(cfg).write_folder(tmp_path / "s", volume)
    hu = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj)  # int16 HU, (x, y, z)
    ds = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[5])  # the 6th slice from inferior: z = 5
    assert ds.RescaleType == "HU" and float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    got = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(got, hu[::-1, ::-1, 5].T)  # rows towards posterior, columns towards left
    every = [
        apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f))
        for f in sorted((tmp_path / "s").iterdir())
    ]
    assert min(x.min() for x in every) == -1024 and max(x.max() for x in every) == 600  # the model's HU window
    assert float(ds.WindowCenter) == -212.0 and float(ds.WindowWidth) == 1624.0


def test_mri_rescale_gives_the_model_units(tmp_path: Path, volume: np.ndarray) -> None:
    from pydicom.pixels import apply_modality_lut

    from model.data.export import MR_STORED_MAX, DicomWriter
    from model.data.volumes import write_volume

    cfg = _config("mri")
    write_volume(tmp_path / "v.nii.gz", volume, cfg)
    DicomWriter(cfg).write_folder(tmp_path / "s", volume)
    ref = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj)  # float32 a.u. in [0, 1]
    ds = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[3])
    assert float(ds.RescaleSlope) == pytest.approx(1.0 / MR_STORED_MAX, rel=1e-12)
    assert float(ds.RescaleIntercept) == 0.0
    assert ds.pixel_array.dtype == np.int16 and 0 <= ds.pixel_array.min() and ds.pixel_array.max() <= MR_STORED_MAX
    err = np.abs(apply_modality_lut(ds.pixel_array, ds) - ref[::-1, ::-1, 3].T)
    assert err.max() <= MR_STEP / 2 + 1e-7


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_nrrd_and_mha_have_the_nifti_geometry(tmp_path: Path, volume: np.ndarray, modality: str, ext: str) -> None:
    from model.data.export import VolumeSource
    from model.data.volumes import read_volume, write_volume

    cfg = _config(modality)
    write_volume(tmp_path / "v.nii.gz", volume, cfg)
    write_volume(tmp_path / f"v{ext}", volume, cfg, source=VolumeSource("m", 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["v.nii.gz", f"v{ext}"])  # no temporaries
    a, b = sitk.ReadImage(str(tmp_path / f"v{ext}")), sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    # the NIfTI's own index order: the very same origin, spacing and direction, the same voxels
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-7)
    assert a.GetPixelID() == b.GetPixelID()  # CT int16 HU, MRI float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetMetaData("voxgen").startswith("SYNTHETIC voxgen hagan")
    g1: dict = {}
    g2: dict = {}
    x1, _ = read_volume(tmp_path / f"v{ext}", geometry=g1, untrusted=True)  # as an upload is read
    x2, _ = read_volume(tmp_path / "v.nii.gz", geometry=g2)
    np.testing.assert_allclose(g1["affine"], g2["affine"], atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(x1, x2)


def test_nifti_header_marks_the_volume_synthetic(tmp_path: Path, volume: np.ndarray) -> None:
    from model.data.export import VolumeSource
    from model.data.volumes import write_volume

    write_volume(tmp_path / "v.nii.gz", volume, _config("ct"), source=VolumeSource("my-model", 9, 1, 3))
    h = nib.load(tmp_path / "v.nii.gz").header
    desc = h["descrip"].item().decode()
    assert desc.startswith("SYNTHETIC voxgen hagan ct (HU)") and "my-model" in desc and "seed 9" in desc
    assert len(h["descrip"].item()) <= 79  # the 80-byte field keeps its NUL
    assert h["intent_name"].item() == b"SYNTHETIC" and int(h["intent_code"]) == 0
    long = VolumeSource("m" * 64, 2**63 - 1, 0, 1)  # the longest served name and seed: cut, not overflowed
    write_volume(tmp_path / "w.nii", volume, _config("ct"), source=long)
    assert nib.load(tmp_path / "w.nii").header["descrip"].item().startswith(b"SYNTHETIC voxgen")


# ------------------------------------------------------------------------------------ the API
def _get(client: TestClient, status: dict, name: str) -> bytes:
    files = {f["name"]: f for f in status["result"]["files"]}
    r = client.get(files[name]["url"])
    assert r.status_code == 200 and len(r.content) == files[name]["bytes"]
    return r.content


def _run(client: TestClient, path: str, **kw) -> dict:
    r = client.post(path, **kw)
    assert r.status_code == 202, r.text
    s = wait(client, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    return s


def _encode(client: TestClient, model: str, name: str, data: bytes, **form: str) -> np.ndarray:
    s = _run(client, "/encode", data={"model": model, **form}, files={"file": (name, data)})
    return np.asarray(s["result"]["latent"], dtype=np.float64)


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_generate_dicom_round_trips_through_encode(client: TestClient, tmp_path: Path, modality: str) -> None:
    """POST /generate format dicom: one zip, one series folder per volume, read back by SimpleITK
    with the NIfTI output's geometry, and /encode of a series gives the latent /encode gives for
    the NIfTI of the same volume.

    Tolerance.  CT: the series holds the NIfTI's int16 HU exactly and the geometry agrees to the
    NIfTI header's float32 precision, so the encoder sees the same input (measured: latents equal,
    difference 0); 1e-5 allows float rounding only.  MRI: voxels are quantised to 1/32000 of the
    intensity range (<= 1.6e-5 a.u.), which after the encode's 99.9th-percentile normalisation
    moves the model-space input by up to ~6e-5 and the latent by about as much (measured 7e-5 for
    this model); 1e-3 leaves a 15x margin and still catches a mirrored axis or a wrong rescale
    (a mirrored x axis moves the latent by 0.7 to 1.0, measured on both models).
    """
    body = {"model": modality, "seed": 11, "n": 2}
    dcm = _run(client, "/generate", json=body | {"format": "dicom"})
    nii = _run(client, "/generate", json=body)
    names = {f["name"] for f in dcm["result"]["files"]}
    assert names == {"dicom.zip", "latent.npy", "volume_000.png", "volume_001.png", "provenance.json"}
    assert [s["folder"] for s in dcm["result"]["dicom"]] == ["volume_000", "volume_001"]
    assert np.array_equal(
        np.load(io.BytesIO(_get(client, dcm, "latent.npy"))), np.load(io.BytesIO(_get(client, nii, "latent.npy")))
    )
    zipped = _get(client, dcm, "dicom.zip")
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        members = zf.namelist()
        assert {m.split("/")[0] for m in members} == {"volume_000", "volume_001"} and len(members) == 256
        zf.extractall(tmp_path / "x")
    (tmp_path / "v0.nii.gz").write_bytes(_get(client, nii, "volume_000.nii.gz"))
    series = _sitk_series(tmp_path / "x" / "volume_000")
    _same_grid(series, sitk.ReadImage(str(tmp_path / "v0.nii.gz")), GEOMETRY_ATOL)
    uid0 = dcm["result"]["dicom"][0]["series_uid"]
    ds = pydicom.dcmread(sorted((tmp_path / "x" / "volume_000").iterdir())[0])
    assert ds.SeriesInstanceUID == uid0 and "seed 11" in ds.ImageComments and f"model {modality}" in ds.ImageComments

    z_nii = _encode(client, modality, "v0.nii.gz", (tmp_path / "v0.nii.gz").read_bytes())
    z_zip = _encode(client, modality, "dicom.zip", zipped, series_uid=uid0)  # the job's whole zip, one series picked
    one = io.BytesIO()  # and a zip of that one series alone, as a user would send it
    with zipfile.ZipFile(one, "w") as zf:
        for f in sorted((tmp_path / "x" / "volume_000").iterdir()):
            zf.write(f, f.name)
    z_one = _encode(client, modality, "series.zip", one.getvalue())
    tol = 1e-5 if modality == "ct" else 1e-3
    np.testing.assert_allclose(z_zip, z_nii, atol=tol)
    np.testing.assert_array_equal(z_one, z_zip)
    # the whole zip without a series UID: a 422 that lists both series (names no server path)
    r = client.post("/encode", data={"model": modality}, files={"file": ("dicom.zip", zipped)})
    assert r.status_code == 422 and "holds 2 DICOM series" in r.json()["detail"] and uid0 in r.json()["detail"]
    assert str(client.app.state.storage.root) not in r.json()["detail"]


def test_generate_nrrd_and_mha_have_the_nifti_geometry(client: TestClient, tmp_path: Path) -> None:
    ref = None
    for fmt, ext in (("nifti", ".nii.gz"), ("nrrd", ".nrrd"), ("mha", ".mha")):
        s = _run(client, "/generate", json={"model": "ct", "seed": 4, "format": fmt})
        p = tmp_path / f"v{ext}"
        p.write_bytes(_get(client, s, f"volume_000{ext}"))
        img = sitk.ReadImage(str(p))
        if ref is None:
            ref = img
            continue
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=GEOMETRY_ATOL)
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=GEOMETRY_ATOL)
        assert img.GetDirection() == ref.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))


def test_traverse_dicom_gives_one_series_per_step(client: TestClient, tmp_path: Path) -> None:
    body = {"model": "ct", "seed": 2, "direction": [1.0] + [0.0] * (LATENT - 1), "steps": [-1, 0, 1]}
    s = _run(client, "/traverse", json=body | {"format": "dicom"})
    steps = s["result"]["steps"]
    assert [x["file"] for x in steps] == ["dicom.zip"] * 3 and [x["folder"] for x in steps] == [
        "step_00",
        "step_01",
        "step_02",
    ]
    with zipfile.ZipFile(io.BytesIO(_get(client, s, "dicom.zip"))) as zf:
        zf.extractall(tmp_path)
    uids = set()
    for x in steps:
        ds = pydicom.dcmread(sorted((tmp_path / x["folder"]).iterdir())[0])
        assert ds.SeriesInstanceUID == x["series_uid"] and "step" in ds.ImageComments
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 3
    for fmt, ext in (("nrrd", ".nrrd"), ("mha", ".mha")):
        t = _run(client, "/traverse", json=body | {"format": fmt})
        assert [x["file"] for x in t["result"]["steps"]] == [f"step_{i:02d}{ext}" for i in range(3)]


@pytest.mark.parametrize("fmt", ["png", "DICOM", "dcm", "nii", 3])
def test_unknown_formats_get_a_422(client: TestClient, fmt: object) -> None:
    for path, body in (("/generate", {"model": "ct", "seed": 1}), ("/traverse", {"model": "ct", "seed": 1})):
        body = (
            body | {"format": fmt, "direction": [1.0] * LATENT, "steps": [0]}
            if path == "/traverse"
            else body | {"format": fmt}
        )
        r = client.post(path, json=body)
        assert r.status_code == 422 and "format" in json.dumps(r.json()), r.text


# ------------------------------------------------------------------------------------ provenance
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_job_has_provenance_linked_from_its_status(client: TestClient, models_dir: Path, tmp_path: Path) -> None:
    from importlib.metadata import version

    weights = _sha256((models_dir / "ct" / "model.safetensors").read_bytes())
    s = _run(client, "/generate", json={"model": "ct", "seed": 5, "n": 1, "format": "nrrd"})
    url = f"/jobs/{s['job_id']}/files/provenance.json"
    assert s["result"]["provenance"] == url and url in {f["url"] for f in s["result"]["files"]}
    doc = client.get(url).json()
    assert doc["model"]["name"] == "ct" and doc["model"]["family"] == "hagan" and doc["model"]["modality"] == "ct"
    assert doc["model"]["weights"]["sha256"] == weights and doc["model"]["weights"]["file"] == "model.safetensors"
    assert doc["model"]["config_sha256"] == _sha256((models_dir / "ct" / "config.json").read_bytes())
    assert doc["voxgen_version"] == version("voxgen") and doc["synthetic"] is True
    assert doc["seed"] == 5 and doc["latent"] is None and doc["latent_file"] == "latent.npy"
    assert doc["request"] == {"model": "ct", "n": 1, "seed": 5, "latent": None, "label": None, "format": "nrrd"}
    assert doc["device"] == "cpu" and doc["precision"] == "fp32" and doc["threads"] == s["threads"] >= 1
    assert doc["job"] == {"id": s["job_id"], "kind": "generate", "attempt": 1}
    assert doc["time"]["started"] <= doc["time"]["finished"] and doc["time"]["seconds"] >= 0
    assert "torch" in doc["software"] and "python" in doc["software"]
    listed = {f["name"] for f in s["result"]["files"]} - {"provenance.json"}
    assert {f["name"] for f in doc["files"]} == listed
    for f in doc["files"]:  # each result file as served
        assert f["sha256"] == _sha256(_get(client, s, f["name"]))

    # a given latent is recorded (no seed); encode records the upload's name and hash, no server path
    lat = [0.25] * LATENT
    g = _run(client, "/generate", json={"model": "mri", "latent": lat})
    doc = client.get(g["result"]["provenance"]).json()
    assert doc["seed"] is None and doc["latent"] == [lat] and doc["model"]["modality"] == "mri"
    assert doc["model"]["weights"]["sha256"] == _sha256((models_dir / "mri" / "model.safetensors").read_bytes())
    up = _get(client, g, "volume_000.nii.gz")
    h = nib.load(_write(tmp_path / "u.nii.gz", up)).header
    assert h["descrip"].item().startswith(b"SYNTHETIC voxgen hagan mri") and b"latent given" in h["descrip"].item()
    e = _run(client, "/encode", data={"model": "mri", "reconstruct": "true"}, files={"file": ("Scan 1.nii.gz", up)})
    text = client.get(e["result"]["provenance"]).text
    doc = json.loads(text)
    assert doc["input"] == {"filename": "Scan 1.nii.gz", "bytes": len(up), "sha256": _sha256(up)}
    assert "upload" not in doc["request"] and str(client.app.state.storage.root) not in text
    assert doc["request"]["reconstruct"] is True and doc["job"]["kind"] == "encode"
    rec = nib.load(_write(tmp_path / "r.nii.gz", _get(client, e, "reconstruction.nii.gz"))).header
    assert rec["descrip"].item().startswith(b"SYNTHETIC voxgen") and rec["intent_name"].item() == b"SYNTHETIC"
    t = _run(client, "/traverse", json={"model": "ct", "seed": 1, "direction": [1.0] * LATENT, "steps": [0]})
    doc = client.get(t["result"]["provenance"]).json()
    assert doc["job"]["kind"] == "traverse" and doc["seed"] == 1 and doc["request"]["steps"] == [0]
    assert doc["model"]["weights"]["sha256"] == weights


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------ the CLI
def test_cli_writes_dicom_nrrd_and_mha(models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from model.cli import main

    model = str(models_dir / "ct")
    assert main(["generate", "--model", model, "--seed", "3", "-o", str(tmp_path / "v.nii.gz")]) == 0
    assert main(["generate", "--model", model, "--seed", "3", "-o", str(tmp_path / "dcm") + "/"]) == 0
    assert main(["generate", "--model", model, "--seed", "3", "--n", "2", "-o", str(tmp_path / "s.zip")]) == 0
    for ext in (".nrrd", ".mha"):
        assert main(["generate", "--model", model, "--seed", "3", "-o", str(tmp_path / f"v{ext}")]) == 0
        img = sitk.ReadImage(str(tmp_path / f"v{ext}"))
        ref = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=GEOMETRY_ATOL)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))
    series = tmp_path / "dcm" / "volume_000"
    assert len(list(series.iterdir())) == 128 and sorted(p.name for p in (tmp_path / "dcm").iterdir()) == ["volume_000"]
    _same_grid(_sitk_series(series), sitk.ReadImage(str(tmp_path / "v.nii.gz")), GEOMETRY_ATOL)
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        assert {m.split("/")[0] for m in zf.namelist()} == {"volume_000", "volume_001"}
    assert pydicom.dcmread(sorted(series.iterdir())[0]).ImageComments.count("seed 3") == 1
    # voxgen encode of the series folder gives the latent of the NIfTI (same voxels, same grid)
    assert main(["encode", "--model", model, str(series), "-o", str(tmp_path / "z1.npy")]) == 0
    assert main(["encode", "--model", model, str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "z2.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "z1.npy"), np.load(tmp_path / "z2.npy"), atol=1e-4)
    # a second run into the same folder replaces the series (no mixture of two series' slices)
    assert main(["generate", "--model", model, "--seed", "4", "-o", str(tmp_path / "dcm")]) == 0
    assert len(list(series.iterdir())) == 128 and len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series))) == 1
    with pytest.raises(SystemExit, match="cannot write"):
        main(["generate", "--model", model, "--seed", "3", "-o", str(tmp_path / "v.png")])
    capsys.readouterr()


def test_cli_traverse_formats(models_dir: Path, tmp_path: Path) -> None:
    import torch

    from model.cli import main
    from model.latent.directions import Direction, save_direction

    model = models_dir / "mri"
    if not (model / "directions.safetensors").exists():
        save_direction(model, Direction("d", "bright_tissue_ml", torch.linspace(-1, 1, LATENT), 1.0, 0.5, None, 8))
    base = ["traverse", "--model", str(model), "--direction", "d", "--seed", "1", "--steps", "0,1"]
    assert main([*base, "--format", "dicom", "-o", str(tmp_path / "d")]) == 0
    doc = json.loads((tmp_path / "d" / "steps.json").read_text())
    assert [s["file"] for s in doc["steps"]] == ["step_00/", "step_01/"]
    ds = pydicom.dcmread(sorted((tmp_path / "d" / "step_01").iterdir())[0])
    assert (
        ds.Modality == "MR"
        and ds.SeriesInstanceUID == doc["steps"][1]["series_uid"]
        and "step 2 of 2" in ds.ImageComments
    )
    assert main([*base, "--format", "mha", "-o", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "step_01.mha").is_file()
    assert main([*base, "-o", str(tmp_path / "n")]) == 0  # the default stays NIfTI
    assert (tmp_path / "n" / "step_00.nii.gz").is_file()
