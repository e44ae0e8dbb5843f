"""The FastAPI application factory.  Thin routes (service/routes/), pydantic schemas as the contract
(service/schemas.py).  The API process does not import torch unless it runs the embedded queue,
whose worker thread loads the models."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.routes import ROUTERS
from service.routes.common import list_models
from service.settings import Settings, get_settings
from worker.store import MemoryRecords, Storage

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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    storage = Storage(settings.storage_dir)
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
                running = {i for i in jobs.records.all_ids() if (r := jobs.records.get(i)) and r["state"] == "running"}
                storage.cleanup(ttl, keep=running)
            except Exception:  # storage or Redis briefly unavailable: next round
                pass
            if stop_cleaner.wait(min(600.0, max(5.0, ttl / 10))):
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        t = threading.Thread(target=cleaner, name="voxgen-cleaner", daemon=True)
        t.start()
        yield
        stop_cleaner.set()
        jobs.close()

    app = FastAPI(
        title="voxgen",
        version="0.1.0",
        lifespan=lifespan,
        description="Generate, encode and edit high-resolution 3D medical volumes (HA-GAN). Jobs are "
        "asynchronous: POST returns 202 with a job id; poll GET /jobs/{id}; download the listed files.",
    )
    app.state.settings, app.state.storage, app.state.jobs = settings, storage, jobs
    app.add_middleware(BodyLimit, upload_bytes=settings.max_upload_mb * 2**20)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errs})

    for router in ROUTERS:
        app.include_router(router)
    return app


__all__ = ["create_app", "list_models", "BodyLimit"]
