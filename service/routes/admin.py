from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from service.auth import require_admin
from service.errors import error_responses
from service.routes.common import models, submit
from service.schemas import JobAccepted, TrainRequest
from worker.params import TrainParams

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/admin/train", status_code=202, responses=error_responses(400, 401, 403, 409, 413, 422))
def admin_train(request: Request, req: TrainRequest) -> JobAccepted:
    """Queue a training run on the ``train`` queue; when it succeeds the model is served under
    ``name``.  Bearer token: VOXGEN_ADMIN_TOKEN."""
    if req.name in models(request):
        raise HTTPException(409, f"a model named {req.name!r} is already served; choose another name")
    return submit(request, TrainParams.model_validate(req.model_dump()))
