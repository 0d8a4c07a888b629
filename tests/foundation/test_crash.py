"""SIGKILL during imports never leaves a row pointing at a missing or partial file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignflow.store import Store
from alignflow.workspace import Workspace

WRITER = """
import json, os, sys
from pathlib import Path
from alignflow.data.io import import_dataset
from alignflow.store import Store
from alignflow.workspace import Workspace

home, src = sys.argv[1], Path(sys.argv[2])
store = Store.open(Workspace.from_env(home))
for i in range(10_000):
    # A different dataset each round so every import writes a new file and row.
    rows = [json.loads(l) for l in src.read_text().splitlines()]
    for r in rows:
        r["prompt"] = f"{i}:{r['prompt']}"
    p = src.with_name(f"round{i}.jsonl")
    # Atomically: a kill during this write must not leave a partial round file for the re-import below
    # (that, not the store, once failed this test on a loaded machine).
    tmp = p.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    os.replace(tmp, p)
    import_dataset(store, p, "pairs")
    print(i, flush=True)
"""


def test_sigkill_during_import_leaves_store_consistent(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": "a" * 200, "rejected": f"b{i}"}) + "\n"
            for i in range(3000)
        )
    )
    home = tmp_path / "ws"
    rng = random.Random(1234)
    env = {**os.environ, "ALIGNFLOW_DB_URL": ""}
    env.pop("ALIGNFLOW_DB_URL")
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), str(src)], stdout=subprocess.PIPE, env=env, text=True
        )
        # Wait until at least one import finished, then kill at a random moment.
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

        store = Store.open(Workspace.from_env(home))
        arts = store.find()
        assert arts, f"attempt {attempt}: nothing was imported before the kill"
        for a in arts:
            table = store.read_dataset(a.id)  # verifies the file's hash; raises if missing/partial
            assert table.num_rows == a.meta["num_rows"]
        store.close()
    # Every finished import after a kill still works (orphaned files are reused or replaced).
    store = Store.open(Workspace.from_env(home))
    from alignflow.data.io import import_dataset

    for p in sorted(tmp_path.glob("round*.jsonl")):
        aid = import_dataset(store, p, "pairs")
        assert store.read_dataset(aid).num_rows == 3000


READER = """
import sys
from alignflow.store import Store
from alignflow.workspace import Workspace

store = Store.open(Workspace.from_env(sys.argv[1]))
print(store.read_dataset(sys.argv[2]).num_rows)
"""


def test_processes_that_read_datasets_exit_cleanly(sqlite_workspace) -> None:
    # pyarrow 26 aborted about 1 process in 6 at interpreter exit after a read from an in-memory
    # buffer ("terminate called without an active exception"); every CLI command reads datasets.
    store = Store.open(sqlite_workspace)
    ds = store.put_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3, kind="pairs")
    for _ in range(16):
        proc = subprocess.run(
            [sys.executable, "-c", READER, str(sqlite_workspace.home), ds], capture_output=True, text=True
        )
        assert (proc.returncode, proc.stdout.strip()) == (0, "3"), proc.stderr
