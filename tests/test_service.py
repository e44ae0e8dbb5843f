"""The HTTP service: embedded queue, and Celery on a real Redis server with real worker processes."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.hagan.config import HAGANConfig
from model.hagan.infer import HAGANModel
from service.app import create_app
from service.settings import Settings

LATENT = 16


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=LATENT), seed=0).save_pretrained(d / "tiny")
    HAGANModel.init(
        HAGANConfig(resolution=128, width=0.25, latent_dim=LATENT, class_names=["healthy", "copd"]), seed=1
    ).save_pretrained(d / "cond")
    from model.latent.directions import Direction, save_direction

    save_direction(d / "tiny", Direction("soft", "soft_tissue_ml", torch.linspace(-1, 1, LATENT), 5.0, 0.9, None, 64))
    # a slower model for the worker-kill test: 256^3 output
    HAGANModel.init(HAGANConfig(resolution=256, width=0.25, latent_dim=LATENT), seed=2).save_pretrained(d / "big")
    return d


def wait(client: TestClient, job_id: str, timeout: float = 300) -> dict:
    t = time.time()
    while time.time() - t < timeout:
        s = client.get(f"/jobs/{job_id}").json()
        if s["state"] in ("succeeded", "failed", "cancelled"):
            return s
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {s}")


def nifti_upload(tmp: Path, shape=(32, 32, 32)) -> bytes:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    v = np.where(x**2 + y**2 + z**2 < 0.6, 40.0, -1000.0).astype(np.float32)
    p = tmp / "scan.nii.gz"
    nib.save(nib.Nifti1Image(v.transpose(2, 1, 0).copy(), np.diag([2.0, 2.0, 2.0, 1.0])), p)
    return p.read_bytes()


# ------------------------------------------------------------------------------------ embedded


@pytest.fixture(scope="module")
def embedded(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    s = Settings(
        models_dir=models_dir,
        storage_dir=tmp_path_factory.mktemp("storage"),
        redis_url=None,
        admin_token="s3cret",
        max_upload_mb=1,
    )
    with TestClient(create_app(s)) as c:
        yield c


def test_models_listing(embedded: TestClient) -> None:
    ms = {m["name"]: m for m in embedded.get("/models").json()}
    assert set(ms) == {"tiny", "cond", "big"}
    assert ms["cond"]["classes"] == ["healthy", "copd"] and ms["tiny"]["latent_dim"] == LATENT
    assert embedded.get("/models/tiny").json()["modality"] == "ct"
    r = embedded.get("/models/nope")
    assert r.status_code == 404 and "unknown model" in r.json()["detail"]


def test_generate_poll_download_read_back(embedded: TestClient, tmp_path: Path) -> None:
    r = embedded.post("/generate", json={"model": "tiny", "seed": 5, "n": 2})
    assert r.status_code == 202 and r.json()["status_url"] == f"/jobs/{r.json()['job_id']}"
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    names = [f["name"] for f in s["result"]["files"]]
    assert names == ["latent.npy", "volume_000.nii.gz", "volume_001.nii.gz"]
    body = embedded.get(s["result"]["files"][1]["url"]).content
    assert len(body) == s["result"]["files"][1]["bytes"]
    (tmp_path / "v.nii.gz").write_bytes(body)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (128, 128, 128) and img.get_data_dtype() == np.int16
    # the same seed through the model directly gives the same volume
    m = HAGANModel.from_pretrained(embedded.app.state.settings.models_dir / "tiny")
    v = m.generate(m.sample_latents(2, 5))[0, 0].numpy()
    expect = np.rint(-1024 + (v + 1) / 2 * 1624).transpose(2, 1, 0)
    assert np.abs(np.asarray(img.dataobj) - expect).max() <= 1
    z = np.load(io.BytesIO(embedded.get(f"/jobs/{s['job_id']}/files/latent.npy").content))
    assert z.shape == (2, LATENT) and np.allclose(z, m.sample_latents(2, 5).numpy())


def test_generate_from_latent_and_label(embedded: TestClient) -> None:
    z = [0.1] * LATENT
    s = wait(
        embedded,
        embedded.post("/generate", json={"model": "cond", "latent": z, "label": "copd", "format": "npy"}).json()[
            "job_id"
        ],
    )
    assert s["state"] == "succeeded" and s["result"]["files"][1]["name"] == "volume_000.npy"


@pytest.mark.parametrize(
    "body,status,msg",
    [
        ({"model": "nope", "seed": 1}, 404, "unknown model"),
        ({"model": "tiny", "seed": -1}, 422, ""),
        ({"model": "tiny", "seed": 2**63}, 422, ""),
        ({"model": "tiny", "seed": "abc"}, 422, ""),
        ({"model": "tiny", "n": 0}, 422, ""),
        ({"model": "tiny", "n": 1000}, 422, "at most"),
        ({"model": "tiny", "latent": [0.0] * 3}, 422, "latent must have"),
        ({"model": "tiny", "latent": []}, 422, "latent must have"),
        ({"model": "tiny", "latent": [[0.0] * LATENT] * 40}, 422, "at most"),
        ({"model": "tiny", "latent": [[0.0] * LATENT, [0.0] * 3]}, 422, "latent must have"),
        ({"model": "cond", "seed": 1, "label": 7}, 422, "unknown label"),
        ({"seed": 1}, 422, "model"),
        ({"model": "tiny", "latent": [float("nan")] * LATENT}, 422, ""),
        ({"model": "tiny", "label": "copd"}, 422, "not class-conditional"),
        ({"model": "cond", "seed": 1}, 422, "class-conditional"),
        ({"model": "cond", "seed": 1, "label": "flu"}, 422, "unknown label"),
        ({"model": "tiny", "format": "png"}, 422, ""),
    ],
)
def test_bad_generate_requests_get_4xx(embedded: TestClient, body: dict, status: int, msg: str) -> None:
    import json

    r = embedded.post(
        "/generate", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert msg in r.text


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
    assert {f["name"] for f in s["result"]["files"]} == {"latent.npy", "reconstruction.nii.gz"}
    assert len(s["result"]["latent"]) == LATENT
    z = np.load(io.BytesIO(embedded.get(f"/jobs/{s['job_id']}/files/latent.npy").content))
    assert np.allclose(z[0], s["result"]["latent"])


def test_bad_uploads_get_4xx(embedded: TestClient, tmp_path: Path) -> None:
    def post(name: str, data: bytes, model: str = "tiny"):
        return embedded.post("/encode", data={"model": model}, files={"file": (name, data, "application/octet-stream")})

    good = nifti_upload(tmp_path)
    assert post("scan.nii.gz", good[: len(good) // 2]).status_code == 422  # truncated
    assert post("scan.nii.gz", b"not a volume at all").status_code == 422
    flat = tmp_path / "2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), flat)
    r = post("2d.nii.gz", flat.read_bytes())
    assert r.status_code == 422 and "2D" in r.json()["detail"]
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), nan)
    assert "NaN" in post("nan.nii.gz", nan.read_bytes()).json()["detail"]
    assert post("scan.nii.gz", b"x" * (2 * 2**20)).status_code == 413  # over VOXGEN_MAX_UPLOAD_MB=1
    bomb = gzip.compress(b"\0" * (64 * 2**20))  # 64 MiB of zeros in ~64 kB
    r = post("bomb.nii.gz", bomb)
    assert r.status_code == 422 and "bytes" in r.json()["detail"]
    assert post("../../etc/passwd.nii.gz", good).status_code == 422
    assert post("scan.nii.gz", good, model="nope").status_code == 404


def test_job_files_are_safe_and_cancel_works(embedded: TestClient) -> None:
    assert embedded.get("/jobs/" + "0" * 32).status_code == 404
    assert embedded.get("/jobs/../../etc").status_code == 404
    jid = embedded.post("/generate", json={"model": "tiny", "seed": 1}).json()["job_id"]
    assert embedded.get(f"/jobs/{jid}/files/..%2F..%2Fsecret").status_code == 404
    wait(embedded, jid)
    jid = embedded.post("/generate", json={"model": "big", "seed": 1, "n": 3}).json()["job_id"]
    r = embedded.delete(f"/jobs/{jid}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    time.sleep(1.0)
    assert embedded.get(f"/jobs/{jid}").json()["state"] == "cancelled"


def test_traverse_named_direction_to_a_target(embedded: TestClient) -> None:
    assert embedded.get("/models/tiny").json()["directions"] == ["soft"]
    r = embedded.post("/traverse", json={"model": "tiny", "seed": 2, "direction": "soft", "target": 12.0, "n_steps": 3})
    assert r.status_code == 202, r.text
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    steps = s["result"]["steps"]
    assert [x["file"] for x in steps] == ["step_00.nii.gz", "step_01.nii.gz", "step_02.nii.gz"]
    assert steps[0]["alpha"] == 0 and abs(steps[-1]["predicted"] - 12.0) < 1e-3
    assert all(isinstance(x["measured"], float) for x in steps)
    names = {f["name"] for f in s["result"]["files"]}
    assert {"step_00.nii.gz", "step_02.nii.gz", "latents.npy"} <= names


def test_traverse_from_an_encode_job_with_a_vector(embedded: TestClient, tmp_path: Path) -> None:
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", nifti_upload(tmp_path))})
    enc = wait(embedded, r.json()["job_id"])
    body = {"model": "tiny", "job_id": enc["job_id"], "direction": [1.0] + [0.0] * (LATENT - 1), "steps": [0, 2]}
    s = wait(embedded, embedded.post("/traverse", json=body).json()["job_id"])
    assert s["state"] == "succeeded", s
    first, second = s["result"]["steps"]
    assert np.allclose(first["latent"], enc["result"]["latent"], atol=1e-6)
    assert np.isclose(second["latent"][0] - first["latent"][0], 2.0, atol=1e-5)


@pytest.mark.parametrize(
    "body,status,msg",
    [
        ({"model": "tiny", "direction": "nope", "steps": [1]}, 404, "no direction"),
        ({"model": "tiny", "direction": "soft"}, 422, "either steps"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "target": 3}, 422, "either steps"),
        ({"model": "tiny", "direction": [1.0, 2.0], "steps": [1]}, 422, "direction vector"),
        ({"model": "tiny", "direction": [1.0] * LATENT, "target": 3}, 422, "named"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "job_id": "0" * 32}, 422, "encode job"),
        ({"model": "tiny", "direction": "soft", "steps": [1], "seed": 1, "latent": [0.0] * LATENT}, 422, "at most one"),
        ({"model": "nope", "direction": "soft", "steps": [1]}, 404, "unknown model"),
    ],
)
def test_bad_traverse_requests_get_4xx(embedded: TestClient, body: dict, status: int, msg: str) -> None:
    r = embedded.post("/traverse", json=body)
    assert r.status_code == status, r.text
    assert msg in r.text


def test_admin_train_auth_and_a_train_job_registers_the_model(embedded: TestClient, tmp_path: Path) -> None:
    from model.data.datasets import prepare_dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "scan.nii.gz").write_bytes(nifti_upload(tmp_path))
    prepare_dataset(src, tmp_path / "ds", HAGANConfig(resolution=128))
    body = {
        "data": str(tmp_path / "ds"),
        "name": "trained1",
        "iterations": 2,
        "batch": 1,
        "width": 0.25,
        "latent_dim": 8,
    }
    assert embedded.post("/admin/train", json=body).status_code == 401
    assert embedded.post("/admin/train", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": "Bearer s3cret"}
    assert embedded.post("/admin/train", json=body | {"name": "tiny"}, headers=auth).status_code == 409
    assert embedded.post("/admin/train", json=body | {"name": "../x"}, headers=auth).status_code == 422
    r = embedded.post("/admin/train", json=body, headers=auth)
    assert r.status_code == 202, r.text
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded", s
    assert {"metrics.jsonl", "preview.png"} <= {f["name"] for f in s["result"]["files"]}
    assert "trained1" in {m["name"] for m in embedded.get("/models").json()}
    g = wait(embedded, embedded.post("/generate", json={"model": "trained1", "seed": 1}).json()["job_id"])
    assert g["state"] == "succeeded"
    bad = embedded.post("/admin/train", json=body | {"name": "t2", "data": str(tmp_path / "none")}, headers=auth)
    failed = wait(embedded, bad.json()["job_id"])
    assert failed["state"] == "failed" and "manifest" in failed["error"]


def test_expired_results_are_cleaned_up(tmp_path: Path) -> None:
    from worker.store import Storage

    st = Storage(tmp_path)
    old, new = st.job_dir("a" * 32), st.job_dir("b" * 32)
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "volume_000.nii.gz").write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert st.cleanup(3600) == 1
    assert not old.exists() and new.exists()


def test_health(embedded: TestClient) -> None:
    assert embedded.get("/health/live").json() == {"status": "ok"}
    assert embedded.get("/health/ready").json()["ready"] is True


def test_api_process_does_not_import_torch_in_celery_mode(models_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from service.app import create_app; from service.settings import Settings;"
        f"create_app(Settings(models_dir={str(models_dir)!r}, storage_dir={str(tmp_path)!r},"
        " redis_url='redis://127.0.0.1:1/0')); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------ Redis + Celery


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class Workers:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, []

    def start(self) -> subprocess.Popen:
        log = open(self.log_dir / f"worker{len(self.procs)}.log", "w")
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "model.cli",
                "worker",
                "--queues",
                "gpu",
                "--device",
                "cpu",
                "--log-level",
                "warning",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def celery(models_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("celery-storage")
    lease = 4.0
    env = os.environ | {
        "VOXGEN_REDIS_URL": redis_url,
        "VOXGEN_MODELS_DIR": str(models_dir),
        "VOXGEN_STORAGE_DIR": str(storage),
        "VOXGEN_JOB_LEASE_SECONDS": str(lease),
    }
    workers = Workers(env, tmp_path_factory.mktemp("logs"))
    workers.start()
    s = Settings(models_dir=models_dir, storage_dir=storage, redis_url=redis_url, job_lease_seconds=lease)
    with TestClient(create_app(s)) as c:
        c.workers = workers  # type: ignore[attr-defined]
        yield c
    workers.stop_all()


def test_celery_generate_same_volume_as_embedded(celery: TestClient, embedded: TestClient) -> None:
    a = wait(celery, celery.post("/generate", json={"model": "tiny", "seed": 9, "format": "npy"}).json()["job_id"])
    b = wait(embedded, embedded.post("/generate", json={"model": "tiny", "seed": 9, "format": "npy"}).json()["job_id"])
    assert a["state"] == b["state"] == "succeeded", (a, b)
    assert a["worker"] != b["worker"]  # really ran in another process
    va = np.load(io.BytesIO(celery.get(f"/jobs/{a['job_id']}/files/volume_000.npy").content))
    vb = np.load(io.BytesIO(embedded.get(f"/jobs/{b['job_id']}/files/volume_000.npy").content))
    assert np.array_equal(va, vb)
    assert celery.get("/health/ready").json() == {"ready": True, "backend": "celery", "queue": True, "storage": True}


def test_celery_encode_upload(celery: TestClient, tmp_path: Path) -> None:
    r = celery.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", nifti_upload(tmp_path))})
    s = wait(celery, r.json()["job_id"])
    assert s["state"] == "succeeded" and len(s["result"]["latent"]) == LATENT


def test_celery_traverse(celery: TestClient) -> None:
    r = celery.post(
        "/traverse", json={"model": "tiny", "seed": 1, "direction": "soft", "steps": [0, 1], "format": "npy"}
    )
    s = wait(celery, r.json()["job_id"])
    assert s["state"] == "succeeded" and len(s["result"]["steps"]) == 2


def test_killed_worker_does_not_lose_the_job(celery: TestClient) -> None:
    jid = celery.post("/generate", json={"model": "big", "seed": 4, "n": 6, "format": "npy"}).json()["job_id"]
    victim = celery.workers.procs[-1]  # type: ignore[attr-defined]
    t = time.time()
    while celery.get(f"/jobs/{jid}").json()["state"] != "running":
        assert time.time() - t < 120, "the job never started"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)  # the whole worker process, mid-job
    victim.wait(10)
    celery.workers.start()  # type: ignore[attr-defined]
    s = wait(celery, jid, timeout=300)
    assert s["state"] == "succeeded", s
    assert s["attempt"] >= 2  # it ran again after the lease lapsed
    assert [f["name"] for f in s["result"]["files"]][-1] == "volume_005.npy"
