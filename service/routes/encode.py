from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from model import families
from model.latent import MAX_FIT_STEPS, fit_steps_problem
from service.errors import error_responses, invalid
from service.routes.common import check_label, model_or_404, submit
from service.schemas import JobAccepted
from worker.params import EncodeParams
from worker.store import new_job_id

router = APIRouter(tags=["jobs"])


def filename_problem(name: str) -> str | None:
    """Why an upload's file name cannot be taken, or None.  Any base name is taken (``Patient_Müller
    .nii.gz``, spaces, a leading dot): the upload is stored under a name of the server's own, and
    the sender's name only appears in messages.  Refused: no name, a name with a path in it (``/``,
    ``\\``, ``.``, ``..``), control characters, more than 255 bytes."""
    if not name:
        return "the file part has no file name; send the file's name (e.g. scan.nii.gz)"
    if "/" in name or "\\" in name or name in (".", ".."):
        return f"file name {name!r} has a path in it; send the file's base name only"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return f"file name {name!r} has control characters; send a plain file name"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "the file name is longer than 255 bytes; send a shorter one"
    return None


def check_upload(path: Path, cfg: dict[str, Any], max_voxels: int, series_uid: str | None = None) -> None:
    """The checks an upload passes before its job is queued, in the API process and without torch:
    read it as the worker will (header limits first, one file only, NaN; a DICOM zip of several
    series needs ``series_uid``, and the series must be there), then refuse a volume the model
    would see as blank (every voxel equal; MRI: 99.9th percentile 0; CT: nothing above the window).
    Memory: one float32 copy of at most ``max_voxels`` voxels, freed on return."""
    from model.data.volumes import check_not_blank, read_volume  # numpy only: no torch in the API

    arr, _ = read_volume(path, max_voxels=max_voxels, untrusted=True, series_uid=series_uid)
    window = cfg.get("intensity") or {}
    lo_hi = (float(window["lo"]), float(window["hi"])) if "lo" in window and "hi" in window else None
    check_not_blank(arr, str(cfg.get("modality") or "ct"), lo_hi, name=path.name)


def check_steps(cfg: dict[str, Any], steps: int | None) -> None:
    """422 at ``steps`` where the model's family cannot take it (``fit_steps_problem``: a projection
    needs at least one step).  (A class-conditional model's fit generates the request's class:
    ``check_label`` requires one.)"""
    family = str(cfg.get("family") or "hagan")
    if steps is not None and (
        problem := fit_steps_problem(steps, family, families.get(family).encoder == "projection")
    ):
        raise invalid(problem, "steps")


@router.post("/encode", status_code=202, responses=error_responses(400, 404, 413, 422))
async def encode(
    request: Request,
    model: Annotated[str, Form(min_length=1, description="a served model's name")],
    file: Annotated[
        UploadFile,
        File(
            description="a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha), or a .zip of DICOM files "
            "(any names: UIDs, .IMA, .dcm; one series, or several and series_uid)"
        ),
    ],
    reconstruct: Annotated[bool, Form(description="also generate the reconstruction from the latent")] = False,
    label: Annotated[str | None, Form(description="class name or index, for class-conditional models")] = None,
    space: Annotated[
        Literal["input", "model"],
        Form(
            description="the reconstruction's grid: input (default) = the upload's own voxels and affine (it "
            "overlays the upload in world space); model = the model's grid"
        ),
    ] = "input",
    series_uid: Annotated[
        str | None,
        Form(
            max_length=128,
            description="the SeriesInstanceUID of the series to encode, for a DICOM zip holding several (a 422 "
            "lists them when it is missing or unknown); empty: none",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        Form(
            ge=0,
            le=MAX_FIT_STEPS,
            description="hagan, alphawgan: Adam steps fitting the encoder's latent to the upload (the generator "
            "frozen; a lower reconstruction error, one generation forward and backward per step); 0: the encoder "
            "alone; default: the model's encode_steps (0 unless its config.json sets it). splitshuffle, stylegan3d: "
            "projection steps (at least 1; default: the model's projection_steps)",
        ),
    ] = None,
) -> JobAccepted:
    """Queue the encoding of an uploaded scan to its latent code.  The upload is checked here
    (size, format, voxel count from its header, a single file, shape, finiteness, not blank)
    before it is queued: 413 over VOXGEN_MAX_UPLOAD_MB or VOXGEN_MAX_INPUT_VOXELS, 422 otherwise."""
    settings, storage = request.app.state.settings, request.app.state.storage
    cfg = model_or_404(request, model)["config"]
    label = check_label(cfg, label)
    check_steps(cfg, steps)
    name = file.filename or ""
    if (problem := filename_problem(name)) is not None:
        raise HTTPException(422, problem)
    series_uid = (series_uid or "").strip() or None  # an empty form field is no choice
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
        from model.data.volumes import VolumeError, VolumeTooLarge

        try:
            # the whole check (header sizes, gzip/zip bombs, shape, NaN, blank) off the event loop
            await run_in_threadpool(check_upload, dst, cfg, settings.max_input_voxels, series_uid)
        except VolumeTooLarge as e:  # messages name no server path: the reader replaced them
            limits = f"uploads may have {settings.max_input_voxels} voxels (VOXGEN_MAX_INPUT_VOXELS)"
            raise HTTPException(413, f"{str(e).replace(dst.name, name)}; {limits}") from None
        except VolumeError as e:
            raise HTTPException(422, str(e).replace(dst.name, name)) from None
        except (ValueError, OSError, RuntimeError, MemoryError) as e:  # a reader's own error: still the input
            raise HTTPException(422, f"{name}: not a readable 3D volume ({type(e).__name__})") from None
    except BaseException:
        storage.delete_job(job_id)
        raise
    params = EncodeParams(
        model=model,
        upload=str(dst),
        filename=name,
        reconstruct=reconstruct,
        label=label,
        space=space,
        series_uid=series_uid,  # the worker reads the same series
        steps=steps,
        max_voxels=settings.max_input_voxels,  # and with the same bound
    )
    return submit(request, params, job_id)
