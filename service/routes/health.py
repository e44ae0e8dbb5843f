from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/health/live")
def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "the queue back end or the storage does not answer"}},
)
def ready(request: Request) -> JSONResponse:
    """200 only when the queue back end (Redis, or the embedded worker thread) and storage answer."""
    jobs, storage = request.app.state.jobs, request.app.state.storage
    checks: dict[str, object] = {}
    for name, fn in (("queue", jobs.ping), ("storage", storage.ping)):
        try:
            checks[name] = bool(fn())
        except Exception as e:  # a readiness probe reports, it does not raise
            checks[name] = False
            checks[f"{name}_error"] = str(e)[:200]
    ok = bool(checks["queue"] and checks["storage"])
    return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "backend": jobs.kind, **checks})
