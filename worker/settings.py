"""Service settings from the environment (prefix VOXGEN_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXGEN_", protected_namespaces=())

    models_dir: Path = REPO_MODELS
    storage_dir: Path = Path("var/storage")
    redis_url: str | None = None
    admin_token: str | None = None
    max_upload_mb: int = 512
    result_ttl_hours: float = 24.0
    job_lease_seconds: float = 30.0
    device: str = "auto"
    max_n: int = 16


@lru_cache
def get_settings() -> Settings:
    return Settings()
