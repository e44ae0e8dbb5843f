"""Admin authentication: a bearer token from VOXGEN_ADMIN_TOKEN."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="VOXGEN_ADMIN_TOKEN")


def require_admin(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 without a bearer token, 403 with a wrong one (or when the service has no admin token)."""
    if cred is None or cred.scheme.lower() != "bearer" or not cred.credentials:
        raise HTTPException(
            401,
            "admin token required (Authorization: Bearer <VOXGEN_ADMIN_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = request.app.state.settings.admin_token
    if not expected:
        raise HTTPException(403, "this service has no admin token configured (set VOXGEN_ADMIN_TOKEN)")
    if not secrets.compare_digest(cred.credentials.encode(), expected.encode()):
        raise HTTPException(403, "wrong admin token")
