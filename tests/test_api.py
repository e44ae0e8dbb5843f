"""The HTTP API on the embedded in-process queue (httpx through FastAPI's TestClient)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.conftest import SERVICE_LATENT as LATENT
from tests.conftest import service_nifti_upload as nifti_upload
from tests.conftest import service_wait as wait


def test_models_listing(embedded: TestClient) -> None:
    ms = {m["name"]: m for m in embedded.get("/models").json()}
    assert set(ms) == {"tiny", "cond", "big"}
    assert ms["cond"]["classes"] == ["healthy", "copd"] and ms["tiny"]["latent_dim"] == LATENT
    assert ms["tiny"]["directions"] == ["soft"] and ms["big"]["output_shape"] == [256, 256, 256]
    assert embedded.get("/models/tiny").json()["modality"] == "ct"
    r = embedded.get("/models/nope")
    assert r.status_code == 404 and "unknown model" in r.json()["detail"]


def test_no_models_directory_serves_none(tmp_path: Path) -> None:
    s = Settings(models_dir=tmp_path / "absent", storage_dir=tmp_path / "st")
    with TestClient(create_app(s)) as c:
        assert c.get("/models").json() == []
        r = c.post("/generate", json={"model": "x"})
        assert r.status_code == 404 and "(none)" in r.json()["detail"]
        assert c.get("/health/ready").status_code == 200


def test_openapi_docs(embedded: TestClient) -> None:
    assert embedded.get("/docs").status_code == 200
    spec = embedded.get("/openapi.json").json()
    assert {"/generate", "/encode", "/traverse", "/jobs/{job_id}", "/admin/train", "/health/ready"} <= set(
        spec["paths"]
    )
    assert "JobStatus" in spec["components"]["schemas"]


def test_generate_poll_download_read_back(embedded: TestClient, tmp_path: Path) -> None:
    from model.hagan.model import HAGANModel

    r = embedded.post("/generate", json={"model": "tiny", "seed": 5, "n": 2})
    assert r.status_code == 202 and r.json()["status_url"] == f"/jobs/{r.json()['job_id']}"
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    assert s["progress"] == {"done": 1, "total": 1, "stage": "done"} and s["result"]["seed"] == 5
    files = {f["name"]: f for f in s["result"]["files"]}
    assert set(files) == {
        "latent.npy",
        "volume_000.nii.gz",
        "volume_001.nii.gz",
        "volume_000.png",
        "volume_001.png",
        "provenance.json",
    }
    body = embedded.get(files["volume_000.nii.gz"]["url"]).content
    assert len(body) == files["volume_000.nii.gz"]["bytes"]
    (tmp_path / "v.nii.gz").write_bytes(body)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (128, 128, 128) and img.get_data_dtype() == np.int16
    # the same seed through the model directly gives the same volume (HU = window map of [-1, 1])
    m = HAGANModel.from_pretrained(embedded.app.state.settings.models_dir / "tiny")
    v = m.generate(m.sample_latents(2, 5))[0, 0].numpy()
    expect = np.rint(-1024 + (v + 1) / 2 * 1624).transpose(2, 1, 0)
    assert np.abs(np.asarray(img.dataobj) - expect).max() <= 1
    z = np.load(io.BytesIO(embedded.get(f"/jobs/{s['job_id']}/files/latent.npy").content))
    assert z.shape == (2, LATENT) and np.allclose(z, m.sample_latents(2, 5).numpy())
    png = embedded.get(files["volume_001.png"]["url"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[0] == 3 * 128


def test_generate_without_seed_draws_and_reports_one(embedded: TestClient) -> None:
    s = wait(embedded, embedded.post("/generate", json={"model": "tiny", "format": "npy"}).json()["job_id"])
    assert s["state"] == "succeeded" and isinstance(s["result"]["seed"], int)


def test_generate_from_latent_and_label(embedded: TestClient) -> None:
    for label in ("copd", 1):
        body = {"model": "cond", "latent": [[0.1] * LATENT, [0.2] * LATENT], "label": label, "format": "npy"}
        s = wait(embedded, embedded.post("/generate", json=body).json()["job_id"])
        assert s["state"] == "succeeded", s
        assert {"volume_000.npy", "volume_001.npy"} <= {f["name"] for f in s["result"]["files"]}


@pytest.mark.parametrize(
    "body,status,msg",
    [
        ({"model": "nope", "seed": 1}, 404, "unknown model"),
        ({"model": "tiny", "seed": -1}, 422, "seed"),
        ({"model": "tiny", "seed": 2**63}, 422, "seed"),
        ({"model": "tiny", "seed": "abc"}, 422, "seed"),
        ({"model": "tiny", "seed": 1.5}, 422, "seed"),
        ({"model": "tiny", "n": 0}, 422, "n"),
        ({"model": "tiny", "n": 1000}, 422, "at most"),
        ({"model": "tiny", "latent": [0.0] * 3}, 422, "latent must have"),
        ({"model": "tiny", "latent": []}, 422, "latent must have"),
        ({"model": "tiny", "latent": [[0.0] * LATENT] * 40}, 422, "at most"),
        ({"model": "tiny", "latent": [[0.0] * LATENT, [0.0] * 3]}, 422, "latent must have"),
        ({"model": "tiny", "latent": [1e300] * LATENT}, 422, "within"),
        ({"model": "tiny", "latent": [[[0.0]]]}, 422, "latent"),
        ({"model": "cond", "seed": 1, "label": 7}, 422, "unknown label"),
        ({"seed": 1}, 422, "model"),
        ({"model": "tiny", "latent": [float("nan")] * LATENT}, 422, "latent"),
        ({"model": "tiny", "label": "copd"}, 422, "not class-conditional"),
        ({"model": "cond", "seed": 1}, 422, "class-conditional"),
        ({"model": "cond", "seed": 1, "label": "flu"}, 422, "unknown label"),
        ({"model": "cond", "seed": 1, "label": 2.5}, 422, "label"),
        ({"model": "tiny", "format": "png"}, 422, "format"),
    ],
)
def test_bad_generate_requests_get_4xx(embedded: TestClient, body: dict, status: int, msg: str) -> None:
    r = embedded.post(
        "/generate", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert msg in r.text


# (path, content type) -> the malformed bodies posted there
MALFORMED = {
    ("/generate", "application/json"): [b"[1, 2]", b'"tiny"', b"{not json", b"\xff\xfe\x00"],
    ("/generate", "application/x-www-form-urlencoded"): [b"model=tiny"],
    ("/traverse", "application/json"): [
        b"{}",
        b'{"model": "tiny", "direction": {"a": 1}, "steps": [1]}',
        b'{"model": "tiny", "direction": "soft", "steps": [1e300]}',
        b'{"model": "tiny", "direction": "soft", "target": 1e999}',
    ],
    ("/encode", "multipart/form-data; boundary=x"): [b"", b"--x\r\ngarbage"],
    ("/encode", "multipart/form-data"): [b"--x\r\nContent-Disposition: form-data; name=model\r\n\r\ntiny\r\n--x--"],
    ("/admin/train", "application/json"): [b"{}"],
}


@pytest.mark.parametrize(
    "path,content,ctype", [(path, body, ctype) for (path, ctype), bodies in MALFORMED.items() for body in bodies]
)
def test_malformed_bodies_never_get_a_500(embedded: TestClient, path: str, content: bytes, ctype: str) -> None:
    r = embedded.post(path, content=content, headers={"content-type": ctype, "authorization": "Bearer s3cret"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["detail"]


def test_encode_an_upload_with_reconstruction(embedded: TestClient, tmp_path: Path) -> None:
    data = nifti_upload(tmp_path)
    r = embedded.post(
        "/encode",
        data={"model": "tiny", "reconstruct": "true"},
        files={"file": ("scan.nii.gz", data, "application/gzip")},
    )
    assert r.status_code == 202, r.text
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    names = {f["name"] for f in s["result"]["files"]}
    assert names == {"latent.npy", "reconstruction.nii.gz", "reconstruction.png", "input.png", "provenance.json"}
    assert len(s["result"]["latent"]) == LATENT
    z = np.load(io.BytesIO(embedded.get(f"/jobs/{s['job_id']}/files/latent.npy").content))
    assert np.allclose(z[0], s["result"]["latent"])
    # the reconstruction comes back on the upload's own grid and affine (space "input", the default)
    import nibabel as nib

    rec = tmp_path / "rec.nii.gz"
    rec.write_bytes(embedded.get(f"/jobs/{s['job_id']}/files/reconstruction.nii.gz").content)
    up = tmp_path / "up.nii.gz"
    up.write_bytes(data)
    a, b = nib.load(up), nib.load(rec)
    assert s["result"]["space"] == "input" and b.shape == a.shape and np.allclose(b.affine, a.affine)
    # space "model": the model's grid
    r = embedded.post(
        "/encode",
        data={"model": "tiny", "reconstruct": "true", "space": "model"},
        files={"file": ("scan.nii.gz", data, "application/gzip")},
    )
    s = wait(embedded, r.json()["job_id"])
    rec.write_bytes(embedded.get(f"/jobs/{s['job_id']}/files/reconstruction.nii.gz").content)
    assert s["result"]["space"] == "model" and nib.load(rec).shape == (128, 128, 128)
    r = embedded.post("/encode", data={"model": "tiny", "space": "world"}, files={"file": ("scan.nii.gz", data)})
    assert r.status_code == 422


def test_encode_a_zipped_dicom_series(embedded: TestClient, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from model.data.phantoms import write_dicom_series, write_phantom

    write_phantom(tmp_path / "p.nii.gz", "ct", shape=(24, 24, 24), spacing=(2, 2, 2))
    arr = np.asarray(nib.load(tmp_path / "p.nii.gz").dataobj).transpose(2, 1, 0)
    write_dicom_series(tmp_path / "series", arr, (2.0, 2.0, 2.0))
    shutil.make_archive(str(tmp_path / "series"), "zip", tmp_path / "series")
    files = {"file": ("series.zip", (tmp_path / "series.zip").read_bytes())}
    r = embedded.post("/encode", data={"model": "tiny"}, files=files)
    assert r.status_code == 202, r.text
    assert wait(embedded, r.json()["job_id"])["state"] == "succeeded"


def test_a_zip_of_several_series_needs_a_series_uid(embedded: TestClient, tmp_path: Path) -> None:
    from tests.test_volumes import _two_series

    _, zipped, ras = _two_series(tmp_path)  # two CT series, files named by their UIDs
    a, b = ras
    data = zipped.read_bytes()
    uploads = embedded.app.state.storage.root / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()

    def post(name: str = "Study 2024.zip", payload: bytes = data, **form: str):
        return embedded.post("/encode", data={"model": "tiny", **form}, files={"file": (name, payload)})

    for form in ({}, {"series_uid": ""}):  # an empty field is no choice
        r = post(**form)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail.startswith("Study 2024.zip: holds 2 DICOM series; pick one by its series UID"), detail
        assert f"{a} (CT, 'Thorax 1.0 B31f', 10 slices); {b} (CT, 'Topogram', 12 slices)" in detail
        assert str(embedded.app.state.storage.root) not in detail and str(tmp_path) not in detail
    r = post(series_uid="1.2.3.4")
    assert r.status_code == 422 and "no DICOM series with the UID '1.2.3.4'" in r.json()["detail"]
    assert a in r.json()["detail"] and b in r.json()["detail"]
    r = post("scan.nii.gz", nifti_upload(tmp_path), series_uid=a)
    assert r.status_code == 422 and "picks one series of a DICOM folder or .zip" in r.json()["detail"]
    assert post(series_uid="1" * 129).status_code == 422
    assert (set(uploads.iterdir()) if uploads.exists() else set()) == before  # nothing of them is queued or kept
    latents = {}
    for uid, shape in ((a, (16, 16, 10)), (b, (16, 16, 12))):
        r = post(series_uid=f" {uid} ", reconstruct="true")
        assert r.status_code == 202, r.text
        s = wait(embedded, r.json()["job_id"])
        assert s["state"] == "succeeded", s
        latents[uid] = s["result"]["latent"]
        rec = tmp_path / f"{uid}.nii.gz"  # on the picked series' own grid
        rec.write_bytes(embedded.get(f"/jobs/{s['job_id']}/files/reconstruction.nii.gz").content)
        assert nib.load(rec).shape == shape, uid
    assert latents[a] != latents[b]


def test_bad_uploads_get_4xx(embedded: TestClient, tmp_path: Path) -> None:
    def post(name: str, data: bytes, model: str = "tiny", **form: str):
        files = {"file": (name, data, "application/octet-stream")}
        return embedded.post("/encode", data={"model": model, **form}, files=files)

    good = nifti_upload(tmp_path)
    r = post("scan.nii.gz", good[: len(good) // 2])
    assert r.status_code == 422 and "scan.nii.gz" in r.json()["detail"]  # truncated; named by the user's name
    assert post("scan.nii.gz", b"not a volume at all").status_code == 422
    assert post("scan.nii.gz", b"").status_code == 422
    assert post("scan.txt", good).status_code == 422
    flat = tmp_path / "2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), flat)
    r = post("2d.nii.gz", flat.read_bytes())
    assert r.status_code == 422 and "2D" in r.json()["detail"]
    four = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 3), np.float32), np.eye(4)), four)
    assert post("4d.nii.gz", four.read_bytes()).status_code == 422
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), nan)
    assert "NaN" in post("nan.nii.gz", nan.read_bytes()).json()["detail"]
    r = post("scan.nii.gz", b"x" * (2 * 2**20))
    assert r.status_code == 413 and "1 MB" in r.json()["detail"]  # over VOXGEN_MAX_UPLOAD_MB=1
    header = nib.Nifti1Header()  # a 16^3 header with 64 MiB of zeros behind it, in ~64 kB
    header.set_data_shape((16, 16, 16))
    header["vox_offset"] = 352
    bomb = gzip.compress(header.binaryblock + b"\0" * (4 + 64 * 2**20))
    r = post("bomb.nii.gz", bomb)
    assert r.status_code == 422 and "uncompressed bytes, over the limit" in r.json()["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../evil.dcm", b"x" * 200)
    assert post("series.zip", buf.getvalue()).status_code == 422  # a zip member with a path outside
    for name in ("../../etc/passwd.nii.gz", "a/b.nii.gz", "..\\x.nii.gz", ".."):
        r = post(name, good)
        assert r.status_code == 422 and "has a path in it" in r.text, name
    assert post("scan.nii.gz", good, model="nope").status_code == 404
    assert post("scan.nii.gz", good, model="cond").status_code == 422  # needs a label
    assert post("scan.nii.gz", good, model="cond", label="9").status_code == 422
    # nothing of the refused uploads is left behind
    assert not any((embedded.app.state.storage.root / "uploads").iterdir())


def _detail(r) -> str:  # noqa: ANN001
    d = r.json()["detail"]
    return d if isinstance(d, str) else json.dumps(d)


def _post_upload(client: TestClient, name: str, data: bytes, model: str = "tiny"):  # noqa: ANN202
    return client.post("/encode", data={"model": model}, files={"file": (name, data, "application/octet-stream")})


def test_any_base_name_is_taken_and_shown_back(embedded: TestClient, tmp_path: Path) -> None:
    from service.routes.encode import filename_problem

    good = nifti_upload(tmp_path)
    for name in ("Patient_Müller.nii.gz", "scan (1).nii.gz", ".hidden.nii.gz", "Ünïcødé 日本 #2.nii.gz"):
        r = _post_upload(embedded, name, good)
        assert r.status_code == 202, (name, r.text)
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    # the name comes back in messages about the upload, as sent
    r = _post_upload(embedded, "Patient_Müller.nii.gz", good[: len(good) // 2])
    assert r.status_code == 422 and "Patient_Müller.nii.gz" in _detail(r), r.text
    for name in ("a\nb.nii.gz", "a\x00b.nii.gz", "x" * 250 + "é" * 10, "", "/etc/passwd", "."):
        assert filename_problem(name), repr(name)
    assert filename_problem("Patient_Müller.nii.gz") is None


def _padded_nrrd(target: str, pad_lines: int) -> bytes:
    pad = "".join(f"# padding line {i:06d} {'x' * 40}\n" for i in range(pad_lines))
    head = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nencoding: raw\n"
    return (head + pad + f"data file: {target}\n\n").encode() + bytes(16**3)


def _padded_mha(target: str, pad_lines: int) -> bytes:
    pad = "".join(f"Comment = padding line {i:06d} {'x' * 40}\n" for i in range(pad_lines))
    head = "ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_UCHAR\n"
    return (head + pad + f"ElementDataFile = {target}\n").encode() + bytes(16**3)


def test_uploads_never_read_another_file(embedded: TestClient, tmp_path: Path) -> None:
    """A NRRD / MetaImage upload naming a data file -- anywhere in its header, however far it is
    padded, in any spelling the readers take -- is refused with one message that names no path,
    whether the file named exists or not."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 16)  # 16^3 bytes: exactly what the headers ask for
    root = str(embedded.app.state.storage.root.resolve())
    before = set(embedded.app.state.jobs.records.all_ids())
    cases = []
    for target in (str(secret), str(tmp_path / "missing.raw"), "/etc/passwd", "secret.raw", "LIST"):
        for pad in (0, 1200, 9000):  # 1200 lines: past the 64 KiB the old check read; 9000: ~500 kB
            cases += [(f"p{pad}.nrrd", _padded_nrrd(target, pad)), (f"p{pad}.mha", _padded_mha(target, pad))]
    mha = "ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_UCHAR\n"
    cases += [
        ("colon.mha", (mha + f"ElementDataFile : {secret}\n").encode() + bytes(4096)),
        # MetaIO takes the line after a key without '=' (or with an empty value) as that key's value
        ("swallow.mha", (mha + f"Comment\nElementDataFile = LOCAL\nElementDataFile = {secret}\n").encode()),
        ("empty.mha", (mha + f"Comment =\nElementDataFile = LOCAL\nElementDataFile = {secret}\n").encode()),
        ("case.mha", (mha + f"elementdatafile = LOCAL\nElementDataFile = {secret}\n").encode() + bytes(4096)),
        ("nul.mha", (mha + f"ElementDataFile\0x = {secret}\n").encode() + bytes(4096)),
        ("datafile.nhdr", f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nDataFile: {secret}\n".encode()),
        ("spaced.nrrd", f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nDATA  FILE: {secret}\n\n".encode()),
        ("cr.nrrd", f"NRRD0004\rtype: uint8\rdimension: 3\rsizes: 16 16 16\rdata file: {secret}\r\r".encode()),
    ]
    details = {}
    for name, data in cases:
        r = _post_upload(embedded, name, data)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        d = _detail(r)
        for leak in (str(secret), str(tmp_path), "/etc/passwd", root, "couldn't open", "missing.raw"):
            assert leak not in d, (name, d)
        details[name] = d
    for name in ("p0.nrrd", "p1200.nrrd", "p9000.mha", "colon.mha", "datafile.nhdr", "cr.nrrd"):
        assert "single-file .nrrd or .mha" in details[name], (name, details[name])
    for name in ("swallow.mha", "empty.mha", "case.mha", "nul.mha"):
        assert "not a valid header" in details[name], (name, details[name])
    assert set(embedded.app.state.jobs.records.all_ids()) == before  # nothing was queued


def test_single_file_nrrd_and_mha_uploads_encode(embedded: TestClient, tmp_path: Path) -> None:
    import SimpleITK as sitk

    (tmp_path / "scan.nii.gz").write_bytes(nifti_upload(tmp_path))
    img = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    for name in ("scan.nrrd", "scan.mha"):
        sitk.WriteImage(img, str(tmp_path / name), True)
        r = _post_upload(embedded, name, (tmp_path / name).read_bytes())
        assert r.status_code == 202, r.text
        s = wait(embedded, r.json()["job_id"])
        assert s["state"] == "succeeded", s
    # a reader's error about a truncated file names the upload, not where the server keeps it
    data = (tmp_path / "scan.mha").read_bytes()
    r = _post_upload(embedded, "cut.mha", data[: len(data) - 300])
    assert r.status_code == 422 and "cut.mha" in _detail(r)
    assert str(embedded.app.state.storage.root.resolve()) not in _detail(r) and "uploads" not in _detail(r)


def _nifti_header_gz(shape: tuple[int, ...], dtype: type = np.uint8, zero_mib: int = 0) -> bytes:
    """A .nii.gz of a bare header declaring ``shape`` (+ ``zero_mib`` MiB of zeros): a few hundred
    bytes to a few hundred kB, whatever it declares."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(header.binaryblock + bytes(4))]
    mib = bytes(2**20)
    out += [c.compress(mib) for _ in range(zero_mib)]
    return b"".join([*out, c.flush()])


def test_a_large_header_is_refused_before_queueing_and_inflating(embedded: TestClient) -> None:
    import tracemalloc

    before = set(embedded.app.state.jobs.records.all_ids())
    bomb = _nifti_header_gz((640, 640, 640), zero_mib=250)  # what 640^3 uint8 of zeros looks like
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        t = time.time()
        r = _post_upload(embedded, "big.nii.gz", bomb)
        elapsed = time.time() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 413, r.text
    assert "640x640x640 = 262144000 voxels, over the limit of 134217728" in _detail(r)
    assert "VOXGEN_MAX_INPUT_VOXELS" in _detail(r)
    assert peak < 16 * 2**20 and elapsed < 5  # refused by its header: nothing inflated or allocated
    assert set(embedded.app.state.jobs.records.all_ids()) == before
    assert not any((embedded.app.state.storage.root / "uploads").iterdir())


def test_the_voxel_limit_is_a_setting(service_models_dir: Path, tmp_path: Path) -> None:
    s = Settings(models_dir=service_models_dir, storage_dir=tmp_path / "st", max_input_voxels=20**3)
    assert Settings().max_input_voxels == 512**3
    with TestClient(create_app(s)) as c:
        r = _post_upload(c, "scan.nii.gz", nifti_upload(tmp_path))  # 32^3 voxels
        assert r.status_code == 413 and "32x32x32 = 32768 voxels, over the limit of 8000" in _detail(r)
        r = _post_upload(c, "small.nii.gz", nifti_upload(tmp_path, shape=(16, 16, 16)))
        assert r.status_code == 202, r.text
        assert c.app.state.jobs.records.get(r.json()["job_id"])["params"]["max_voxels"] == 20**3
        assert wait(c, r.json()["job_id"])["state"] == "succeeded"


def test_truncated_and_blank_uploads_are_refused_before_queueing(embedded: TestClient, tmp_path: Path) -> None:
    before = set(embedded.app.state.jobs.records.all_ids())
    good = nifti_upload(tmp_path, shape=(40, 40, 40))
    for cut in (len(good) // 3, len(good) - 8):
        r = _post_upload(embedded, "cut.nii.gz", good[:cut] + b"\xff\xff\xff\x7f")  # ISIZE: ~2 GB
        d = _detail(r)
        assert r.status_code == 422 and ("truncated" in d or "corrupt" in d) and "over the limit" not in d, d

    def upload(v: np.ndarray) -> bytes:
        p = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(v.transpose(2, 1, 0)), np.eye(4)), p)
        return p.read_bytes()

    for value in (0.0, -1024.0, 3000.0):  # CT: every voxel equal
        r = _post_upload(embedded, "flat.nii.gz", upload(np.full((16, 16, 16), value, np.float32)))
        assert r.status_code == 422 and "blank" in _detail(r), r.text
    below = np.full((16, 16, 16), -2000.0, np.float32)
    below[4:8] = -1500.0  # not constant, but nothing above the CT window's minimum (-1024 HU)
    r = _post_upload(embedded, "air.nii.gz", upload(below))
    assert r.status_code == 422 and "blank after windowing" in _detail(r), r.text
    assert set(embedded.app.state.jobs.records.all_ids()) == before


def test_blank_mri_uploads_are_refused_before_queueing(tmp_path: Path) -> None:
    from model.base import Intensity
    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel

    cfg = HAGANConfig(resolution=128, width=0.25, latent_dim=8, modality="mri", intensity=Intensity.for_modality("mri"))
    HAGANModel.init(cfg, seed=0).save_pretrained(tmp_path / "models" / "mri")
    s = Settings(models_dir=tmp_path / "models", storage_dir=tmp_path / "st")

    def upload(v: np.ndarray) -> bytes:
        p = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(v.transpose(2, 1, 0)), np.eye(4)), p)
        return p.read_bytes()

    with TestClient(create_app(s)) as c:
        zeros = np.zeros((24, 24, 24), np.float32)
        r = _post_upload(c, "zeros.nii.gz", upload(zeros), model="mri")
        assert r.status_code == 422 and "blank" in _detail(r), r.text
        sparse = zeros.copy()
        sparse[0, 0, :5] = 100.0  # 5 of 13824 voxels: the 99.9th percentile is still 0
        r = _post_upload(c, "sparse.nii.gz", upload(sparse), model="mri")
        assert r.status_code == 422 and "99.9th percentile" in _detail(r), r.text
        negative = np.full((24, 24, 24), -5.0, np.float32)
        negative[::2] = -1.0
        r = _post_upload(c, "negative.nii.gz", upload(negative), model="mri")
        assert r.status_code == 422 and "blank" in _detail(r), r.text
        assert c.app.state.jobs.records.all_ids() == []
        brain = zeros.copy()
        brain[6:18, 6:18, 6:18] = 80.0
        r = _post_upload(c, "brain.nii.gz", upload(brain), model="mri")
        assert r.status_code == 202, r.text
        assert wait(c, r.json()["job_id"])["state"] == "succeeded"


def _asgi_post(app, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:  # noqa: ANN001
    """POST ``chunks`` as a streamed body straight through ASGI; (status, chunks the app read)."""
    read, status = 0, []

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            status.append(msg["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status[0], read


def test_upload_limit_is_enforced_while_streaming(embedded: TestClient) -> None:
    app = embedded.app
    head = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n'
    head += b'--b\r\nContent-Disposition: form-data; name="file"; filename="scan.nii.gz"\r\n\r\n'
    chunks = [head] + [b"\0" * 2**18] * 40  # 10 MiB of file, sent in 256 KiB chunks, no Content-Length
    ctype = (b"content-type", b"multipart/form-data; boundary=b")
    status, read = _asgi_post(app, "/encode", chunks, [ctype])
    assert status == 413
    assert read <= 1 + 5  # stopped at the first chunk over 1 MiB (+ overhead), not after reading 10 MiB
    # a declared Content-Length over the limit is refused before any of the body is read
    status, read = _asgi_post(app, "/encode", chunks, [ctype, (b"content-length", str(10 * 2**20).encode())])
    assert (status, read) == (413, 0)
    # JSON bodies have their own cap
    status, _ = _asgi_post(app, "/generate", [b"[" + b"0," * 2**23], [(b"content-type", b"application/json")])
    assert status == 413


def test_job_files_are_safe_and_cancel_works(embedded: TestClient) -> None:
    assert embedded.get("/jobs/" + "0" * 32).status_code == 404
    assert embedded.get("/jobs/../../etc").status_code == 404
    assert embedded.delete("/jobs/nope").status_code == 404
    jid = embedded.post("/generate", json={"model": "tiny", "seed": 1}).json()["job_id"]
    for name in ("..%2F..%2Fsecret", "%2E%2E", ".latent.npy.tmp", "latent.npy%00"):
        assert embedded.get(f"/jobs/{jid}/files/{name}").status_code == 404
    done = wait(embedded, jid)
    r = embedded.delete(f"/jobs/{jid}")  # a finished job is deleted: the answer is the job as it was
    assert r.json()["state"] == "succeeded" and r.json()["action"] == "deleted"
    assert embedded.get(f"/jobs/{jid}/files/nothere.nii.gz").status_code == 404
    assert done["state"] == "succeeded"
    jid = embedded.post("/generate", json={"model": "big", "seed": 1, "n": 3}).json()["job_id"]
    r = embedded.delete(f"/jobs/{jid}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    wait_idle = time.time()
    while embedded.app.state.jobs.pending() and time.time() - wait_idle < 120:
        time.sleep(0.2)
    s = embedded.get(f"/jobs/{jid}").json()
    assert s["state"] == "cancelled" and "result" not in s


def test_traverse_named_direction_to_a_target(embedded: TestClient) -> None:
    r = embedded.post("/traverse", json={"model": "tiny", "seed": 2, "direction": "soft", "target": 12.0, "n_steps": 3})
    assert r.status_code == 202, r.text
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    steps = s["result"]["steps"]
    assert [x["file"] for x in steps] == ["step_00.nii.gz", "step_01.nii.gz", "step_02.nii.gz"]
    assert steps[0]["alpha"] == 0 and all(isinstance(x["measured"], float) for x in steps)
    names = {f["name"] for f in s["result"]["files"]}
    assert {"step_00.nii.gz", "step_02.nii.gz", "step_02.png", "latents.npy"} <= names
    # the linear step corrected by measuring (refine, default 3): the last step is the alpha tried (the start
    # included) whose volume measured nearest the target, never further than the start's or the linear step's
    tried = s["result"]["refine"]["tried"]
    assert 2 <= len(tried) <= 5 and tried[0]["alpha"] == 0
    best = min(tried, key=lambda t: abs(t["measured"] - 12.0))
    assert steps[-1]["alpha"] == best["alpha"] and abs(steps[-1]["measured"] - best["measured"]) <= 1e-3 * 12.0
    assert abs(steps[-1]["measured"] - 12.0) <= min(abs(t["measured"] - 12.0) for t in tried[:2])
    # refine 0: the linear step alone, whose prediction is the target
    r = embedded.post("/traverse", json={"model": "tiny", "seed": 2, "direction": "soft", "target": 12.0, "refine": 0})
    s = wait(embedded, r.json()["job_id"])
    assert abs(s["result"]["steps"][-1]["predicted"] - 12.0) < 1e-3 and "refine" not in s["result"]


def test_traverse_from_an_encode_job_with_a_vector(embedded: TestClient, tmp_path: Path) -> None:
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", nifti_upload(tmp_path))})
    enc = wait(embedded, r.json()["job_id"])
    body = {"model": "tiny", "job_id": enc["job_id"], "direction": [1.0] + [0.0] * (LATENT - 1), "steps": [0, 2]}
    s = wait(embedded, embedded.post("/traverse", json=body).json()["job_id"])
    assert s["state"] == "succeeded", s
    first, second = s["result"]["steps"]
    assert np.allclose(first["latent"], enc["result"]["latent"], atol=1e-6)
    assert np.isclose(second["latent"][0] - first["latent"][0], 2.0, atol=1e-5)
    other = embedded.post("/traverse", json=body | {"model": "cond", "label": "copd"})
    assert other.status_code == 422 and "encoded with model" in other.json()["detail"]


@pytest.mark.parametrize(
    "body,status,msg",
    [
        ({"model": "tiny", "direction": "nope", "steps": [1]}, 404, "no direction"),
        ({"model": "tiny", "direction": "soft"}, 422, "either steps"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "target": 3}, 422, "either steps"),
        ({"model": "tiny", "direction": "soft", "steps": []}, 422, "steps"),
        ({"model": "tiny", "direction": [1.0, 2.0], "steps": [1]}, 422, "direction vector"),
        ({"model": "tiny", "direction": [0.0] * LATENT, "steps": [1]}, 422, "not all zero"),
        ({"model": "tiny", "direction": [1.0] * LATENT, "target": 3}, 422, "named"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "job_id": "0" * 32}, 422, "encode job"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "job_id": "../x"}, 422, "encode job"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "seed": 1, "latent": [0.0] * LATENT}, 422, "at most one"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "latent": [0.0] * 3}, 422, "latent must have"),
        ({"model": "nope", "direction": "soft", "steps": [1]}, 404, "unknown model"),
        ({"model": "tiny", "direction": "soft", "target": 1e300}, 422, "target"),
        ({"model": "tiny", "direction": "soft", "target": 3, "refine": 9}, 422, "refine"),
        ({"model": "tiny", "direction": "soft", "target": 3, "refine": -1}, 422, "refine"),
        ({"model": "tiny", "direction": "soft", "target": -2e6}, 422, "target"),
        # |w| = 2.4 for "soft": 1e5 lies ~4e4 unit steps out, beyond the 1e4 that steps may take
        ({"model": "tiny", "direction": "soft", "target": 1e5}, 422, "unit steps"),
        ({"model": "tiny", "direction": "soft", "target": 1e5, "seed": 3}, 422, "unit steps"),
    ],
)
def test_bad_traverse_requests_get_4xx(embedded: TestClient, body: dict, status: int, msg: str) -> None:
    r = embedded.post("/traverse", json=body)
    assert r.status_code == status, r.text
    assert msg in r.text


def test_a_target_is_bounded_by_the_unit_steps_it_needs_from_the_start() -> None:
    from service.routes.traverse import target_problem

    w = np.linspace(-1, 1, LATENT)
    d = {"name": "soft", "vector": w.tolist(), "intercept": 5.0}
    z = (500 * w).tolist()  # predicted at z: 5 + 500 |w|^2 ~ 3027
    norm = float(np.linalg.norm(w))
    start = 5 + 500 * norm**2
    near = start + 9_000 * norm  # 9000 unit steps from z, but ~10,200 from a seed's (unknown) start
    assert target_problem(near, d, z) is None
    assert "unit steps" in target_problem(near, d, None)
    assert "unit steps" in target_problem(start + 10_001 * norm, d, z)
    assert target_problem(start - 9_999 * norm, d, z) is None
    assert "zero" in target_problem(1.0, {"name": "z", "vector": [0.0] * LATENT, "intercept": 0.0}, None)


def test_admin_train_auth_and_a_train_job_registers_the_model(service_models_dir: Path, tmp_path: Path) -> None:
    from model.data.datasets import prepare_dataset
    from model.hagan.config import HAGANConfig

    models = tmp_path / "models"  # its own models folder: the shared fixture keeps its three models
    shutil.copytree(service_models_dir / "tiny", models / "tiny")
    src = tmp_path / "src"
    src.mkdir()
    (src / "scan.nii.gz").write_bytes(nifti_upload(tmp_path))
    prepare_dataset(src, tmp_path / "ds", HAGANConfig(resolution=128))
    body = {"data": str(tmp_path / "ds"), "name": "trained1", "iterations": 2, "batch": 1, "width": 0.25}
    body |= {"latent_dim": 8, "recipe": "small-data"}
    s = Settings(models_dir=models, storage_dir=tmp_path / "storage", admin_token="s3cret")
    with TestClient(create_app(s)) as c:
        r = c.post("/admin/train", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/admin/train", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert c.post("/admin/train", json=body, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/admin/train", json=body | {"name": "tiny"}, headers=auth).status_code == 409
        assert c.post("/admin/train", json=body | {"name": "../x"}, headers=auth).status_code == 422
        assert c.post("/admin/train", json=body | {"recipe": "fast"}, headers=auth).status_code == 422
        # HA-GAN has no single learning rate: lr is refused before queueing, not silently ignored
        r = c.post("/admin/train", json=body | {"lr": 1e-3}, headers=auth)
        assert r.status_code == 422 and "lr_g" in r.text, r.text
        r = c.post("/admin/train", json=body, headers=auth)
        assert r.status_code == 202, r.text
        done = wait(c, r.json()["job_id"])
        assert done["state"] == "succeeded", done
        assert done["kind"] == "train" and done["result"]["model"] == "trained1"
        assert {"metrics.jsonl", "preview.png"} <= {f["name"] for f in done["result"]["files"]}
        assert "trained1" in {m["name"] for m in c.get("/models").json()}
        trained = json.loads((models / "trained1" / "config.json").read_text())
        assert trained["training"]["recipe"] == "small-data" and trained["training"]["ema"] == 0.999
        g = wait(c, c.post("/generate", json={"model": "trained1", "seed": 1}).json()["job_id"])
        assert g["state"] == "succeeded"
        # fine-tuning a served model: init_from, its width and latent size taken (none asked for here)
        tune = {k: v for k, v in body.items() if k not in ("width", "latent_dim")} | {"name": "tuned", "iterations": 1}
        r = c.post("/admin/train", json=tune | {"init_from": str(models / "trained1")}, headers=auth)
        done = wait(c, r.json()["job_id"])
        assert done["state"] == "succeeded", done
        tuned = json.loads((models / "tuned" / "config.json").read_text())
        assert tuned["training"]["init_from"] == "trained1" and (tuned["width"], tuned["latent_dim"]) == (0.25, 8)
        # G by GLO, then its encoders through the frozen G: two jobs, each recorded in its config
        glo = body | {"name": "glo1", "objective": "glo", "code_noise": 0.3}
        done = wait(c, c.post("/admin/train", json=glo, headers=auth).json()["job_id"])
        assert done["state"] == "succeeded", done
        cfg = json.loads((models / "glo1" / "config.json").read_text())["training"]
        assert (cfg["objective"], cfg["code_noise"], cfg["augment"]) == ("glo", 0.3, "off")
        enc = tune | {"name": "glo1enc", "init_from": str(models / "glo1"), "freeze_g": "on"}
        done = wait(c, c.post("/admin/train", json=enc, headers=auth).json()["job_id"])
        assert done["state"] == "succeeded", done
        assert json.loads((models / "glo1enc" / "config.json").read_text())["training"]["freeze_g"] == "on"
        # what cannot run is refused before it is queued
        for wrong, why in (
            ({"objective": "glo", "init_from": str(models / "glo1")}, "objective glo fits G from scratch"),
            ({"freeze_g": "on"}, "needs init_from"),
            ({"code_noise": 0.5}, "code_noise is an option of objective glo"),
            ({"family": "alphawgan", "objective": "glo"}, "objective: hagan options"),
            ({"objective": "vae"}, "objective"),
        ):
            r = c.post("/admin/train", json=body | {"name": "t3"} | wrong, headers=auth)
            assert r.status_code == 422 and why in r.text, (wrong, r.text)
        bad = c.post("/admin/train", json=body | {"name": "t2", "data": str(tmp_path / "none")}, headers=auth)
        failed = wait(c, bad.json()["job_id"])
        assert failed["state"] == "failed" and "manifest" in failed["error"]


def test_admin_without_a_configured_token_is_forbidden(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(models_dir=tmp_path, storage_dir=tmp_path / "st"))) as c:
        body = {"data": "x", "name": "m"}
        assert c.post("/admin/train", json=body, headers={"Authorization": "Bearer x"}).status_code == 403


def test_expired_results_are_cleaned_up(tmp_path: Path) -> None:
    from worker.store import MemoryRecords, Storage, new_record

    st = Storage(tmp_path)
    old, new = st.job_dir("a" * 32), st.job_dir("b" * 32)
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "volume_000.nii.gz").write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert st.cleanup(3600) == 1
    assert not old.exists() and new.exists()
    recs = MemoryRecords()
    for i, age in (("a" * 32, 7200), ("b" * 32, 0)):
        recs.put(new_record(i, "generate", {}) | {"state": "succeeded", "created": time.time() - age})
    recs.expire(3600)
    assert recs.all_ids() == ["b" * 32]


def test_health(embedded: TestClient) -> None:
    assert embedded.get("/health/live").json() == {"status": "ok"}
    ready = embedded.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "backend": "embedded", "queue": True, "storage": True}


def test_ready_reports_an_unreachable_redis(tmp_path: Path) -> None:
    s = Settings(models_dir=tmp_path, storage_dir=tmp_path / "st", redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(s)) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["queue"] is False and c.get("/health/live").status_code == 200


def test_api_process_does_not_import_torch_in_celery_mode(service_models_dir: Path, tmp_path: Path) -> None:
    up = tmp_path / "scan.nii.gz"
    up.write_bytes(nifti_upload(tmp_path))
    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
app = create_app(Settings(models_dir={str(service_models_dir)!r}, storage_dir={str(tmp_path)!r},
                          redis_url='redis://127.0.0.1:1/0'))
c = TestClient(app)
assert c.get('/models').status_code == 200
bad = c.post('/encode', data={{'model': 'tiny'}}, files={{'file': ('x.nii.gz', b'junk')}})
assert bad.status_code == 422, bad.text
print('torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------ job machinery


def test_previews_are_oriented_and_windowed() -> None:
    from model.hagan.config import HAGANConfig
    from worker.previews import LABEL_HEIGHT, render_preview

    cfg = HAGANConfig(resolution=128, width=0.25, latent_dim=8)
    v = np.full((32, 32, 32), -1.0, np.float32)  # (z, y, x): air
    v[20:28, 20:28, 20:28] = 1.0  # a bright block superior (z), anterior (y), right (x) of the centre
    v[14:18, 20:28, 20:28] = 1.0  # crosses the middle axial slice too
    v[20:28, 14:18, 20:28] = 1.0  # and the middle coronal slice
    v[20:28, 20:28, 14:18] = 1.0  # and the middle sagittal slice
    img = render_preview(v, cfg)[LABEL_HEIGHT:]
    assert img.shape == (32, 96) and img.min() == 0 and img.max() == 255
    ax, cor, sag = img[:, :32], img[:, 32:64], img[:, 64:]
    # axial: anterior up, right on the right -> the block is in the upper right quadrant
    assert ax[:16, 16:].max() == 255 and ax[16:, :].max() == 0 and ax[:, :16].max() == 0
    # coronal: superior up, right on the right; sagittal: superior up, anterior on the right
    assert cor[:16, 16:].max() == 255 and cor[16:, :].max() == 0
    assert sag[:16, 16:].max() == 255 and sag[16:, :].max() == 0
    mri = HAGANConfig(resolution=128, width=0.25, latent_dim=8, modality="mri")
    assert render_preview(np.linspace(-1, 1, 16**3, dtype=np.float32).reshape(16, 16, 16), mri).max() == 255


def test_lapsed_leases_are_requeued_exactly_once() -> None:
    from worker.jobs import reap
    from worker.store import MemoryRecords, new_record

    recs = MemoryRecords()
    ids = ["a" * 32, "b" * 32, "c" * 32]
    now = time.time()
    recs.put(new_record(ids[0], "generate", {}) | {"state": "running", "lease_until": now - 1, "worker": "w1"})
    recs.put(new_record(ids[1], "train", {}) | {"state": "running", "lease_until": now + 60})
    recs.put(new_record(ids[2], "generate", {}) | {"state": "queued"})
    sent: list[tuple] = []
    assert reap(recs, lambda *a: sent.append(a)) == [ids[0]]
    assert reap(recs, lambda *a: sent.append(a)) == []  # a second reaper finds nothing to do
    assert sent == [(ids[0], 2, "generate")]
    r = recs.get(ids[0])
    assert r["state"] == "queued" and r["attempt"] == 2 and "w1" in r["progress"]["stage"]
    assert reap(recs, lambda *a: sent.append(a), now=now + 120) == [ids[1]]
    assert sent[-1] == (ids[1], 2, "train")


def test_job_parameters_travel_typed_from_route_to_worker(embedded: TestClient, tmp_path: Path) -> None:
    """Each route submits its kind's parameter model; the record holds its JSON, which parses back
    into the same model (what the worker runs), with the label resolved and a seed drawn."""
    from worker.params import EncodeParams, GenerateParams, TraverseParams, parse

    recs = embedded.app.state.jobs.records
    r = embedded.post("/generate", json={"model": "cond", "label": 1, "format": "npy"})
    p = parse("generate", recs.get(r.json()["job_id"])["params"])
    assert isinstance(p, GenerateParams) and p.label == "copd" and p.seed is not None and p.latent is None
    r = embedded.post("/generate", json={"model": "tiny", "latent": [0.5] * LATENT, "format": "npy"})
    p = parse("generate", recs.get(r.json()["job_id"])["params"])
    assert p.latent == [[0.5] * LATENT] and p.n == 1 and p.dump() == recs.get(r.json()["job_id"])["params"]
    r = embedded.post("/traverse", json={"model": "tiny", "direction": "soft", "steps": [0, 1], "seed": 3})
    t = parse("traverse", recs.get(r.json()["job_id"])["params"])
    assert isinstance(t, TraverseParams) and t.direction.name == "soft" and t.direction.attribute == "soft_tissue_ml"
    assert len(t.direction.vector) == LATENT and t.direction.intercept == 5.0 and t.steps == [0.0, 1.0]
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", nifti_upload(tmp_path))})
    e = parse("encode", recs.get(r.json()["job_id"])["params"])
    assert isinstance(e, EncodeParams) and e.filename == "scan.nii.gz" and e.space == "input" and e.series_uid is None
    for kind in ("generate", "traverse", "encode", "nope"):  # a record that does not fit names fields, not values
        with pytest.raises(ValueError, match="parameters do not fit|unknown job kind") as err:
            parse(kind, {"model": 3, "upload": "/srv/secret"})
        assert "/srv/secret" not in str(err.value)


def test_the_latent_is_checked_once_in_one_function() -> None:
    from worker.params import ParamError, latent_rows

    assert latent_rows([0.0, 1.0], 2) == [[0.0, 1.0]] and latent_rows([[0.0] * 2] * 3, 2, max_rows=3) == [[0.0] * 2] * 3
    for bad, msg in (
        ([0.0], "latent must have 2 values"),
        ([], "latent must have 2 values"),
        ([[0.0] * 2] * 4, "at most 3 latents"),
        ([[0.0] * 2, [0.0]], "per volume"),
        ([1e300, 0.0], r"within \+-1000"),
        ([float("inf"), 0.0], "NaN or infinite"),
    ):
        with pytest.raises(ParamError, match=msg):
            latent_rows(bad, 2, max_rows=3)


def test_one_label_resolver(embedded: TestClient) -> None:
    """model/labels.py label_index: what the CLI, the API's check and the job functions all call."""
    from model.labels import LabelError, label_index

    names = ["healthy", "copd"]
    assert [label_index(names, x) for x in ("copd", 1, "1", "healthy", 0)] == [1, 1, 1, 0, 0]
    assert label_index([], None) is None and label_index([], "") is None
    bads = ((None, "class-conditional: give label"), (2, "unknown label"), ("²", "unknown label"), (True, "label True"))
    for bad, msg in bads:
        with pytest.raises(LabelError, match=msg):
            label_index(names, bad)
    with pytest.raises(LabelError, match="not class-conditional"):
        label_index([], 0)
    r = embedded.post("/generate", json={"model": "cond", "seed": 1, "label": "²"})  # a digit int() cannot read
    assert r.status_code == 422 and "unknown label" in r.json()["detail"]


def test_stale_and_duplicate_deliveries_do_not_run(service_models_dir: Path, tmp_path: Path) -> None:
    from worker.jobs import execute
    from worker.store import MemoryRecords, Storage, new_record

    recs, st = MemoryRecords(), Storage(tmp_path)
    jid = "d" * 32
    recs.put(new_record(jid, "generate", {"model": "tiny", "seed": 1, "n": 1, "format": "npy"}) | {"attempt": 2})
    execute(jid, 1, recs, st, service_models_dir, device="cpu")  # an older attempt's message
    assert recs.get(jid)["state"] == "queued"
    recs.update(jid, state="running", lease_until=time.time() + 60, worker="elsewhere")
    execute(jid, 2, recs, st, service_models_dir, device="cpu")  # redelivered while another worker holds it
    assert recs.get(jid)["worker"] == "elsewhere" and not st.job_dir(jid).exists()
    recs.update(jid, state="queued")
    execute(jid, 2, recs, st, service_models_dir, device="cpu")
    done = recs.get(jid)
    assert done["state"] == "succeeded" and done["lease_until"] is None
    names = [f["name"] for f in done["result"]["files"]]
    assert names == ["latent.npy", "provenance.json", "volume_000.npy", "volume_000.png"]


# ------------------------------------------------------------------------------------ model cards, long poll
CARD = "# tiny\n\nA **test** model card.\n\n<script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_model_card_is_served_as_markdown(embedded: TestClient) -> None:
    models_dir = embedded.app.state.settings.models_dir
    (models_dir / "tiny" / "README.md").write_text(CARD)
    r = embedded.get("/models/tiny/card")
    assert r.status_code == 200 and r.text == CARD
    ms = {m["name"]: m for m in embedded.get("/models").json()}
    assert ms["tiny"]["card_url"] == "/models/tiny/card" and ms["cond"]["card_url"] is None
    assert r.headers["content-type"].startswith("text/markdown")
    # no card, unknown model, a name with a path: 404 with a message that names no server path
    for name, msg in (("cond", "has no model card"), ("nope", "unknown model"), ("..%2Ftiny", "")):
        r = embedded.get(f"/models/{name}/card")
        assert r.status_code == 404 and msg in r.json()["detail"], (name, r.text)
        assert str(models_dir) not in r.text and "README" not in r.text
    spec = embedded.get("/openapi.json").json()["paths"]["/models/{name}/card"]["get"]
    assert "text/markdown" in spec["responses"]["200"]["content"] and "404" in spec["responses"]


def test_long_poll_returns_when_the_job_ends(embedded: TestClient) -> None:
    """GET /jobs/{id}?wait=S: the job's final status as soon as it ends; after S seconds (capped)
    the status then; a finished job's at once."""
    import service.routes.jobs as jobs_route

    waits = embedded.app.state.jobs.waits
    jid = embedded.post("/generate", json={"model": "big", "seed": 3, "format": "npy"}).json()["job_id"]
    s = embedded.get(f"/jobs/{jid}?wait=0.2").json()  # a 256^3 job does not end in 0.2 s
    assert s["state"] in ("queued", "running"), s
    s = embedded.get(f"/jobs/{jid}?wait=300").json()  # capped at 60 s; the job ends well before
    if s["state"] not in ("succeeded", "failed", "cancelled"):  # a very slow machine: ask again
        s = embedded.get(f"/jobs/{jid}?wait=300").json()
    assert s["state"] == "succeeded" and s["result"]["files"], s
    t = time.monotonic()
    assert embedded.get(f"/jobs/{jid}?wait=60").json() == s  # finished: answered at once, the same status
    assert time.monotonic() - t < 30
    assert waits.waiting() == 0
    # the cap: a huge wait on a running job comes back after the (here lowered) maximum, not never
    jid = embedded.post("/generate", json={"model": "big", "seed": 4, "format": "npy"}).json()["job_id"]
    old = jobs_route.WAIT_MAX_SECONDS
    jobs_route.WAIT_MAX_SECONDS = 0.3
    try:
        assert embedded.get(f"/jobs/{jid}?wait=1e9").json()["state"] in ("queued", "running")
    finally:
        jobs_route.WAIT_MAX_SECONDS = old
    embedded.delete(f"/jobs/{jid}")
    for bad in ("-1", "soon", "nan"):
        r = embedded.get(f"/jobs/{jid}?wait={bad}")
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "wait"], r.text
    assert embedded.get("/jobs/" + "0" * 32 + "?wait=5").status_code == 404
    _wait_idle(embedded)


def _wait_idle(client: TestClient) -> None:
    """Until the embedded worker thread has finished every job (a cancelled one stops at its next step)."""
    t = time.monotonic()
    while client.app.state.jobs.pending() and time.monotonic() - t < 120:
        time.sleep(0.1)


def test_long_poll_is_woken_by_a_cancel(embedded: TestClient) -> None:
    """A waiting request is woken by a state change any writer makes (here DELETE from another
    request), not by polling: it answers 'cancelled' long before its wait."""
    import threading

    jid = embedded.post("/generate", json={"model": "big", "seed": 5, "n": 4, "format": "npy"}).json()["job_id"]
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(embedded.get(f"/jobs/{jid}?wait=60").json()))
    t = time.monotonic()
    waiter.start()
    while embedded.app.state.jobs.waits.waiting() == 0:  # the request is asleep on its event
        assert waiter.is_alive() and time.monotonic() - t < 30, got
        time.sleep(0.02)
    assert embedded.delete(f"/jobs/{jid}").json()["action"] == "cancelled"
    waiter.join(60)
    assert got["state"] == "cancelled" and time.monotonic() - t < 45, got
    _wait_idle(embedded)
