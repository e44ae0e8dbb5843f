"""GET /health/ready under concurrent probes, against a real uvicorn server: no false 503s (a
Kubernetes readiness probe must not flap while Redis and the storage are up)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import uvicorn_server


def _serve(settings: Settings) -> Iterator[str]:
    with uvicorn_server(create_app(settings), "ready-uvicorn") as base:
        yield base


@pytest.mark.parametrize("mode", ["embedded", "celery"])
def test_concurrent_ready_probes_never_answer_503(mode: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url") if mode == "celery" else None
    settings = Settings(models_dir=tmp_path / "models", storage_dir=tmp_path / "storage", redis_url=redis_url)
    for base in _serve(settings):
        with httpx.Client(base_url=base, timeout=30.0, limits=httpx.Limits(max_connections=20)) as client:

            def probe(_: int) -> int:
                return client.get("/health/ready").status_code

            with ThreadPoolExecutor(20) as pool:
                codes = Counter(pool.map(probe, range(200)))
        assert codes == {200: 200}, codes
        # every probe removed its own file: nothing is left in the storage root
        assert not list((tmp_path / "storage").glob(".ready.*"))
