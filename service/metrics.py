"""GET /metrics: Prometheus text format.

What is counted where (so the numbers are right with many API replicas and many workers):

* ``voxgen_jobs_*_total`` (submitted, started, requeued, succeeded, failed, cancelled; by kind and
  model), ``voxgen_job_duration_seconds`` (running -> terminal, by kind, model and final state) and
  ``voxgen_worker_gpu_memory_peak_bytes`` (the largest ``gpu_peak_bytes`` a worker reported in a job
  record, by worker and device) are counted by the job-record store at each state change, in the same
  atomic write as the record (worker/store.py).  With Celery they live in Redis: every API replica
  reports the same deployment-wide values (aggregate replicas with ``max``, not ``sum``), they survive
  API restarts, and they reset only with Redis's data.  With the embedded queue they are this
  process's counts since it started.
* ``voxgen_jobs_active`` (queued and running now, by state, kind and model) is read at scrape time
  from the records' active index; ``voxgen_queue_depth`` (messages waiting per Celery queue, the
  Redis list KEDA scales on; or the embedded queue's length) from the broker.
* ``process_*`` metrics are the scraped API process's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.store import DURATION_BUCKETS

log = logging.getLogger("voxgen.api")
router = APIRouter(tags=["health"])

_EVENTS = {
    "submitted": "jobs accepted by the API",
    "started": "job deliveries a worker claimed and started (a re-queued job starts again)",
    "requeued": "running jobs re-queued because their worker's lease lapsed",
    "succeeded": "jobs that finished with their results published",
    "failed": "jobs that ended with an error",
    "cancelled": "jobs cancelled by DELETE /jobs/{id}",
}


class JobsCollector:
    """Reads the job statistics at scrape time (see the module docstring)."""

    def __init__(self, jobs: Any) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        stats = self.jobs.records.stats()
        for event, doc in _EVENTS.items():
            c = CounterMetricFamily(f"voxgen_jobs_{event}", doc.capitalize() + ".", labels=["kind", "model"])
            for (ev, kind, model), n in sorted(stats["counts"].items()):
                if ev == event:
                    c.add_metric([kind, model], n)
            yield c
        g = GaugeMetricFamily("voxgen_jobs_active", "Jobs queued or running now.", labels=["state", "kind", "model"])
        for (state, kind, model), n in sorted(stats["active"].items()):
            g.add_metric([state, kind, model], n)
        yield g
        h = HistogramMetricFamily(
            "voxgen_job_duration_seconds",
            "Time from a worker starting a job to its end (succeeded, failed or cancelled while running).",
            labels=["kind", "model", "state"],
        )
        for (kind, model, state), d in sorted(stats["durations"].items()):
            cum, buckets = 0, []
            for le, n in zip((*(str(b) for b in DURATION_BUCKETS), "+Inf"), d["buckets"], strict=True):
                cum += n
                buckets.append((le, cum))
            h.add_metric([kind, model, state], buckets, d["sum"])
        yield h
        p = GaugeMetricFamily(
            "voxgen_worker_gpu_memory_peak_bytes",
            "Largest peak of GPU memory allocated by torch during one job, as reported by each worker.",
            labels=["worker", "device"],
        )
        for (worker, device), b in sorted(stats["gpu_peak"].items()):
            p.add_metric([worker, device], b)
        yield p
        q = GaugeMetricFamily("voxgen_queue_depth", "Jobs waiting in the queue, not yet started.", labels=["queue"])
        for name, n in sorted(self.jobs.queue_depth().items()):
            q.add_metric([name], n)
        yield q


def make_registry(jobs: Any) -> CollectorRegistry:
    """A registry of its own per app (several apps in one process do not collide)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobsCollector(jobs))
    ProcessCollector(registry=reg)
    return reg


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: job counts by kind and model, durations, queue depth, worker GPU peaks
    (service/metrics.py says what is counted where).  503 when the record store cannot be read."""
    try:
        body = generate_latest(request.app.state.metrics_registry)
    except Exception as e:  # Redis unreachable: say so rather than report zeros
        log.warning("metrics unavailable: %s", e)
        return Response(f"metrics unavailable: {e}\n", status_code=503, media_type="text/plain")
    return Response(body, media_type=CONTENT_TYPE_LATEST)
