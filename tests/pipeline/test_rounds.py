"""Pipeline rounds: a block of stages repeated N times, each round reading the previous round's outputs;
caching, skipping, per-round overrides and resume work per round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignflow.pipeline import PipelineError, load_pipeline, run_pipeline
from alignflow.store import Store

# base w = 0.5 * 2 = 1. Round R adds 2 labels to the cumulative set (2R rows) and its policy continues from the
# previous round's: w_R = w_{R-1} + steps * 2R, so with steps 2: 5, 13, 25.
PIPE = """\
name: rounds
stages:
  data:
    call: tests.pipeline.stages:make_data
    params: {n: 2}
  base:
    call: tests.pipeline.stages:train
    params: {data: "${data.dataset}", lr: 0.5, steps: 2, die_at: null}
  first:
    call: tests.pipeline.stages:evaluate
    params: {model: "${policy@1.checkpoint}"}
  final:
    call: tests.pipeline.stages:evaluate
    params: {model: "${policy@last.checkpoint}"}
rounds:
  count: 3
  carry:
    previous_labels: {init: null, from: labels.cumulative}
    current_policy: {init: "${base.checkpoint}", from: policy.checkpoint}
  stages:
    labels:
      call: tests.pipeline.stages:collect
      params: {previous: "${round.previous_labels}", n: 2, round: "${round.index}", policy: "${round.current_policy}"}
    policy:
      call: tests.pipeline.stages:improve
      params:
        init: "${round.current_policy}"
        data: "${labels.cumulative}"
        steps: 2
        reference: "${base.checkpoint}"
        die_at: DIE
"""

REPO = Path(__file__).resolve().parents[2]
quiet = {"log": lambda m: None}


def calls(store: Store) -> list[str]:
    f = store.workspace.home / "calls.jsonl"
    return [json.loads(line)["stage"] for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def pipe(tmp_path: Path) -> Path:
    p = tmp_path / "rounds.yaml"
    p.write_text(PIPE.replace("DIE", "null"))
    return p


def test_expansion_names_rounds_and_makes_references_explicit(pipe: Path) -> None:
    pipeline = load_pipeline(pipe)
    assert pipeline.rounds == 3
    assert pipeline.order() == [
        "data",
        "base",
        "labels@1",
        "policy@1",
        "first",
        "labels@2",
        "policy@2",
        "labels@3",
        "policy@3",
        "final",
    ]
    r1, r2 = pipeline.stages["labels@1"].params, pipeline.stages["labels@2"].params
    assert r1 == {"previous": None, "n": 2, "round": 1, "policy": "${base.checkpoint}"}  # the carry's init
    assert r2 == {
        "previous": "${labels@1.cumulative}",
        "n": 2,
        "round": 2,
        "policy": "${policy@1.checkpoint}",
    }
    assert pipeline.stages["policy@3"].params["data"] == "${labels@3.cumulative}"  # same round's stage
    assert pipeline.stages["policy@3"].params["reference"] == "${base.checkpoint}"  # top-level stays
    assert pipeline.stages["final"].params["model"] == "${policy@3.checkpoint}"
    assert pipeline.stages["policy@2"].round == 2 and pipeline.stages["base"].round is None


def test_rounds_run_cache_extend_and_override_per_round(pipe: Path, sqlite_workspace) -> None:
    store = Store.open(sqlite_workspace)
    first = run_pipeline(pipe, store=store, **quiet)
    out = first["outputs"]
    assert [out[f"labels@{r}"]["n_total"] for r in (1, 2, 3)] == [2, 4, 6]  # cumulative labels
    assert [out[f"labels@{r}"]["round"] for r in (1, 2, 3)] == [1, 2, 3]  # ctx.round
    assert [out[f"policy@{r}"]["w"] for r in (1, 2, 3)] == [5, 13, 25]  # each continues from the last
    assert out["first"]["score"] == 5 and out["final"]["score"] == 25
    ref = store.read_dataset(out["policy@3"]["checkpoint"]).to_pylist()[0]["reference"]
    assert ref == out["base"]["checkpoint"]  # the reference stays the original model in every round
    lineage = store.lineage(out["policy@3"]["checkpoint"])
    assert {out["policy@1"]["checkpoint"], out["labels@1"]["cumulative"], out["base"]["checkpoint"]} <= set(
        lineage.nodes
    )

    again = run_pipeline(pipe, store=store, **quiet)
    assert again["ran"] == [] and len(again["skipped"]) == 10

    # One more round runs only that round and what reads the last round.
    more = run_pipeline(pipe, ["rounds.count=4"], store=store, **quiet)
    assert more["ran"] == ["labels@4", "policy@4", "final"]
    assert more["outputs"]["labels@4"]["n_total"] == 8 and more["outputs"]["final"]["score"] == 25 + 2 * 8

    # A change in round 2 re-runs round 2 and the rounds after it, never round 1.
    r2 = run_pipeline(pipe, ["policy@2.params.steps=3"], store=store, **quiet)
    assert r2["ran"] == ["policy@2", "labels@3", "policy@3", "final"]
    assert r2["outputs"]["policy@2"]["w"] == 5 + 3 * 4
    # A change to a round stage applies to every round.
    every = run_pipeline(pipe, ["labels.params.n=1"], store=store, **quiet)
    assert [n for n in every["ran"] if "@" in n] == [
        f"{s}@{r}" for r in (1, 2, 3) for s in ("labels", "policy")
    ]
    # Forcing a round stage by its name re-runs it in every round (and, unchanged, nothing downstream).
    forced = run_pipeline(pipe, store=store, force=["labels"], **quiet)
    assert forced["ran"] == ["labels@1", "labels@2", "labels@3"]


def test_crashed_round_two_resumes_without_redoing_round_one(tmp_path: Path, sqlite_workspace) -> None:
    p = tmp_path / "die.yaml"
    p.write_text(PIPE.replace("DIE", "[2, 0]"))  # killed after step 1 of round 2's policy update
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from alignflow.pipeline import run_pipeline; run_pipeline(sys.argv[1])"
    cmd = [sys.executable, "-c", code, str(p)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    proc = subprocess.run(cmd, env={**env, "AF_TEST_NO_DIE": "1"}, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for done in ("data", "base", "labels@1", "policy@1", "first", "labels@2"):
        assert f"[skip] {done}: unchanged" in proc.stdout
    assert "[run]  policy@2 (resuming)" in proc.stdout
    store = Store.open(sqlite_workspace)
    stage_calls = calls(store)
    assert stage_calls.count("policy@1") == 1 and stage_calls.count("labels@1") == 1
    assert stage_calls.count("policy@2") == 2  # killed once, resumed once
    state = json.loads((store.workspace.home / "pipelines" / "rounds" / "state.json").read_text())
    assert state["policy@2"]["outputs"]["resumed_from"] == 1
    assert state["final"]["outputs"]["score"] == 25  # the resumed run ends where an unbroken one does


def test_bad_rounds(tmp_path: Path) -> None:
    def bad(text: str, match: str, overrides: tuple[str, ...] = ()) -> None:
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        with pytest.raises(PipelineError, match=match):
            load_pipeline(p, overrides)

    one = "stages: {{a: {{call: x:y}}}}\nrounds: {{count: 2, stages: {{b: {{call: x:y, params: {{v: '{ref}'}}}}}}}}"
    bad(one.format(ref="${round.prev.b.out}"), "round 1, which has no previous round")
    bad(one.format(ref="${round.nope}"), "expected round.index")
    bad(one.format(ref="${round.prev.zz.out}"), "round.prev.STAGE.OUTPUT")
    bad(one.format(ref="${b@1.out}").replace("rounds:", "x: 1\nrounds:"), "unknown top-level")
    bad("rounds: {count: 0, stages: {b: {call: x:y}}}", "rounds.count")
    bad("rounds: {count: 2, stages: {}}", "rounds.stages")
    bad("rounds: {count: 2, stages: {b: {call: x:y}}, repeat: 1}", "rounds: unknown key")
    bad(
        "stages: {b: {call: x:y}}\nrounds: {count: 2, stages: {b: {call: x:y}}}",
        "both top-level and in rounds",
    )
    bad("rounds: {count: 2, stages: {round: {call: x:y}}}", "reserved")
    bad("rounds: {count: 2, carry: {c: {init: 1}}, stages: {b: {call: x:y}}}", "carry.c")
    bad("rounds: {count: 2, carry: {c: {init: 1, from: zz.out}}, stages: {b: {call: x:y}}}", "carry.c.from")
    bad("rounds: {count: 2, stages: {b: {call: x:y, paramz: {}}}}", r"rounds.stages.b: unknown key")
    bad("stages: {a: {call: x:y}}", "has no 'rounds'", ("a@2.params.v=1",))
    bad("rounds: {count: 2, stages: {b: {call: x:y}}}", "no such stage", ("b@3.params.v=1",))
    bad("stages: {'a@1': {call: x:y}}", "stage name 'a@1'")
    # A round's stage referring to a stage that exists in no round nor at the top level.
    p = tmp_path / "dangling.yaml"
    p.write_text("rounds: {count: 2, stages: {b: {call: x:y, params: {v: '${nope.out}'}}}}")
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        load_pipeline(p).order()
