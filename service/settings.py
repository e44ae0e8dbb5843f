"""Service settings: the same VOXGEN_* settings the workers read (defined in worker/settings.py, so
dependencies point one way: service -> worker -> model)."""

from worker.settings import REPO_MODELS, Settings, get_settings

__all__ = ["REPO_MODELS", "Settings", "get_settings"]
