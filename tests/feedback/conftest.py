"""Fixtures: every test gets a disposable, migrated database, on SQLite and on PostgreSQL.

PostgreSQL reads `ALIGNFLOW_TEST_PG_URL` (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); without it the
PostgreSQL variants skip, unless CI=true, where they fail. A migrated template database is built once per session
and each test copies it (`CREATE DATABASE ... TEMPLATE`, a file copy on SQLite), so a test costs milliseconds.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fb_helpers import PG_URL, copy_database, drop_pg, pg_admin, pg_url_for
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from alignflow.feedback import auth, services
from alignflow.store import db
from alignflow.workspace import Workspace

# Cheap argon2 parameters: the tests check the login logic, not the hash's cost.
auth.set_password_cost(time_cost=1, memory_cost_kib=1024)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tmpl") / "template.db"
    eng = db.make_engine(f"sqlite:///{path}")
    db.ensure_schema(eng)
    eng.dispose()
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    if not PG_URL:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "ALIGNFLOW_TEST_PG_URL is not set but CI=true: the PostgreSQL variants must run in CI"
            )
        pytest.skip("ALIGNFLOW_TEST_PG_URL not set")
    name = f"af_tmpl_{uuid.uuid4().hex[:10]}"
    admin = pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    eng = db.make_engine(pg_url_for(name))
    db.ensure_schema(eng)
    eng.dispose()
    yield name
    drop_pg(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        target = tmp_path / "alignflow.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        yield f"sqlite:///{target}"
        return
    url = copy_database(pg_url_for(request.getfixturevalue("pg_template")), tmp_path)
    yield url
    drop_pg(make_url(url).database)


@pytest.fixture
def workspace(db_url: str, tmp_path: Path) -> Workspace:
    ws = Workspace(home=tmp_path / "ws", db_url=db_url)
    ws.ensure_dirs()
    return ws


@pytest.fixture
def sessions(workspace: Workspace):
    factory = services.connect(workspace)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def s(sessions) -> Iterator[Session]:
    with sessions() as session:
        yield session


@pytest.fixture
def cli(workspace: Workspace, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """`alignflow ...` in-process against the test's workspace; `ok=False` returns a failed result to inspect."""
    from fb_helpers import PASSWORD
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    monkeypatch.setenv("ALIGNFLOW_HOME", str(workspace.home))
    monkeypatch.setenv("ALIGNFLOW_DB_URL", workspace.db_url)
    monkeypatch.setenv("ALIGNFLOW_PASSWORD", PASSWORD)
    runner = CliRunner()

    def run(*args, ok: bool = True):  # noqa: ANN202
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=not ok)
        if ok:
            assert r.exit_code == 0, r.output
        return r

    return run
