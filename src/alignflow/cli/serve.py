"""`alignflow serve`: the annotation web platform (FastAPI + Uvicorn) on the workspace database."""

from __future__ import annotations

import os

import typer

from alignflow.errors import AlignflowError


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    workers: int = typer.Option(
        1, "--workers", help="Uvicorn worker processes (more than 1 needs PostgreSQL)."
    ),
    max_body_bytes: int = typer.Option(
        256_000, "--max-body-bytes", help="Refuse request bodies larger than this (413)."
    ),
    secure_cookies: bool = typer.Option(
        False, "--secure-cookies", help="Mark cookies Secure (serve behind HTTPS)."
    ),
    home: str | None = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME)."),
    db_url: str | None = typer.Option(
        None, "--db-url", help="Database URL (default $ALIGNFLOW_DB_URL or the workspace SQLite)."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="Uvicorn log level."),
) -> None:
    """Serve the annotation pages and the JSON API (/api/v1, OpenAPI at /api/v1/openapi.json)."""
    import uvicorn

    from alignflow.feedback.app import app_from_env
    from alignflow.workspace import Workspace

    ws = Workspace.from_env(home, db_url)
    if workers > 1 and ws.is_sqlite:
        raise AlignflowError(
            "--workers > 1 needs PostgreSQL (set --db-url or ALIGNFLOW_DB_URL); SQLite has one writer"
        )
    # Workers are separate processes: hand them the settings through the environment.
    os.environ["ALIGNFLOW_HOME"] = str(ws.home)
    os.environ["ALIGNFLOW_DB_URL"] = ws.db_url
    os.environ["ALIGNFLOW_MAX_BODY_BYTES"] = str(max_body_bytes)
    os.environ["ALIGNFLOW_SECURE_COOKIES"] = "1" if secure_cookies else "0"
    if workers > 1:
        uvicorn.run(
            "alignflow.feedback.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
    else:
        uvicorn.run(app_from_env(), host=host, port=port, log_level=log_level)
