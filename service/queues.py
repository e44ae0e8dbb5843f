"""Two queue back ends behind one interface: Celery on Redis, and the embedded in-process queue.

Both take ``submit(job_id, attempt, kind)`` (an encode job's upload is first pushed to shared
storage: ``storage.commit_upload``), answer ``ping()``, ``pending()`` and ``queue_depth()`` (jobs
waiting per queue, for GET /metrics), and expose the job ``records`` and ``waits`` (service/waits.py:
woken by the records' pushed state changes, for the long poll ``GET /jobs/{id}?wait=S``)."""

from __future__ import annotations

import logging
import queue
import threading
import time

from service.waits import JobWaits
from worker.logs import bind_job, job_context, task_id_for
from worker.settings import Settings, celery_conf
from worker.store import MemoryRecords, RedisRecords, S3Storage, Storage, queue_for

log = logging.getLogger("voxgen.api")

# Celery's Redis transport keeps a queue's messages in a list named after the queue; messages sent
# with a priority go to lists "{queue}\x06\x16{priority}" (priority steps 3, 6, 9).  voxgen sends
# without priority, so the plain list is the one that fills (and the one KEDA watches).
_PRIORITY_SEP = "\x06\x16"
QUEUES = ("gpu", "train")


class EmbeddedQueue:
    """One worker thread in the API process runs jobs in order (no Redis needed)."""

    kind = "embedded"

    def __init__(self, settings: Settings, storage: Storage | S3Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.records = MemoryRecords()
        self.waits = JobWaits()
        self.records.subscribe(self.waits.notify)  # the worker thread's writes wake the long polls
        self._q: queue.Queue[tuple[str, int] | None] = queue.Queue()
        # this process's job records start empty: any scratch folder here is a previous process's
        if n := storage.sweep_scratch(self.records):
            log.warning("removed %d scratch folder(s) left by an earlier process", n)
        self._thread = threading.Thread(target=self._run, name="voxgen-embedded-worker", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, attempt: int, kind: str) -> None:
        bind_job(job_id, attempt=attempt)
        self.storage.commit_upload(job_id)
        self._q.put((job_id, attempt))
        with job_context(job_id, attempt=attempt):
            log.info("job submitted: kind %s, attempt %d, embedded queue", kind, attempt)

    def _run(self) -> None:
        from worker.jobs import execute

        while (item := self._q.get()) is not None:
            job_id, attempt = item
            with job_context(job_id, attempt=attempt):
                t0 = time.time()
                log.info("job started")
                try:
                    execute(
                        job_id,
                        attempt,
                        self.records,
                        self.storage,
                        self.settings.models_dir,
                        device=self.settings.device,
                        lease_seconds=self.settings.job_lease_seconds,
                        threads=self.settings.threads,
                    )
                except Exception:  # execute records job failures itself; this thread must outlive anything
                    log.exception("job crashed outside its own error handling")
                finally:
                    self._q.task_done()
                rec = self.records.get(job_id) or {}
                log.info("job ended: %s after %.2f s", rec.get("state"), time.time() - t0)

    def reap(self) -> list[str]:  # a thread in this process cannot die without the process
        return []

    def pending(self) -> int:
        """Jobs submitted and not yet finished by the worker thread."""
        return self._q.unfinished_tasks

    def queue_depth(self) -> dict[str, int]:
        """Jobs waiting (not yet started) in the one embedded queue."""
        return {"embedded": self._q.qsize()}

    def ping(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._q.put(None)


class CeleryQueue:
    """Jobs go to Celery workers through Redis; records live in Redis."""

    kind = "celery"

    def __init__(self, settings: Settings, storage: Storage | S3Storage) -> None:
        from celery import Celery

        self.settings = settings
        self.storage = storage
        self.records = RedisRecords(settings.redis_url or "", settings.result_ttl_hours * 3600)
        # a bare client app: sending by task name keeps torch and the model code out of the API
        self.app = Celery("voxgen-api", broker=settings.redis_url)
        self.app.conf.update(celery_conf(settings))
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="voxgen-reaper", daemon=True)
        self._reaper.start()
        # every process's state changes arrive by Redis pub/sub and wake this process's long polls
        self.waits = JobWaits()
        self._events = threading.Thread(
            target=self.records.listen, args=(self.waits.notify, self._stop), name="voxgen-events", daemon=True
        )
        self._events.start()

    def submit(self, job_id: str, attempt: int, kind: str) -> None:
        bind_job(job_id, attempt=attempt)
        self.storage.commit_upload(job_id)  # an encode job's upload, to where any worker finds it
        q = queue_for(kind)
        self.app.send_task("voxgen.run_job", args=[job_id, attempt], queue=q, task_id=task_id_for(job_id, attempt))
        with job_context(job_id, attempt=attempt):
            log.info("job submitted: kind %s, attempt %d, queue %s", kind, attempt, q)

    def reap(self) -> list[str]:
        """Re-queue running jobs whose lease lapsed (their worker died); see worker/store.py."""
        from worker.jobs import reap  # plain Python: no torch

        return reap(self.records, self.submit, storage=self.storage)

    def _reap_loop(self) -> None:
        period = max(1.0, self.settings.job_lease_seconds / 3)
        while not self._stop.wait(period):
            try:
                for job_id in self.reap():
                    with job_context(job_id):
                        log.warning("job re-queued: its worker's lease lapsed")
            except Exception:  # Redis unreachable for a moment: try again at the next period
                pass

    def pending(self) -> int:
        """Jobs queued or running (from the records' active index)."""
        return len(self.records.active())

    def queue_depth(self) -> dict[str, int]:
        """Messages waiting in each Celery queue's Redis list (what KEDA scales the workers on)."""
        out = {}
        with self.records.r.pipeline(transaction=False) as p:
            for q in QUEUES:
                p.llen(q)
                for pri in (3, 6, 9):
                    p.llen(f"{q}{_PRIORITY_SEP}{pri}")
            n = p.execute()
        for i, q in enumerate(QUEUES):
            out[q] = int(sum(n[4 * i : 4 * i + 4]))
        return out

    def ping(self) -> bool:
        return self.records.ping()

    def close(self) -> None:
        self._stop.set()
