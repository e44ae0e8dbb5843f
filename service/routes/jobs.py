from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from service.routes.common import job_record
from service.schemas import JobStatus
from worker.store import TERMINAL

router = APIRouter(tags=["jobs"])

_FIELDS = ("kind", "model", "state", "progress", "result", "error", "attempt", "worker", "device")
_MEDIA = {".gz": "application/gzip", ".png": "image/png", ".json": "application/json", ".jsonl": "application/json"}


def status(rec: dict[str, Any]) -> JobStatus:
    return JobStatus(job_id=rec["id"], **{k: rec.get(k) for k in (*_FIELDS, "created", "started", "finished")})


@router.get("/jobs/{job_id}", response_model_exclude_none=True)
def job_status(request: Request, job_id: str) -> JobStatus:
    """State, progress and, once succeeded, the result: files (complete once listed) and small
    inline values (an encode job's latent, a traverse job's steps)."""
    return status(job_record(request, job_id))


@router.get("/jobs/{job_id}/files/{name}", response_class=FileResponse)
def job_file(request: Request, job_id: str, name: str) -> FileResponse:
    """Stream one of the job's listed result files."""
    rec = job_record(request, job_id)
    listed = {f["name"] for f in (rec.get("result") or {}).get("files", [])}
    p = request.app.state.storage.file_path(job_id, name) if name in listed else None
    if p is None:
        raise HTTPException(404, f"job {job_id} has no result file {name!r}")
    suffix = "." + name.rsplit(".", 1)[-1]
    return FileResponse(p, media_type=_MEDIA.get(suffix, "application/octet-stream"), filename=name)


@router.delete("/jobs/{job_id}", response_model_exclude_none=True)
def cancel(request: Request, job_id: str) -> JobStatus:
    """Cancel a queued or running job (a running one stops at its next progress step); a finished
    job is left as it is."""
    job_record(request, job_id)
    request.app.state.jobs.records.update_if(
        job_id, lambda r: r["state"] not in TERMINAL, state="cancelled", finished=time.time(), lease_until=None
    )
    return status(job_record(request, job_id))
