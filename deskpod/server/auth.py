"""API keys: with a key set, every route but /health needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac

from fastapi import Request

from deskpod.server.errors import APIError


async def require_api_key(request: Request) -> None:
    """A FastAPI dependency; the key is `app.state.api_key` (None: no key needed)."""
    key: str | None = request.app.state.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
