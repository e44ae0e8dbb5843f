"""The Celery application: broker = Redis (VOXGEN_REDIS_URL); results are files in storage and
small records in Redis, never Celery result payloads."""

from __future__ import annotations

from celery import Celery

from worker.settings import get_settings

settings = get_settings()
app = Celery("voxgen", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
app.conf.update(
    task_acks_late=True,  # a message is acknowledged only after the job ran
    task_reject_on_worker_lost=True,  # a worker killed mid-job does not ack its message
    worker_prefetch_multiplier=1,  # one job at a time per process: no job waits behind a long one
    task_ignore_result=True,
    # Redis redelivers an unacked message only after this; longer than the longest job. Lost jobs
    # are recovered much sooner by the lease reaper (worker/store.py), and the stale redelivery is
    # ignored because its attempt number no longer matches.
    broker_transport_options={"visibility_timeout": 6 * 3600},
    task_default_queue="gpu",
    task_routes={"voxgen.run_job": {"queue": "gpu"}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="voxgen.run_job")
def run_job(job_id: str, attempt: int) -> None:
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
