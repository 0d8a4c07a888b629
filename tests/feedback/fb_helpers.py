"""Helpers shared by the feedback tests (users, items, valid answers, database copies)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from alignflow.feedback import auth
from alignflow.store import db

PG_URL = os.environ.get("ALIGNFLOW_TEST_PG_URL")


def pg_admin() -> Engine:
    return create_engine(db._normalise_url(PG_URL), isolation_level="AUTOCOMMIT")


def pg_url_for(dbname: str) -> str:
    return make_url(db._normalise_url(PG_URL)).set(database=dbname).render_as_string(hide_password=False)


def drop_pg(name: str) -> None:
    admin = pg_admin()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def copy_database(url: str, sqlite_dir: Path) -> str:
    """A copy of the database at `url`: a file copy into `sqlite_dir` on SQLite, `CREATE DATABASE ... TEMPLATE`
    on PostgreSQL (nothing may be connected to the source then). Drop a PostgreSQL copy with `drop_pg`."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        target = sqlite_dir / f"copy-{uuid.uuid4().hex[:8]}.db"
        shutil.copy(parsed.database, target)
        return f"sqlite:///{target}"
    name = f"af_t_{uuid.uuid4().hex[:12]}"
    admin = pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{parsed.database}"'))
    admin.dispose()
    return pg_url_for(name)


PASSWORD = "correct-horse-battery"


def make_users(s: Session, spec: dict[str, str | tuple[str, str | None]]) -> dict[str, int]:
    """Create users {name: role} or {name: (role, pod)}; returns their ids."""
    ids = {}
    for name, role in spec.items():
        role, pod = role if isinstance(role, tuple) else (role, "pod1")
        ids[name] = auth.create_user(s, name, PASSWORD, role, pod=pod).id
    s.commit()
    return ids


def pair_items(n: int, prefix: str = "i", gold: int = 0) -> list[dict]:
    rows = [
        {
            "id": f"{prefix}{k}",
            "prompt": f"prompt {k}",
            "candidates": [
                {
                    "id": "a",
                    "text": f"answer A{k}",
                    "model": "m1",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
                {
                    "id": "b",
                    "text": f"answer B{k}",
                    "model": "m2",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
            ],
        }
        for k in range(n)
    ]
    for k in range(gold):
        rows.append({**rows[0], "id": f"{prefix}gold{k}", "prompt": f"prompt {1000 + k}", "gold_label": "A"})
    return rows


def answer(task: dict, choice: str = "left", **extra) -> dict:
    """A valid pairwise answer for `task` in display terms."""
    body = {
        "schema_version": task["schema_version"],
        "choice": choice,
        "strength": None if choice == "tie" else 2,
        "dimensions": {d: choice for d in task["schema"]["dimensions"]},
        "rationale": "the left one is more accurate and more concise",
        "duration_s": 3.5,
    }
    body.update(extra)
    return body
