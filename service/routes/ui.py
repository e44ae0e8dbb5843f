"""The web page: ``GET /`` serves service/static/index.html, and /static/ the files next to it
(the page's script and style sheet, and the vendored NiiVue bundle).  Plain files, no build step;
the page talks to the same JSON API as any other client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["ui"])
router.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def index() -> FileResponse:
    """The single-page UI: generate, watch progress, view in NiiVue, traverse, encode."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
