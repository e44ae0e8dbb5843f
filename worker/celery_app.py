"""The Celery application: broker = Redis (VOXGEN_REDIS_URL); queues ``gpu`` (generate, encode,
traverse) and ``train``.  Results are files in storage and small JSON records in Redis, never Celery
result payloads.  Models are cached per worker process (worker/jobs.py:get_model).

Surviving a killed worker: ``task_acks_late`` + ``task_reject_on_worker_lost`` keep the message of
a job whose worker died unacknowledged, but Redis redelivers it only after ``visibility_timeout``
(which must exceed the longest job, so hours).  The job lease (worker/store.py) brings it back much
sooner: every worker process runs a reaper thread (started below when the worker is ready) and so
does every API process; a lapsed lease is re-queued as a new attempt within about one
VOXGEN_JOB_LEASE_SECONDS.  The eventual redelivery of the old message is then dropped because its
attempt number no longer matches the record.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache

from celery import Celery
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging, worker_ready, worker_shutdown

from worker.logs import configure_logging, job_context, task_id_for
from worker.settings import celery_conf, get_settings
from worker.store import S3Storage, Storage, open_storage, queue_for

log = logging.getLogger("voxgen.worker")

settings = get_settings()
app = Celery("voxgen", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
app.conf.update(celery_conf(settings))

_stop_reaper = threading.Event()


@app.task(name="voxgen.run_job")
def run_job(job_id: str, attempt: int) -> None:
    """A thin wrapper: the job itself is worker.jobs.execute, the same as in the embedded queue.
    Every line logged while it runs carries the job id (worker/logs.py)."""
    from worker.jobs import execute
    from worker.store import RedisRecords

    s = get_settings()
    records = RedisRecords(s.redis_url or "", s.result_ttl_hours * 3600)
    with job_context(job_id, attempt=attempt):
        t0 = time.time()
        log.info("job delivered")
        execute(
            job_id,
            attempt,
            records,
            _storage(),
            s.models_dir,
            device=s.device,
            lease_seconds=s.job_lease_seconds,
            threads=s.threads,
        )
        rec = records.get(job_id) or {}
        log.info(
            "job delivery ended: %s after %.2f s (worker %s, device %s)",
            rec.get("state"),
            time.time() - t0,
            rec.get("worker"),
            rec.get("device"),
        )


@lru_cache(maxsize=1)
def _storage() -> Storage | S3Storage:
    """One store (and its S3 connection pool) per worker process."""
    return open_storage(get_settings())


def resubmit(job_id: str, attempt: int, kind: str) -> None:
    app.send_task("voxgen.run_job", args=[job_id, attempt], queue=queue_for(kind), task_id=task_id_for(job_id, attempt))


@celeryd_init.connect
def _early_logging(instance: object = None, **_: object) -> None:
    """Before the worker starts: our log format already (so warnings raised during start-up are
    lines of it), and with JSON logs no multi-line start-up banner (its gist is logged instead)."""
    s = get_settings()
    configure_logging(s.log_format, s.log_level)
    if s.log_format == "json" and instance is not None:
        instance.quiet = True  # type: ignore[attr-defined]


@celeryd_after_setup.connect
def _announce(sender: object = None, instance: object = None, **_: object) -> None:
    s = get_settings()
    queues = sorted(getattr(getattr(instance, "app", app).amqp.queues, "consume_from", None) or [])
    log.info(
        "worker %s: queues %s, device %s, concurrency %s, storage %s",
        sender,
        ",".join(queues),
        s.device,
        getattr(instance, "concurrency", "?"),
        s.storage_url or s.storage_dir,  # not _storage(): its S3 client must not cross a prefork fork
    )


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Celery leaves logging to us when this signal has a receiver: VOXGEN_LOG_FORMAT lines with
    the job id (worker/logs.py), at the worker's --loglevel."""
    s = get_settings()
    configure_logging(s.log_format, loglevel or s.log_level)


SWEEP_SECONDS = 60.0


def _sweep(records: object, storage: Storage | S3Storage) -> None:
    try:
        if n := storage.sweep_scratch(records):
            log.warning("removed %d scratch folder(s) that no live job attempt owns", n)
    except Exception as e:  # Redis or the disk unavailable for a moment: the next sweep
        log.warning("scratch sweep failed: %s", e)


def _reaper_loop() -> None:
    """Re-queue lapsed leases every lease/3 seconds, and sweep this worker's disk for dead
    attempts' scratch folders when the worker starts and every minute (worker/store.py)."""
    from worker.jobs import reap
    from worker.store import RedisRecords

    s = get_settings()
    records = RedisRecords(s.redis_url or "", s.result_ttl_hours * 3600)
    storage = open_storage(s)  # this thread's own (not _storage(): prefork children must not inherit it)
    _sweep(records, storage)
    swept = time.monotonic()
    while True:
        try:
            for job_id in reap(records, resubmit, storage=storage):
                with job_context(job_id):
                    log.warning("job re-queued: its worker's lease lapsed")
            s.heartbeat_file.touch()  # alive and reaching Redis (the health check reads its age)
        except Exception as e:  # Redis unreachable for a moment: try again at the next period
            log.warning("reaper round failed: %s", e)
        if time.monotonic() - swept >= SWEEP_SECONDS:
            _sweep(records, storage)
            swept = time.monotonic()
        if _stop_reaper.wait(max(1.0, s.job_lease_seconds / 3)):
            return


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    threading.Thread(target=_reaper_loop, name="voxgen-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reaper.set()
