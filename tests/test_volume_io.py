"""Reading and writing volumes: formats, orientation, HU round trip, and every refused input."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from model.data.volumes import VolumeError, read_volume, to_model_space, write_volume
from model.hagan.config import HAGANConfig


def phantom(shape=(24, 32, 28), seed=0) -> np.ndarray:
    """A CT-like phantom in HU, indexed (z, y, x): air, a body ellipsoid, a bone ring, lungs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    v = np.full(shape, -1000.0, np.float32)
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    v[body] = 40
    v[body & ((x / 0.75) ** 2 + (y / 0.55) ** 2 > 0.85)] = 700
    v[((x - 0.35) / 0.25) ** 2 + (y / 0.35) ** 2 + (z / 0.8) ** 2 < 1] = -800
    v += rng.normal(0, 5, shape).astype(np.float32)
    return v


def save_nifti(path: Path, zyx: np.ndarray, spacing=(1.0, 1.25, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), np.diag([*spacing, 1.0])), path)
    return path


def save_dicom_series(folder: Path, zyx: np.ndarray, spacing=(1.0, 1.25, 2.0), uid="1.2.826.0.1.3680043.2.1125.1"):
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(zyx.astype(np.int16))
    img.SetSpacing(spacing)
    w = sitk.ImageFileWriter()
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
        w.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        w.Execute(s)
    return folder


CT = HAGANConfig(resolution=128, width=0.25, latent_dim=8, spacing=(1.5, 1.5, 2.0))


def test_nifti_round_trip_in_hounsfield_units_with_ras_affine(tmp_path: Path) -> None:
    v = np.random.default_rng(1).uniform(-1, 1, (16, 20, 24)).astype(np.float32)
    write_volume(tmp_path / "v.nii.gz", v, CT)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(np.diag(img.affine)[:3], CT.spacing)
    hu = np.asarray(img.dataobj).transpose(2, 1, 0)
    assert np.abs(hu - (-1024 + (v + 1) / 2 * 1624)).max() <= 0.5
    back, spacing = read_volume(tmp_path / "v.nii.gz")
    assert np.array_equal(back, hu.astype(np.float32)) and spacing == CT.spacing
    write_volume(tmp_path / "v.npy", v, CT)
    assert np.array_equal(np.load(tmp_path / "v.npy"), v)


def test_mri_is_written_as_float(tmp_path: Path) -> None:
    from model.hagan.config import Intensity

    mri = HAGANConfig(resolution=128, width=0.25, latent_dim=8, modality="mri", intensity=Intensity.for_modality("mri"))
    write_volume(tmp_path / "m.nii.gz", np.zeros((8, 8, 8), np.float32), mri)
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.get_data_dtype() == np.float32 and np.allclose(img.get_fdata(), 0.5)


def test_formats_give_the_same_array(tmp_path: Path) -> None:
    v = phantom()
    ref, sp = read_volume(save_nifti(tmp_path / "a.nii.gz", v))
    assert np.allclose(ref, v) and sp == (1.0, 1.25, 2.0)
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    for name in ("a.nrrd", "a.mha"):
        sitk.WriteImage(img, str(tmp_path / name))
        arr, sp2 = read_volume(tmp_path / name)
        assert np.allclose(arr, ref) and np.allclose(sp2, sp), name
    dcm = save_dicom_series(tmp_path / "dicom", np.rint(v))  # written in DICOM's LPS index order
    arr, sp3 = read_volume(dcm)
    ras = np.rint(v)[:, ::-1, ::-1]  # LPS -> RAS: x and y reversed
    assert arr.shape == ref.shape and np.abs(arr - ras).max() <= 1 and np.allclose(sp3, sp)
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as z:
        for f in sorted(dcm.iterdir()):
            z.write(f, f"series/{f.name}")
    arr, _ = read_volume(tmp_path / "series.zip")
    assert np.abs(arr - ras).max() <= 1


def test_flipped_and_permuted_affines_are_reoriented(tmp_path: Path) -> None:
    v = phantom(seed=2)
    xyz = v.transpose(2, 1, 0)
    flipped = np.diag([-1.0, 1.25, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz[::-1]), flipped), tmp_path / "f.nii.gz")
    perm = np.array([[0, 1.0, 0, 0], [1.25, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz.transpose(1, 0, 2)), perm), tmp_path / "p.nii.gz")
    for name in ("f.nii.gz", "p.nii.gz"):
        arr, sp = read_volume(tmp_path / name)
        assert np.allclose(arr, v), name
        assert np.allclose(sp, (1.0, 1.25, 2.0)), name


def test_to_model_space_windows_trims_and_resamples() -> None:
    v = phantom((40, 32, 32))
    v[:5] = -1024  # blank axial slices at the bottom
    v[-3:] = -3000
    m = to_model_space(v, (1, 1, 1), CT)
    assert m.shape == (128, 128, 128) and m.dtype == np.float32
    assert m.min() >= -1 and m.max() <= 1
    assert m[0].max() > -1  # the blank slices were trimmed, the first kept slice has the body
    untrimmed = to_model_space(v, (1, 1, 1), CT, trim_blank=False)
    assert untrimmed[0].max() == -1
    # the window: 700 HU bone clips to 600 HU -> +1
    assert np.isclose(m.max(), 1.0)


def test_partial_nan_is_filled_all_nan_refused(tmp_path: Path) -> None:
    v = phantom()
    v[0, 0, :5] = np.nan
    arr, _ = read_volume(save_nifti(tmp_path / "some.nii.gz", v))
    assert np.isfinite(arr).all() and arr[0, 0, 0] == np.nanmin(v)
    with pytest.raises(VolumeError, match="NaN"):
        read_volume(save_nifti(tmp_path / "all.nii.gz", np.full((10, 10, 10), np.nan, np.float32)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "corrupt|unreadable|not gzip"),
        (lambda p: p.write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000))), "unreadable|corrupt"),
    ],
)
def test_corrupt_files_are_refused(tmp_path: Path, make, match: str) -> None:
    p = tmp_path / "bad.nii.gz"
    make(p)
    with pytest.raises(VolumeError, match=match):
        read_volume(p)


def test_truncated_nifti_is_refused(tmp_path: Path) -> None:
    p = save_nifti(tmp_path / "t.nii.gz", phantom())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated|corrupt"):
        read_volume(p)
    raw = save_nifti(tmp_path / "t.nii", phantom())
    raw.write_bytes(raw.read_bytes()[:2000])
    with pytest.raises(VolumeError, match="t.nii"):
        read_volume(raw)


def test_2d_4d_and_tiny_images_are_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), tmp_path / "2d.nii.gz")
    with pytest.raises(VolumeError, match="2D"):
        read_volume(tmp_path / "2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(VolumeError, match="4D"):
        read_volume(tmp_path / "4d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 1), np.float32), np.eye(4)), tmp_path / "4d1.nii.gz")
    assert read_volume(tmp_path / "4d1.nii.gz")[0].shape == (16, 16, 16)  # a trailing singleton is fine
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), np.eye(4)), tmp_path / "thin.nii.gz")
    with pytest.raises(VolumeError, match="at least 8"):
        read_volume(tmp_path / "thin.nii.gz")


def test_unknown_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="unknown format"):
        read_volume(tmp_path / "x.png")
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")


def test_gzip_bomb_is_refused_by_size_without_inflating(tmp_path: Path) -> None:
    header = nib.Nifti1Image(np.zeros((1024, 512, 512), np.uint8), np.eye(4)).header
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=6) as f:  # 256 MiB of zeros -> a few hundred kB on disk
        f.write(header.binaryblock + b"\x00" * 4)
        chunk = b"\x00" * (1 << 20)
        for _ in range(256):
            f.write(chunk)
    assert bomb.stat().st_size < 2**20
    with pytest.raises(VolumeError, match="declares"):  # refused by its declared size
        read_volume(bomb, max_voxels=128**3)
    # the declared size (ISIZE, modulo 2^32) can lie: the streaming cap refuses it as well
    data = bytearray(bomb.read_bytes())
    data[-4:] = (1000).to_bytes(4, "little")
    liar = tmp_path / "liar.nii.gz"
    liar.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="more than"):  # refused by its actual size, streaming
        read_volume(liar, max_voxels=128**3)


def test_zip_with_several_series_or_unsafe_paths_is_refused(tmp_path: Path) -> None:
    a = save_dicom_series(tmp_path / "a", np.rint(phantom((10, 16, 16))), uid="1.2.3.4.1")
    b = save_dicom_series(tmp_path / "b", np.rint(phantom((10, 16, 16), seed=3)), uid="1.2.3.4.2")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        for f in list(a.iterdir()) + list(b.iterdir()):
            z.write(f, f"{f.parent.name}/{f.name}")
    with pytest.raises(VolumeError, match="2 DICOM series"):
        read_volume(tmp_path / "two.zip")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("../../etc/evil.dcm", b"x")
    with pytest.raises(VolumeError, match="unsafe path"):
        read_volume(tmp_path / "evil.zip")
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(VolumeError, match="zip"):
        read_volume(tmp_path / "notzip.zip")
