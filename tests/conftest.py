"""Shared fixtures: an offline environment and a disposable workspace per test.

The `db_url` fixture runs a test on SQLite and, when `ALIGNFLOW_TEST_PG_URL` is set, on
PostgreSQL too (a fresh database per test, dropped afterwards). In CI (`CI=true`) a missing
PostgreSQL URL is an error rather than a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one thread each. Two threads per process oversubscribe the
    # cores, and OpenMP's spinning makes small matmuls 10-20x slower (measured here). Subprocesses
    # the tests start inherit the setting through the environment.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _pg_admin_url() -> str | None:
    url = os.environ.get("ALIGNFLOW_TEST_PG_URL")
    if not url and os.environ.get("CI") == "true":
        pytest.fail("CI=true but ALIGNFLOW_TEST_PG_URL is unset: the PostgreSQL tests must run in CI")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for one test: SQLite in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'alignflow.db'}"
        return
    admin = _pg_admin_url()
    if not admin:
        pytest.skip("ALIGNFLOW_TEST_PG_URL is not set")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from alignflow.store.db import _normalise_url

    admin = _normalise_url(admin)
    name = f"af_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def workspace(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch):
    """A Workspace in tmp_path on the parametrised database; also exported to the environment."""
    from alignflow.workspace import Workspace

    home = tmp_path / "ws"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    monkeypatch.setenv("ALIGNFLOW_DB_URL", db_url)
    return Workspace.from_env(home, db_url)


@pytest.fixture
def store(workspace):
    from alignflow.store import Store

    s = Store.open(workspace)
    yield s
    s.close()


@pytest.fixture
def sqlite_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A SQLite-only workspace, for tests that are not about the database."""
    from alignflow.workspace import Workspace

    home = tmp_path / "ws"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    monkeypatch.delenv("ALIGNFLOW_DB_URL", raising=False)
    return Workspace.from_env(home)


# The longest files first, in the order of a CI run's --durations (2026-12-02: 1468 passed in 660 s).
# `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: xdist hands whole files to the two workers in
# collection order, so a long file collected late became the suite's tail (the quickstart's minutes ran alone at
# the end); started first, it runs beside everything else.
LONGEST_FIRST = (
    "tests/quickstart/test_quickstart.py",  # the small quickstart, locally and through Ray: ~3.5 min
    "tests/train/test_distributed.py",
    "tests/pipeline/test_ray_engine.py",
    "tests/pipeline/test_iterative.py",
    "tests/recipes/test_ppo_distributed.py",
    "tests/train/test_distributed_rm_dpo.py",
    "tests/feedback/test_role_matrix.py",
    "tests/feedback/test_crash.py",
    "tests/recipes/test_ppo.py",
    "tests/feedback/test_limiter.py",
    "tests/recipes/test_resume.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))  # stable
