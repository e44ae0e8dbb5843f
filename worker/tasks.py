"""Celery tasks: thin wrappers around worker.jobs (the same functions run in the embedded queue)."""

from worker.celery_app import app, run_job

__all__ = ["app", "run_job"]
