"""The FastAPI application factory.  Thin routes (service/routes/), pydantic schemas as the contract
(service/schemas.py), GET /metrics (service/metrics.py).  Storage is a local directory or an
S3-compatible store (VOXGEN_STORAGE_URL; worker/store.py).  The API process does not import torch
unless it runs the embedded queue, whose worker thread loads the models."""

from __future__ import annotations

import logging
import re
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, metrics
from service.routes import ROUTERS
from service.routes.common import list_models
from service.settings import Settings, get_settings
from worker.logs import bind_job, configure_logging, end_scope, request_scope
from worker.store import MemoryRecords, open_storage

log = logging.getLogger("voxgen.api")
_JOB_PATH = re.compile(r"^/jobs/([0-9a-f]{32})(?:/|$)")

JSON_BODY_LIMIT = 16 * 2**20  # the largest legitimate JSON body (16 latents of 8192 values) is ~4 MB
MULTIPART_OVERHEAD = 64 * 2**10  # boundaries, part headers and the small form fields around the file


class BodyLimit:
    """Refuse a request body over the limit while it streams in, never after reading it all.

    Starlette parses a multipart upload completely (into a temporary file) before the route runs,
    so the route alone could only count bytes that already sit on disk.  This middleware answers
    413 at once when Content-Length declares too much, and otherwise counts the body as it arrives
    and stops the parse with 413 at the first chunk over the limit (chunked uploads included).
    /encode may carry VOXGEN_MAX_UPLOAD_MB plus multipart overhead; other bodies 16 MiB."""

    def __init__(self, app: ASGIApp, upload_bytes: int) -> None:
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        is_upload = scope["path"].rstrip("/") == "/encode"
        limit = self.upload_bytes + MULTIPART_OVERHEAD if is_upload else JSON_BODY_LIMIT
        what = f"upload over the limit of {self.upload_bytes // 2**20} MB" if is_upload else "request body too large"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await JSONResponse({"detail": what}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, what)  # raised inside the body parse: FastAPI answers 413
            return msg

        await self.app(scope, counted, send)


class LogScope:
    """Each HTTP request logs in a scope of its own (worker/logs.py): a request on /jobs/{id}
    carries that job id on its lines from the start; a submission binds its new job's id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = request_scope()
        if m := _JOB_PATH.match(scope["path"]):
            bind_job(m.group(1))
        try:
            await self.app(scope, receive, send)
        finally:
            end_scope(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    storage = open_storage(settings)
    if settings.redis_url:
        from service.queues import CeleryQueue

        jobs: Any = CeleryQueue(settings, storage)
    else:
        from service.queues import EmbeddedQueue

        jobs = EmbeddedQueue(settings, storage)

    stop_cleaner = threading.Event()

    def cleaner() -> None:
        """Results older than VOXGEN_RESULT_TTL_HOURS are deleted; records expire with them (in
        Redis by their key TTL, in memory here)."""
        ttl = settings.result_ttl_hours * 3600
        while True:
            try:
                if isinstance(jobs.records, MemoryRecords):
                    jobs.records.expire(ttl)
                running = {i for i, state in jobs.records.active().items() if state == "running"}
                storage.cleanup(ttl, keep=running)
            except Exception as e:  # storage or Redis briefly unavailable: next round
                log.warning("result cleanup skipped this round: %s", e)
            if stop_cleaner.wait(min(600.0, max(5.0, ttl / 10))):
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        # VOXGEN_LOG_FORMAT for our lines and uvicorn's (whose own handlers are replaced)
        configure_logging(
            settings.log_format, settings.log_level, loggers=("uvicorn", "uvicorn.error", "uvicorn.access")
        )
        log.info("voxgen API: %s queue, storage %s", jobs.kind, storage.describe())
        t = threading.Thread(target=cleaner, name="voxgen-cleaner", daemon=True)
        t.start()
        yield
        stop_cleaner.set()
        jobs.close()

    app = FastAPI(
        title="voxgen",
        version="0.1.0",
        lifespan=lifespan,
        description="Generate, encode and edit high-resolution 3D medical volumes (HA-GAN, 3D Split&Shuffle-GAN, "
        "3D-StyleGAN, alpha-WGAN-GP). Jobs are "
        "asynchronous: POST returns 202 with a job id; long-poll GET /jobs/{id}?wait=60 (answers when the job "
        "ends); download the listed files.",
    )
    app.state.settings, app.state.storage, app.state.jobs = settings, storage, jobs
    app.state.metrics_registry = metrics.make_registry(jobs)
    app.add_middleware(BodyLimit, upload_bytes=settings.max_upload_mb * 2**20)
    app.add_middleware(LogScope)  # outermost: a 413 from BodyLimit is logged in the request's scope

    errors.install(app)  # every error body in its documented shape (service/errors.py)

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(metrics.router)
    return app


__all__ = ["create_app", "list_models", "BodyLimit"]
