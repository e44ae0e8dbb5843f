"""Result storage as the API sees it.  The implementation is shared with the workers (they write,
the API reads), so it lives in worker/store.py; dependencies point service -> worker -> model."""

from worker.store import SAFE_NAME, Storage

__all__ = ["SAFE_NAME", "Storage"]
