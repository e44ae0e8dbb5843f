"""Volumes in and out (model/data/volumes.py) and the synthetic phantoms (model/data/phantoms.py):
formats, orientation, the HU round trip, the paper's preprocessing, every refused input, DICOM as
hospitals export it (found by content, several series picked by UID) and uploads (one file, headers
bounded, messages without server paths, one float32 copy, blank checks)."""

from __future__ import annotations

import os
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from model.base import Intensity
from model.data import volumes
from model.data.phantoms import AIR, BONE, LUNG, MRI_CLASSES, ct_phantom, mri_phantom, write_dicom_series, write_phantom
from model.data.volumes import (
    VolumeError,
    check_gzip,
    load_for_model,
    read_volume,
    to_model_space,
    volume_affine,
    write_volume,
)
from model.hagan.config import HAGANConfig

SHAPE = (20, 24, 22)  # (z, y, x): small, and every axis a different length
SPACING = (0.75, 0.8, 2.5)  # (x, y, z) mm
CT = HAGANConfig(resolution=128, width=0.25, latent_dim=8, spacing=SPACING)
MRI = HAGANConfig(resolution=128, width=0.25, latent_dim=8, modality="mri", intensity=Intensity.for_modality("mri"))
MiB = 1 << 20


def save_nifti(path: Path, zyx: np.ndarray, affine: np.ndarray | None = None) -> Path:
    aff = np.diag([*SPACING, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), aff), path)
    return path


def zip_folder(path: Path, folder: Path, prefix: str = "series/") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, prefix + f.name)
    return path


def save_dicom_series(
    folder: Path,
    zyx: np.ndarray,
    spacing=(1.0, 1.25, 2.0),
    uid="1.2.826.0.1.3680043.2.1125.1",
    name="slice{k:03d}.dcm",
    description: str | None = None,
):
    """Write a (z, y, x) array as one DICOM series with ITK's GDCM writer (not model/data/phantoms.py's:
    an independent writer, identity direction, so DICOM's LPS index order), a file a slice named
    ``name.format(k=k, uid=uid)``."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(zyx.astype(np.int16))
    img.SetSpacing(spacing)
    w = sitk.ImageFileWriter()
    w.SetImageIO("GDCMImageIO")  # whatever the file names
    w.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        s.SetMetaData("0020|000e", uid)  # series instance UID
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0020|0032", f"0\\0\\{k * spacing[2]}")  # image position (patient)
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0018|0050", str(spacing[2]))
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        if description is not None:
            s.SetMetaData("0008|103e", description)
        w.SetFileName(str(folder / name.format(k=k, uid=uid)))
        w.Execute(s)
    return folder


# ------------------------------------------------------------------------------------ phantoms
def test_ct_phantom_has_its_tissues_is_seeded_and_asymmetric() -> None:
    v = ct_phantom(SHAPE, seed=0)
    assert v.shape == SHAPE and v.dtype == np.float32
    assert abs(v[0, 0, 0] - AIR) < 60  # air outside the body
    for hu, least in ((LUNG, 0.02), (40.0, 0.05), (BONE, 0.01)):
        assert (np.abs(v - hu) < 50).mean() > least, hu
    assert np.array_equal(v, ct_phantom(SHAPE, seed=0))
    assert not np.allclose(v, ct_phantom(SHAPE, seed=1), atol=100)  # jittered shapes, not just noise
    clean = ct_phantom(SHAPE, seed=0, noise_hu=0)
    for axis in range(3):  # a flip along any axis changes it: orientation errors are visible
        assert (clean != np.flip(clean, axis)).mean() > 0.01, axis


def test_mri_phantom_is_non_negative_with_brain_tissue_classes() -> None:
    m = mri_phantom(SHAPE, seed=0)
    assert m.dtype == np.float32 and m.min() >= 0
    clean = mri_phantom((32, 32, 32), seed=0, noise=0)
    assert clean[0, 0, 0] == 0  # background outside the head
    for tissue in ("wm", "gm", "csf", "scalp"):
        assert np.isclose(clean, MRI_CLASSES[tissue], rtol=0.11).mean() > 0.005, tissue
    assert (clean > MRI_CLASSES["wm"] * 1.2).any()  # the bright lesion
    assert np.array_equal(m, mri_phantom(SHAPE, seed=0)) and not np.array_equal(m, mri_phantom(SHAPE, seed=1))


# ------------------------------------------------------------------------------------ writing
def test_nifti_is_written_in_hounsfield_units_with_a_ras_affine(tmp_path: Path) -> None:
    v = np.random.default_rng(1).uniform(-1, 1, SHAPE).astype(np.float32)
    v[0, 0, :3] = (-1.0, 1.0, 1.7)  # the ends of the window, and a value past it
    write_volume(tmp_path / "v.nii.gz", v, CT)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == SHAPE[::-1] and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.affine[:3, :3], np.diag(SPACING))
    centre = img.affine @ [*(np.array(img.shape) - 1) / 2, 1]
    assert np.allclose(centre[:3], 0, atol=1e-4)  # centred on the origin
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    hu = np.asarray(img.dataobj).transpose(2, 1, 0)
    assert np.abs(hu - CT.intensity.to_physical(np.clip(v, -1, 1))).max() <= 0.5
    assert np.abs(hu - (-1024 + (np.clip(v, -1, 1) + 1) / 2 * 1624)).max() <= 0.5  # the window, spelled out
    assert tuple(hu[0, 0, :3]) == (-1024, 600, 600)
    back, spacing = read_volume(tmp_path / "v.nii.gz")
    assert np.array_equal(back, hu) and np.allclose(spacing, SPACING)


def test_mri_is_written_as_float32_in_its_units(tmp_path: Path) -> None:
    v = np.linspace(-1, 1, 8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    write_volume(tmp_path / "m.nii", v, MRI)
    img = nib.load(tmp_path / "m.nii")
    assert img.get_data_dtype() == np.float32
    assert np.allclose(img.get_fdata().transpose(2, 1, 0), (v + 1) / 2, atol=1e-6)


def test_npy_keeps_the_model_space_array(tmp_path: Path) -> None:
    v = np.random.default_rng(2).uniform(-1, 1, SHAPE).astype(np.float32)
    write_volume(tmp_path / "v.npy", v, CT)
    back = np.load(tmp_path / "v.npy")
    assert back.dtype == np.float32 and np.array_equal(back, v)


def test_the_streamed_nifti_is_the_file_nibabel_writes(tmp_path: Path) -> None:
    """write_volume streams the header and slabs of physical values into the gzip stream (ISA-L)
    instead of building the whole file in memory: the bytes inside are nibabel's own for the same
    image, CT (int16 HU, rounded and clipped) and MRI (float32), compressed or not."""
    import gzip

    from model.data.export import mark_nifti_synthetic

    v = np.random.default_rng(5).uniform(-1.2, 1.2, (20, 24, 28)).astype(np.float32)  # clipping too
    for cfg in (CT, MRI):
        ref = volumes.nifti_image(np.ascontiguousarray(volumes._physical(v, cfg.intensity)), cfg.spacing)
        mark_nifti_synthetic(ref.header, cfg)
        expected = ref.to_bytes()
        for ext in (".nii.gz", ".nii"):
            p = tmp_path / f"{cfg.modality}{ext}"
            with open(p, "wb") as f:
                volumes._write_nifti_stream(f, v, cfg.intensity, ref, ext == ".nii.gz", 4096)
            raw = p.read_bytes()
            assert (gzip.decompress(raw) if ext == ".nii.gz" else raw) == expected, (cfg.modality, ext)
    # the threaded ISA-L writer (large streams) gives one gzip stream any reader reads
    data = np.random.default_rng(6).integers(0, 50, volumes.GZIP_THREADED_MIN_BYTES + 12345, dtype=np.uint8)
    with open(tmp_path / "big.gz", "wb") as f, volumes.gzip_writer(f, data.nbytes, threads=2) as g:
        g.write(memoryview(data))
    assert gzip.decompress((tmp_path / "big.gz").read_bytes()) == data.tobytes()


def test_writes_are_atomic_and_bad_requests_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.nii.gz"
    write_volume(target, np.zeros(SHAPE, np.float32), CT)
    before = target.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(volumes, "nifti_image", boom)  # fail in the middle of a write
    with pytest.raises(RuntimeError):
        write_volume(target, np.ones(SHAPE, np.float32), CT)
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old file is intact
    with pytest.raises(VolumeError, match="NaN"):
        write_volume(target, np.full(SHAPE, np.nan, np.float32), CT)
    with pytest.raises(VolumeError, match=r"\.nii\.gz, \.nii, \.nrrd, \.mha or \.npy"):
        write_volume(tmp_path / "out.png", np.zeros(SHAPE, np.float32), CT)
    with pytest.raises(VolumeError, match="3D"):
        write_volume(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32), CT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temporary files left
    assert target.read_bytes() == before


def test_volume_affine_is_diagonal_ras_and_centred() -> None:
    aff = volume_affine((10, 20, 30), (0.5, 1.0, 2.0))  # (D, H, W) and (x, y, z) mm
    assert np.allclose(aff[:3, :3], np.diag([0.5, 1.0, 2.0]))
    assert np.allclose(aff @ [14.5, 9.5, 4.5, 1], [0, 0, 0, 1])  # the (x, y, z) centre voxel sits at 0


# ------------------------------------------------------------------------------------ reading
def test_every_format_reads_the_same_phantom(tmp_path: Path) -> None:
    ref = write_phantom(tmp_path / "a.nii.gz", "ct", SHAPE, SPACING, seed=3)
    arr, sp = read_volume(tmp_path / "a.nii.gz")
    assert arr.dtype == np.float32 and np.array_equal(arr, ref) and np.allclose(sp, SPACING)
    for name in ("a.nii", "a.nrrd", "a.nhdr", "a.mha", "a.mhd"):
        write_phantom(tmp_path / name, "ct", SHAPE, SPACING, seed=3)
        arr, sp = read_volume(tmp_path / name)
        assert np.array_equal(arr, ref) and np.allclose(sp, SPACING), name
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    for name in ("itk.nrrd", "itk.mha"):  # converted by ITK, not written by write_phantom
        sitk.WriteImage(img, str(tmp_path / name))
        arr, sp = read_volume(tmp_path / name)
        assert np.allclose(arr, ref) and np.allclose(sp, SPACING), name
    dcm = write_dicom_series(tmp_path / "dicom", ref, SPACING)
    arr, sp = read_volume(dcm)
    assert np.array_equal(arr, ref) and np.allclose(sp, SPACING)
    arr, sp = read_volume(zip_folder(tmp_path / "series.zip", dcm))
    assert np.array_equal(arr, ref) and np.allclose(sp, SPACING)


def test_flipped_and_permuted_orientations_give_the_same_ras_array(tmp_path: Path) -> None:
    v = ct_phantom(SHAPE, seed=4)
    xyz = v.transpose(2, 1, 0)
    sx, sy, sz = SPACING
    flipped = np.diag([-sx, sy, -sz, 1.0])  # x and z stored reversed (LAI)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz[::-1, :, ::-1]), flipped), tmp_path / "f.nii.gz")
    perm = np.array([[0, sx, 0, 0], [sy, 0, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1.0]])  # voxel axes (y, x, z)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz.transpose(1, 0, 2)), perm), tmp_path / "p.nii.gz")
    # ITK's physical space is LPS: stored as (z, y, x) voxel axes = Superior, Anterior, Right
    img = sitk.GetImageFromArray(np.ascontiguousarray(v.transpose(2, 1, 0)))  # sitk index (z, y, x)
    img.SetSpacing((sz, sy, sx))
    img.SetDirection((0, 0, -1, 0, -1, 0, 1, 0, 0))  # columns: index i -> S, j -> A, k -> R
    sitk.WriteImage(img, str(tmp_path / "s.mha"))
    for name in ("f.nii.gz", "p.nii.gz", "s.mha"):
        arr, sp = read_volume(tmp_path / name)
        assert arr.shape == SHAPE and np.array_equal(arr, v), name
        assert np.allclose(sp, SPACING), name


def test_partial_nan_is_filled_with_the_minimum_and_all_nan_refused(tmp_path: Path) -> None:
    v = ct_phantom(SHAPE, seed=5)
    v[3, 4, :5] = np.nan
    v[3, 5, 0] = np.inf
    arr, _ = read_volume(save_nifti(tmp_path / "some.nii.gz", v))
    assert np.isfinite(arr).all() and arr[3, 4, 0] == arr[3, 5, 0] == np.nanmin(v[np.isfinite(v)])
    with pytest.raises(VolumeError, match="NaN"):
        read_volume(save_nifti(tmp_path / "all.nii.gz", np.full((10, 10, 10), np.nan, np.float32)))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((10, 10, 10), np.nan, np.float32)), str(tmp_path / "all.mha"))
    with pytest.raises(VolumeError, match="NaN"):
        read_volume(tmp_path / "all.mha")


# ------------------------------------------------------------------------------------ the model grid
def test_ct_window_maps_linearly_to_minus_one_one() -> None:
    hu = np.linspace(-3000, 3000, 128).astype(np.float32)  # one value per axial slice
    hu[64], hu[5] = -212.0, np.nan  # the window's centre; a NaN
    v = np.broadcast_to(hu[:, None, None], (128, 8, 8)).copy()
    m = to_model_space(v, SPACING, CT, trim_blank=False)  # 128 slices -> 128: no interpolation along z
    assert m.shape == (128, 128, 128) and m.dtype == np.float32
    expected = np.clip((np.nan_to_num(hu, nan=-1024) + 1024) / 1624 * 2 - 1, -1, 1)
    assert np.allclose(m[:, 0, 0], expected, atol=1e-5) and np.allclose(m, m[:, :1, :1])
    assert m[64, 0, 0] == pytest.approx(0.0, abs=1e-6) and m[5, 0, 0] == -1.0
    assert np.isfinite(v[5]).sum() == 0  # the caller's array is not modified


def test_blank_axial_slices_are_trimmed_at_both_ends_only() -> None:
    v = np.full((20, 16, 16), -1024.0, np.float32)
    v[5:15, 4:12, 4:12] = 40.0  # a body on slices 5..14: five blank slices at each end
    v[9:11] = -2000.0  # blank slices inside the body stay (they are anatomy, not padding)
    raw = to_model_space(v, SPACING, CT, trim_blank=False)
    blank = raw.max(axis=(1, 2)) == -1
    assert blank[:20].all() and blank[-20:].all()  # untrimmed: a quarter of the cube at each end
    m = to_model_space(v, SPACING, CT)
    shows_body = m.max(axis=(1, 2)) > -1
    assert shows_body[:50].all() and shows_body[-50:].all() and not shows_body.all()
    assert np.isclose(m[30, 64, 64], CT.intensity.to_model(40.0), atol=1e-5)
    with pytest.raises(VolumeError, match="blank"):
        to_model_space(np.full((8, 8, 8), -1500.0, np.float32), SPACING, CT)


def test_mri_is_scaled_by_its_99_9th_percentile() -> None:
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1000, (16, 16, 16)).astype(np.float32)
    v[0, 0, :3] = 1e6  # three outliers: under 0.1% of the voxels
    v[1, 0, 0] = -50  # negative noise clips to 0
    m = to_model_space(v, SPACING, MRI, trim_blank=False)
    assert m.shape == (128, 128, 128) and m.min() >= -1 and m.max() <= 1
    p = float(np.percentile(np.clip(v, 0, None), 99.9))
    assert 990 < p < 1e6  # the outliers do not set the scale
    assert np.isclose(np.median(m), np.median(np.clip(v, 0, p) / p * 2 - 1), atol=0.02)
    with pytest.raises(VolumeError, match="blank"):
        to_model_space(np.zeros((8, 8, 8), np.float32), SPACING, MRI)


def test_load_for_model_reads_and_normalises_a_scan(tmp_path: Path) -> None:
    write_phantom(tmp_path / "m.nii.gz", "mri", SHAPE, SPACING, seed=1)
    m = load_for_model(tmp_path / "m.nii.gz", MRI)
    assert m.shape == (128, 128, 128) and m.dtype == np.float32 and m.min() >= -1 and m.max() <= 1
    arr, sp = read_volume(tmp_path / "m.nii.gz")
    assert np.array_equal(m, to_model_space(arr, sp, MRI))


# ------------------------------------------------------------------------------------ refusals
def test_missing_unknown_and_empty_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(VolumeError, match="unknown format .png; expected a 3D NIfTI"):
        read_volume(tmp_path / "x.png")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(VolumeError, match="empty file"):
        read_volume(tmp_path / "empty.nii.gz")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("not DICOM")
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["r.nii.gz", "r.nii", "r.nrrd", "r.mha", "r.nhdr", "r.mhd"])
def test_random_bytes_are_refused(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VolumeError, match=name):
        read_volume(p)


def test_gzip_of_random_bytes_and_truncated_files_are_refused(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "g.nii.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000)))
    with pytest.raises(VolumeError, match="unreadable|corrupt"):
        read_volume(tmp_path / "g.nii.gz")
    for name in ("t.nii.gz", "t.nii", "t.nrrd", "t.mha"):
        p = tmp_path / name
        write_phantom(p, "ct", SHAPE, SPACING)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        with pytest.raises(VolumeError, match="truncated|corrupt") as e:
            read_volume(p)
        assert name in str(e.value), name  # the message names the file
    raw = tmp_path / "short.nii"
    write_phantom(raw, "ct", SHAPE, SPACING)
    raw.write_bytes(raw.read_bytes()[:2000])  # cut inside the voxels
    with pytest.raises(VolumeError, match="short.nii"):
        read_volume(raw)


def test_2d_4d_and_small_images_are_refused(tmp_path: Path) -> None:
    cases = {
        "2d.nii.gz": ((32, 32), "2D image"),
        "4d.nii.gz": ((16, 16, 16, 3), "4D image"),
        "slice.nii.gz": ((16, 16, 1), "2D image .one slice.; at least 8"),
        "tiny.nii.gz": ((4, 16, 16), "too small; at least 8"),
        "empty.nii.gz": ((0, 16, 16), "empty image"),
    }
    for name, (shape, match) in cases.items():
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / name)
        with pytest.raises(VolumeError, match=match):
            read_volume(tmp_path / name)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 1), np.float32), np.eye(4)), tmp_path / "4d1.nii.gz")
    assert read_volume(tmp_path / "4d1.nii.gz")[0].shape == (16, 16, 16)  # a trailing singleton is fine
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 16, 16, 16), np.int16), isVector=False), str(tmp_path / "4d.nrrd")
    )
    with pytest.raises(VolumeError, match="4D"):
        read_volume(tmp_path / "4d.nrrd")
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((16, 16, 16, 3), np.uint8), isVector=True), str(tmp_path / "rgb.mha")
    )
    with pytest.raises(VolumeError, match="components"):
        read_volume(tmp_path / "rgb.mha")
    one = write_dicom_series(tmp_path / "one", np.zeros((1, 32, 32)), SPACING)
    with pytest.raises(VolumeError, match="2D image"):
        read_volume(one)
    with pytest.raises(VolumeError, match="over the limit"):
        read_volume(tmp_path / "4d1.nii.gz", max_voxels=15**3)


def gzip_of_zeros(prefix: bytes, zero_mib: int, isize: int | None = None) -> bytes:
    """A gzip member of ``prefix`` + ``zero_mib`` MiB of zeros, built from one compressed MiB
    repeated (a full flush makes the pieces identical), so a GB-sized payload costs nothing to make.
    The CRC is not computed: a reader must refuse the file long before it reaches it."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(b"\0" * MiB) + c.flush(zlib.Z_FULL_FLUSH)
    size = len(prefix) + zero_mib * MiB
    body = head + piece * zero_mib + c.flush(zlib.Z_FINISH)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + struct.pack("<II", 0, (isize or size) % 2**32)


def test_gzip_bombs_are_refused_by_declared_and_actual_size_without_inflating(tmp_path: Path) -> None:
    header = nib.Nifti1Image(np.zeros((64, 64, 64), np.uint8), np.eye(4)).header.binaryblock + b"\0" * 4
    honest = tmp_path / "honest.nii.gz"
    honest.write_bytes(gzip_of_zeros(header, 3 * 1024))  # 3 GiB of zeros in ~3 MB
    liar = tmp_path / "liar.nii.gz"
    liar.write_bytes(gzip_of_zeros(header, 3 * 1024, isize=1000))  # the trailer claims 1000 bytes
    wrapped = tmp_path / "wrapped.nii.gz"
    wrapped.write_bytes(gzip_of_zeros(header, 4 * 1024))  # 4 GiB + 352 bytes: ISIZE wraps to 352
    assert honest.stat().st_size < 4 * MiB
    big = nib.Nifti1Header()  # a header alone: no array of the declared size is made
    big.set_data_shape((1024, 512, 512))
    big.set_data_dtype(np.uint8)
    big["vox_offset"] = 352
    over = tmp_path / "over.nii.gz"
    over.write_bytes(gzip_of_zeros(big.binaryblock + b"\0" * 4, 256))
    tracemalloc.start()
    try:
        # an honest header with more voxels than allowed: refused by the header, before inflating
        with pytest.raises(volumes.VolumeTooLarge, match="1024x512x512 = 268435456 voxels, over the limit of 2097152"):
            read_volume(over, max_voxels=128**3)
        with pytest.raises(VolumeError, match="declares 3221225824 uncompressed bytes, over the limit"):
            read_volume(honest, max_bytes=64 * MiB)
        for bomb in (liar, wrapped):
            with pytest.raises(VolumeError, match="decompresses to more than 67108864 bytes"):
                read_volume(bomb, max_bytes=64 * MiB)
        with pytest.raises(VolumeError, match="more than"):  # the default cap follows max_voxels
            read_volume(liar, max_voxels=128**3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB  # streamed: never inflated into memory


def test_check_gzip_refuses_a_cut_stream(tmp_path: Path) -> None:
    ok = tmp_path / "ok.nii.gz"
    write_phantom(ok, "ct", SHAPE, SPACING)
    assert check_gzip(ok, 64 * MiB) == 352 + int(np.prod(SHAPE)) * 2  # header + int16 voxels
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(ok.read_bytes()[:-100])
    with pytest.raises(VolumeError, match="truncated|corrupt"):
        check_gzip(cut, 2**32)  # whatever the cut trailer declares, the stream ends early


def test_truncated_gzip_is_reported_as_truncated_not_over_the_limit(tmp_path: Path) -> None:
    p = save_nifti(tmp_path / "t.nii.gz", ct_phantom((40, 48, 48)))
    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 9, 400):
        cut_file = tmp_path / f"cut{cut}.nii.gz"
        # the last four bytes of a cut file are whatever came there: make them declare 4 GiB
        cut_file.write_bytes(data[:cut] + b"\xff\xff\xff\xff")
        with pytest.raises(VolumeError, match="truncated|corrupt") as e:
            read_volume(cut_file, max_voxels=64**3)
        assert "over the limit" not in str(e.value)


def test_a_second_gzip_member_counts_towards_the_cap(tmp_path: Path) -> None:
    ok = tmp_path / "ok.nii.gz"
    write_phantom(ok, "ct", SHAPE, SPACING)
    assert read_volume(ok)[0].shape == SHAPE
    two = tmp_path / "two.nii.gz"
    two.write_bytes(ok.read_bytes() + gzip_of_zeros(b"", 100, isize=10))
    with pytest.raises(VolumeError, match="more than"):
        read_volume(two, max_bytes=64 * MiB)


def test_zips_with_several_series_or_unsafe_paths_are_refused(tmp_path: Path) -> None:
    v = ct_phantom((10, 16, 16))
    a = write_dicom_series(tmp_path / "a", v, SPACING, series_uid="1.2.826.0.1.3680043.9.1")
    b = write_dicom_series(tmp_path / "b", v, SPACING, series_uid="1.2.826.0.1.3680043.9.2")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        for f in [*a.iterdir(), *b.iterdir()]:
            z.write(f, f"{f.parent.name}/{f.name}")
    with pytest.raises(VolumeError, match="2 DICOM series; pick one by its series UID"):
        read_volume(tmp_path / "two.zip")
    both = tmp_path / "both"
    both.mkdir()
    for f in [*a.iterdir(), *b.iterdir()]:
        (both / f"{f.parent.name}{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(VolumeError, match="2 DICOM series"):
        read_volume(both)
    for evil in ("../../etc/evil.dcm", "/tmp/evil.dcm", "series\\..\\..\\evil.dcm", "C:/evil.dcm"):
        with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
            z.write(next(a.iterdir()), "ok.dcm")
            z.writestr(evil, b"x")
        with pytest.raises(VolumeError, match="unsafe path"):
            read_volume(tmp_path / "evil.zip")
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(VolumeError, match="not a readable zip"):
        read_volume(tmp_path / "notzip.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with pytest.raises(VolumeError, match="empty"):
        read_volume(tmp_path / "empty.zip")


def test_zip_bombs_are_refused_by_declared_and_actual_size(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("s.dcm", "w") as f:
        for _ in range(64):
            f.write(b"\0" * MiB)
    assert bomb.stat().st_size < MiB
    with pytest.raises(VolumeError, match="declares 67108864 uncompressed bytes"):
        read_volume(bomb, max_bytes=16 * MiB)
    # a member whose headers understate its size is caught while streaming (or by its CRC)
    data = bytearray(bomb.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (1000).to_bytes(4, "little")  # central directory: uncompressed size
    lh = data.find(b"PK\x03\x04")
    data[lh + 22 : lh + 26] = (1000).to_bytes(4, "little")  # local header (also written after the data)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="corrupt|more than"):
        read_volume(liar, max_bytes=16 * MiB)
    enc = bytearray(
        zip_folder(tmp_path / "enc.zip", write_dicom_series(tmp_path / "e", ct_phantom((8, 8, 8)))).read_bytes()
    )
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the 'encrypted' flag bit everywhere
        i = enc.find(sig)
        while i >= 0:
            enc[i + off] |= 1
            i = enc.find(sig, i + 4)
    (tmp_path / "enc.zip").write_bytes(bytes(enc))
    with pytest.raises(VolumeError, match="encrypted"):
        read_volume(tmp_path / "enc.zip")


def test_detached_data_must_sit_beside_its_header(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"top secret" * 500)
    up = tmp_path / "uploads"
    up.mkdir()
    mhd = "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile = {}\n"
    nhdr = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 8\nencoding: raw\ndata file: {}\n"
    for ref in (str(secret), "../secret.raw", "..\\secret.raw"):
        (up / "evil.mhd").write_text(mhd.format(ref))
        with pytest.raises(VolumeError, match="outside its folder"):
            read_volume(up / "evil.mhd")
        (up / "evil.nhdr").write_text(nhdr.format(ref))
        with pytest.raises(VolumeError, match="outside its folder"):
            read_volume(up / "evil.nhdr")
    (up / "evil.nrrd").write_text(nhdr.format(secret) + "\n")  # a .nrrd may name a data file too
    with pytest.raises(VolumeError, match="outside its folder"):
        read_volume(up / "evil.nrrd")
    (up / "lost.mhd").write_text(mhd.format("lost.raw"))
    with pytest.raises(VolumeError, match="missing"):
        read_volume(up / "lost.mhd")
    (up / "fine.raw").write_bytes(bytes(range(256)) * 2)
    (up / "fine.mhd").write_text(mhd.format("fine.raw"))
    arr, _ = read_volume(up / "fine.mhd")
    assert arr.shape == (8, 8, 8) and arr.max() == 255


def test_headers_that_overstate_their_size_are_refused_before_allocating(tmp_path: Path) -> None:
    big = (
        "ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementType = MET_DOUBLE\n{}ElementDataFile = LOCAL\n"
    )
    (tmp_path / "raw.mha").write_bytes(big.format("").encode() + b"\0" * 4096)
    with pytest.raises(VolumeError, match="declares 8000000000 bytes of voxel data but holds only"):
        read_volume(tmp_path / "raw.mha")
    (tmp_path / "z.mha").write_bytes(big.format("CompressedData = True\n").encode() + zlib.compress(b"\0" * 4096))
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        read_volume(tmp_path / "z.mha")
    with pytest.raises(VolumeError, match="over the limit"):
        read_volume(tmp_path / "z.mha", max_bytes=64 * MiB)


# ------------------------------------------------------------------------------------ DICOM as hospitals export it
def test_dicom_files_are_found_by_content_whatever_their_names(tmp_path: Path) -> None:
    from model.data.datasets import find_scans
    from model.data.volumes import is_dicom_file

    v = np.rint(ct_phantom((10, 16, 16)))
    ref, ref_sp = read_volume(save_dicom_series(tmp_path / "src" / "dcm", v))
    uid = "1.3.12.2.1107.5.1.4.99.30000024"
    folders = {
        "uids": save_dicom_series(tmp_path / "src" / "uids", v, uid=uid, name="{uid}.{k}"),  # no extension
        "ima": save_dicom_series(tmp_path / "src" / "ima", v, name="PHANTOM.CT.THORAX.0001.{k:04d}.2024.IMA"),
    }
    assert all("." in f.name and not f.name.endswith(".dcm") for f in folders["uids"].iterdir())
    nopre = tmp_path / "src" / "nopreamble"  # the same files without the 128-byte preamble and "DICM"
    nopre.mkdir()
    for f in folders["uids"].iterdir():
        (nopre / f.name).write_bytes(f.read_bytes()[132:])
    folders["nopreamble"] = nopre
    for name, folder in folders.items():
        assert all(is_dicom_file(f) for f in folder.iterdir()), name
        arr, sp = read_volume(folder)
        assert np.array_equal(arr, ref) and np.allclose(sp, ref_sp), name
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            for f in folder.iterdir():
                z.write(f, f"export/{f.name}")
        assert np.array_equal(read_volume(tmp_path / f"{name}.zip")[0], ref), name
    others = tmp_path / "src" / "others"  # extension-less files that are not DICOM
    others.mkdir()
    (others / "README").write_text("not DICOM")
    (others / "1.2.3.4").write_bytes(b"\x02\x00" + bytes(200))  # a DICOM-like first tag, then junk
    (others / "short").write_bytes(b"DICM")
    os.mkfifo(others / "pipe")  # never opened: a reader would wait on it forever
    save_nifti(tmp_path / "src" / "scan.nii.gz", v)
    assert not any(is_dicom_file(f) for f in [*others.iterdir(), tmp_path / "src" / "scan.nii.gz"])
    found = {p.relative_to(tmp_path / "src").as_posix() for p in find_scans(tmp_path / "src")}
    assert found == {"dcm", "uids", "ima", "nopreamble", "scan.nii.gz"}


def _two_series(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A folder and a zip holding two CT series (10 and 12 slices) under UID file names."""
    uids = ("1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.22")
    vols = {uids[0]: np.rint(ct_phantom((10, 16, 16))), uids[1]: np.rint(ct_phantom((12, 16, 16), seed=5))}
    both = tmp_path / "study"
    for (uid, v), desc in zip(vols.items(), ("Thorax 1.0 B31f", "Topogram"), strict=True):
        save_dicom_series(both, v, uid=uid, name="{uid}.{k}", description=desc)
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as z:
        for f in sorted(both.iterdir()):
            z.write(f, f"DICOM/{f.name}")
    ras = {uid: v[:, ::-1, ::-1] for uid, v in vols.items()}  # LPS -> RAS: x and y reversed
    return both, tmp_path / "study.zip", ras


def test_several_series_are_listed_and_picked_by_uid(tmp_path: Path) -> None:
    from model.data.volumes import dicom_series

    both, zipped, ras = _two_series(tmp_path)
    a, b = ras
    assert dicom_series(both) == [
        {"series_uid": a, "slices": 10, "modality": "CT", "description": "Thorax 1.0 B31f"},
        {"series_uid": b, "slices": 12, "modality": "CT", "description": "Topogram"},
    ]
    for path in (both, zipped):
        with pytest.raises(VolumeError) as e:
            read_volume(path, untrusted=True)
        msg = str(e.value)
        assert msg.startswith(f"{path.name}: holds 2 DICOM series; pick one by its series UID"), msg
        assert f"{a} (CT, 'Thorax 1.0 B31f', 10 slices); {b} (CT, 'Topogram', 12 slices)" in msg
        assert str(tmp_path) not in msg
        for uid, expect in ras.items():
            arr, _ = read_volume(path, series_uid=uid, untrusted=True)
            assert arr.shape == expect.shape and np.array_equal(arr, expect), (path.name, uid)
        with pytest.raises(VolumeError) as e:
            read_volume(path, series_uid=" 1.2.3 ", untrusted=True)
        msg = str(e.value)
        assert "no DICOM series with the UID '1.2.3'" in msg and a in msg and b in msg
        assert str(tmp_path) not in msg
    one, _ = read_volume(tmp_path / "study.zip", series_uid=f"{b}\0")  # NUL padding, as in headers
    assert one.shape[0] == 12
    with pytest.raises(VolumeError, match="series UID is empty"):
        read_volume(both, series_uid="  ")
    scan = save_nifti(tmp_path / "scan.nii.gz", ct_phantom((24, 32, 28)))
    with pytest.raises(VolumeError, match="picks one series of a DICOM folder or .zip"):
        read_volume(scan, series_uid=a)


# ------------------------------------------------------------------------------------ uploads: one file, bounded


def _nrrd(tail: str, pad_lines: int = 0) -> bytes:
    pad = "".join(f"# comment {i:06d} {'x' * 50}\n" for i in range(pad_lines))
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n{pad}{tail}".encode()


def _mha(tail: str, pad_lines: int = 0) -> bytes:
    pad = "".join(f"Comment = line {i:06d} {'x' * 50}\n" for i in range(pad_lines))
    return f"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n{pad}{tail}".encode()


def test_detached_data_are_found_wherever_the_header_names_them(tmp_path: Path) -> None:
    """The whole header is parsed (not its first 64 KiB): a data file named after 1200 or 12000
    padding lines is refused outside the folder for local reads, and refused outright for uploads,
    with a message that names no path."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 2)
    up = tmp_path / "up"
    up.mkdir()
    for pad in (0, 1200, 12000):  # up to ~0.85 MB of header
        for name, data in (
            ("p.nrrd", _nrrd(f"data file: {secret}\n\n", pad)),
            ("p.nhdr", _nrrd(f"data file: {secret}\n", pad)),
            ("p.mha", _mha(f"ElementDataFile = {secret}\n", pad)),
            ("p.mhd", _mha(f"ElementDataFile: {secret}\n", pad)),
        ):
            (up / name).write_bytes(data)
            with pytest.raises(VolumeError, match="outside its folder"):
                read_volume(up / name)
            with pytest.raises(VolumeError, match="refers to a separate data file; upload a single-file") as e:
                read_volume(up / name, untrusted=True)
            assert str(tmp_path) not in str(e.value) and "secret" not in str(e.value)
    # beside the header: a local read takes it, an upload does not
    (up / "fine.raw").write_bytes(bytes(range(256)) * 2)
    (up / "fine.mhd").write_bytes(_mha("ElementDataFile = fine.raw\n", 2000))
    (up / "fine.nhdr").write_bytes(_nrrd("data file: fine.raw\n", 2000))
    for name in ("fine.mhd", "fine.nhdr"):
        arr, _ = read_volume(up / name)
        assert arr.shape == (8, 8, 8) and arr.max() == 255
        with pytest.raises(VolumeError, match="separate data file"):
            read_volume(up / name, untrusted=True)
    # attached data after a long header are fine for both
    (up / "attached.nrrd").write_bytes(_nrrd("\n", 12000) + bytes(range(256)) * 2)
    (up / "attached.mha").write_bytes(_mha("ElementDataFile = LOCAL\n", 12000) + bytes(range(256)) * 2)
    for name in ("attached.nrrd", "attached.mha"):
        arr, _ = read_volume(up / name, untrusted=True)
        assert arr.shape == (8, 8, 8) and arr.max() == 255


def test_metaimage_lines_metaio_would_read_otherwise_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(512))
    pad = "Comment = " + "x" * 600 + "\n"  # enough stored bytes for the size check to pass
    for i, tail in enumerate(
        (
            f"Comment\nElementDataFile = LOCAL\nElementDataFile = {secret}\n",  # MetaIO: Comment's value
            f"Comment =\nElementDataFile = LOCAL\nElementDataFile = {secret}\n",  # the same, empty value
            f"elementdatafile = LOCAL\nElementDataFile = {secret}\n",  # MetaIO skips an unknown key
            f"ElementDataFile\x00junk = {secret}\n",  # MetaIO's key ends at the NUL
            f"Comment = a\rElementDataFile = LOCAL\nElementDataFile = {secret}\n",  # '\r' inside a value
        )
    ):
        p = tmp_path / f"t{i}.mha"
        p.write_bytes(_mha(pad * 2 + tail) + bytes(512))
        for untrusted in (False, True):
            with pytest.raises(VolumeError, match="not a valid header"):
                read_volume(p, untrusted=untrusted)


def test_headers_must_end_within_a_mebibyte(tmp_path: Path) -> None:
    (tmp_path / "long.nrrd").write_bytes(_nrrd("", 20000) + bytes(2**20))  # no blank line in 1 MiB
    with pytest.raises(VolumeError, match="no end .* within 1 MiB"):
        read_volume(tmp_path / "long.nrrd")
    (tmp_path / "long.mha").write_bytes(_mha("", 20000) + b"ElementDataFile = LOCAL\n" + bytes(512))
    with pytest.raises(VolumeError, match="no ElementDataFile line within the first 1 MiB"):
        read_volume(tmp_path / "long.mha")
    (tmp_path / "magic.nrrd").write_bytes(b"NOT A NRRD\n\n" + bytes(512))
    with pytest.raises(VolumeError, match="NRRD magic"):
        read_volume(tmp_path / "magic.nrrd")


def test_upload_errors_name_no_server_path(tmp_path: Path) -> None:
    from model.data.volumes import scrub_paths

    p = tmp_path / "uploads" / "abc" / "upload.mha"
    msg = f'upload.mha: unreadable (couldn\'t open "{p}" or "/etc/shadow", see C:\\data\\x.raw); 1/2 mm/s'
    clean = scrub_paths(msg, p)
    assert clean == 'upload.mha: unreadable (couldn\'t open "upload.mha" or "(a path)", see (a path)); 1/2 mm/s'
    p.parent.mkdir(parents=True)
    p.write_bytes(_mha("ElementDataFile = LOCAL\n") + bytes(100))  # 512 bytes declared, 100 held
    with pytest.raises(VolumeError) as e:
        read_volume(p, untrusted=True)
    assert str(tmp_path) not in str(e.value)
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "nothere.nii.gz", untrusted=True)
    assert str(e.value).startswith("nothere.nii.gz: no such file") and str(tmp_path) not in str(e.value)


def test_streamed_nifti_reads_what_nibabel_reads(tmp_path: Path) -> None:
    """Scaling, byte order, NIfTI-2, trailing singleton axes and every axis permutation and flip
    give the array nibabel's canonical (RAS) image holds."""
    rng = np.random.default_rng(3)
    raw = rng.integers(-2000, 2000, (20, 24, 28)).astype(np.int16)  # (x, y, z) as stored
    perm = np.array([[0, -1.5, 0, 4], [0, 0, 2.0, -3], [-1.25, 0, 0, 7], [0, 0, 0, 1]])
    cases = {
        "scaled.nii.gz": nib.Nifti1Image(raw, np.diag([1.0, 1.25, 2.0, 1.0])),
        "big_endian.nii": nib.Nifti1Image(raw.astype(">f4"), np.diag([-1.0, 1.25, 2.0, 1.0])),
        "nifti2.nii.gz": nib.Nifti2Image(raw, perm),
        "single.nii.gz": nib.Nifti1Image(raw[..., None, None], perm),
        "u8.nii": nib.Nifti1Image((raw % 200).astype(np.uint8), np.diag([2.0, -2.0, -3.0, 1.0])),
    }
    cases["scaled.nii.gz"].header.set_slope_inter(0.5, -100.0)
    for name, img in cases.items():
        nib.save(img, tmp_path / name)
        ref = nib.as_closest_canonical(nib.squeeze_image(nib.load(tmp_path / name)))
        expect = np.asarray(ref.dataobj, dtype=np.float64).transpose(2, 1, 0)
        arr, sp = read_volume(tmp_path / name)
        assert arr.dtype == np.float32 and arr.flags.c_contiguous, name
        assert arr.shape == expect.shape and np.allclose(arr, expect, rtol=0, atol=1e-3), name
        assert np.allclose(sp, np.sqrt((ref.affine[:3, :3] ** 2).sum(axis=0))), name


def test_itk_images_are_reoriented_as_dicom_orient_does(tmp_path: Path) -> None:
    v = ct_phantom((12, 14, 16))
    for k, direction in enumerate(
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0), (-1, 0, 0, 0, 0, 1, 0, 1, 0))
    ):
        img = sitk.GetImageFromArray(v)
        img.SetSpacing((1.0, 1.5, 2.5))
        img.SetDirection(direction)
        sitk.WriteImage(img, str(tmp_path / f"d{k}.mha"))
        ref = sitk.DICOMOrient(img, "LPS")
        expect = sitk.GetArrayFromImage(ref)[:, ::-1, ::-1]  # LPS -> RAS: x and y reversed
        arr, sp = read_volume(tmp_path / f"d{k}.mha", untrusted=True)
        assert np.array_equal(arr, expect), direction
        assert np.allclose(sp, ref.GetSpacing()), direction


def test_reading_holds_one_float32_copy(tmp_path: Path) -> None:
    import tracemalloc

    import torch  # noqa: F401  (imported first: its own allocations are not the reader's)

    from model.data.volumes import load_for_model

    v = np.zeros((256, 256, 256), np.int16)  # (x, y, z)
    v[30:230, 40:220, 20:240] = 40
    v[0, 0, 0] = np.int16(-1000)
    img = nib.Nifti1Image(v, np.diag([-1.0, 1.0, 1.0, 1.0]))
    img.header.set_slope_inter(1.0, -24.0)  # scaled: float64 happens one slab at a time only
    nib.save(img, tmp_path / "v.nii.gz")
    out = 256**3 * 4  # 64 MiB: the old reader held two or three of these
    tracemalloc.start()
    try:
        arr, _ = read_volume(tmp_path / "v.nii.gz", untrusted=True)
        read_peak = tracemalloc.get_traced_memory()[1]
        del arr
        tracemalloc.reset_peak()
        m = load_for_model(tmp_path / "v.nii.gz", CT, untrusted=True)
        load_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m.shape == (128, 128, 128)
    assert read_peak < out + 40 * 2**20, read_peak / out  # the float32 array + a few slabs
    assert load_peak < out + 48 * 2**20, load_peak / out  # + the 128^3 grid: no second copy


def test_blank_checks_and_percentiles() -> None:
    from model.data.volumes import _percentile, check_not_blank

    with pytest.raises(VolumeError, match="every voxel has the value 0"):
        check_not_blank(np.zeros((8, 8, 8), np.float32), "ct", (-1024, 600))
    with pytest.raises(VolumeError, match="blank after windowing"):
        check_not_blank(np.linspace(-3000, -1024, 512, dtype=np.float32).reshape(8, 8, 8), "ct", (-1024, 600))
    check_not_blank(np.linspace(-3000, -1000, 512, dtype=np.float32).reshape(8, 8, 8), "ct", (-1024, 600))
    sparse = np.zeros((22, 22, 22), np.float32)  # 10648 voxels: the top 0.1% are 10
    sparse[0, 0, :10] = 5
    with pytest.raises(VolumeError, match="99.9th percentile is 0"):
        check_not_blank(sparse, "mri")
    sparse[0, 0, :20] = 5
    check_not_blank(sparse, "mri")
    big = np.random.default_rng(0).gamma(2.0, 50.0, 260**3).astype(np.float32).reshape(260, 260, 260)
    exact = float(np.percentile(big, 99.9))
    assert abs(_percentile(big, 99.9) - exact) < 0.01 * exact  # an even subsample of 2^24 voxels
    small = big[:200]
    assert _percentile(small, 99.9) == float(np.percentile(small, 99.9))  # up to 2^24 voxels: exact
