"""Orphaned staging files (artifacts/tmp/) are removed when a store opens and by `alignflow workspace gc`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignflow.cli.common import human_bytes
from alignflow.cli.main import app
from alignflow.store import Store
from alignflow.workspace import Workspace

runner = CliRunner()

# The real `alignflow data import`, held still once the Parquet bytes are staged so that the
# SIGKILL lands at a known point: after step 1 of the write protocol, before the rename.
KILLED_IMPORT = """
import sys, time
import pyarrow.parquet as pq

real = pq.write_table

def write_then_hang(table, where, **kw):
    real(table, where, **kw)
    where.flush()
    print("staged", flush=True)
    time.sleep(600)

pq.write_table = write_then_hang
from alignflow.cli.main import main

sys.argv = ["alignflow", "data", "import", sys.argv[1], "--kind", "pairs", "--home", sys.argv[2]]
main()
"""


def _killed_import(tmp_path: Path, ws: Workspace) -> Path:
    """Run an import, SIGKILL it mid-write, and return the staging file it left behind."""
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(50))
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNFLOW_DB_URL", "ALIGNFLOW_HOME")}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_IMPORT, str(src), str(ws.home)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
        left = list(ws.tmp_dir.iterdir())
        assert len(left) == 1 and left[0].name.startswith(f"{proc.pid}-") and left[0].stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return left[0]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_killed_imports_leftover_is_removed_when_the_store_opens(tmp_path: Path, sqlite_workspace) -> None:
    left = _killed_import(tmp_path, sqlite_workspace)
    store = Store.open(sqlite_workspace)
    try:
        assert not left.exists()
        assert list(sqlite_workspace.tmp_dir.iterdir()) == []
        assert store.find() == []  # the killed import never registered anything
    finally:
        store.close()


def test_a_killed_imports_leftover_is_removed_by_workspace_gc(tmp_path: Path, sqlite_workspace) -> None:
    left = _killed_import(tmp_path, sqlite_workspace)
    size = left.stat().st_size
    r = runner.invoke(app, ["workspace", "gc", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"would remove {left}" in r.output and "has exited" in r.output and left.exists()
    assert "would remove 1 orphaned staging file(s)" in r.output

    r = runner.invoke(app, ["workspace", "gc"])
    assert r.exit_code == 0, r.output
    assert f"removed {left} ({human_bytes(size)}): its writer (process" in r.output
    assert "removed 1 orphaned staging file(s)" in r.output
    assert not left.exists()
    r = runner.invoke(app, ["workspace", "gc"])
    assert "removed 0 orphaned staging file(s)" in r.output


def test_gc_keeps_live_and_recent_files_and_honours_older_than(sqlite_workspace) -> None:
    ws = sqlite_workspace
    ws.ensure_dirs()
    live = ws.new_tmp_path()  # written by this (running) process
    live.write_bytes(b"x" * 10)
    legacy = ws.tmp_dir / f"{uuid.uuid4().hex}.part"  # no writer in the name (older alignflow)
    legacy.write_bytes(b"y")
    foreign = ws.tmp_dir / f"{os.getpid()}-00000000-{uuid.uuid4().hex}.part"  # another host's writer
    foreign.write_bytes(b"z")
    dead_dir = ws.tmp_dir / f"{_dead_pid()}-{live.name.split('-')[1]}-{uuid.uuid4().hex}.dir"
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "model.bin").write_bytes(b"w" * 100)

    r = runner.invoke(app, ["workspace", "gc"])
    assert r.exit_code == 0, r.output
    assert f"removed {dead_dir} (100 B)" in r.output and not dead_dir.exists()
    assert f"kept {live}" in r.output and "is running" in r.output
    assert f"kept {legacy}" in r.output and "no writer recorded" in r.output
    assert f"kept {foreign}" in r.output and "written on another host" in r.output
    assert live.exists() and legacy.exists() and foreign.exists()

    # --older-than 0: anything whose writer is not known to be alive is an orphan.
    r = runner.invoke(app, ["workspace", "gc", "--older-than", "0"])
    assert r.exit_code == 0, r.output
    assert not legacy.exists() and not foreign.exists() and live.exists()
    assert "removed 2 orphaned staging file(s)" in r.output


def test_gc_has_help_and_rejects_a_negative_age(sqlite_workspace) -> None:
    r = runner.invoke(app, ["workspace", "gc", "--help"])
    assert r.exit_code == 0 and "--dry-run" in r.output and "--older-than" in r.output
    r = runner.invoke(app, ["workspace", "gc", "--older-than", "-1"])
    assert r.exit_code == 2


def test_a_failed_write_removes_its_own_staging_file(
    sqlite_workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(sqlite_workspace)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("alignflow.store.api.pq.write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.put_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}], kind="pairs")
    assert list(sqlite_workspace.tmp_dir.iterdir()) == []
    store.close()
