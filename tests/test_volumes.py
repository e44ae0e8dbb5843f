"""Volumes in and out (model/data/volumes.py) and the synthetic phantoms (model/data/phantoms.py):
formats, orientation, the HU round trip, the paper's preprocessing, and every refused input."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

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
from model.hagan.config import HAGANConfig, Intensity

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
        with pytest.raises(VolumeError, match="truncated|corrupt"):
            read_volume(p)


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
    tracemalloc.start()
    try:
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
