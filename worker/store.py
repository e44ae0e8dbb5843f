"""Job records and result storage, shared by the API and the workers.

* Records are small JSON documents: in memory for the embedded queue, in Redis for Celery.
* Result files live in storage (a local directory): ``{root}/jobs/{id}/{name}``.  A file appears
  under its name only after it is complete (written under a temporary name, then renamed), and a
  job's ``result`` lists its files only after all of them are in place.
* Leases (how a job survives ``kill -9`` of its worker): a running job's record carries
  ``lease_until`` and its ``attempt`` number.  The worker's heartbeat thread renews the lease
  every lease/3 seconds (VOXGEN_JOB_LEASE_SECONDS, default 30).  Reapers -- a thread in every API
  process (Celery mode) and one in every worker process -- scan the running records every lease/3
  seconds; a record whose lease lapsed is moved back to ``queued`` with ``attempt + 1`` by a
  compare-and-set (``update_if``: of several reapers exactly one wins) and a new message for the new
  attempt is sent.  So a lost job runs again about one lease after its worker died.
* Stale deliveries are harmless: a worker runs a delivery only if it can *claim* the record
  (``queued`` with the same attempt -> ``running``, again by compare-and-set).  An old attempt's
  message (Celery/Redis redelivers unacknowledged messages after ``visibility_timeout``), or a
  second delivery of a job another worker runs under a live lease, is acknowledged and dropped.
  An old attempt that is still running somewhere notices at its next progress report that the
  record's attempt moved on and stops without publishing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TERMINAL = ("succeeded", "failed", "cancelled")


def queue_for(kind: str) -> str:
    """Celery queue of a job kind: training on ``train``, everything else (GPU work) on ``gpu``."""
    return "train" if kind == "train" else "gpu"


def new_job_id() -> str:
    return uuid.uuid4().hex


class Storage:
    """Result files in a local directory; complete files only."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            raise ValueError("bad job id")
        return self.root / "jobs" / job_id

    def scratch(self, job_id: str) -> Path:
        d = self.job_dir(job_id).with_name(f".{job_id}.work.{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def publish(self, job_id: str, scratch: Path) -> list[dict[str, Any]]:
        """Move finished files into the job's folder (each by an atomic rename) and list them."""
        dst = self.job_dir(job_id)
        dst.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted(scratch.iterdir()):
            os.replace(f, dst / f.name)
            files.append({"name": f.name, "bytes": (dst / f.name).stat().st_size})
        shutil.rmtree(scratch, ignore_errors=True)
        return files

    def file_path(self, job_id: str, name: str) -> Path | None:
        if not SAFE_NAME.fullmatch(name):
            return None
        p = self.job_dir(job_id) / name
        return p if p.is_file() else None

    def upload_path(self, job_id: str, filename: str) -> Path:
        suffix = "".join(Path(filename).suffixes[-2:]).lower() if filename else ""
        if not re.fullmatch(r"(\.[a-z0-9]{1,6}){0,2}", suffix):
            suffix = ""
        d = self.root / "uploads" / job_id
        d.mkdir(parents=True, exist_ok=True)
        return d / f"upload{suffix}"

    def delete_upload(self, job_id: str) -> None:
        """An encode job's input, removed once the job is finished (it is no result)."""
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def cleanup(self, ttl_seconds: float, keep: set[str] | None = None) -> int:
        """Delete job folders and uploads older than the TTL (VOXGEN_RESULT_TTL_HOURS)."""
        cutoff = time.time() - ttl_seconds
        removed = 0
        for sub in ("jobs", "uploads"):
            for d in (self.root / sub).iterdir():
                if d.name in (keep or set()):
                    continue
                try:
                    if d.stat().st_mtime < cutoff:
                        shutil.rmtree(d, ignore_errors=True)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def ping(self) -> bool:
        probe = self.root / f".ready.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        return True


class MemoryRecords:
    """Job records for the embedded queue."""

    def __init__(self) -> None:
        self._d: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self._d[rec["id"]] = json.loads(json.dumps(rec))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._d.get(job_id)
            return json.loads(json.dumps(r)) if r else None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        return self.update_if(job_id, lambda r: True, **fields)

    def update_if(self, job_id: str, pred: Callable[[dict[str, Any]], bool], **fields: Any) -> dict[str, Any] | None:
        """Apply ``fields`` only if ``pred(record)`` holds, atomically; the new record, or None."""
        with self._lock:
            r = self._d.get(job_id)
            if r is None or not pred(json.loads(json.dumps(r))):
                return None
            r.update(json.loads(json.dumps(fields)))
            return json.loads(json.dumps(r))

    def all_ids(self) -> list[str]:
        with self._lock:
            return list(self._d)

    def expire(self, ttl_seconds: float) -> None:
        cutoff = time.time() - ttl_seconds
        with self._lock:
            for k in [k for k, r in self._d.items() if r["state"] in TERMINAL and r["created"] < cutoff]:
                del self._d[k]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._d.pop(job_id, None)

    def ping(self) -> bool:
        return True


class RedisRecords:
    """Job records in Redis (one JSON string per job, with a TTL), updated with WATCH/MULTI."""

    PREFIX = "voxgen:job:"

    def __init__(self, url: str, ttl_seconds: float) -> None:
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.ttl = max(60, int(ttl_seconds))

    def put(self, rec: dict[str, Any]) -> None:
        self.r.set(self.PREFIX + rec["id"], json.dumps(rec), ex=self.ttl)

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.PREFIX + job_id)
        return json.loads(raw) if raw else None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        return self.update_if(job_id, lambda r: True, **fields)

    def update_if(self, job_id: str, pred: Callable[[dict[str, Any]], bool], **fields: Any) -> dict[str, Any] | None:
        """Apply ``fields`` only if ``pred(record)`` holds, atomically (optimistic WATCH/MULTI: a
        concurrent writer makes us re-read and re-check); the new record, or None."""
        import redis

        key = self.PREFIX + job_id
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    rec = json.loads(raw)
                    if not pred(rec):
                        pipe.unwatch()
                        return None
                    rec.update(fields)
                    pipe.multi()
                    pipe.set(key, json.dumps(rec), keepttl=True)
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue

    def all_ids(self) -> list[str]:
        return [k.decode()[len(self.PREFIX) :] for k in self.r.scan_iter(self.PREFIX + "*", count=500)]

    def delete(self, job_id: str) -> None:
        self.r.delete(self.PREFIX + job_id)

    def ping(self) -> bool:
        return bool(self.r.ping())


def new_record(job_id: str, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "kind": kind,
        "model": params.get("model"),
        "params": params,
        "state": "queued",
        "progress": {"done": 0, "total": 1, "stage": "queued"},
        "result": None,
        "error": None,
        "attempt": 1,
        "created": time.time(),
        "lease_until": None,
        "worker": None,
    }
