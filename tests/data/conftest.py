"""Fixtures for the curation tests: a SQLite store, small HH extracts, and a CLI runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture
def cstore(sqlite_workspace):
    from alignflow.store import Store

    s = Store.open(sqlite_workspace)
    yield s
    s.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def hh_base() -> list[dict]:
    import bench_dedup

    return bench_dedup.hh_pairs(limit=300)
