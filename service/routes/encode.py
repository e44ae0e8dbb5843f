from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import error_responses
from service.routes.common import check_label, model_or_404, submit
from service.schemas import JobAccepted
from worker.store import new_job_id

router = APIRouter(tags=["jobs"])

_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,199}$")


@router.post("/encode", status_code=202, responses=error_responses(400, 404, 413, 422))
async def encode(
    request: Request,
    model: Annotated[str, Form(min_length=1, description="a served model's name")],
    file: Annotated[
        UploadFile,
        File(description="a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha), or a .zip of one DICOM series"),
    ],
    reconstruct: Annotated[bool, Form(description="also generate the reconstruction from the latent")] = False,
    label: Annotated[str | None, Form(description="class name or index, for class-conditional models")] = None,
) -> JobAccepted:
    """Queue the encoding of an uploaded scan to its latent code.  The upload is checked here
    (size, format, shape, finiteness) before it is queued."""
    settings, storage = request.app.state.settings, request.app.state.storage
    cfg = model_or_404(request, model)["config"]
    label = check_label(cfg, label)  # type: ignore[assignment]
    name = file.filename or ""
    if not _SAFE_FILENAME.fullmatch(name) or ".." in name:
        raise HTTPException(422, f"file name {name!r} must be a plain name (letters, digits, . _ - ( ) +), not a path")
    job_id = new_job_id()
    dst = storage.upload_path(job_id, name)
    limit = settings.max_upload_mb * 2**20
    size = 0
    try:
        with open(dst, "wb") as f:
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"upload over the limit of {settings.max_upload_mb} MB")
                f.write(chunk)
        from model.data.volumes import VolumeError, read_volume  # numpy only: no torch in the API

        try:
            # the whole check (header sizes, gzip/zip bombs, shape, NaN) off the event loop
            await run_in_threadpool(read_volume, dst, max_bytes=8 * limit)
        except VolumeError as e:
            raise HTTPException(422, str(e).replace(dst.name, name)) from None
        except (ValueError, OSError, RuntimeError, MemoryError) as e:  # a reader's own error: still the input
            raise HTTPException(422, f"{name}: not a readable 3D volume ({type(e).__name__})") from None
    except BaseException:
        storage.delete_job(job_id)
        raise
    params = {"model": model, "upload": str(dst), "reconstruct": reconstruct, "label": label, "filename": name}
    return submit(request, "encode", params, job_id)
