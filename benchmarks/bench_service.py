"""The service's own overhead, and throughput with one and two Celery workers.

Starts its own redis-server (free port) and `voxgen worker` processes, runs the API in-process
(FastAPI TestClient, Celery mode), and compares, in one run:

  direct   model.generate + write_volume (.nii.gz), the work a generate job does, called in-process
  service  POST /generate -> poll GET /jobs/{id} every 10 ms -> download the .nii.gz

    python benchmarks/bench_service.py [--res 128] [--width 1] [--repeats 5] [--jobs 12]

The model is the authors' 128^3 configuration (width 1, latent 1024) with random weights unless
--width is given.  Each worker's first job (model load) is excluded as warm-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(client, job_id: str) -> dict:
    while True:
        s = client.get(f"/jobs/{job_id}").json()
        if s["state"] in ("succeeded", "failed", "cancelled"):
            return s
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=12, help="jobs per throughput measurement")
    a = ap.parse_args()

    import redis
    from fastapi.testclient import TestClient

    from model.data.volumes import write_volume
    from model.hagan.config import HAGANConfig
    from model.hagan.infer import HAGANModel
    from service.app import create_app
    from service.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="voxgen-bench-"))
    models = tmp / "models"
    HAGANModel.init(HAGANConfig(resolution=a.res, width=a.width), seed=0).save_pretrained(models / "m")
    port = free_port()
    rs = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    env = os.environ | {
        "VOXGEN_REDIS_URL": url,
        "VOXGEN_MODELS_DIR": str(models),
        "VOXGEN_STORAGE_DIR": str(tmp / "st"),
    }
    workers: list[subprocess.Popen] = []

    def start_worker() -> None:
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "model.cli", "worker", "--device", "cpu", "--log-level", "error"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    rows = []
    try:
        # direct, in this process
        m = HAGANModel.from_pretrained(models / "m")
        m.generate(m.sample_latents(1, 0))  # warm-up
        direct = []
        for i in range(a.repeats):
            t = time.perf_counter()
            v = m.generate(m.sample_latents(1, i + 1))
            write_volume(tmp / "direct.nii.gz", v[0, 0].numpy(), m.config)
            direct.append(time.perf_counter() - t)
        del m

        start_worker()
        s = Settings(models_dir=models, storage_dir=tmp / "st", redis_url=url)
        with TestClient(create_app(s)) as c:
            wait(c, c.post("/generate", json={"model": "m", "seed": 0}).json()["job_id"])  # warm-up (model load)
            service, done_at = [], []
            for i in range(a.repeats):
                t = time.perf_counter()
                st = wait(c, c.post("/generate", json={"model": "m", "seed": i + 1}).json()["job_id"])
                done_at.append(time.perf_counter() - t)
                body = c.get(f"/jobs/{st['job_id']}/files/volume_000.nii.gz").content
                assert len(body) > 0
                service.append(time.perf_counter() - t)
            rows.append(("direct (generate + write .nii.gz)", statistics.median(direct), min(direct)))
            rows.append(("service: submit until the job reports succeeded", statistics.median(done_at), min(done_at)))
            rows.append(("service: ... and download the .nii.gz", statistics.median(service), min(service)))

            tput = {}
            for n_workers in (1, 2):
                while len(workers) < n_workers:
                    start_worker()
                    time.sleep(3)
                if n_workers == 2:  # warm the new worker
                    ids = [c.post("/generate", json={"model": "m", "seed": 100 + k}).json()["job_id"] for k in range(4)]
                    for j in ids:
                        wait(c, j)
                t = time.perf_counter()
                ids = [
                    c.post("/generate", json={"model": "m", "seed": 1000 + k}).json()["job_id"] for k in range(a.jobs)
                ]
                states = [wait(c, j)["state"] for j in ids]
                dt = time.perf_counter() - t
                tput[n_workers] = (a.jobs / dt * 60, states.count("succeeded"))
    finally:
        for w in workers:
            w.kill()
        rs.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    import torch

    print(
        f"# {a.res}^3 HA-GAN (width {a.width}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{a.repeats} runs per row\n"
    )
    print("| path | median s | min s |")
    print("|---|---|---|")
    for name, med, mn in rows:
        print(f"| {name} | {med:.3f} | {mn:.3f} |")
    for row in rows[1:]:
        print(f"\noverhead of '{row[0]}' over direct (medians): {(row[1] - rows[0][1]) / rows[0][1] * 100:+.1f}%")
    print()
    print("| workers | jobs/minute | succeeded |")
    print("|---|---|---|")
    for n, (jpm, ok) in tput.items():
        print(f"| {n} | {jpm:.1f} | {ok}/{a.jobs} |")


if __name__ == "__main__":
    main()
