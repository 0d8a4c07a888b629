"""A scaled-down `examples/iterative.yaml`: three rounds of feedback on the current policy, a reward model on the
cumulative preferences, PPO continued from the previous round with the SFT model as the KL reference, and
uncertainty routing from round 2. Round 3's policy must beat round 1's on gold utility, the 95% CI of the
paired difference (bootstrap over prompts) above zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignflow.pipeline import run_pipeline
from alignflow.store import Store

REPO = Path(__file__).resolve().parents[2]

# Smaller model, data and steps than the example; the same stages and code paths.
SMALL = [
    "base.params.corpus_size=2000",
    "base.params.hidden_size=96",
    "base.params.num_layers=2",
    "data.params.n_demonstrations=800",
    "data.params.n_feedback_prompts=390",
    "data.params.n_rl_prompts=256",
    "data.params.n_eval_prompts=150",
    "sft.config.train.epochs=2",
    "feedback.params.candidates_per_round=130",
    "feedback.params.n_items=100",
    "feedback.params.max_new_tokens=40",
    "rm.config.train.epochs=2",
    "ppo.config.train.steps=20",
    "ppo.config.rollout.max_new_tokens=40",
    "ppo.config.monitor.every=0",
    "evaluate.params.samples_per_prompt=2",
    "evaluate.params.max_new_tokens=40",
    "evaluate.params.greedy=false",
    "summary.params.n_heldout_pairs=150",
]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # minutes on an idle 2-core machine, far more when it is shared
def test_three_rounds_improve_the_policy(sqlite_workspace) -> None:
    store = Store.open(sqlite_workspace)
    log: list[str] = []
    result = run_pipeline(REPO / "examples" / "iterative.yaml", SMALL, store=store, log=log.append)
    out = result["outputs"]
    rounds = out["summary"]["rounds"]
    print(json.dumps({"times": result["times"], "rounds": rounds}, indent=1))

    # Each round annotates the current policy's samples and the RM sees all rounds' pairs so far.
    stats = [out[f"feedback@{r}"]["stats"] for r in (1, 2, 3)]
    assert [s["routing"] for s in stats] == ["random", "moderated_margin", "moderated_margin"]
    assert stats[1]["n_expert_items"] == 20 and stats[0]["n_expert_items"] == 0  # 20% of 100 items
    totals = [s["n_pairs_total"] for s in stats]
    assert totals == [stats[0]["n_pairs"], totals[0] + stats[1]["n_pairs"], totals[1] + stats[2]["n_pairs"]]
    # From round 2 the queue serves the previous RM's most uncertain items first and the most uncertain of
    # all only to experts.
    state = json.loads(Path(result["state_file"]).read_text())
    routed = json.loads((Path(state["feedback@2"]["work_dir"]) / "items.json").read_text())
    routed = [it for it in routed if "gold_label" not in it]
    expert = [it["priority"] for it in routed if it["ambiguous"]]
    standard = [it["priority"] for it in routed if not it["ambiguous"]]
    assert len(expert) == 20 and min(expert) >= max(standard) > 0
    assert stats[1]["mean_priority"] >= stats[1]["mean_priority_all"]

    # PPO continues from the previous round's policy; the KL reference stays the SFT model.
    graph = store.lineage(out["ppo@3"]["checkpoint"], "up")
    assert out["ppo@2"]["checkpoint"] in graph.nodes and out["ppo@1"]["checkpoint"] in graph.nodes
    assert out["sft"]["checkpoint"] in graph.nodes
    assert out["feedback@1"]["annotations"] in graph.nodes  # round 1's labels reach round 3's policy

    diff = out["evaluate"]["diff_vs_round1"]["round3"]
    assert diff["lo"] > 0, f"round 3 does not beat round 1 on gold utility: {diff}; rounds: {rounds}"

    # An unchanged re-run skips every stage of every round.
    again = run_pipeline(REPO / "examples" / "iterative.yaml", SMALL, store=store, log=lambda m: None)
    assert again["ran"] == []
