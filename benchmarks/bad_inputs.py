"""Bad uploads against the in-process API: every one must get a 4xx, and the server's memory stay bounded.

Builds a corpus of bad files (truncated, 2D, 4D, NaN, Inf, empty, blank, headers that lie, gzip and
zip bombs, zip path traversal, DICOM junk, NRRD / MetaImage headers naming detached data files --
padded past 64 KiB and not --, headers with no end, huge headers, ...), posts each to POST /encode
of an app on the embedded queue (FastAPI TestClient, default settings: VOXGEN_MAX_UPLOAD_MB 512,
VOXGEN_MAX_INPUT_VOXELS 512^3) in a fresh process, and prints one row per file (status code,
message) and that process's peak RSS (resource.getrusage).  Then, each in a fresh process, valid
uploads at the voxel limit are posted and encoded (the embedded queue runs the job in the same
process, as `voxgen serve` does without Redis), with the peak RSS of the whole run.

    python benchmarks/bad_inputs.py [--limit-only | --bad-only] [--max-rss-gib 1.5]

Exits non-zero if a bad file gets anything but a 4xx, a valid one is refused, or a peak RSS passes
the bound.  The model is an untrained 128^3 HA-GAN (width 0.25, latent 16) made by `voxgen init`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MiB = 2**20
LIMIT = 512**3  # the default VOXGEN_MAX_INPUT_VOXELS


def peak_rss_mib() -> float:
    """This process's peak RSS (getrusage; KiB on Linux).  The children that measure are started by
    a driver that holds nothing large, since Linux carries ru_maxrss over from the parent."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mib() -> float | None:
    """The same from /proc/self/status (VmHWM: the address space's own high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------ the corpus
def nifti_bytes(v_xyz: np.ndarray, affine: np.ndarray | None = None, gz: bool = True, nifti2: bool = False) -> bytes:
    import nibabel as nib

    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(v_xyz, np.eye(4) if affine is None else affine)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("v.nii.gz" if gz else "v.nii")
        nib.save(img, p)
        return p.read_bytes()


def header_gz(shape: tuple[int, ...], dtype: type = np.uint8, zero_mib: int = 0, isize: int | None = None) -> bytes:
    """A gzip of a bare NIfTI header declaring ``shape`` followed by ``zero_mib`` MiB of zeros, built
    from one compressed MiB repeated (a GiB of zeros costs ~1 MB and no time).  ``isize`` overrides
    the trailer's declared size (a lie)."""
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["vox_offset"] = 352
    prefix = h.binaryblock + bytes(4)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    body = head + piece * zero_mib + c.flush(zlib.Z_FINISH)
    size = len(prefix) + zero_mib * MiB
    crc = zlib.crc32(prefix)  # the zeros' part only for small files (a bomb is refused long before)
    for _ in range(zero_mib if zero_mib <= 16 else 0):
        crc = zlib.crc32(bytes(MiB), crc)
    trailer = crc.to_bytes(4, "little") + ((isize if isize is not None else size) % 2**32).to_bytes(4, "little")
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + trailer


def phantom_xyz(shape: tuple[int, int, int] = (32, 32, 32), dtype: type = np.int16) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[::-1]], indexing="ij")
    v = np.where(x**2 + y**2 + z**2 < 0.6, 40.0, -1000.0).astype(dtype)
    return np.ascontiguousarray(v.transpose(2, 1, 0))


def nrrd(tail: str, pad_lines: int = 0, data: bytes = b"") -> bytes:
    pad = "".join(f"# padding {i:06d} {'x' * 40}\n" for i in range(pad_lines))
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nencoding: raw\n{pad}{tail}".encode() + data


def mha(tail: str, pad_lines: int = 0, data: bytes = b"", dims: str = "16 16 16", etype: str = "MET_UCHAR") -> bytes:
    pad = "".join(f"Comment = padding {i:06d} {'x' * 40}\n" for i in range(pad_lines))
    head = f"ObjectType = Image\nNDims = {len(dims.split())}\nDimSize = {dims}\nElementType = {etype}\n"
    return (head + pad + tail).encode() + data


def sitk_bytes(v_zyx: np.ndarray, suffix: str, compress: bool = False, components: bool = False) -> bytes:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(v_zyx, isVector=components)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"v{suffix}"
        sitk.WriteImage(img, str(p), compress)
        return p.read_bytes()


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def dicom_zip(series: int = 1) -> bytes:
    from model.data.phantoms import write_dicom_series

    with tempfile.TemporaryDirectory() as d:
        members = {}
        for s in range(series):
            folder = write_dicom_series(
                Path(d) / f"s{s}",
                phantom_xyz((16, 16, 10)).transpose(2, 1, 0),
                (1.0, 1.0, 2.0),
                series_uid=f"1.2.826.0.1.3680043.9.77.{s + 1}",
            )
            members |= {f"s{s}/{f.name}": f.read_bytes() for f in sorted(folder.iterdir())}
    return zip_of(members)


def zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("s.dcm", "w", force_zip64=True) as f:
        mib = bytes(MiB)
        for _ in range(1024):  # 1 GiB of zeros in ~1 MB
            f.write(mib)
    return buf.getvalue()


def encrypted_zip() -> bytes:
    data = bytearray(dicom_zip())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        while i >= 0:
            data[i + off] |= 1
            i = data.find(sig, i + 4)
    return bytes(data)


def corpus() -> list[tuple[str, str, Callable[[], bytes]]]:
    """(upload file name, what it is, its bytes)."""
    good = lambda: nifti_bytes(phantom_xyz((40, 40, 40)))  # noqa: E731
    rng = np.random.default_rng(0)
    secret = "/etc/passwd"
    ct = phantom_xyz((16, 16, 16)).transpose(2, 1, 0)
    nan = np.full((16, 16, 16), np.nan, np.float32)
    inf = np.full((16, 16, 16), np.inf, np.float32)
    inf[::2] = -np.inf
    complex_v = np.zeros((16, 16, 16), np.complex64)
    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    below = np.full((16, 16, 16), -2000, np.int16)
    below[::2] = -1500
    return [
        ("empty.nii.gz", "empty file", lambda: b""),
        ("junk.nii.gz", "random bytes named .nii.gz", lambda: rng.bytes(5000)),
        ("gz_random.nii.gz", "gzip of random bytes", lambda: gzip.compress(rng.bytes(5000))),
        ("plain.nii.gz", "an uncompressed .nii named .nii.gz", lambda: nifti_bytes(phantom_xyz(), gz=False)),
        ("truncated_half.nii.gz", "a .nii.gz cut in half", lambda: good()[: len(good()) // 2]),
        ("truncated_isize.nii.gz", "cut; its last bytes declare 4 GiB", lambda: good()[:3000] + b"\xff" * 4),
        ("truncated_tail.nii.gz", "cut 8 bytes before its end", lambda: good()[:-8]),
        ("truncated.nii", "an uncompressed .nii cut", lambda: nifti_bytes(phantom_xyz(), gz=False)[:5000]),
        ("header_only.nii", "a 64^3 header with no data", lambda: _bare(64)),
        ("header_lies.nii.gz", "256^3 int16 declared, 1 MiB held", lambda: header_gz((256, 256, 256), np.int16, 1)),
        ("2d.nii.gz", "a 2D image", lambda: nifti_bytes(np.zeros((64, 64), np.int16))),
        ("4d.nii.gz", "a 4D image (16^3 x 3)", lambda: nifti_bytes(np.zeros((16, 16, 16, 3), np.int16))),
        ("tiny.nii.gz", "4x4x4 voxels", lambda: nifti_bytes(np.zeros((4, 4, 4), np.int16))),
        ("thin.nii.gz", "64x64x1 (one slice)", lambda: nifti_bytes(np.zeros((64, 64, 1), np.int16))),
        ("nan.nii.gz", "every voxel NaN", lambda: nifti_bytes(nan)),
        ("inf.nii.gz", "every voxel +-inf", lambda: nifti_bytes(inf)),
        ("blank_zero.nii.gz", "every voxel 0 (blank)", lambda: nifti_bytes(np.zeros((32, 32, 32), np.int16))),
        ("blank_air.nii.gz", "nothing above the CT window", lambda: nifti_bytes(below)),
        ("complex.nii.gz", "complex voxels", lambda: nifti_bytes(complex_v)),
        ("rgb.nii.gz", "RGB voxels", lambda: nifti_bytes(rgb)),
        ("ni1_pair.nii", "the header of a .hdr/.img pair", lambda: _bare(32, magic=b"ni1")),
        ("nan_affine.nii.gz", "NaN in the affine (sform)", nan_affine),
        ("big_640.nii.gz", "640^3 uint8 of zeros (~260 MB in ~250 kB)", lambda: header_gz((640,) * 3, zero_mib=250)),
        ("big_header.nii.gz", "a 2048^3 float64 header", lambda: header_gz((2048,) * 3, np.float64)),
        ("gzip_bomb.nii.gz", "16^3 header + 1 GiB of zeros", lambda: header_gz((16, 16, 16), zero_mib=1024)),
        (
            "gzip_bomb_lie.nii.gz",
            "the same, trailer declares 1000",
            lambda: header_gz((16,) * 3, zero_mib=1024, isize=1000),
        ),
        ("zip_bomb.zip", "1 GiB of zeros in one member", zip_bomb),
        ("zip_traversal.zip", "member ../../etc/evil.dcm", lambda: zip_of({"../../etc/evil.dcm": b"x" * 200})),
        ("zip_absolute.zip", "member /tmp/evil.dcm", lambda: zip_of({"/tmp/evil.dcm": b"x" * 200})),
        ("zip_empty.zip", "an empty zip", lambda: zip_of({})),
        ("zip_junk.zip", "PK magic then garbage", lambda: b"PK\x03\x04" + rng.bytes(3000)),
        ("dicom_junk.zip", "a zip of non-DICOM files", lambda: zip_of({f"{i}.dcm": rng.bytes(2000) for i in range(5)})),
        ("dicom_two_series.zip", "two DICOM series in one zip", lambda: dicom_zip(2)),
        ("zip_encrypted.zip", "encrypted members", encrypted_zip),
        ("nrrd_detached.nrrd", f"data file: {secret}", lambda: nrrd(f"data file: {secret}\n\n")),
        (
            "nrrd_padded.nrrd",
            f"1200 comment lines, then data file: {secret}",
            lambda: nrrd(f"data file: {secret}\n\n", 1200),
        ),
        (
            "nrrd_padded_far.nrrd",
            f"12000 comment lines (~0.6 MB), then {secret}",
            lambda: nrrd(f"data file: {secret}\n\n", 12000),
        ),
        ("nrrd_missing.nrrd", "padded, names a missing file", lambda: nrrd("data file: /nonexistent/x.raw\n\n", 1200)),
        ("nrrd_relative.nrrd", "data file: ../../secret.raw", lambda: nrrd("data file: ../../secret.raw\n\n")),
        ("nrrd_beside.nrrd", "data file beside it: x.raw", lambda: nrrd("data file: x.raw\n\n")),
        ("nrrd_list.nrrd", "data file: LIST", lambda: nrrd(f"data file: LIST\n{secret}\n")),
        ("nrrd_spelling.nrrd", f"DataFile: {secret}", lambda: nrrd(f"DataFile: {secret}\n\n")),
        ("nrrd_cr.nrrd", "CR line ends, data file", lambda: nrrd(f"data file: {secret}\n\n").replace(b"\n", b"\r")),
        ("nrrd.nhdr", f"a detached header .nhdr -> {secret}", lambda: nrrd(f"data file: {secret}\n")),
        ("nrrd_no_end.nrrd", "a header with no blank line in 1.2 MB", lambda: nrrd("", 25000)),
        ("nrrd_no_magic.nrrd", "no NRRD magic line", lambda: b"NRRX0004\ntype: uint8\n\n" + bytes(4096)),
        ("nrrd_truncated.nrrd", "attached raw data cut", lambda: sitk_bytes(ct, ".nrrd")[:-2000]),
        ("nrrd_2d.nrrd", "a 2D NRRD", lambda: sitk_bytes(np.zeros((32, 32), np.int16), ".nrrd")),
        ("mha_detached.mha", f"ElementDataFile = {secret}", lambda: mha(f"ElementDataFile = {secret}\n")),
        ("mha_padded.mha", f"1200 Comment lines, then {secret}", lambda: mha(f"ElementDataFile = {secret}\n", 1200)),
        (
            "mha_padded_far.mha",
            f"12000 Comment lines, then {secret}",
            lambda: mha(f"ElementDataFile = {secret}\n", 12000),
        ),
        (
            "mha_missing.mha",
            "padded, names a missing file",
            lambda: mha("ElementDataFile = /nonexistent/x.raw\n", 1200),
        ),
        ("mha_colon.mha", f"ElementDataFile : {secret}", lambda: mha(f"ElementDataFile : {secret}\n", 20)),
        (
            "mha_swallow.mha",
            "Comment<newline>ElementDataFile = LOCAL<newline>... = secret",
            lambda: mha(f"Comment\nElementDataFile = LOCAL\nElementDataFile = {secret}\n", 20),
        ),
        (
            "mha_empty_value.mha",
            "Comment =<newline>ElementDataFile = LOCAL ...",
            lambda: mha(f"Comment =\nElementDataFile = LOCAL\nElementDataFile = {secret}\n", 20),
        ),
        (
            "mha_lowercase.mha",
            "elementdatafile = LOCAL, then the real one",
            lambda: mha(f"elementdatafile = LOCAL\nElementDataFile = {secret}\n", 20),
        ),
        ("mha_list.mhd", "ElementDataFile = LIST", lambda: mha(f"ElementDataFile = LIST\n{secret}\n")),
        (
            "mha_pattern.mha",
            "ElementDataFile = /etc/x%03d 1 16 1",
            lambda: mha("ElementDataFile = /etc/x%03d 1 16 1\n"),
        ),
        ("mha_no_datafile.mha", "no ElementDataFile line", lambda: mha("", 20000)),
        (
            "mha_header_lies.mha",
            "300^3 uint8 declared, 4 kB held",
            lambda: mha("ElementDataFile = LOCAL\n", data=bytes(4096), dims="300 300 300"),
        ),
        (
            "mha_header_big.mha",
            "1000^3 double declared, 4 kB held",
            lambda: mha("ElementDataFile = LOCAL\n", data=bytes(4096), dims="1000 1000 1000", etype="MET_DOUBLE"),
        ),
        ("mha_truncated.mha", "attached data cut", lambda: sitk_bytes(ct, ".mha")[:-3000]),
        (
            "mha_rgb.mha",
            "3 components per voxel",
            lambda: sitk_bytes(np.zeros((16, 16, 16, 3), np.uint8), ".mha", components=True),
        ),
        (
            "mha_4d.mha",
            "a 4D MetaImage",
            lambda: mha("ElementDataFile = LOCAL\n", data=bytes(16**3 * 3), dims="16 16 16 3"),
        ),
        ("mha_blank.mha", "16^3 of one value", lambda: sitk_bytes(np.full((16, 16, 16), 7, np.int16), ".mha")),
        ("scan.png", "an unknown format", lambda: b"\x89PNG\r\n\x1a\n" + rng.bytes(100)),
        ("noextension", "no extension", good),
        ("../../etc/passwd.nii.gz", "a path in the file name", good),
    ]


def nan_affine() -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(phantom_xyz((16, 16, 16)), np.eye(4))
    img.header.set_sform(np.eye(4), code=1)
    img.header.set_qform(None, code=0)
    raw = bytearray(img.to_bytes())
    raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]: the affine's first element
    return gzip.compress(bytes(raw))


def _bare(n: int, magic: bytes = b"n+1") -> bytes:
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape((n, n, n))
    h.set_data_dtype(np.int16)
    h["vox_offset"] = 352
    h["magic"] = magic
    return h.binaryblock + bytes(4)


# ------------------------------------------------------------------------------------ children
def make_app(models: Path, storage: Path):  # noqa: ANN201
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    return TestClient(create_app(Settings(models_dir=models, storage_dir=storage)))


def child_corpus(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, (name, what, make) in enumerate(corpus()):
        stored = f"{i:03d}.bin"
        (out / stored).write_bytes(make())
        manifest.append({"name": name, "what": what, "stored": stored})
    (out / "manifest.json").write_text(json.dumps(manifest))


def child_bad(models: Path, corpus_dir: Path, storage: Path) -> None:
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    with make_app(models, storage) as c:
        base = peak_rss_mib()
        for row in manifest:
            data = (corpus_dir / row["stored"]).read_bytes()
            t = time.time()
            r = c.post("/encode", data={"model": "m"}, files={"file": (row["name"], data, "application/octet-stream")})
            detail = r.json().get("detail")
            msg = detail if isinstance(detail, str) else json.dumps(detail)
            row = {"name": row["name"], "what": row["what"], "bytes": len(data), "status": r.status_code}
            print(json.dumps(row | {"message": msg, "seconds": round(time.time() - t, 2)}))
        queued = len(c.app.state.jobs.records.all_ids())
    rss = {"baseline_rss_mib": round(base), "peak_rss_mib": round(peak_rss_mib()), "hwm_mib": round(hwm_mib() or 0)}
    print(json.dumps({"summary": True, "queued": queued} | rss))


def child_limit(models: Path, upload: Path, storage: Path) -> None:
    with make_app(models, storage) as c:
        base = peak_rss_mib()
        t = time.time()
        r = c.post("/encode", data={"model": "m"}, files={"file": (upload.name, upload.read_bytes())})
        api_s = time.time() - t
        state, error = None, None
        if r.status_code == 202:
            while True:
                s = c.get(f"/jobs/{r.json()['job_id']}").json()
                if s["state"] in ("succeeded", "failed", "cancelled"):
                    state, error = s["state"], s.get("error")
                    break
                time.sleep(0.2)
    out = {"name": upload.name, "status": r.status_code, "api_seconds": round(api_s, 1), "state": state}
    out |= {"error": error, "detail": r.json().get("detail") if r.status_code != 202 else None}
    out |= {"total_seconds": round(time.time() - t, 1), "baseline_rss_mib": round(base)}
    out |= {"peak_rss_mib": round(peak_rss_mib()), "hwm_mib": round(hwm_mib() or 0)}
    print(json.dumps(out))


# ------------------------------------------------------------------------------------ driver
def child_limit_files(d: Path) -> None:
    """Valid CT-like uploads of exactly 512^3 voxels: int16 and float32 NIfTI (gzip), int16
    MetaImage and NRRD (compressed)."""
    import nibabel as nib
    import SimpleITK as sitk

    d.mkdir(parents=True, exist_ok=True)
    n = round(LIMIT ** (1 / 3))
    v = np.full((n, n, n), -1000, np.int16)  # (x, y, z)
    v[64:448, 96:416, 32:480] = 40
    v[200:300, 200:300, 100:400] = 700
    img = nib.Nifti1Image(v, np.diag([0.8, 0.8, 1.0, 1.0]))
    nib.save(img, d / "limit_int16.nii.gz")
    nib.save(nib.Nifti1Image(v.astype(np.float32), img.affine), d / "limit_float32.nii.gz")
    s = sitk.GetImageFromArray(np.ascontiguousarray(v.transpose(2, 1, 0)))
    for name in ("limit_int16.mha", "limit_int16.nrrd"):
        sitk.WriteImage(s, str(d / name), True)


LIMIT_FILES = ("limit_int16.nii.gz", "limit_float32.nii.gz", "limit_int16.mha", "limit_int16.nrrd")


def run_child(args: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"child {args[:1]} failed ({out.returncode})")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bad-only", action="store_true")
    ap.add_argument("--limit-only", action="store_true")
    ap.add_argument("--max-rss-gib", type=float, default=1.5)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *paths = a.child
        funcs = {"corpus": child_corpus, "limit-files": child_limit_files, "bad": child_bad, "limit": child_limit}
        funcs[kind](*map(Path, paths))
        return 0

    # this driver imports and holds nothing large: Linux starts a child's ru_maxrss at its parent's
    bound = a.max_rss_gib * 1024
    ok = True
    tmp = Path(tempfile.mkdtemp(prefix="voxgen-bad-"))
    try:
        models = tmp / "models"
        init = ["init", "--resolution", "128", "--width", "0.25", "--latent-dim", "16", "-o", str(models / "m")]
        subprocess.run([sys.executable, "-m", "model.cli", *init], check=True, cwd=REPO, capture_output=True)
        if not a.limit_only:
            run_child(["corpus", str(tmp / "corpus")])
            rows = run_child(["bad", str(models), str(tmp / "corpus"), str(tmp / "st-bad")])
            summary = rows.pop()
            print(f"\n{len(rows)} bad uploads to POST /encode (in-process app, default settings)\n")
            print("| file | what it is | bytes | status | message |")
            print("|---|---|---|---|---|")
            for r in rows:
                msg = r["message"].replace("|", "/").replace("\n", " ")
                msg = msg if len(msg) <= 150 else msg[:147] + "..."
                print(f"| `{r['name']}` | {r['what']} | {r['bytes']} | {r['status']} | {msg} |")
            statuses = sorted({r["status"] for r in rows})
            all4xx = all(400 <= r["status"] < 500 for r in rows)
            slowest = max(rows, key=lambda r: r["seconds"])
            print(
                f"\n{len(rows)} files, statuses {statuses}, all 4xx: {all4xx}; jobs queued: {summary['queued']}; "
                f"slowest {slowest['name']} {slowest['seconds']} s; peak RSS (getrusage) after start-up "
                f"{summary['baseline_rss_mib']} MiB, at the end {summary['peak_rss_mib']} MiB "
                f"(VmHWM {summary['hwm_mib']} MiB; bound {bound:.0f} MiB)"
            )
            ok &= all4xx and summary["queued"] == 0 and summary["peak_rss_mib"] < bound
        if not a.bad_only:
            run_child(["limit-files", str(tmp / "limit")])
            print(
                f"\nvalid uploads of {LIMIT} = 512^3 voxels (the limit), posted and encoded, each in a fresh process\n"
            )
            print("| file | upload MB | status | job | API check s | total s | RSS after start-up MiB | peak RSS MiB |")
            print("|---|---|---|---|---|---|---|---|")
            for name in LIMIT_FILES:
                f = tmp / "limit" / name
                (r,) = run_child(["limit", str(models), str(f), str(tmp / f"st-{name}")])
                job = r["state"] if r["state"] != "failed" else f"failed: {r['error']}"
                print(
                    f"| `{name}` | {f.stat().st_size / 1e6:.1f} | {r['status']} | {job or r['detail']} | "
                    f"{r['api_seconds']} | {r['total_seconds']} | {r['baseline_rss_mib']} | {r['peak_rss_mib']} |"
                )
                ok &= r["status"] == 202 and r["state"] == "succeeded" and r["peak_rss_mib"] < bound
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = " ".join(["python benchmarks/bad_inputs.py", *sys.argv[1:]])
    print(f"\n{'PASS' if ok else 'FAIL'}: bound {a.max_rss_gib} GiB; CPU: {cpu_model()}; command: {cmd}")
    return 0 if ok else 1


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
