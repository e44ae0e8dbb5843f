"""Result storage as the API sees it.  The implementation is shared with the workers (they write,
the API reads), so it lives in worker/store.py; dependencies point service -> worker -> model.

``file_response`` answers GET /jobs/{id}/files/{name} from either store: a local file as a
FileResponse, an S3 object streamed from the store chunk by chunk (never held whole in memory)."""

from __future__ import annotations

from fastapi.responses import FileResponse, Response, StreamingResponse

from worker.store import SAFE_NAME, S3Storage, Storage, open_storage


def file_response(storage: Storage | S3Storage, job_id: str, name: str, media_type: str) -> Response | None:
    """The response that sends a published result file, or None if there is no such file.  The
    caller checks first that the job's record lists ``name`` (only listed files are complete)."""
    if isinstance(storage, Storage):
        p = storage.file_path(job_id, name)
        return None if p is None else FileResponse(p, media_type=media_type, filename=name)
    got = storage.open(job_id, name)
    if got is None:
        return None
    chunks, size = got
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


__all__ = ["SAFE_NAME", "S3Storage", "Storage", "file_response", "open_storage"]
