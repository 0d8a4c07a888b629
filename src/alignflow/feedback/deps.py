"""Request dependencies shared by `api.py` and `pages.py`: database session, principal, role/scope checks,
CSRF and cookie constants, and the HTTP problem type.

In the FastAPI template's style, each dependency is an `Annotated` alias (`DB`, `Who`) a route names as a
parameter type. This module imports no routes, so `app.py` can import the routers without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from alignflow.feedback import auth

SESSION_COOKIE = "af_session"
LOGIN_CSRF_COOKIE = "af_login_csrf"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
MANAGERS = ("admin", "lead")


class HTTPProblem(Exception):
    """Raised by dependencies; mapped to JSON for the API and to a page or redirect for HTML routes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def get_db(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as s:
        yield s


DB = Annotated[Session, Depends(get_db)]


def authenticate(request: Request, s: Session) -> auth.Principal:
    """Authenticate by `Authorization: Bearer <token>` or by the session cookie (401 otherwise)."""
    header = request.headers.get("authorization", "")
    p: auth.Principal | None = None
    if header.lower().startswith("bearer "):
        p = auth.token_principal(s, header[7:].strip())
        if p is None:
            raise HTTPProblem(401, "invalid, revoked or disabled API token")
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            p = auth.session_principal(s, cookie)
        if p is None:
            raise HTTPProblem(401, "not logged in")
    # No rollback here: the loaded user stays in the session for the route (one query fewer). SQLite reads
    # open no transaction in pysqlite, so `engine.begin_write` can still take the write lock; on PostgreSQL
    # the request simply continues in the same READ COMMITTED transaction.
    return p


def principal(request: Request, s: DB) -> auth.Principal:
    """API authentication; a cookie-authenticated write must echo the CSRF token in `X-CSRF-Token`."""
    p = authenticate(request, s)
    if request.method in UNSAFE_METHODS and not auth.csrf_ok(p, request.headers.get(CSRF_HEADER)):
        raise HTTPProblem(403, "missing or wrong CSRF token (send the X-CSRF-Token header)")
    return p


Who = Annotated[auth.Principal, Depends(principal)]


def require(p: auth.Principal, *, roles: tuple[str, ...] | None = None, scope: str | None = None) -> None:
    """403 unless the credential has `scope` and the user one of `roles`."""
    if scope is not None and scope not in p.scopes:
        raise HTTPProblem(403, f"this token lacks the '{scope}' scope")
    if roles is not None and p.user.role not in roles:
        raise HTTPProblem(403, f"role '{p.user.role}' may not do this (needs one of {', '.join(roles)})")


def page_user(request: Request, s: Session, roles: tuple[str, ...] | None = None) -> auth.Principal:
    """Pages need a browser session (not a token) and, when given, one of `roles`."""
    p = authenticate(request, s)
    if p.via != "session":
        raise HTTPProblem(403, "pages need a browser session; use the API with tokens")
    if roles is not None and p.user.role not in roles:
        raise HTTPProblem(403, f"role '{p.user.role}' may not open this page")
    return p


def secure_cookies(request: Request) -> bool:
    return bool(request.app.state.settings.secure_cookies)


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    """The session cookie: HttpOnly, SameSite=Lax, Secure when the server is configured for HTTPS."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="lax",
        secure=secure_cookies(request),
        max_age=auth.SESSION_HOURS * 3600,
    )
