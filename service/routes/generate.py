from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from service.errors import error_responses, invalid
from service.routes.common import check_label, model_or_404, submit
from service.schemas import GenerateRequest, JobAccepted

router = APIRouter(tags=["jobs"])


@router.post("/generate", status_code=202, responses=error_responses(400, 404, 413, 422))
def generate(request: Request, req: GenerateRequest) -> JobAccepted:
    """Queue the generation of ``n`` volumes from a seed (or from given latent codes)."""
    max_n = request.app.state.settings.max_n
    cfg = model_or_404(request, req.model)["config"]
    params = req.model_dump()
    params["label"] = check_label(cfg, req.label)
    latent_dim = int(cfg.get("latent_dim") or 0)
    if req.latent is not None:
        rows = req.latent if req.latent and isinstance(req.latent[0], list) else [req.latent]
        if len(rows) > max_n:
            raise invalid(f"at most {max_n} latents per request (VOXGEN_MAX_N)", "latent")
        if any(len(r) != latent_dim for r in rows):  # type: ignore[arg-type]
            raise invalid(f"latent must have {latent_dim} values per volume", "latent")
        params["latent"], params["n"] = rows, len(rows)
    else:
        if req.n > max_n:
            raise invalid(f"n must be at most {max_n} (VOXGEN_MAX_N)", "n")
        if req.seed is None:
            params["seed"] = secrets.randbelow(2**63)
    return submit(request, "generate", params)
