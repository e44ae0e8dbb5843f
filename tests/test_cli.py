"""The `voxgen` command line as a user runs it: init, info, generate, encode, reconstruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def voxgen(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "model.cli", *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"voxgen {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny"
    voxgen(
        "init",
        "--family",
        "hagan",
        "--resolution",
        "128",
        "--width",
        "0.25",
        "--latent-dim",
        "32",
        "--spacing",
        "1.5",
        "1.5",
        "2",
        "--seed",
        "3",
        "-o",
        str(d),
    )
    return d


def test_init_and_info_json(tiny_dir: Path) -> None:
    info = json.loads(voxgen("info", str(tiny_dir), "--json").stdout)
    assert info["config"]["family"] == "hagan" and info["config"]["resolution"] == 128
    assert info["parameters"]["total_parameters"] == sum(
        info["parameters"][k] for k in ("ga", "gl", "gh", "dh", "dl", "eh", "eg")
    )
    full = json.loads(voxgen("info", str(tiny_dir), "--json").stdout)
    assert full == info


def test_info_of_the_full_256_model_prints_the_authors_counts(tmp_path: Path) -> None:
    voxgen("init", "--resolution", "256", "-o", str(tmp_path / "m"))
    p = json.loads(voxgen("info", str(tmp_path / "m"), "--json").stdout)["parameters"]
    assert (p["G"], p["D"], p["E^H"], p["E^G"]) == (52_518_210, 7_402_258, 161_152, 19_663_264)


def test_generate_nifti_in_hounsfield_units_with_the_affine(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "vol.nii.gz"
    p = voxgen("generate", "--model", str(tiny_dir), "--seed", "7", "--device", "cpu", "-o", str(out))
    assert "seed 7" in p.stderr and str(tiny_dir) in p.stderr  # says which model and seed it used
    img = nib.load(out)
    assert img.shape == (128, 128, 128)
    assert img.get_data_dtype() == np.int16
    assert np.allclose(np.diag(img.affine)[:3], [1.5, 1.5, 2.0])
    hu = np.asarray(img.dataobj)
    assert hu.min() >= -1024 and hu.max() <= 600  # the CT window of the model's intensity mapping
    # .npy gives the raw model-space array; the same seed gives the same volume
    voxgen("generate", "--model", str(tiny_dir), "--seed", "7", "-o", str(tmp_path / "vol.npy"))
    raw = np.load(tmp_path / "vol.npy")
    assert raw.shape == (128, 128, 128) and raw.dtype == np.float32
    expect = np.round(-1024 + (raw + 1) / 2 * 1624).transpose(2, 1, 0)  # (D,H,W) -> NIfTI (x,y,z)
    assert np.abs(expect - hu).max() <= 1


def test_generate_n_numbers_the_files(tiny_dir: Path, tmp_path: Path) -> None:
    voxgen("generate", "--model", str(tiny_dir), "--seed", "1", "--n", "2", "-o", str(tmp_path / "s.npy"))
    a, b = np.load(tmp_path / "s_000.npy"), np.load(tmp_path / "s_001.npy")
    assert not np.array_equal(a, b)


def test_encode_and_reconstruct_a_scan(tiny_dir: Path, tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    voxgen("generate", "--model", str(tiny_dir), "--seed", "2", "-o", str(scan))
    # bit for bit needs one thread: with two, on Intel AVX-512/AMX CPUs about one process in ten sums in
    # another order and differs by ~5e-5 (the README's promise says so); one thread pins it
    one = os.environ | {"OMP_NUM_THREADS": "1"}
    voxgen("encode", "--model", str(tiny_dir), str(scan), "-o", str(tmp_path / "z.npy"), env=one)
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (1, 32) and np.isfinite(z).all()
    g, r = tmp_path / "g.npy", tmp_path / "r.npy"
    voxgen("generate", "--model", str(tiny_dir), "--latent", str(tmp_path / "z.npy"), "-o", str(g), env=one)
    voxgen("reconstruct", "--model", str(tiny_dir), str(scan), "-o", str(r), env=one)
    assert np.array_equal(np.load(g), np.load(r))  # .npy: the model grid
    # .nii.gz: on the scan's own grid and affine, so it overlays the scan
    voxgen("reconstruct", "--model", str(tiny_dir), str(scan), "-o", str(tmp_path / "r.nii.gz"))
    a, b = nib.load(scan), nib.load(tmp_path / "r.nii.gz")
    assert b.shape == a.shape and np.allclose(b.affine, a.affine)
    p = voxgen(
        "reconstruct",
        "--model",
        str(tiny_dir),
        str(scan),
        "--space",
        "input",
        "-o",
        str(tmp_path / "x.npy"),
        check=False,
    )
    assert p.returncode != 0 and "--space input" in p.stderr
    # an output the chosen space cannot be written as is refused before the scan is even read (a scan
    # that does not exist here): it failed after encoding and generating before
    for out, why in (("x.nrrd", "--space input writes .nii.gz or .nii"), ("x.txt", "cannot write")):
        cmd = ("reconstruct", "--model", str(tiny_dir), str(tmp_path / "absent.nii.gz"), "-o", str(tmp_path / out))
        p = voxgen(*cmd, check=False)
        assert p.returncode != 0 and why in p.stderr, p.stderr


def test_encode_and_reconstruct_pick_a_series_by_uid(tiny_dir: Path, tmp_path: Path) -> None:
    from model.data.phantoms import ct_phantom as phantom
    from tests.test_volumes import save_dicom_series

    a, b = "1.2.826.0.1.3680043.8.498.31", "1.2.826.0.1.3680043.8.498.32"
    study = tmp_path / "study"
    save_dicom_series(study, np.rint(phantom((20, 32, 32))), uid=a, name="{uid}.{k}")
    save_dicom_series(study, np.rint(phantom((24, 32, 32), seed=4)) + 300, uid=b, name="{uid}.{k}")
    p = voxgen("encode", "--model", str(tiny_dir), str(study), "-o", str(tmp_path / "z.npy"), check=False)
    assert p.returncode == 2 and "holds 2 DICOM series" in p.stderr and a in p.stderr and b in p.stderr
    assert not (tmp_path / "z.npy").exists()
    for uid in (a, b):
        voxgen("encode", "--model", str(tiny_dir), str(study), "--series-uid", uid, "-o", str(tmp_path / f"{uid}.npy"))
    assert not np.array_equal(np.load(tmp_path / f"{a}.npy"), np.load(tmp_path / f"{b}.npy"))
    p = voxgen(
        "reconstruct",
        "--model",
        str(tiny_dir),
        str(study),
        "--series-uid",
        "1.2.3",
        "-o",
        str(tmp_path / "r.npy"),
        check=False,
    )
    assert p.returncode == 2 and "no DICOM series with the UID '1.2.3'" in p.stderr and a in p.stderr
    voxgen("reconstruct", "--model", str(tiny_dir), str(study), "--series-uid", b, "-o", str(tmp_path / "r.nii.gz"))
    assert nib.load(tmp_path / "r.nii.gz").shape == (32, 32, 24)  # series b's own grid (x, y, z)


def test_clear_errors(tiny_dir: Path, tmp_path: Path) -> None:
    p = voxgen("generate", "--model", str(tmp_path / "nope"), "--seed", "1", "-o", str(tmp_path / "x.npy"), check=False)
    assert p.returncode != 0 and "not a model directory" in p.stderr
    p = voxgen("generate", "--model", str(tiny_dir), "--seed", "-4", "-o", str(tmp_path / "x.npy"), check=False)
    assert p.returncode != 0 and "seed" in p.stderr
    p = voxgen(
        "generate", "--model", str(tiny_dir), "--seed", "1", "--label", "a", "-o", str(tmp_path / "x.npy"), check=False
    )
    assert p.returncode != 0 and "not class-conditional" in p.stderr
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"junk" * 10)
    p = voxgen("encode", "--model", str(tiny_dir), str(bad), "-o", str(tmp_path / "z.npy"), check=False)
    assert p.returncode == 2 and "bad.nii.gz" in p.stderr
    assert not (tmp_path / "z.npy").exists()


def test_help_lists_every_command_without_loading_torch() -> None:
    """``voxgen --help`` and each command's ``--help`` answer without importing torch (2-3 s of a
    CPU's time before a word of help; the attributes fit-direction offers come from a torch-free module)."""
    code = (
        "import sys, contextlib, io\n"
        "from model.cli import build_parser\n"
        "p = build_parser()\n"
        "helps = {}\n"
        "for argv in (['--help'], ['fit-direction', '--help'], ['train', '--help'], ['generate', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        p.parse_args(argv)\n"
        "    helps[argv[0]] = out.getvalue()\n"
        "    assert helps[argv[0]].startswith('usage'), argv\n"
        "print('bright_tissue_ml' in helps['fit-direction'], 'torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "False"], p.stdout
