"""Nothing left behind: a dead attempt's scratch folder is removed when its job is re-queued or a
worker starts (not only by the 24 h cleanup), and a record store that lost its records (Redis
restarted without persistence, the embedded queue's process restarted) re-indexes succeeded jobs
from the copy beside their files, so no result folder is orphaned.  Real Redis, real workers."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from benchmarks._common import redis_owned_by, start_redis
from service.app import create_app
from service.settings import Settings
from tests.conftest import _free_port, service_wait
from tests.test_worker_integration import Workers
from worker.jobs import reap
from worker.store import RECORD_COPY, MemoryRecords, Storage, new_record

A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


def _until(cond: Any, timeout: float, what: str) -> None:
    t = time.time()
    while not cond():
        assert time.time() - t < timeout, what
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ scratch folders


def test_scratch_names_carry_the_attempt_and_a_new_attempt_drops_older_ones(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    first = st.scratch(A, 1)
    assert first.name.startswith(f".{A}.work.1.") and first.is_dir()
    second = st.scratch(A, 2)
    assert not first.exists() and second.name.startswith(f".{A}.work.2.")
    other = st.scratch(B, 1)
    assert {(j, a) for j, a, _ in st.scratch_dirs()} == {(A, 2), (B, 1)} and other.is_dir()
    assert st.drop_scratch(A) == 1 and not second.exists() and other.is_dir()


def test_sweep_removes_every_scratch_folder_no_live_attempt_owns(tmp_path: Path) -> None:
    st, recs = Storage(tmp_path), MemoryRecords()
    now = time.time()
    recs.put(new_record(A, "generate", {}) | {"state": "running", "attempt": 2, "lease_until": now + 60})
    recs.put(new_record(B, "generate", {}) | {"state": "succeeded"})
    recs.put(new_record(D, "generate", {}) | {"state": "queued", "attempt": 2})
    jobs = tmp_path / "jobs"
    dead_a, live_a = jobs / f".{A}.work.1.11.1", jobs / f".{A}.work.2.12.1"  # A: attempt 1 died, 2 runs
    finished_b = jobs / f".{B}.work.1.13.1"  # B finished since
    unknown_c = jobs / f".{C}.work.1.14.1"  # C's record expired or was lost
    requeued_d = jobs / f".{D}.work.1.15.1"  # D re-queued, not yet claimed again
    # names before attempts were in them: kept while the job runs (a worker not yet upgraded)
    legacy_a, legacy_b = jobs / f".{A}.work.16.1", jobs / f".{B}.work.17.1"
    for d in (dead_a, live_a, finished_b, unknown_c, requeued_d, legacy_a, legacy_b):
        d.mkdir(parents=True)
        (d / "volume_000.npy").write_bytes(b"x" * 1000)
    results = st.job_dir(B)
    results.mkdir()
    assert st.sweep_scratch(recs) == 5
    assert live_a.is_dir() and results.is_dir()
    assert sorted(p.name for p in jobs.iterdir() if p.name.startswith(".")) == sorted([live_a.name, legacy_a.name])
    assert st.drop_scratch(A, before_attempt=2) == 1 and not legacy_a.exists() and live_a.is_dir()


def test_reap_removes_the_lapsed_attempts_scratch(tmp_path: Path) -> None:
    st, recs = Storage(tmp_path), MemoryRecords()
    recs.put(new_record(A, "generate", {}) | {"state": "running", "lease_until": time.time() - 1, "worker": "w1"})
    dead = st.scratch(A, 1)
    (dead / "volume_000.npy").write_bytes(b"half")
    sent: list[tuple] = []
    assert reap(recs, lambda *a: sent.append(a), storage=st) == [A]
    assert sent == [(A, 2, "generate")] and not dead.exists()


# ------------------------------------------------------------------------------------ embedded restart


def test_embedded_restart_reindexes_results_and_sweeps_scratch(service_models_dir: Path, tmp_path: Path) -> None:
    s = Settings(models_dir=service_models_dir, storage_dir=tmp_path, redis_url=None)
    with TestClient(create_app(s)) as c:
        jid = c.post("/generate", json={"model": "tiny", "seed": 4, "format": "npy"}).json()["job_id"]
        done = service_wait(c, jid)
        assert done["state"] == "succeeded"
        body = c.get(f"/jobs/{jid}/files/volume_000.npy").content
        assert c.get(f"/jobs/{jid}/files/{RECORD_COPY}").status_code == 404  # the copy is never served
        assert 'voxgen_jobs_submitted_total{kind="generate",model="tiny"} 1.0' in c.get("/metrics").text
    copy = Storage(tmp_path).get_record(jid)
    assert copy is not None and copy["state"] == "succeeded" and copy["result"] == done["result"]
    assert RECORD_COPY not in {f["name"] for f in done["result"]["files"]}
    stale = tmp_path / "jobs" / f".{C}.work.1.99.1"  # a process killed mid-job left it
    stale.mkdir()
    with TestClient(create_app(s)) as c2:  # a new process: its records start empty
        assert not stale.exists()
        again = c2.get(f"/jobs/{jid}")
        assert again.status_code == 200, again.text
        assert again.json()["state"] == "succeeded" and again.json()["result"] == done["result"]
        assert c2.get(f"/jobs/{jid}/files/volume_000.npy").content == body
        metrics = c2.get("/metrics").text
        assert 'voxgen_jobs_submitted_total{kind="generate"' not in metrics  # a restore is no submission
        assert c2.get("/jobs/" + C).status_code == 404
        assert c2.delete(f"/jobs/{jid}").json()["action"] == "deleted"
        assert not Storage(tmp_path).job_dir(jid).exists() and c2.get(f"/jobs/{jid}").status_code == 404


def test_an_expired_record_copy_is_not_restored(service_models_dir: Path, tmp_path: Path) -> None:
    st = Storage(tmp_path)
    st.job_dir(A).mkdir(parents=True)
    old = new_record(A, "generate", {"model": "tiny"}) | {"state": "succeeded", "created": time.time() - 7200}
    st.put_record(A, old | {"result": {"files": []}})
    s = Settings(models_dir=service_models_dir, storage_dir=tmp_path, redis_url=None, result_ttl_hours=1)
    with TestClient(create_app(s)) as c:
        assert c.get(f"/jobs/{A}").status_code == 404
        st.put_record(A, old | {"created": time.time() - 60, "result": {"files": []}})
        assert c.get(f"/jobs/{A}").json()["state"] == "succeeded"


# ------------------------------------------------------------------------------------ Celery, real processes


class RedisServer:
    """A redis-server of this module's own (no persistence), on a port that survives restarts."""

    def __init__(self, d: Path) -> None:
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            pytest.skip("redis-server is not installed")
        self.dir = d
        self.proc, self.url = start_redis(d)  # a port of its own (another one where one was taken)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def start(self) -> None:
        """Restart on the same port: the workers' URL stays valid."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.exe, *args, "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not redis_owned_by(self.proc, self.port):
            self.proc.kill()
            raise RuntimeError(f"redis-server did not start again on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_a_test_redis_never_reuses_a_server_on_a_taken_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel test workers start redis-servers on ports that were free a moment ago: where another
    server holds the port first, the new one exits and a ping would reach the other's data.
    ``start_redis`` then takes another port and returns a server that is its own process."""
    import benchmarks._common as common

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    first, url = common.start_redis(tmp_path)
    taken = int(url.rsplit(":", 1)[1].split("/")[0])
    ports = iter([taken, _free_port()])
    monkeypatch.setattr(common, "free_port", lambda: next(ports))
    try:
        second, url2 = common.start_redis(tmp_path)
        try:
            assert url2 != url
            assert redis.Redis.from_url(url2).info("server")["process_id"] == second.pid
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()


@pytest.fixture(scope="module")
def stack(service_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Its own redis-server, a storage directory, one `voxgen worker` process and the API."""
    rs = RedisServer(tmp_path_factory.mktemp("leftovers-redis"))
    storage = tmp_path_factory.mktemp("leftovers-storage")
    lease = 4.0
    env = os.environ | {
        "VOXGEN_REDIS_URL": rs.url,
        "VOXGEN_MODELS_DIR": str(service_models_dir),
        "VOXGEN_STORAGE_DIR": str(storage),
        "VOXGEN_JOB_LEASE_SECONDS": str(lease),
    }
    workers = Workers(env, tmp_path_factory.mktemp("leftovers-logs"))
    workers.start()
    s = Settings(models_dir=service_models_dir, storage_dir=storage, redis_url=rs.url, job_lease_seconds=lease)
    try:
        with TestClient(create_app(s)) as c:
            c.redis, c.workers, c.storage = rs, workers, Storage(storage)  # type: ignore[attr-defined]
            yield c
    finally:
        workers.stop_all()
        rs.stop()


def test_redis_restart_without_persistence_keeps_results_reachable(stack: TestClient) -> None:
    jid = stack.post("/generate", json={"model": "tiny", "seed": 6, "format": "npy"}).json()["job_id"]
    done = service_wait(stack, jid)
    assert done["state"] == "succeeded", done
    body = stack.get(f"/jobs/{jid}/files/volume_000.npy").content
    stack.redis.stop()  # type: ignore[attr-defined]
    stack.redis.start()  # type: ignore[attr-defined]  # empty: no persistence
    r = redis.Redis.from_url(stack.redis.url)  # type: ignore[attr-defined]
    assert r.dbsize() == 0
    again = stack.get(f"/jobs/{jid}")
    assert again.status_code == 200, again.text
    assert again.json()["result"] == done["result"] and again.json()["worker"] == done["worker"]
    assert stack.get(f"/jobs/{jid}/files/volume_000.npy").content == body
    assert np.load(io.BytesIO(body)).shape == (128, 128, 128)
    ttl = r.ttl(f"voxgen:job:{jid}")
    assert 0 < ttl <= 24 * 3600  # re-indexed with the TTL it has left
    # the service keeps working on the new Redis: a new job runs (the worker reconnected)
    jid2 = stack.post("/generate", json={"model": "tiny", "seed": 7, "format": "npy"}).json()["job_id"]
    assert service_wait(stack, jid2, timeout=120)["state"] == "succeeded"


def test_a_worker_start_sweeps_dead_attempts_scratch(stack: TestClient, tmp_path: Path) -> None:
    """A worker of its own storage directory (so no other process's sweep or reaper touches it)."""
    recs = stack.app.state.jobs.records
    now = time.time()
    running = new_record(A, "generate", {"model": "tiny"}) | {"state": "running", "lease_until": now + 3600}
    recs.put(running)  # a live attempt (its lease far ahead): its folder stays
    recs.put(new_record(B, "generate", {"model": "tiny"}) | {"state": "succeeded"})
    jobs = Storage(tmp_path / "storage").root / "jobs"
    live, finished, unknown = jobs / f".{A}.work.1.1.1", jobs / f".{B}.work.1.2.1", jobs / f".{C}.work.3.3.1"
    for d in (live, finished, unknown):
        d.mkdir()
        (d / "volume_000.npy").write_bytes(b"x" * 1000)
    own = Workers(stack.workers.env | {"VOXGEN_STORAGE_DIR": str(tmp_path / "storage")}, tmp_path)  # type: ignore[attr-defined]
    t = time.time()
    p = own.start()
    try:
        _until(lambda: not finished.exists() and not unknown.exists(), 90, "the new worker did not sweep")
        assert live.is_dir()
        assert time.time() - t < 50  # at its start, not at a periodic sweep (every 60 s)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        recs.delete(A)
        recs.delete(B)


def test_a_killed_workers_scratch_is_removed_when_its_job_is_requeued(stack: TestClient) -> None:
    # 16 volumes: still running a second after it starts (256^3 at width 0.25 takes ~0.25 s a volume since
    # the transposed-conv generation; 2 volumes were done before the kill)
    jid = stack.post("/generate", json={"model": "big", "seed": 5, "n": 16, "format": "npy"}).json()["job_id"]
    jobs = stack.storage.root / "jobs"  # type: ignore[attr-defined]
    victim = stack.workers.procs[0]  # type: ignore[attr-defined]
    _until(lambda: list(jobs.glob(f".{jid}.work.1.*")), 120, "the job never started")
    time.sleep(1.0)  # mid-job: the scratch folder exists and the model is loading or generating
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert list(jobs.glob(f".{jid}.work.1.*")), "the killed attempt left its scratch folder"
    stack.workers.start()  # type: ignore[attr-defined]
    _until(lambda: stack.get(f"/jobs/{jid}").json()["attempt"] >= 2, 60, "the job was not re-queued")
    # removed at the re-queue (by the reaper that re-queued it), not after 24 h
    _until(lambda: not list(jobs.glob(f".{jid}.work.1.*")), 5, "the dead attempt's scratch folder stayed")
    s = service_wait(stack, jid, timeout=300)
    assert s["state"] == "succeeded" and s["attempt"] >= 2, s
    assert not list(jobs.glob(f".{jid}.work.*"))


def test_the_deployments_run_redis_with_append_only_persistence() -> None:
    import yaml

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    redis_svc = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]["redis"]
    cmd = redis_svc["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert redis_svc["volumes"][0].split(":")[1] == "/data"  # the AOF on the named volume
    sts = next(d for d in yaml.safe_load_all((deploy / "k8s" / "redis.yaml").read_text()) if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} <= claims
