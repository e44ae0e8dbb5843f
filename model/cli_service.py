"""`voxgen serve` and `voxgen worker` (registered into model/cli.py)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def passive_omp_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the
    environment says otherwise.  A service shares its cores: the API, Redis, other workers, the
    machine's other jobs; threads spinning between a job's parallel regions (the OpenMP default)
    take those cores from them and from each other.  Measured on the 2-core development machine
    under load (benchmarks/RESULTS.md): a Celery worker's 128^3 job went from about 1.4x the same
    work in-process to 1.0-1.15x.  Must run before torch (its OpenMP) is loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_serve(a: argparse.Namespace) -> int:
    passive_omp_threads()  # the embedded queue runs the jobs in this process
    import uvicorn

    from service.app import create_app
    from service.app import list_models as _list
    from service.settings import get_settings

    s = get_settings()
    found = _list(s.models_dir)
    mode = f"Celery on {s.redis_url}" if s.redis_url else "embedded in-process queue (no Redis)"
    print(f"voxgen serve: {mode}; models from {s.models_dir}: {', '.join(found) or 'none'}; storage {s.storage_dir}")
    uvicorn.run(create_app(s), host=a.host, port=a.port, log_level=a.log_level)
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    passive_omp_threads()
    if a.device:
        os.environ["VOXGEN_DEVICE"] = a.device
    from service.settings import get_settings

    if not get_settings().redis_url:
        raise SystemExit("voxgen worker: set VOXGEN_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    from worker.celery_app import app

    argv = [
        "worker",
        "-Q",
        a.queues,
        "--concurrency",
        str(a.concurrency),
        "--pool",
        "solo" if a.concurrency == 1 else "prefork",
        "--loglevel",
        a.log_level,
        "-n",
        f"voxgen-{a.queues.replace(',', '-')}@%h-{os.getpid()}",
    ]
    app.worker_main(argv)
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    s = sub.add_parser("serve", help="run the HTTP API (embedded queue unless VOXGEN_REDIS_URL is set)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="info")
    commands["serve"] = cmd_serve
    s = sub.add_parser("worker", help="run a Celery worker (needs VOXGEN_REDIS_URL)")
    s.add_argument("--queues", default="gpu", help="comma-separated: gpu, train")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda if available)")
    s.add_argument("--concurrency", type=int, default=1)
    s.add_argument("--log-level", default="info")
    commands["worker"] = cmd_worker
