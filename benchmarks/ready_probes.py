"""Readiness under concurrent probes: GET /health/ready must not flap.

Starts `voxgen serve` (a real uvicorn server on 127.0.0.1, free port) in each mode -- the embedded
queue, and Celery mode with a redis-server this script starts on a free port (no worker is needed:
readiness checks Redis and storage) -- fires ``--probes`` probes, ``--concurrency`` at a time, and
prints one table row per mode: probes sent, 200s, 503s, other answers and transport errors.
Every 503 here is a false one: Redis and the storage directory are up the whole time.

    python benchmarks/ready_probes.py [--probes 500] [--concurrency 50] [--modes embedded,celery]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, start_redis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


async def fire(url: str, probes: int, concurrency: int) -> Counter:
    """``probes`` GETs of ``url``, at most ``concurrency`` in flight; a Counter of the outcomes."""
    import httpx

    out: Counter = Counter()
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def one() -> None:
            async with sem:
                try:
                    r = await client.get(url)
                    out[r.status_code] += 1
                except httpx.TransportError as e:
                    out[f"error {type(e).__name__}"] += 1

        await asyncio.gather(*(one() for _ in range(probes)))
    return out


def run_mode(mode: str, tmp: Path, probes: int, concurrency: int) -> Counter:
    port = free_port()
    env = os.environ | {
        "VOXGEN_MODELS_DIR": str(tmp / "models"),  # none: readiness does not depend on models
        "VOXGEN_STORAGE_DIR": str(tmp / f"storage-{mode}"),
    }
    env.pop("VOXGEN_REDIS_URL", None)
    redis_proc = None
    if mode == "celery":
        try:
            redis_proc, env["VOXGEN_REDIS_URL"] = start_redis(tmp)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(str(e)) from None
    server = subprocess.Popen(
        [sys.executable, "-m", "model.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live", server)
        return asyncio.run(fire(f"http://127.0.0.1:{port}/health/ready", probes, concurrency))
    finally:
        server.terminate()
        server.wait(30)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--modes", default="embedded,celery")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="voxgen-ready-") as d:
        for mode in a.modes.split(","):
            c = run_mode(mode, Path(d), a.probes, a.concurrency)
            other = sum(n for k, n in c.items() if k not in (200, 503) and not str(k).startswith("error"))
            errors = sum(n for k, n in c.items() if str(k).startswith("error"))
            rows.append((mode, a.probes, a.concurrency, c[200], c[503], other, errors))
    print("| mode | probes | concurrent | 200 | 503 | other status | transport errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    if any(r[4] or r[5] or r[6] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
