"""Request dependencies of the serving gateway, shared by `app.py` and the feedback router (`feedback.py`).

Sessions: the gateway opens the workspace database through the store's engine (`make_app` builds one
`sessionmaker` on `store.engine` and keeps it in `app.state.sessions`), so the gateway, the store's artifacts
and the annotation platform all live in one database and one Alembic history. `get_session` yields one session
per request; FastAPI caches it, so `require_key` and the route share it.

`require_key` authenticates `Authorization: Bearer <key>` against the hashed keys of `serving_api_keys`
(`keys.verify_key`) and then charges the key's rate limit (`app.state.limiter`, in memory per process).
Failures raise `ApiError`, which the app renders as an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}`, so the official client raises its usual exceptions.

This module imports no routes, so `app.py` can import the feedback router without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from alignflow.serving import keys
from alignflow.serving.models import ServingApiKey

# HTTP status -> the OpenAI error `type` the official client and its users expect.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error the gateway returns as an OpenAI-style body; `headers` are added to the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]


def require_key(request: Request, s: SessionDep) -> ServingApiKey:
    """The caller's API key row (401 when missing, unknown or revoked; 429 over its rate limit)."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    row = keys.verify_key(s, header[7:].strip())
    if row is not None:
        s.expunge(row)  # keeps its loaded columns
    # End the read: a completion holds its request's session while it decodes, and without this each one
    # would hold a pooled connection too (a burst of requests would exhaust the pool).
    s.rollback()
    if row is None:
        raise ApiError(401, "invalid or revoked API key", code="invalid_api_key")
    limiter: keys.RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        wait = limiter.acquire(row.id, row.rate_per_minute)
        if wait > 0:
            raise ApiError(
                429,
                f"rate limit of {limiter.rate_for(row.rate_per_minute)} requests per minute exceeded for key "
                f"'{row.name}'; retry after {wait:.1f} s",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, int(wait + 0.999)))},
            )
    request.state.key_id = row.id
    return row


KeyDep = Annotated[ServingApiKey, Depends(require_key)]
