from __future__ import annotations

import math
import secrets
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from model.checkpoint import read_direction
from service.errors import error_responses, invalid
from service.routes.common import check_label, find_record, model_or_404, submit
from service.schemas import ALPHA_LIMIT, JobAccepted, TraverseRequest
from worker.params import DirectionParams, ParamError, TraverseParams, latent_rows

router = APIRouter(tags=["jobs"])


def target_problem(target: float, direction: dict[str, Any], latent: list[float] | None) -> str | None:
    """Why a traverse ``target`` cannot be reached sanely, or None.  The job goes to
    ``alpha* = (target - predict(z0)) / |w|`` along the unit direction; that alpha must be finite
    and within the same +-ALPHA_LIMIT as explicit steps, or the latents (and the volumes made
    from them) overflow into NaN.  With a given latent (or an encode job's) ``predict(z0) = w.z0
    + intercept`` is computed here; a seed's latent is drawn in the job, so its ``w.z0`` (about
    N(0, |w|^2): under a few unit steps) is left out of the estimate."""
    w = [float(x) for x in direction["vector"]]
    norm = math.sqrt(math.fsum(x * x for x in w))
    if not (math.isfinite(norm) and norm > 0):
        return f"direction {direction.get('name')!r} is zero or not finite"
    start = float(direction.get("intercept") or 0.0)
    if latent is not None:
        start += math.fsum(a * b for a, b in zip(w, latent, strict=False))
    alpha = (float(target) - start) / norm
    if math.isfinite(alpha) and abs(alpha) <= ALPHA_LIMIT:
        return None
    return (
        f"target {target:g} lies {abs(alpha):.3g} unit steps along direction {direction.get('name')!r} from the "
        f"start (predicted {start:.4g}); at most {ALPHA_LIMIT:g} steps are taken: choose a nearer target"
    )


@router.post("/traverse", status_code=202, responses=error_responses(400, 404, 413, 422))
def traverse(request: Request, req: TraverseRequest) -> JobAccepted:
    """Volumes along a latent direction from a seed, a latent or an encode job's latent: either at
    the given ``steps`` (alphas along the unit direction) or until the direction's fitted
    attribute model predicts ``target``; per step the latent and the attribute value."""
    settings = request.app.state.settings
    entry = model_or_404(request, req.model)
    cfg = entry["config"]
    label = check_label(cfg, req.label)
    latent_dim = int(cfg.get("latent_dim") or 0)
    if sum(x is not None for x in (req.seed, req.latent, req.job_id)) > 1:
        raise invalid("give at most one of seed, latent, job_id")
    if (req.steps is None) == (req.target is None):
        raise invalid("give either steps (a list of alphas) or target (an attribute value)")
    if isinstance(req.direction, str):
        d = read_direction(settings.models_dir / req.model, req.direction)
        if d is None:
            stored = ", ".join(entry["directions"]) or "none"
            raise HTTPException(404, f"model {req.model!r} has no direction {req.direction!r}; stored: {stored}")
        direction = DirectionParams.model_validate(d)
    else:
        if len(req.direction) != latent_dim or not any(req.direction):
            raise invalid(f"a direction vector needs {latent_dim} values, not all zero", "direction")
        if req.target is not None:
            raise invalid("target needs a named (fitted) direction; a raw vector takes steps", "target")
        direction = DirectionParams(vector=_latent(req.direction, latent_dim, "direction"))
    latent, seed = None, req.seed
    if req.job_id is not None:
        src = find_record(request, req.job_id)
        if src is None or src["kind"] != "encode" or src["state"] != "succeeded":
            raise invalid(f"job_id {req.job_id!r} is not a succeeded encode job", "job_id")
        if src["model"] != req.model:
            raise invalid(f"job {req.job_id} encoded with model {src['model']!r}, not {req.model!r}", "job_id")
        latent = src["result"]["latent"]  # the model's own output: already a latent of this model
    elif req.latent is not None:
        latent = _latent(req.latent, latent_dim, "latent")
    elif req.seed is None:
        seed = secrets.randbelow(2**63)
    if req.target is not None and (problem := target_problem(req.target, direction.model_dump(), latent)):
        raise HTTPException(422, problem)  # checked here: a job would only fail with "latent contains NaN"
    params = TraverseParams(
        model=req.model,
        seed=seed,
        latent=latent,
        job_id=req.job_id,
        direction=direction,
        steps=req.steps,
        target=req.target,
        n_steps=req.n_steps,
        refine=req.refine,
        label=label,
        format=req.format,
    )
    return submit(request, params)


def _latent(value: list[float], latent_dim: int, what: str) -> list[float]:
    """One latent-space vector of the request, through the one latent check (422 at ``what``)."""
    try:
        return latent_rows(value, latent_dim, what=what)[0]
    except ParamError as e:
        raise invalid(str(e), what) from None
