"""Opening the workspace database: the session factory every route, command and simulation uses."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from alignflow.store import db
from alignflow.workspace import Workspace


def connect(workspace: Workspace | None = None) -> sessionmaker[Session]:
    """Open the workspace database (creating or checking its schema) and return a session factory."""
    ws = workspace or Workspace.from_env()
    if ws.is_sqlite:
        ws.ensure_dirs()
    eng = db.make_engine(ws.db_url)
    db.ensure_schema(eng)
    return db.session_factory(eng)
