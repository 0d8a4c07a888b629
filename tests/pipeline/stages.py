"""Stage functions for the runner tests: they count their calls in a file so tests can see re-runs."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from alignflow.pipeline import StageContext

# The runner tests' pipeline (DIE: the train step at which the stage kills its own process, or null).
TOY_PIPELINE = """\
name: toy
stages:
  evaluate:
    call: tests.pipeline.stages:evaluate
    params: {model: "${train.checkpoint}"}
  data:
    call: tests.pipeline.stages:make_data
    params: {n: 5}
  train:
    call: tests.pipeline.stages:train
    params: {data: "${data.dataset}", lr: 0.5, steps: 4, die_at: DIE}
"""


def _count(ctx: StageContext) -> None:
    counter = ctx.store.workspace.home / "calls.jsonl"
    with open(counter, "a") as f:
        f.write(json.dumps({"stage": ctx.stage, "dir": str(ctx.work_dir)}) + "\n")


def make_data(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    _count(ctx)
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(params["n"])]
    return {"dataset": ctx.store.put_dataset(rows, kind="pairs", name="toy"), "n": params["n"]}


def train(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    _count(ctx)
    # A "training" stage that checkpoints progress in its work dir and can be killed mid-way.
    progress = ctx.work_dir / "progress.json"
    done = json.loads(progress.read_text())["step"] if progress.exists() else 0
    for step in range(done, params["steps"]):
        progress.write_text(json.dumps({"step": step + 1}))
        if params.get("die_at") == step and not os.environ.get("AF_TEST_NO_DIE"):
            os.kill(os.getpid(), signal.SIGKILL)
        if params.get("stop_at") == step and not os.environ.get("AF_TEST_NO_STOP"):
            # what a recipe returns after a SIGUSR1/SIGTERM checkpoint: not finished, no outputs
            return {"stopped": True, "step": step + 1, "signal": "SIGUSR1"}
    model = ctx.store.put_dataset(
        [{"w": params["lr"] * params["steps"]}], kind="checkpoint", parents=[(params["data"], "dataset")]
    )
    return {"checkpoint": model, "resumed_from": done}


def evaluate(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    _count(ctx)
    return {"score": ctx.store.read_dataset(params["model"]).to_pylist()[0]["w"]}


def collect(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """One round's new labels on the current policy, appended to the previous rounds' (cumulative data)."""
    _count(ctx)
    previous = ctx.store.read_dataset(params["previous"]).to_pylist() if params["previous"] else []
    new = [
        {"prompt": f"r{params['round']}-p{i}", "chosen": params["policy"], "rejected": "bad"}
        for i in range(params["n"])
    ]
    parents = [(params["previous"], "previous_rounds")] if params["previous"] else []
    data = ctx.store.put_dataset(previous + new, kind="pairs", name="toy-cumulative", parents=parents)
    return {"cumulative": data, "n_total": len(previous) + len(new), "round": ctx.round}


def improve(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """A "policy update" that continues from `init` (a previous checkpoint, or the base weight) and can be killed."""
    _count(ctx)
    start = (
        ctx.store.read_dataset(params["init"]).to_pylist()[0]["w"]
        if isinstance(params["init"], str)
        else params["init"]
    )
    n_data = len(ctx.store.read_dataset(params["data"]).to_pylist())
    progress = ctx.work_dir / "progress.json"
    done = json.loads(progress.read_text())["step"] if progress.exists() else 0
    for step in range(done, params["steps"]):
        progress.write_text(json.dumps({"step": step + 1}))
        if params.get("die_at") == [ctx.round, step] and not os.environ.get("AF_TEST_NO_DIE"):
            os.kill(os.getpid(), signal.SIGKILL)
    parents = [(params["data"], "dataset")]
    if isinstance(params["init"], str):
        parents.append((params["init"], "init"))
    w = start + params["steps"] * n_data
    model = ctx.store.put_dataset(
        [{"w": w, "reference": params["reference"]}], kind="checkpoint", parents=parents
    )
    return {"checkpoint": model, "w": w, "resumed_from": done}
