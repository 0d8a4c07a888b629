"""The pipeline runner: DAG order, skip when unchanged, re-run what a change touches, resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignflow.pipeline import PipelineError, run_pipeline
from alignflow.store import Store

from .stages import TOY_PIPELINE as PIPE

REPO = Path(__file__).resolve().parents[2]


def calls(store: Store) -> list[str]:
    f = store.workspace.home / "calls.jsonl"
    return [json.loads(line)["stage"] for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def pipe(tmp_path: Path) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text(PIPE.replace("DIE", "null"))
    return p


def test_order_skip_and_partial_rerun(pipe: Path, sqlite_workspace) -> None:
    store = Store.open(sqlite_workspace)
    first = run_pipeline(pipe, store=store, log=lambda m: None)
    assert first["ran"] == ["data", "train", "evaluate"]  # dependency order, not file order
    assert first["outputs"]["evaluate"]["score"] == 2.0
    second = run_pipeline(pipe, store=store, log=lambda m: None)
    assert second["ran"] == [] and sorted(second["skipped"]) == ["data", "evaluate", "train"]
    # Changing one train setting re-runs train and what depends on it, not data.
    third = run_pipeline(pipe, ["train.params.lr=0.25"], store=store, log=lambda m: None)
    assert third["ran"] == ["train", "evaluate"]
    assert third["outputs"]["evaluate"]["score"] == 1.0
    assert calls(store) == ["data", "train", "evaluate", "train", "evaluate"]
    # Switching the setting back finds the earlier result: nothing runs.
    back = run_pipeline(pipe, store=store, log=lambda m: None)
    assert back["ran"] == [] and back["outputs"]["evaluate"]["score"] == 2.0
    # Lineage runs through the stages' artifacts.
    lin = store.lineage(third["outputs"]["train"]["checkpoint"])
    assert first["outputs"]["data"]["dataset"] in lin.nodes
    # A forced stage re-runs even when unchanged.
    assert run_pipeline(pipe, ["train.params.lr=0.25"], store=store, force=["data"], log=lambda m: None)[
        "ran"
    ] == ["data"]


def test_killed_stage_resumes_in_its_own_folder(tmp_path: Path, sqlite_workspace) -> None:
    p = tmp_path / "die.yaml"
    p.write_text(PIPE.replace("DIE", "2"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from alignflow.pipeline import run_pipeline; run_pipeline(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(p)], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", code, str(p)],
        env={**env, "AF_TEST_NO_DIE": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train (resuming)" in proc.stdout and "[skip] data" in proc.stdout
    store = Store.open(sqlite_workspace)
    state = json.loads((store.workspace.home / "pipelines" / "toy" / "state.json").read_text())
    assert state["train"]["outputs"]["resumed_from"] == 3  # steps 1..3 were done before the kill


def test_a_stage_stopped_for_requeue_stops_the_pipeline_and_resumes(tmp_path: Path, sqlite_workspace) -> None:
    p = tmp_path / "stop.yaml"
    p.write_text(PIPE.replace("die_at: DIE", "stop_at: 1"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "alignflow", "run", str(p)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stdout + proc.stderr  # EXIT_REQUEUE: checkpointed, run again
    assert "stage 'train' stopped at step 2 (SIGUSR1)" in proc.stdout + proc.stderr
    store = Store.open(sqlite_workspace)
    state = json.loads((store.workspace.home / "pipelines" / "toy" / "state.json").read_text())
    assert state["train"]["status"] == "stopped" and "evaluate" not in state  # nothing ran on missing outputs
    proc = subprocess.run(
        cmd, env={**env, "AF_TEST_NO_STOP": "1"}, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train (resuming)" in proc.stdout
    state = json.loads((store.workspace.home / "pipelines" / "toy" / "state.json").read_text())
    assert state["train"]["outputs"]["resumed_from"] == 2 and state["evaluate"]["status"] == "done"


def test_bad_pipelines(tmp_path: Path, sqlite_workspace) -> None:
    def bad(text: str, match: str) -> None:
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        with pytest.raises(PipelineError, match=match):
            run_pipeline(p, log=lambda m: None)

    bad("stages: {a: {call: x:y, params: {v: '${b.out}'}}}", "unknown stage 'b'")
    bad("stages: {a: {call: x:y, after: [b]}, b: {call: x:y, after: [a]}}", "cycle")
    bad("stages: {a: {call: x:y, recipe: sft}}", "exactly one")
    bad("stages: {a: {call: x:y, paramz: {}}}", "unknown key")
    bad("stages: {a: {recipe: nope}}", "recipe: expected one of")
    bad("stages: {a: {call: 'no.such.module:f'}}", "cannot import")
    bad("bogus: 1\nstages: {a: {call: x:y}}", "unknown top-level")
