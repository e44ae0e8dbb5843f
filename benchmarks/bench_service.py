"""The service's own overhead, on both queues, and throughput with one and two Celery workers.

Starts its own redis-server (free port), a `voxgen serve` process (embedded queue) and `voxgen
worker` processes, runs a Celery-mode API in-process, and compares, in one run,
round by round (each round runs every path once with the same seed, in an order rotated from round
to round, so background load on a shared machine and what one path leaves behind fall on all alike):

  direct            model.generate + write_volume (.nii.gz): the work a generate job does, in-process
  direct, job       worker.jobs.job_generate: the same plus what a job also writes (PNG preview,
                    latent.npy), in-process
  direct, execute   worker.jobs.execute in-process: the whole job as a queue runs it (claim the record,
                    the lease's heartbeat, the job function, provenance, publishing), in-memory records
  direct, another   the "direct" work in a second plain Python process with the services' environment
    process         (no service in it), timed inside it: a control for what the same arithmetic costs
                    in another process
  embedded          POST /generate -> GET /jobs/{id}?wait=60 (long poll) -> download the .nii.gz, over
                    HTTP from a `voxgen serve` process (embedded queue) as deployed
  celery            the same through Redis and a `voxgen worker` process (API in this process,
                    FastAPI TestClient, Celery mode: it runs no model)
  celery, polling   the same, polling GET /jobs/{id} every --poll-ms ms instead (how clients did
                    before the long poll; --poll-ms 0 leaves the row out)

    python benchmarks/bench_service.py [--res 128] [--width 1] [--repeats 7] [--jobs 12] [--poll-ms 10]
                                       [--queues embedded,celery]

The model is the authors' 128^3 configuration (width 1, latent 1024) with random weights unless
--width is given.  `voxgen serve` and `voxgen worker` set OMP_WAIT_POLICY=PASSIVE (unless it is set);
the direct paths run in this process with whatever the environment says (the OpenMP default unless
set), as a library user's code does.  Each path's first job (model load) is excluded as warm-up.  --jobs 0 skips
the throughput table.  Prints markdown tables: medians and minima per path, and the overhead of each
service path over direct generation (medians, and the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, start_redis  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def wait(client, job_id: str, poll_ms: float = 0.0) -> dict:  # noqa: ANN001
    """The job's final status: by long poll (poll_ms 0), or by polling every poll_ms."""
    while True:
        if poll_ms > 0:
            s = client.get(f"/jobs/{job_id}").json()
        else:
            s = client.get(f"/jobs/{job_id}", params={"wait": 60}).json()
        if s["state"] in TERMINAL:
            return s
        if poll_ms > 0:
            time.sleep(poll_ms / 1000)


PHASES: dict[str, list[tuple[float, float, float]]] = {}


def through_service(client, seed: int, poll_ms: float = 0.0, name: str = "") -> tuple[float, float]:  # noqa: ANN001
    """(seconds from submit until the client sees succeeded, ... until the .nii.gz is downloaded).
    Under ``name``, PHASES gets (submit to job start, job start to end, job end to the client's
    answer) from the record's wall-clock times."""
    t, wall = time.perf_counter(), time.time()
    st = wait(client, client.post("/generate", json={"model": "m", "seed": seed}).json()["job_id"], poll_ms)
    done, seen = time.perf_counter() - t, time.time()
    assert st["state"] == "succeeded", st
    if name:
        PHASES.setdefault(name, []).append(
            (st["started"] - wall, st["finished"] - st["started"], seen - st["finished"])
        )
    body = client.get(f"/jobs/{st['job_id']}/files/volume_000.nii.gz").content
    assert len(body) > 0
    return done, time.perf_counter() - t


OTHER_PROCESS = """
import sys, time
from pathlib import Path
import torch
from model.data.volumes import write_volume
from model.hagan.model import HAGANModel
from worker.settings import job_threads
torch.set_num_threads(job_threads(0))
m = HAGANModel.from_pretrained(sys.argv[1])
m.set_precision(sys.argv[2])
m.generate(m.sample_latents(1, 0))
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    v = m.generate(m.sample_latents(1, int(line)))
    write_volume(Path(sys.argv[3]), v[0, 0].numpy(), m.config)
    print(time.perf_counter() - t, flush=True)
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=12, help="jobs per throughput measurement (0: none)")
    ap.add_argument("--poll-ms", type=float, default=10.0, help="the polling row's interval (0: no polling row)")
    ap.add_argument("--queues", default="embedded,celery", help="which service paths to run")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="generation arithmetic of every path (auto: bf16 on CPUs with native bf16), the same for all",
    )
    a = ap.parse_args()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    queues = {q.strip() for q in a.queues.split(",") if q.strip()}

    import torch
    from fastapi.testclient import TestClient

    from model.data.volumes import write_volume
    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.precision import resolve_precision
    from service.app import create_app
    from service.settings import Settings
    from worker.jobs import job_generate
    from worker.params import GenerateParams
    from worker.settings import job_threads

    torch.set_num_threads(job_threads(0))  # what every job pins (VOXGEN_THREADS=0)
    precision = resolve_precision(a.precision, torch.device("cpu"))  # one arithmetic for every path
    tmp = Path(tempfile.mkdtemp(prefix="voxgen-bench-"))
    models = tmp / "models"
    HAGANModel.init(HAGANConfig(resolution=a.res, width=a.width), seed=0).save_pretrained(models / "m")
    procs: list[subprocess.Popen] = []
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    tput = {}
    try:
        url = None
        if "celery" in queues:
            proc, url = start_redis(tmp)
            procs.append(proc)
        env = os.environ | {
            "VOXGEN_REDIS_URL": url or "",
            "VOXGEN_MODELS_DIR": str(models),
            "VOXGEN_STORAGE_DIR": str(tmp / "st-celery"),
            "VOXGEN_PRECISION": precision,
        }

        def start_worker() -> None:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "model.cli", "worker", "--device", "cpu", "--log-level", "error"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        m = HAGANModel.from_pretrained(models / "m")
        m.set_precision(precision)
        m.generate(m.sample_latents(1, 0))  # warm-up
        emb = cel = None
        if "embedded" in queues:  # `voxgen serve` as deployed: its own process, real HTTP
            import httpx

            port = free_port()
            serve_env = {k: v for k, v in env.items() if k != "VOXGEN_REDIS_URL"}
            serve_env["VOXGEN_STORAGE_DIR"] = str(tmp / "st-emb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "model.cli", "serve", "--port", str(port), "--log-level", "warning"],
                    env=serve_env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            emb = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            for _ in range(300):
                try:
                    if emb.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            through_service(emb, 0)  # warm-up (model load)
        if "celery" in queues:
            start_worker()
            cel = TestClient(create_app(Settings(models_dir=models, storage_dir=tmp / "st-celery", redis_url=url)))
            cel.__enter__()
            through_service(cel, 0)  # warm-up (model load in the worker)

        def run_direct(i: int, seed: int) -> None:
            t = time.perf_counter()
            v = m.generate(m.sample_latents(1, seed))
            write_volume(tmp / "direct.nii.gz", v[0, 0].numpy(), m.config)
            record("direct", time.perf_counter() - t)

        def run_job_function(i: int, seed: int) -> None:
            out = tmp / f"job-{i}"
            out.mkdir()
            t = time.perf_counter()
            job_generate(GenerateParams(model="m", seed=seed, n=1), m, out, lambda *_: None)
            record("direct, job", time.perf_counter() - t)

        # the same work as "direct" in another plain Python process (no service in it), started as the
        # service processes are (their environment, OMP_WAIT_POLICY=PASSIVE unless set): a control for
        # what the same arithmetic costs in a second process, timed inside it
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_PROCESS, str(models / "m"), precision, str(tmp / "other.nii.gz")],
            env=env | {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(other)
        assert other.stdout is not None and other.stdin is not None
        if other.stdout.readline().strip() != "ready":
            raise RuntimeError("the control process did not start")

        def run_other_process(i: int, seed: int) -> None:
            other.stdin.write(f"{seed}\n")
            other.stdin.flush()
            record("direct, another process", float(other.stdout.readline()))

        from worker import jobs as worker_jobs
        from worker.store import MemoryRecords, Storage, new_job_id, new_record

        worker_jobs._MODELS[(str((models / "m").resolve()), "cpu")] = m  # this process's model, as loaded
        exec_records, exec_storage = MemoryRecords(), Storage(tmp / "st-exec")

        def run_execute(i: int, seed: int) -> None:
            job_id = new_job_id()
            params = GenerateParams(model="m", seed=seed, n=1)
            exec_records.put(new_record(job_id, params.kind, params.dump()))
            t = time.perf_counter()
            worker_jobs.execute(job_id, 1, exec_records, exec_storage, models, device="cpu")
            record("direct, execute", time.perf_counter() - t)
            rec = exec_records.get(job_id)
            assert rec is not None and rec["state"] == "succeeded", rec
            exec_storage.delete_job(job_id)

        def run_service(client, name: str, poll_ms: float = 0.0):  # noqa: ANN001, ANN202
            def run(i: int, seed: int) -> None:
                done, dl = through_service(client, seed, poll_ms, name=name)
                record(name, done)
                if not poll_ms:
                    record(f"{name} + download", dl)

            return run

        paths = [run_direct, run_job_function, run_execute, run_other_process]
        if emb is not None:
            paths.append(run_service(emb, "embedded"))
        if cel is not None:
            paths.append(run_service(cel, "celery"))
            if a.poll_ms > 0:
                paths.append(run_service(cel, "celery, polling", a.poll_ms))
        for i in range(a.repeats):
            # every path once per round, the order rotated from round to round: whatever a path leaves
            # behind (a busy process, a cold worker) falls on each of the others alike
            k = i % len(paths)
            for run in paths[k:] + paths[:k]:
                run(i, i + 1)

        if cel is not None and a.jobs > 0:
            for n_workers in (1, 2):
                while len(procs) < n_workers + 1 + (emb is not None):  # redis-server, `serve`, the workers
                    start_worker()
                    time.sleep(3)
                if n_workers == 2:  # warm the new worker
                    for j in [
                        cel.post("/generate", json={"model": "m", "seed": 100 + k}).json()["job_id"] for k in range(4)
                    ]:
                        wait(cel, j)
                t = time.perf_counter()
                ids = [
                    cel.post("/generate", json={"model": "m", "seed": 1000 + k}).json()["job_id"] for k in range(a.jobs)
                ]
                states = [wait(cel, j)["state"] for j in ids]
                tput[n_workers] = (a.jobs / (time.perf_counter() - t) * 60, states.count("succeeded"))
        if emb is not None:
            emb.close()
        if cel is not None:
            cel.__exit__(None, None, None)
    finally:
        for p in reversed(procs):
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    labels = {
        "direct": "direct (generate + write .nii.gz)",
        "direct, job": "direct, the job function (+ PNG preview, latent.npy)",
        "direct, execute": "direct, the whole job (`worker.jobs.execute`: claim, lease, job, provenance, publish)",
        "direct, another process": "direct, in another plain process (no service; a control)",
        "embedded": "embedded queue (`voxgen serve`): submit until the long poll answers succeeded",
        "embedded + download": "embedded queue (`voxgen serve`): ... and download the .nii.gz",
        "celery": "Celery/Redis: submit until the long poll answers succeeded",
        "celery + download": "Celery/Redis: ... and download the .nii.gz",
        "celery, polling": f"Celery/Redis: submit until succeeded, polling every {a.poll_ms:g} ms",
    }
    print(
        f"# {a.res}^3 HA-GAN (width {a.width}), {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{job_threads(0)} threads, precision {precision} on every path, {a.repeats} interleaved rounds\n"
    )
    print("| path | median s | min s | overhead over direct (medians) | median of per-round ratios |")
    print("|---|---|---|---|---|")
    base = times["direct"]
    for key, vals in times.items():
        med = statistics.median(vals)
        over = (med - statistics.median(base)) / statistics.median(base) * 100
        ratio = statistics.median([v / b for v, b in zip(vals, base, strict=True)])
        cells = "-" if key == "direct" else f"{over:+.1f}%"
        rcell = "-" if key == "direct" else f"{ratio:.3f}"
        print(f"| {labels[key]} | {med:.3f} | {min(vals):.3f} | {cells} | {rcell} |")
    print()
    print("| path | submit to job start, median s | job start to end | job end to the client's answer |")
    print("|---|---|---|---|")
    for key, rows in PHASES.items():
        cols = [statistics.median(r[k] for r in rows) for k in range(3)]
        print(f"| {labels[key]} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")
    if tput:
        print()
        print("| Celery workers | jobs/minute | succeeded |")
        print("|---|---|---|")
        for n, (jpm, ok) in tput.items():
            print(f"| {n} | {jpm:.1f} | {ok}/{a.jobs} |")


if __name__ == "__main__":
    main()
