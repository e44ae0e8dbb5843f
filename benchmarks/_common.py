"""Helpers shared by the benchmark scripts (which import it as ``_common``) and tests/conftest.py
(as ``benchmarks._common``); not a benchmark itself."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    """Start a redis-server without persistence on a free 127.0.0.1 port; (the process, its URL) once it answers.

    The server that answers must be this process (its INFO process_id): where another process took the
    port between ``free_port`` and the bind (parallel test workers start servers too), this one exits and
    a ping would reach the other's; it then tries another port, up to 5 times.  FileNotFoundError where
    redis-server is not installed; RuntimeError (the process killed) where it does not answer within
    about 10 s."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed")
    args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    for _ in range(5):
        port = free_port()
        cmd = [exe, "--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if redis_owned_by(proc, port):
            return proc, f"redis://127.0.0.1:{port}/0"
        if proc.poll() is None:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        proc.wait()  # it exited: the port was taken; another one
    raise RuntimeError("redis-server did not start: 5 ports in a row were taken")


def redis_owned_by(proc: subprocess.Popen, port: int, tries: int = 100) -> bool:
    """Whether the redis-server on ``port`` is ``proc`` (its INFO process_id), waiting up to ``tries``
    x 0.1 s for it to answer; False as soon as ``proc`` has exited."""
    import redis

    r = redis.Redis(port=port)
    for _ in range(tries):
        if proc.poll() is not None:
            return False
        try:
            if int(r.info("server")["process_id"]) == proc.pid:
                return True
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    return False


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_in_child(cmd: list[str], res: int, path: str) -> dict:
    """Run one benchmark cell in a child process: its last stdout line as JSON, or {res, path, error} on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"res": res, "path": path, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def add_model_args(ap: argparse.ArgumentParser, res: int = 256, repeats: int = 3) -> None:
    """--res, --width, --latent-dim (the authors' full width and latent by default) and --repeats."""
    ap.add_argument("--res", type=int, default=res)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--latent-dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=repeats)
