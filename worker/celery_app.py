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

import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from worker.settings import celery_conf, get_settings
from worker.store import queue_for

settings = get_settings()
app = Celery("voxgen", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
app.conf.update(celery_conf(settings))

_stop_reaper = threading.Event()


@app.task(name="voxgen.run_job")
def run_job(job_id: str, attempt: int) -> None:
    """A thin wrapper: the job itself is worker.jobs.execute, the same as in the embedded queue."""
    from worker.jobs import execute
    from worker.store import RedisRecords, Storage

    s = get_settings()
    execute(
        job_id,
        attempt,
        RedisRecords(s.redis_url or "", s.result_ttl_hours * 3600),
        Storage(s.storage_dir),
        s.models_dir,
        device=s.device,
        lease_seconds=s.job_lease_seconds,
    )


def resubmit(job_id: str, attempt: int, kind: str) -> None:
    app.send_task("voxgen.run_job", args=[job_id, attempt], queue=queue_for(kind))


def _reaper_loop() -> None:
    from worker.jobs import reap
    from worker.store import RedisRecords

    s = get_settings()
    records = RedisRecords(s.redis_url or "", s.result_ttl_hours * 3600)
    while not _stop_reaper.wait(max(1.0, s.job_lease_seconds / 3)):
        try:
            reap(records, resubmit)
        except Exception:  # Redis unreachable for a moment: try again at the next period
            pass


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    threading.Thread(target=_reaper_loop, name="voxgen-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reaper.set()
