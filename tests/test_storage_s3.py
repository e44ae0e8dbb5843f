"""Results and uploads in an S3-compatible object store (VOXGEN_STORAGE_URL=s3://...), against a real
S3 server started here (moto's server mode on a free loopback port), not a mock object."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import _free_port
from tests.conftest import service_wait as wait
from worker.store import S3Storage, new_job_id, new_record, open_storage

MiB = 2**20
BUCKET = "voxgen-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in this process (its own thread), with a bucket and dummy credentials."""
    pytest.importorskip("moto.server", reason="needs moto[server] (S3 test server)")
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def store(endpoint: str, spool: Path, prefix: str) -> S3Storage:
    return S3Storage(f"s3://{BUCKET}/{prefix}", spool, endpoint_url=endpoint, part_bytes=5 * MiB)


def objects(st: S3Storage) -> list[str]:
    return sorted(o["Key"] for o in st._keys(st.prefix))


def pending_uploads(st: S3Storage) -> list[str]:
    return [u["Key"] for u in st.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=st.prefix).get("Uploads", [])]


def read_all(st: S3Storage, job_id: str, name: str) -> bytes | None:
    got = st.open(job_id, name)
    return None if got is None else b"".join(got[0])


def test_round_trip_small_and_multipart(s3_endpoint: str, tmp_path: Path) -> None:
    st = store(s3_endpoint, tmp_path / "spool", "rt")
    jid = new_job_id()
    scratch = st.scratch(jid)
    big = np.random.default_rng(0).bytes(12 * MiB + 123)  # three parts of 5 MiB
    (scratch / "volume_000.nii.gz").write_bytes(big)
    (scratch / "latent.npy").write_bytes(b"small")
    files = st.publish(jid, scratch)
    assert files == [{"name": "latent.npy", "bytes": 5}, {"name": "volume_000.nii.gz", "bytes": len(big)}]
    assert not scratch.exists()
    chunks, size = st.open(jid, "volume_000.nii.gz")
    assert size == len(big) and hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(big).digest()
    assert read_all(st, jid, "latent.npy") == b"small"
    assert st.open(jid, "absent.npy") is None and st.open(jid, "../x") is None
    assert st.file_path(jid, "volume_000.nii.gz").read_bytes() == big  # the local-path view (cache)
    assert objects(st) == [f"rt/jobs/{jid}/latent.npy", f"rt/jobs/{jid}/volume_000.nii.gz"]
    assert st.ping() and pending_uploads(st) == []
    st.delete_job(jid)
    assert objects(st) == [] and st.open(jid, "latent.npy") is None


def test_an_upload_reaches_a_worker_on_another_machine(s3_endpoint: str, tmp_path: Path) -> None:
    api, worker = store(s3_endpoint, tmp_path / "api", "up"), store(s3_endpoint, tmp_path / "worker", "up")
    jid = new_job_id()
    p = api.upload_path(jid, "scan.nii.gz")
    p.write_bytes(b"scan bytes")
    api.commit_upload(jid)  # at submission
    assert not p.exists() and objects(api) == [f"up/uploads/{jid}/upload.nii.gz"]
    got = worker.fetch_upload(jid, str(p))  # the path as the API recorded it: only the name counts
    assert got.read_bytes() == b"scan bytes" and got.is_relative_to(tmp_path / "worker")
    worker.delete_upload(jid)
    assert objects(api) == [] and not got.exists()
    with pytest.raises(FileNotFoundError, match="no longer in storage"):
        worker.fetch_upload(jid, str(p))


def test_storage_url_selects_s3(s3_endpoint: str, tmp_path: Path) -> None:
    s = Settings(storage_dir=tmp_path, storage_url=f"s3://{BUCKET}/sel", s3_endpoint_url=s3_endpoint)
    st = open_storage(s)
    assert isinstance(st, S3Storage) and st.bucket == BUCKET and st.prefix == "sel/"
    assert type(open_storage(Settings(storage_dir=tmp_path))).__name__ == "Storage"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Storage("http://not-s3", tmp_path)


# A worker that publishes a job's results and is killed with SIGKILL during the upload of its
# second, multipart file: it stops right after the first part reached the server.
KILLED_WORKER = """
import sys, threading, time
import worker.jobs as jobs
from worker.store import RedisRecords, S3Storage

redis_url, endpoint, spool, job_id, models = sys.argv[1:6]
st = S3Storage("s3://voxgen-test/kill", spool, endpoint_url=endpoint, part_bytes=5 * 2**20)
real_upload_part = st.s3.upload_part

def upload_part(**kw):
    r = real_upload_part(**kw)
    print("PART", kw["PartNumber"], flush=True)
    threading.Event().wait()  # hangs here until killed
    return r

st.s3.upload_part = upload_part

def job(params, model, out, progress):
    (out / "a_small.npy").write_bytes(b"a" * 100)
    (out / "b_large.nii.gz").write_bytes(bytes(range(256)) * (12 * 2**20 // 256))
    return {}

jobs.JOBS["generate"] = job
jobs.get_model = lambda *a, **k: None
jobs.execute(job_id, 1, RedisRecords(redis_url, 3600), st, models, device="cpu", lease_seconds=1.5)
"""


def test_a_killed_upload_is_never_listed(s3_endpoint: str, redis_url: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import worker.jobs as jobs
    from worker.store import RedisRecords

    recs = RedisRecords(redis_url, 3600)
    st = store(s3_endpoint, tmp_path / "spool", "kill")
    jid = new_job_id()
    recs.put(new_record(jid, "generate", {"model": "tiny", "seed": 1}))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WORKER), redis_url, s3_endpoint, str(tmp_path / "w"), jid, "."],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "PART 1", f"the worker did not reach its upload: {line!r}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    rec = recs.get(jid)
    assert rec["state"] == "running" and rec["result"] is None  # nothing listed
    # the half-uploaded file is invisible: its key does not exist, only an incomplete multipart upload
    assert read_all(st, jid, "b_large.nii.gz") is None and st.file_path(jid, "b_large.nii.gz") is None
    assert pending_uploads(st) == [f"kill/jobs/{jid}/b_large.nii.gz"]
    # through the API: the job is running, and no file of it is served (not even the complete one)
    s = Settings(
        models_dir=tmp_path, storage_dir=tmp_path / "api", redis_url=redis_url, job_lease_seconds=1.5,
        storage_url=f"s3://{BUCKET}/kill", s3_endpoint_url=s3_endpoint,
    )  # fmt: skip
    with TestClient(create_app(s)) as api:
        assert api.get(f"/jobs/{jid}").json()["state"] in ("running", "queued")
        assert api.get(f"/jobs/{jid}/files/a_small.npy").status_code == 404
        assert api.get(f"/jobs/{jid}/files/b_large.nii.gz").status_code == 404
        # the API's reaper re-queues the job once the dead worker's lease lapsed; a new worker runs it
        t0 = time.time()
        while recs.get(jid)["attempt"] == 1 and time.time() - t0 < 30:
            time.sleep(0.2)
        assert recs.get(jid)["state"] == "queued" and recs.get(jid)["attempt"] == 2
        monkeypatch.setattr(jobs, "get_model", lambda *a, **k: None)
        big = bytes(range(256)) * (12 * MiB // 256)

        def job(params, model, out, progress):  # noqa: ANN001, ANN202
            (out / "a_small.npy").write_bytes(b"a" * 100)
            (out / "b_large.nii.gz").write_bytes(big)
            return {}

        monkeypatch.setitem(jobs.JOBS, "generate", job)
        jobs.execute(jid, 2, recs, st, tmp_path, device="cpu", lease_seconds=1.5)
        done = api.get(f"/jobs/{jid}").json()
        assert done["state"] == "succeeded"
        listed = {f["name"]: f["bytes"] for f in done["result"]["files"]}
        assert listed.pop("provenance.json") > 0  # every job's results carry their provenance
        assert listed == {"a_small.npy": 100, "b_large.nii.gz": len(big)}
        body = api.get(f"/jobs/{jid}/files/b_large.nii.gz")
        assert body.status_code == 200 and body.content == big
    # cleanup: the dead worker's incomplete upload is aborted and the expired job's objects deleted
    assert pending_uploads(st) == [f"kill/jobs/{jid}/b_large.nii.gz"]
    assert st.cleanup(0) >= 1
    assert pending_uploads(st) == [] and objects(st) == []


def test_embedded_service_on_s3(s3_endpoint: str, service_models_dir: Path, tmp_path: Path) -> None:
    """The whole service with S3 storage: a generated volume is published to the bucket and served
    back by the API; the uploaded scan of an encode job goes through the bucket and is removed."""
    from tests.conftest import service_nifti_upload

    s = Settings(
        models_dir=service_models_dir, storage_dir=tmp_path / "spool", storage_url=f"s3://{BUCKET}/svc",
        s3_endpoint_url=s3_endpoint,
    )  # fmt: skip
    with TestClient(create_app(s)) as c:
        st = c.app.state.storage
        assert c.get("/health/ready").json()["storage"] is True
        s1 = wait(c, c.post("/generate", json={"model": "tiny", "seed": 4, "format": "npy"}).json()["job_id"])
        assert s1["state"] == "succeeded"
        names = {f["name"] for f in s1["result"]["files"]}
        # the listed files, and the copy of the record a record store that lost it re-indexes from
        assert {f"svc/jobs/{s1['job_id']}/{n}" for n in names | {".record.json"}} == set(objects(st))
        assert st.get_record(s1["job_id"])["result"] == s1["result"]
        assert c.get(f"/jobs/{s1['job_id']}/files/.record.json").status_code == 404  # never served
        vol = np.load(__import__("io").BytesIO(c.get(f"/jobs/{s1['job_id']}/files/volume_000.npy").content))
        assert vol.shape == (128, 128, 128)
        scan = service_nifti_upload(tmp_path)
        r = c.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", scan)})
        s2 = wait(c, r.json()["job_id"])
        assert s2["state"] == "succeeded" and len(s2["result"]["latent"]) == 16
        t0 = time.time()  # the worker removes the input right after it recorded the job's end
        while [k for k in objects(st) if "/uploads/" in k] and time.time() - t0 < 30:
            time.sleep(0.1)
        assert not [k for k in objects(st) if "/uploads/" in k]
    with TestClient(create_app(s)) as c:  # a new process: its records start empty; the bucket has the copy
        again = c.get(f"/jobs/{s1['job_id']}")
        assert again.status_code == 200 and again.json()["result"] == s1["result"]


def test_file_response_streams_from_either_store(s3_endpoint: str, tmp_path: Path) -> None:
    """service.storage.file_response: what GET /jobs/{id}/files/{name} sends, for both stores."""
    from fastapi import FastAPI, HTTPException

    from service.storage import file_response
    from worker.store import Storage

    data = np.random.default_rng(1).bytes(7 * MiB + 5)
    stores = {"local": Storage(tmp_path / "local"), "s3": store(s3_endpoint, tmp_path / "spool", "resp")}
    jid = new_job_id()
    for st in stores.values():
        scratch = st.scratch(jid)
        (scratch / "volume_000.nii.gz").write_bytes(data)
        st.publish(jid, scratch)
    app = FastAPI()

    @app.get("/{which}/{name}")
    def get(which: str, name: str):  # noqa: ANN202
        r = file_response(stores[which], jid, name, "application/gzip")
        if r is None:
            raise HTTPException(404)
        return r

    with TestClient(app) as c:
        for which in stores:
            r = c.get(f"/{which}/volume_000.nii.gz")
            assert r.status_code == 200 and r.content == data, which
            assert r.headers["content-length"] == str(len(data)) and r.headers["content-type"] == "application/gzip"
            assert 'filename="volume_000.nii.gz"' in r.headers["content-disposition"]
            assert c.get(f"/{which}/absent.nii.gz").status_code == 404
    stores["s3"].delete_job(jid)
