"""Reading and writing volumes: formats, orientation, HU round trip, and every refused input."""

from __future__ import annotations

import gzip
import os
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


def save_dicom_series(
    folder: Path,
    zyx: np.ndarray,
    spacing=(1.0, 1.25, 2.0),
    uid="1.2.826.0.1.3680043.2.1125.1",
    name="slice{k:03d}.dcm",
    description: str | None = None,
):
    """Write a (z, y, x) array as one DICOM series, a file a slice named ``name.format(k=k, uid=uid)``."""
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
    import tracemalloc

    from model.data.volumes import VolumeTooLarge

    def bomb(name: str, shape: tuple[int, int, int], zero_mib: int) -> Path:
        header = nib.Nifti1Header()  # a header alone: no array of the declared size is made
        header.set_data_shape(shape)
        header.set_data_dtype(np.uint8)
        header["vox_offset"] = 352
        p = tmp_path / name
        with gzip.open(p, "wb", compresslevel=6) as f:  # MiBs of zeros -> a few hundred kB on disk
            f.write(header.binaryblock + b"\x00" * 4)
            chunk = b"\x00" * (1 << 20)
            for _ in range(zero_mib):
                f.write(chunk)
        assert p.stat().st_size < 2**20
        return p

    tracemalloc.start()
    try:
        # an honest header over the limit is refused by the header, before the stream is inflated
        with pytest.raises(VolumeTooLarge, match="1024x512x512 = 268435456 voxels, over the limit of 2097152"):
            read_volume(bomb("big.nii.gz", (1024, 512, 512), 256), max_voxels=128**3)
        # a header that fits but data that go on (256 MiB behind a 64^3 header): the streaming cap
        liar = bomb("liar.nii.gz", (64, 64, 64), 256)
        with pytest.raises(VolumeError, match="declares 268435808 uncompressed bytes, over the limit"):
            read_volume(liar, max_voxels=128**3)
        data = bytearray(liar.read_bytes())
        data[-4:] = (1000).to_bytes(4, "little")  # the declared size (ISIZE, modulo 2^32) can lie
        (tmp_path / "liar2.nii.gz").write_bytes(bytes(data))
        with pytest.raises(VolumeError, match="decompresses to more than"):
            read_volume(tmp_path / "liar2.nii.gz", max_voxels=128**3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20  # neither inflated into memory


def test_truncated_gzip_is_reported_as_truncated_not_over_the_limit(tmp_path: Path) -> None:
    p = save_nifti(tmp_path / "t.nii.gz", phantom((40, 48, 48)))
    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 9, 400):
        cut_file = tmp_path / f"cut{cut}.nii.gz"
        # the last four bytes of a cut file are whatever came there: make them declare 4 GiB
        cut_file.write_bytes(data[:cut] + b"\xff\xff\xff\xff")
        with pytest.raises(VolumeError, match="truncated|corrupt") as e:
            read_volume(cut_file, max_voxels=64**3)
        assert "over the limit" not in str(e.value)


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


# ------------------------------------------------------------------------------------ DICOM as hospitals export it
def test_dicom_files_are_found_by_content_whatever_their_names(tmp_path: Path) -> None:
    from model.data.datasets import find_scans
    from model.data.volumes import is_dicom_file

    v = np.rint(phantom((10, 16, 16)))
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
    vols = {uids[0]: np.rint(phantom((10, 16, 16))), uids[1]: np.rint(phantom((12, 16, 16), seed=5))}
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
    scan = save_nifti(tmp_path / "scan.nii.gz", phantom())
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
    v = phantom((12, 14, 16))
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
