from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from service.errors import error_responses
from service.routes.common import describe, model_or_404, models
from service.schemas import ModelInfo

router = APIRouter(tags=["models"])

CARD_NAME = "README.md"  # a model directory's model card
CARD_MAX_BYTES = 1 << 20
CARD_MEDIA = "text/markdown; charset=utf-8"


@router.get("/models")
def get_models(request: Request) -> list[ModelInfo]:
    """The served models with their configuration and named latent directions."""
    return [ModelInfo(**describe(n, e)) for n, e in models(request).items()]


@router.get("/models/{name}", responses=error_responses(404, 422))
def get_model(request: Request, name: str) -> ModelInfo:
    return ModelInfo(**describe(name, model_or_404(request, name)))


_CARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the model card, markdown", "content": {"text/markdown": {"schema": {"type": "string"}}}},
    **error_responses(404, 422),
}


@router.get("/models/{name}/card", response_class=Response, responses=_CARD_RESPONSES)
def get_model_card(request: Request, name: str) -> Response:
    """The model's card: its directory's README.md (what it was trained on, how, its measured
    figures and limits), as markdown.  404 for an unknown model or one without a card."""
    model_or_404(request, name)
    card = request.app.state.settings.models_dir / name / CARD_NAME
    try:
        with open(card, "rb") as f:
            raw = f.read(CARD_MAX_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HTTPException(404, f"model {name!r} has no model card") from None
    except OSError:
        raise HTTPException(404, f"the model card of {name!r} cannot be read") from None
    if len(raw) > CARD_MAX_BYTES:
        raise HTTPException(404, f"the model card of {name!r} is over {CARD_MAX_BYTES >> 20} MiB; not served")
    return Response(raw.decode("utf-8", errors="replace"), media_type=CARD_MEDIA)
