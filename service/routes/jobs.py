from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service.errors import error_responses
from service.routes.common import job_record
from service.schemas import JobDeleted, JobStatus
from service.storage import file_response
from service.waits import RECHECK_SECONDS, WAIT_MAX_SECONDS
from worker.store import TERMINAL

router = APIRouter(tags=["jobs"])

_FIELDS = (
    "kind",
    "model",
    "state",
    "progress",
    "result",
    "error",
    "attempt",
    "worker",
    "device",
    "threads",
    "gpu_peak_bytes",
)
_MEDIA = {
    ".gz": "application/gzip",
    ".png": "image/png",
    ".json": "application/json",
    ".jsonl": "application/json",
    ".zip": "application/zip",
}


def status(rec: dict[str, Any]) -> JobStatus:
    return JobStatus(job_id=rec["id"], **{k: rec.get(k) for k in (*_FIELDS, "created", "started", "finished")})


@router.get("/jobs/{job_id}", response_model_exclude_none=True, responses=error_responses(404, 422))
async def job_status(
    request: Request,
    job_id: str,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            description="long poll: answer as soon as the job has ended (succeeded, failed, cancelled), or "
            f"after this many seconds with its status then (at most {WAIT_MAX_SECONDS:g}: a larger value is "
            "capped); absent or 0: at once",
        ),
    ] = None,
) -> JobStatus:
    """State, progress and, once succeeded, the result: files (complete once listed) and small
    inline values (an encode job's latent, a traverse job's steps).  With ``wait`` the request is
    a long poll: it returns when the job ends, pushed by the record store (no polling), or when
    ``wait`` seconds have passed; a client loops on it instead of polling often."""
    if not wait:
        return status(await run_in_threadpool(job_record, request, job_id))
    deadline = time.monotonic() + min(float(wait), WAIT_MAX_SECONDS)
    # registered before the first read, cleared before each later one: no state change is missed
    with request.app.state.jobs.waits.watch(job_id) as changed:
        rec = await run_in_threadpool(job_record, request, job_id)
        while rec["state"] not in TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), min(left, RECHECK_SECONDS))
            except asyncio.TimeoutError:
                pass
            changed.clear()
            rec = await run_in_threadpool(job_record, request, job_id)  # 404 if deleted meanwhile
    return status(rec)


_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the file's bytes",
        "content": {
            m: {"schema": {"type": "string", "format": "binary"}}
            for m in sorted({*_MEDIA.values(), "application/octet-stream"})
        },
    },
    **error_responses(404, 422),
}


@router.get("/jobs/{job_id}/files/{name}", response_class=Response, responses=_FILE_RESPONSES)
def job_file(request: Request, job_id: str, name: str) -> Response:
    """Stream one of the job's listed result files (from the local directory or the S3 store)."""
    rec = job_record(request, job_id)
    listed = {f["name"] for f in (rec.get("result") or {}).get("files", [])}
    media = _MEDIA.get("." + name.rsplit(".", 1)[-1], "application/octet-stream")
    resp = file_response(request.app.state.storage, job_id, name, media) if name in listed else None
    if resp is None:
        raise HTTPException(404, f"job {job_id} has no result file {name!r}")
    return resp


@router.delete("/jobs/{job_id}", response_model_exclude_none=True, responses=error_responses(404, 422))
def cancel_or_delete(request: Request, job_id: str) -> JobDeleted:
    """A queued or running job is cancelled (a running one stops at its next progress step; its
    record stays, state ``cancelled``): ``action: "cancelled"``.  A finished job (succeeded, failed
    or cancelled) has its result files and its record deleted at once, before the TTL:
    ``action: "deleted"``, with the job as it was; GET /jobs/{id} answers 404 afterwards."""
    rec = job_record(request, job_id)
    records, storage = request.app.state.jobs.records, request.app.state.storage
    cancelled = records.update_if(
        job_id, lambda r: r["state"] not in TERMINAL, state="cancelled", finished=time.time(), lease_until=None
    )
    if cancelled is not None:
        return JobDeleted(**status(cancelled).model_dump(), action="cancelled")
    rec = records.get(job_id) or rec  # finished meanwhile, or already: as it is now
    storage.delete_job(job_id)  # result files (and an encode job's upload) first, then the record
    records.delete(job_id)
    return JobDeleted(**status(rec).model_dump(), action="deleted")
