from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from service.errors import error_responses, invalid
from service.routes.common import check_label, model_or_404, submit
from service.schemas import GenerateRequest, JobAccepted
from worker.params import GenerateParams, ParamError, latent_rows

router = APIRouter(tags=["jobs"])


@router.post("/generate", status_code=202, responses=error_responses(400, 404, 413, 422))
def generate(request: Request, req: GenerateRequest) -> JobAccepted:
    """Queue the generation of ``n`` volumes from a seed (or from given latent codes)."""
    max_n = request.app.state.settings.max_n
    cfg = model_or_404(request, req.model)["config"]
    label = check_label(cfg, req.label)
    if req.latent is not None:
        try:
            rows = latent_rows(req.latent, int(cfg.get("latent_dim") or 0), max_rows=max_n)
        except ParamError as e:
            raise invalid(str(e), "latent") from None
        params = GenerateParams(
            model=req.model, n=len(rows), seed=req.seed, latent=rows, label=label, format=req.format
        )
    else:
        if req.n > max_n:
            raise invalid(f"n must be at most {max_n} (VOXGEN_MAX_N)", "n")
        seed = secrets.randbelow(2**63) if req.seed is None else req.seed
        params = GenerateParams(model=req.model, n=req.n, seed=seed, label=label, format=req.format)
    return submit(request, params)
