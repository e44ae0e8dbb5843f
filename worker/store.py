"""Job records and result storage, shared by the API and the workers.

* Records are small JSON documents: in memory for the embedded queue, in Redis for Celery.
* Result files live in storage: a local directory (``{root}/jobs/{id}/{name}``, the default) or an
  S3-compatible object store (``VOXGEN_STORAGE_URL=s3://bucket/prefix``: ``{prefix}/jobs/{id}/{name}``),
  both behind one interface (``open_storage``).  A file appears under its name only after it is
  complete (local: written under a temporary name, then renamed; S3: a single PUT or a multipart
  upload, which the store makes visible only when it is completed), and a job's ``result`` lists its
  files only after all of them are in place.  A worker killed mid-publication leaves no listed file:
  the record is written after the last upload, and the API serves listed files only.
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
* Job statistics for GET /metrics are counted where the state changes: every ``put`` (a submission)
  and every ``update_if`` that changes a record's ``state`` adds its event (submitted, started,
  requeued, succeeded, failed, cancelled, by kind and model), the job's duration (finished - started)
  and the worker's reported GPU memory peak, in the same atomic write as the record itself (Redis:
  the same MULTI; memory: the same lock).  So the counts are exact whichever process -- API, reaper,
  worker -- made the change, once per change, and they outlive the records' TTL.
* State changes are pushed, not polled: every write that changes a record's state (and every
  deletion) tells the listeners -- in memory, callbacks run by the writing thread
  (``MemoryRecords.subscribe``); in Redis, a PUBLISH on ``voxgen:events`` in the same MULTI as the
  record, read by one subscriber thread per API process (``RedisRecords.listen``).  The API's long
  poll ``GET /jobs/{id}?wait=S`` sleeps on them (service/waits.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20
RECORD_COPY = ".record.json"  # a succeeded job's record, kept beside its files (never served: a dot name)


def queue_for(kind: str) -> str:
    """Celery queue of a job kind: training on ``train``, everything else (GPU work) on ``gpu``."""
    return "train" if kind == "train" else "gpu"


def new_job_id() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------------ storage


class _LocalSpool:
    """What both stores keep on this machine's disk: scratch folders of running jobs, uploads while
    they are received and checked, and (train jobs) training runs under ``root/runs``."""

    kind = "local"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError("bad job id")
        return self.root / "jobs" / job_id

    def scratch(self, job_id: str, attempt: int = 1) -> Path:
        """A fresh private folder where a running job writes its results before ``publish``:
        ``jobs/.{id}.work.{attempt}.{pid}.{thread}``.  The attempt in the name says whose it is,
        so anyone can tell a dead attempt's folder from a live one (``sweep_scratch``); the folders
        of this job's older attempts on this disk are removed here (their attempts are over)."""
        self.drop_scratch(job_id, before_attempt=attempt)
        d = self.job_dir(job_id).with_name(f".{job_id}.work.{int(attempt)}.{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def scratch_dirs(self, job_id: str | None = None) -> list[tuple[str, int | None, Path]]:
        """(job id, attempt, folder) of the scratch folders on this disk (of one job, or all); the
        attempt is None in a name an earlier version made (``.{id}.work.{pid}.{thread}``)."""
        pattern = f".{job_id}.work.*" if job_id else ".*.work.*"
        out = []
        for d in (self.root / "jobs").glob(pattern):
            parts = d.name.split(".")  # ["", id, "work", attempt, pid, thread]; before: no attempt
            if len(parts) >= 5 and JOB_ID.fullmatch(parts[1]) and parts[2] == "work":
                attempt = int(parts[3]) if len(parts) == 6 and parts[3].isdigit() else None
                out.append((parts[1], attempt, d))
        return out

    def drop_scratch(self, job_id: str, before_attempt: int | None = None) -> int:
        """Remove this job's scratch folders on this disk (those of attempts before
        ``before_attempt``, or all; an unnumbered one counts as older); the number removed."""
        n = 0
        for _, attempt, d in self.scratch_dirs(job_id):
            if before_attempt is None or attempt is None or attempt < before_attempt:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n

    def sweep_scratch(self, records: Any) -> int:
        """Remove the scratch folders on this disk that no live attempt owns: the job's record is
        gone, or not running, or running under another attempt (a worker killed mid-job left it;
        the job was re-queued, cancelled or finished since).  A folder of the attempt the record
        says is running stays: its worker may be alive (if not, its lease lapses, the job is
        re-queued, and the next sweep removes it).  Run when a worker starts (and by its reaper
        thread every minute), and by the embedded queue when the API starts.  A folder of an earlier
        version's name (no attempt in it) stays while its job runs: a worker not yet upgraded may own
        it.  The number removed."""
        n = 0
        for job_id, attempt, d in self.scratch_dirs():
            rec = records.get(job_id)
            running = rec is not None and rec.get("state") == "running"
            if not running or (attempt is not None and int(rec.get("attempt", 1)) != attempt):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n

    def upload_path(self, job_id: str, filename: str) -> Path:
        """Where the API writes an upload while it arrives and is checked (always on local disk)."""
        suffix = "".join(Path(filename).suffixes[-2:]).lower() if filename else ""
        if not re.fullmatch(r"(\.[a-z0-9]{1,6}){0,2}", suffix):
            suffix = ""
        d = self.root / "uploads" / self.job_dir(job_id).name
        d.mkdir(parents=True, exist_ok=True)
        return d / f"upload{suffix}"

    def _cleanup_local(self, cutoff: float, keep: set[str]) -> int:
        removed = 0
        for sub in ("jobs", "uploads", "cache"):
            if not (self.root / sub).is_dir():
                continue
            for d in (self.root / sub).iterdir():
                if d.name.lstrip(".").split(".")[0] in keep:  # a job's folder, or its scratch .{id}.work...
                    continue
                try:
                    if d.stat().st_mtime < cutoff:
                        shutil.rmtree(d, ignore_errors=True)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


class Storage(_LocalSpool):
    """Result files in a local directory (shared between machines only through a shared file
    system); complete files only."""

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

    def open(self, job_id: str, name: str) -> tuple[Iterator[bytes], int] | None:
        """A published file as (chunks, size), or None."""
        p = self.file_path(job_id, name)
        if p is None:
            return None
        f = open(p, "rb")  # closed by the generator

        def chunks() -> Iterator[bytes]:
            with f:
                while b := f.read(CHUNK):
                    yield b

        return chunks(), os.fstat(f.fileno()).st_size

    def commit_upload(self, job_id: str) -> None:
        """Nothing to do: the upload already is where the workers read it (the shared directory)."""

    def fetch_upload(self, job_id: str, path: str) -> Path:
        """The local path of a job's upload (as the API recorded it)."""
        return Path(path)

    def delete_upload(self, job_id: str) -> None:
        """An encode job's input, removed once the job is finished (it is no result)."""
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def put_record(self, job_id: str, rec: dict[str, Any]) -> None:
        """Keep a copy of a succeeded job's record beside its files (``.record.json``, a name the
        API never serves), written atomically: a record store that lost the record (Redis
        restarted without persistence, the embedded queue's process restarted) re-indexes it
        from here (``get_record``), so the files stay reachable until the TTL."""
        dst = self.job_dir(job_id) / RECORD_COPY
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{RECORD_COPY}.{uuid.uuid4().hex}.part")
        try:
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def get_record(self, job_id: str) -> dict[str, Any] | None:
        """The record copy ``put_record`` kept, or None."""
        try:
            rec = json.loads((self.job_dir(job_id) / RECORD_COPY).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("id") == job_id else None

    def cleanup(self, ttl_seconds: float, keep: set[str] | None = None) -> int:
        """Delete job folders and uploads older than the TTL (VOXGEN_RESULT_TTL_HOURS)."""
        return self._cleanup_local(time.time() - ttl_seconds, keep or set())

    def ping(self) -> bool:
        """The directory takes a write: a file of this probe's own (concurrent probes of one
        process never share a name, so one probe's unlink cannot fail another's), then removed."""
        probe = self.root / f".ready.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            probe.write_text("ok")
        finally:
            probe.unlink(missing_ok=True)
        return True

    def describe(self) -> str:
        return f"directory {self.root}"


class S3Storage(_LocalSpool):
    """Results and uploads in an S3-compatible object store under ``s3://bucket/prefix``.

    * ``publish`` uploads each finished file straight to its final key: small files with one PUT,
      larger ones as a multipart upload (parts of VOXGEN_S3_PART_MB).  S3 shows an object only once
      its PUT or its multipart upload completed, so a key never holds a partial file; the caller
      lists the files in the job record only after ``publish`` returned.  A worker killed mid-upload
      leaves an incomplete multipart upload, invisible to readers; ``cleanup`` aborts those older
      than the TTL (a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` does the same).
    * Uploads for /encode are received and checked on the API's disk (``upload_path``), pushed to
      ``uploads/{id}/`` when the job is submitted (``commit_upload``), and fetched by whichever
      worker runs the job (``fetch_upload``).
    * Reads stream from the store (``open``); ``file_path`` downloads a file into the local cache
      for callers that need a path.
    """

    kind = "s3"

    def __init__(
        self,
        url: str,
        spool_dir: str | os.PathLike,
        endpoint_url: str | None = None,
        part_bytes: int = 16 * 2**20,
        client: Any = None,
    ) -> None:
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
        if not m:
            raise ValueError(f"VOXGEN_STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
        super().__init__(spool_dir)
        self.bucket = m.group(1)
        prefix = (m.group(2) or "").strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{self.bucket}/{prefix}".rstrip("/")
        if part_bytes < 5 * 2**20:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.part_bytes = int(part_bytes)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else {},
                connect_timeout=5,
                read_timeout=60,
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)
        self.s3 = client

    # keys
    def _key(self, area: str, job_id: str, name: str = "") -> str:
        return f"{self.prefix}{area}/{self.job_dir(job_id).name}/{name}"

    def _missing(self, e: Exception) -> bool:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def _put(self, key: str, path: Path) -> int:
        """Upload one file to ``key``; visible only when complete.  Returns its size."""
        size = path.stat().st_size
        if size <= self.part_bytes:
            with open(path, "rb") as f:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=f.read())
            return size
        upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:
                n = 1
                while chunk := f.read(self.part_bytes):
                    r = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=chunk)
                    parts.append({"ETag": r["ETag"], "PartNumber": n})
                    n += 1
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:  # an error or an interruption: nothing becomes visible; free the parts now
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # the store is unreachable: cleanup() aborts it later
                pass
            raise
        return size

    def _download(self, key: str, dst: Path) -> Path:
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as f:
                body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
                for b in body.iter_chunks(CHUNK):
                    f.write(b)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return dst

    def _keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # the interface
    def publish(self, job_id: str, scratch: Path) -> list[dict[str, Any]]:
        """Upload the finished files to ``jobs/{id}/`` (each complete or invisible) and list them."""
        files = []
        for f in sorted(scratch.iterdir()):
            files.append({"name": f.name, "bytes": self._put(self._key("jobs", job_id, f.name), f)})
        shutil.rmtree(scratch, ignore_errors=True)
        return files

    def open(self, job_id: str, name: str) -> tuple[Iterator[bytes], int] | None:
        """A published file as (chunks streamed from the store, size), or None."""
        if not SAFE_NAME.fullmatch(name):
            return None
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self._key("jobs", job_id, name))
        except Exception as e:
            if self._missing(e):
                return None
            raise
        body = r["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks(), int(r["ContentLength"])

    def file_path(self, job_id: str, name: str) -> Path | None:
        """A published file downloaded into the local cache (``root/cache``), or None."""
        if not SAFE_NAME.fullmatch(name):
            return None
        dst = self.root / "cache" / self.job_dir(job_id).name / name
        if dst.is_file():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._download(self._key("jobs", job_id, name), dst)
        except Exception as e:
            if self._missing(e):
                return None
            raise

    def commit_upload(self, job_id: str) -> None:
        """Push the checked upload(s) of a job from the local spool to ``uploads/{id}/``."""
        d = self.root / "uploads" / self.job_dir(job_id).name
        if not d.is_dir():
            return  # nothing staged here (not an encode job, or already pushed)
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                self._put(self._key("uploads", job_id, f.name), f)
        shutil.rmtree(d, ignore_errors=True)

    def fetch_upload(self, job_id: str, path: str) -> Path:
        """The job's upload on this machine's disk: downloaded from ``uploads/{id}/`` if needed."""
        name = Path(path).name
        dst = self.root / "uploads" / self.job_dir(job_id).name / name
        if dst.is_file():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._download(self._key("uploads", job_id, name), dst)
        except Exception as e:
            if self._missing(e):
                raise FileNotFoundError(f"the upload of job {job_id} is no longer in storage") from e
            raise

    def delete_upload(self, job_id: str) -> None:
        self._delete_keys([o["Key"] for o in self._keys(self._key("uploads", job_id))])
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        self._delete_keys([o["Key"] for o in self._keys(self._key("jobs", job_id))])
        self.delete_upload(job_id)
        shutil.rmtree(self.root / "cache" / job_id, ignore_errors=True)

    def put_record(self, job_id: str, rec: dict[str, Any]) -> None:
        """A copy of a succeeded job's record at ``jobs/{id}/.record.json`` (see Storage.put_record)."""
        self.s3.put_object(
            Bucket=self.bucket, Key=self._key("jobs", job_id, RECORD_COPY), Body=json.dumps(rec).encode()
        )

    def get_record(self, job_id: str) -> dict[str, Any] | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key("jobs", job_id, RECORD_COPY))["Body"]
            rec = json.loads(body.read())
        except Exception as e:
            if self._missing(e) or isinstance(e, ValueError):
                return None
            raise
        return rec if isinstance(rec, dict) and rec.get("id") == job_id else None

    def cleanup(self, ttl_seconds: float, keep: set[str] | None = None) -> int:
        """Delete the objects of jobs and uploads whose newest object is older than the TTL, abort
        multipart uploads started before it (left by killed workers), and clean the local spool.
        Returns the number of job folders (in the store or local) removed."""
        keep = keep or set()
        cutoff = time.time() - ttl_seconds
        removed = 0
        for area in ("jobs", "uploads"):
            newest: dict[str, float] = {}
            keys: dict[str, list[str]] = {}
            for o in self._keys(f"{self.prefix}{area}/"):
                job_id = o["Key"][len(self.prefix) + len(area) + 1 :].split("/", 1)[0]
                newest[job_id] = max(newest.get(job_id, 0.0), o["LastModified"].timestamp())
                keys.setdefault(job_id, []).append(o["Key"])
            old = [j for j, t in newest.items() if t < cutoff and j not in keep]
            self._delete_keys([k for j in old for k in keys[j]])
            removed += len(old)
        pages = self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for u in page.get("Uploads", []):
                job_id = u["Key"][len(self.prefix) :].split("/")[1] if u["Key"].count("/") >= 2 else ""
                if u["Initiated"].timestamp() < cutoff and job_id not in keep:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        return removed + self._cleanup_local(cutoff, keep)

    def ping(self) -> bool:
        self.s3.head_bucket(Bucket=self.bucket)
        return True

    def describe(self) -> str:
        return self.url


def open_storage(settings: Any) -> Storage | S3Storage:
    """The configured store: S3 when VOXGEN_STORAGE_URL is set, else the directory
    VOXGEN_STORAGE_DIR (which, with S3, is only this machine's spool)."""
    url = getattr(settings, "storage_url", None)
    if url:
        return S3Storage(
            url,
            settings.storage_dir,
            endpoint_url=settings.s3_endpoint_url or None,  # empty: the provider's own endpoint (AWS)
            part_bytes=int(settings.s3_part_mb) * 2**20,
        )
    return Storage(settings.storage_dir)


# ------------------------------------------------------------------------------------------ statistics

# job duration histogram buckets, seconds: a 128^3 sample on a GPU takes about a second, training hours
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0, 43200.0, 172800.0)
EVENT_OF_STATE = {
    "queued": "requeued",
    "running": "started",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
_SEP = "\x1f"  # between label values in a stats key (names cannot contain it)


def job_labels(rec: dict[str, Any]) -> tuple[str, str]:
    """(kind, model) of a record; a train job's model is the name it registers."""
    model = rec.get("model") or (rec.get("params") or {}).get("name") or ""
    return str(rec.get("kind") or ""), str(model)


def _bucket(seconds: float) -> int:
    for i, le in enumerate(DURATION_BUCKETS):
        if seconds <= le:
            return i
    return len(DURATION_BUCKETS)


def _changes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """What a write means for the statistics: None when the state did not change."""
    kind, model = job_labels(new)
    if old is None:
        return {"event": "submitted", "labels": (kind, model), "active": new["state"] not in TERMINAL}
    if new["state"] == old["state"] or new["state"] not in EVENT_OF_STATE:
        return None
    out: dict[str, Any] = {
        "event": EVENT_OF_STATE[new["state"]],
        "labels": (kind, model),
        "active": new["state"] not in TERMINAL,
    }
    if new["state"] in TERMINAL and old["state"] == "running" and new.get("started"):
        out["duration"] = (new["state"], max(0.0, float(new.get("finished") or time.time()) - float(new["started"])))
    if new["state"] in TERMINAL and new.get("gpu_peak_bytes"):
        out["gpu_peak"] = (str(new.get("worker") or ""), str(new.get("device") or ""), int(new["gpu_peak_bytes"]))
    return out


def empty_stats() -> dict[str, dict]:
    """The shape of ``records.stats()``: counts[(event, kind, model)], durations[(kind, model,
    state)] = {buckets (per bucket, not cumulative, the last one +Inf), sum, count},
    gpu_peak[(worker, device)] = bytes, active[(state, kind, model)] = jobs queued or running now."""
    return {"counts": {}, "durations": {}, "gpu_peak": {}, "active": {}}


# ------------------------------------------------------------------------------------------ records


class MemoryRecords:
    """Job records for the embedded queue."""

    def __init__(self) -> None:
        self._d: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stats = empty_stats()
        self._listeners: list[Callable[[str], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(job_id)`` after every write that changes a job's state (a submission, a
        state change, a deletion, a restored record), in the writing thread, outside the lock."""
        self._listeners.append(listener)

    def _notify(self, job_id: str) -> None:
        for fn in self._listeners:
            try:
                fn(job_id)
            except Exception:  # a listener's failure must not fail the write
                pass

    def _count(self, ch: dict[str, Any] | None) -> None:  # under the lock
        if ch is None:
            return
        k = (ch["event"], *ch["labels"])
        self._stats["counts"][k] = self._stats["counts"].get(k, 0) + 1
        if "duration" in ch:
            state, secs = ch["duration"]
            h = self._stats["durations"].setdefault(
                (*ch["labels"], state), {"buckets": [0] * (len(DURATION_BUCKETS) + 1), "sum": 0.0, "count": 0}
            )
            h["buckets"][_bucket(secs)] += 1
            h["sum"] += secs
            h["count"] += 1
        if "gpu_peak" in ch:
            w, dev, b = ch["gpu_peak"]
            self._stats["gpu_peak"][(w, dev)] = max(b, self._stats["gpu_peak"].get((w, dev), 0))

    def put(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self._d[rec["id"]] = json.loads(json.dumps(rec))
            self._count(_changes(None, rec))
        self._notify(rec["id"])

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
            old_state = r["state"]
            r.update(json.loads(json.dumps(fields)))
            changed = _changes({"state": old_state}, r)
            self._count(changed)
            out = json.loads(json.dumps(r))
        if changed is not None:
            self._notify(job_id)
        return out

    def all_ids(self) -> list[str]:
        with self._lock:
            return list(self._d)

    def active(self) -> dict[str, str]:
        """{job id: state} of the jobs queued or running now."""
        with self._lock:
            return {k: r["state"] for k, r in self._d.items() if r["state"] not in TERMINAL}

    def stats(self) -> dict[str, dict]:
        """Counts since this process started (see ``empty_stats``)."""
        with self._lock:
            res = copy.deepcopy(self._stats)
            for r in self._d.values():
                if r["state"] not in TERMINAL:
                    key = (r["state"], *job_labels(r))
                    res["active"][key] = res["active"].get(key, 0) + 1
            return res

    def expire(self, ttl_seconds: float) -> None:
        cutoff = time.time() - ttl_seconds
        with self._lock:
            for k in [k for k, r in self._d.items() if r["state"] in TERMINAL and r["created"] < cutoff]:
                del self._d[k]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._d.pop(job_id, None)
        self._notify(job_id)

    def restore(self, rec: dict[str, Any], ttl_seconds: float) -> bool:
        """Put back a record this store lost (from the copy beside the job's files), unless one is
        here or it is older than the TTL.  Not a submission: the statistics do not count it."""
        if time.time() - float(rec.get("created") or 0) >= ttl_seconds:
            return False
        with self._lock:
            if rec["id"] in self._d:
                return False
            self._d[rec["id"]] = json.loads(json.dumps(rec))
        self._notify(rec["id"])
        return True

    def ping(self) -> bool:
        return True


class RedisRecords:
    """Job records in Redis (one JSON string per job, with a TTL), updated with WATCH/MULTI.

    Beside the records: ``voxgen:active`` (hash: id -> state, kind, model of the jobs queued or
    running, so scans need not read every record) and the statistics ``voxgen:stats:*`` (counts,
    duration histograms, GPU peaks; no TTL), each written in the same transaction as the record."""

    PREFIX = "voxgen:job:"
    ACTIVE = "voxgen:active"
    EVENTS = "voxgen:events"  # pub/sub channel: "{job id} {state}" after each state change ("deleted")
    COUNTS = "voxgen:stats:counts"
    DURATIONS = "voxgen:stats:durations"
    GPU_PEAK = "voxgen:stats:gpu_peak"

    def __init__(self, url: str, ttl_seconds: float) -> None:
        import redis

        self.url = url
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.ttl = max(60, int(ttl_seconds))

    def _count(self, pipe: Any, job_id: str, new: dict[str, Any], ch: dict[str, Any] | None) -> None:
        if ch is None:
            return
        pipe.publish(self.EVENTS, f"{job_id} {new['state']}")  # in the same MULTI: sent once the write is
        kind, model = ch["labels"]
        pipe.hincrby(self.COUNTS, _SEP.join((ch["event"], kind, model)), 1)
        if ch["active"]:
            pipe.hset(self.ACTIVE, job_id, _SEP.join((new["state"], kind, model)))
        else:
            pipe.hdel(self.ACTIVE, job_id)
        if "duration" in ch:
            state, secs = ch["duration"]
            base = _SEP.join((kind, model, state))
            pipe.hincrby(self.DURATIONS, f"{base}{_SEP}{_bucket(secs)}", 1)
            pipe.hincrbyfloat(self.DURATIONS, f"{base}{_SEP}sum", secs)
            pipe.hincrby(self.DURATIONS, f"{base}{_SEP}count", 1)
        if "gpu_peak" in ch:
            w, dev, b = ch["gpu_peak"]
            pipe.zadd(self.GPU_PEAK, {_SEP.join((w, dev)): b}, gt=True)

    def put(self, rec: dict[str, Any]) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self.PREFIX + rec["id"], json.dumps(rec), ex=self.ttl)
            self._count(pipe, rec["id"], rec, _changes(None, rec))
            pipe.execute()

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
                    old_state = rec["state"]
                    rec.update(fields)
                    pipe.multi()
                    pipe.set(key, json.dumps(rec), keepttl=True)
                    self._count(pipe, job_id, rec, _changes({"state": old_state}, rec))
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue

    def all_ids(self) -> list[str]:
        return [k.decode()[len(self.PREFIX) :] for k in self.r.scan_iter(self.PREFIX + "*", count=500)]

    def _active_raw(self) -> dict[str, str]:
        """The active index, less the entries whose record expired (dropped from the index here)."""
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self.ACTIVE).items()}
        if not raw:
            return raw
        with self.r.pipeline(transaction=False) as p:
            for k in raw:
                p.exists(self.PREFIX + k)
            alive = p.execute()
        gone = [k for k, a in zip(raw, alive, strict=True) if not a]
        if gone:
            self.r.hdel(self.ACTIVE, *gone)
        return {k: v for k, v in raw.items() if k not in gone}

    def active(self) -> dict[str, str]:
        """{job id: state} of the jobs queued or running now."""
        return {k: v.split(_SEP)[0] for k, v in self._active_raw().items()}

    def stats(self) -> dict[str, dict]:
        """Counts kept in Redis: the whole deployment's, since Redis's data began (see ``empty_stats``)."""
        out = empty_stats()
        for k, v in self.r.hgetall(self.COUNTS).items():
            out["counts"][tuple(k.decode().split(_SEP))] = int(v)
        for k, v in self.r.hgetall(self.DURATIONS).items():
            kind, model, state, field = k.decode().split(_SEP)
            h = out["durations"].setdefault(
                (kind, model, state), {"buckets": [0] * (len(DURATION_BUCKETS) + 1), "sum": 0.0, "count": 0}
            )
            if field == "sum":
                h["sum"] = float(v)
            elif field == "count":
                h["count"] = int(v)
            else:
                h["buckets"][int(field)] = int(v)
        for k, score in self.r.zrange(self.GPU_PEAK, 0, -1, withscores=True):
            out["gpu_peak"][tuple(k.decode().split(_SEP))] = int(score)
        for v in self._active_raw().values():
            key = tuple(v.split(_SEP))
            out["active"][key] = out["active"].get(key, 0) + 1
        return out

    def delete(self, job_id: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.PREFIX + job_id)
            pipe.hdel(self.ACTIVE, job_id)
            pipe.publish(self.EVENTS, f"{job_id} deleted")
            pipe.execute()

    def listen(self, on_event: Callable[[str | None], None], stop: threading.Event) -> None:
        """Until ``stop`` is set: call ``on_event(job_id)`` for every state change any process
        published (``voxgen:events``), and ``on_event(None)`` -- "anything may have changed" -- each
        time the subscription is (re)established, since messages sent while it was down are lost.
        Blocks in Redis (one connection, a 1 s read timeout to notice ``stop``); run it in a thread."""
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=5, health_check_interval=30)
        while not stop.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.EVENTS)
                on_event(None)
                while not stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        on_event(msg["data"].decode(errors="replace").split(" ", 1)[0])
            except (redis.RedisError, OSError):  # Redis away for a moment: resubscribe
                stop.wait(1.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass
        client.close()

    def restore(self, rec: dict[str, Any], ttl_seconds: float | None = None) -> bool:
        """Put back a record Redis lost (restarted without persistence), from the copy beside the
        job's files, with the TTL it has left (none left: not restored); never over a record that
        is there (SET NX).  Not a submission: the statistics do not count it."""
        ttl = self.ttl if ttl_seconds is None else ttl_seconds
        left = int(float(rec.get("created") or 0) + ttl - time.time())
        if left <= 0:
            return False
        return bool(self.r.set(self.PREFIX + rec["id"], json.dumps(rec), ex=left, nx=True))

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
