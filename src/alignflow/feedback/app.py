"""The FastAPI application: settings, security middleware, error mapping; it only assembles the app.

Routes live in `api.py` (JSON under /api/v1) and `pages.py` (server-rendered HTML); both are thin shells over
`services` and take their dependencies from `deps.py`. Security defaults: session cookies are HttpOnly and
SameSite=Lax (and Secure, with HSTS, when `secure_cookies` is set); every state-changing request made with a
session cookie must carry the session's CSRF token; a Content-Security-Policy without 'unsafe-inline' means
even an escaping mistake could not run injected script; request bodies are capped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from alignflow.feedback import api, pages, runs_pages, services
from alignflow.feedback.deps import HTTPProblem
from alignflow.workspace import Workspace

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass
class Settings:
    """Server settings; `max_body_bytes` bounds every request body (413 beyond it)."""

    max_body_bytes: int = 256_000
    secure_cookies: bool = False  # set True behind HTTPS


class BodyLimit:
    """ASGI middleware: refuse bodies larger than the limit, by header or while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        body = f'{{"detail": "request body larger than {self.limit} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(workspace: Workspace | None = None, settings: Settings | None = None) -> FastAPI:
    """Build the app on the workspace database (SQLite by default, PostgreSQL via `ALIGNFLOW_DB_URL`)."""
    settings = settings or Settings()
    ws = workspace or Workspace.from_env()
    app = FastAPI(
        title="alignflow annotation platform",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI would load its JS from a CDN; the spec itself is at openapi_url
        redoc_url=None,
    )
    app.state.workspace = ws
    app.state.sessions = services.connect(ws)
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.templates.env.filters["own_qc_state"] = services.own_qc_state

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Any:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if settings.secure_cookies:  # served over HTTPS: browsers should never fall back to plain HTTP
            response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(services.ServiceError)
    async def service_error(request: Request, exc: services.ServiceError) -> Any:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status)
        return pages.error_page(request, exc.status, str(exc))

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, exc: HTTPProblem) -> Any:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        if exc.status == 401:
            return RedirectResponse("/login", status_code=303)
        return pages.error_page(request, exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        return JSONResponse({"detail": f"field '{loc}': {msg}", "field": loc}, status_code=422)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api.router, prefix="/api/v1")
    app.include_router(pages.router)
    app.include_router(runs_pages.router)
    return app


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` workers: settings from ALIGNFLOW_* environment variables."""
    import os

    return create_app(
        Workspace.from_env(),
        Settings(
            max_body_bytes=int(os.environ.get("ALIGNFLOW_MAX_BODY_BYTES", "256000")),
            secure_cookies=os.environ.get("ALIGNFLOW_SECURE_COOKIES") == "1",
        ),
    )
