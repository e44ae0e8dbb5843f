from __future__ import annotations

from fastapi import APIRouter, Request

from service.errors import error_responses
from service.routes.common import describe, model_or_404, models
from service.schemas import ModelInfo

router = APIRouter(tags=["models"])


@router.get("/models")
def get_models(request: Request) -> list[ModelInfo]:
    """The served models with their configuration and named latent directions."""
    return [ModelInfo(**describe(n, e)) for n, e in models(request).items()]


@router.get("/models/{name}", responses=error_responses(404, 422))
def get_model(request: Request, name: str) -> ModelInfo:
    return ModelInfo(**describe(name, model_or_404(request, name)))
