from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from service.routes.common import job_record
from service.schemas import JobStatus
from service.storage import file_response
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
_MEDIA = {".gz": "application/gzip", ".png": "image/png", ".json": "application/json", ".jsonl": "application/json"}


def status(rec: dict[str, Any]) -> JobStatus:
    return JobStatus(job_id=rec["id"], **{k: rec.get(k) for k in (*_FIELDS, "created", "started", "finished")})


@router.get("/jobs/{job_id}", response_model_exclude_none=True)
def job_status(request: Request, job_id: str) -> JobStatus:
    """State, progress and, once succeeded, the result: files (complete once listed) and small
    inline values (an encode job's latent, a traverse job's steps)."""
    return status(job_record(request, job_id))


@router.get("/jobs/{job_id}/files/{name}", response_class=Response)
def job_file(request: Request, job_id: str, name: str) -> Response:
    """Stream one of the job's listed result files (from the local directory or the S3 store)."""
    rec = job_record(request, job_id)
    listed = {f["name"] for f in (rec.get("result") or {}).get("files", [])}
    media = _MEDIA.get("." + name.rsplit(".", 1)[-1], "application/octet-stream")
    resp = file_response(request.app.state.storage, job_id, name, media) if name in listed else None
    if resp is None:
        raise HTTPException(404, f"job {job_id} has no result file {name!r}")
    return resp


@router.delete("/jobs/{job_id}", response_model_exclude_none=True)
def cancel(request: Request, job_id: str) -> JobStatus:
    """Cancel a queued or running job (a running one stops at its next progress step); a finished
    job is left as it is."""
    job_record(request, job_id)
    request.app.state.jobs.records.update_if(
        job_id, lambda r: r["state"] not in TERMINAL, state="cancelled", finished=time.time(), lease_until=None
    )
    return status(job_record(request, job_id))
