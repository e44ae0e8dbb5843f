"""Two queue back ends behind one interface: Celery on Redis, and the embedded in-process queue."""

from __future__ import annotations

import queue
import threading

from worker.settings import Settings, celery_conf
from worker.store import MemoryRecords, RedisRecords, Storage, queue_for


class EmbeddedQueue:
    """One worker thread in the API process runs jobs in order (no Redis needed)."""

    kind = "embedded"

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.records = MemoryRecords()
        self._q: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="voxgen-embedded-worker", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, attempt: int, kind: str) -> None:
        self._q.put((job_id, attempt))

    def _run(self) -> None:
        from worker.jobs import execute

        while (item := self._q.get()) is not None:
            try:
                execute(
                    item[0],
                    item[1],
                    self.records,
                    self.storage,
                    self.settings.models_dir,
                    device=self.settings.device,
                    lease_seconds=self.settings.job_lease_seconds,
                )
            except Exception:  # execute records job failures itself; this thread must outlive anything
                pass
            finally:
                self._q.task_done()

    def reap(self) -> list[str]:  # a thread in this process cannot die without the process
        return []

    def pending(self) -> int:
        """Jobs submitted and not yet finished by the worker thread."""
        return self._q.unfinished_tasks

    def ping(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._q.put(None)


class CeleryQueue:
    """Jobs go to Celery workers through Redis; records live in Redis."""

    kind = "celery"

    def __init__(self, settings: Settings, storage: Storage) -> None:
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

    def submit(self, job_id: str, attempt: int, kind: str) -> None:
        self.app.send_task("voxgen.run_job", args=[job_id, attempt], queue=queue_for(kind))

    def reap(self) -> list[str]:
        """Re-queue running jobs whose lease lapsed (their worker died); see worker/store.py."""
        from worker.jobs import reap  # plain Python: no torch

        return reap(self.records, self.submit)

    def _reap_loop(self) -> None:
        period = max(1.0, self.settings.job_lease_seconds / 3)
        while not self._stop.wait(period):
            try:
                self.reap()
            except Exception:  # Redis unreachable for a moment: try again at the next period
                pass

    def ping(self) -> bool:
        return self.records.ping()

    def close(self) -> None:
        self._stop.set()
