"""Per-head diagnostics of a multi-head reward model in `alignflow rm-eval` and `alignflow eval`, through the real
console entry point on a tiny Llama.

The multi-head checkpoint is trained here by `alignflow rm` with `heads: auto` (3 steps) on pairs whose `labels`
rate two dimensions: `accuracy` (chosen better on even pairs, rejected better on odd ones, a tie on every
fourth) and `tone` (chosen better, left out on every third pair). The numbers are recomputed by hand from the
checkpoint's own `score_heads`: 3 training steps teach the heads nothing worth pinning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from .conftest import alignflow, two_policies

N_PAIRS = 16
HEADS = ["overall", "accuracy", "tone"]


def _labels(k: int) -> dict[str, float]:
    labels = {"accuracy": 0.5 if k % 4 == 3 else (1.0 if k % 2 == 0 else 0.0)}
    if k % 3:
        labels["tone"] = 1.0
    return labels


def _pair_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": f"q{k}",
            "prompt": f"question {k}? ",
            "chosen": f"a kind answer {k}",
            "rejected": f"no {k}",
            "labels": _labels(k),
        }
        for k in range(N_PAIRS)
    ]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny policies, a 3-head reward model trained by `alignflow rm` and a plain one-head HF reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    root = tmp_path_factory.mktemp("heads")
    a, b = two_policies(root, hidden_size=32, num_layers=1)
    tok = AutoTokenizer.from_pretrained(a)
    cfg = {
        "stage": "rm",
        "output_dir": str(root / "rm"),
        "model": {"path": str(a), "dtype": "float32"},
        "heads": "auto",
        "data": {
            "train": str(_jsonl(root / "pairs.jsonl", _pair_rows())),
            "eval_fraction": 0.0,
            "max_length": 32,
        },
        "optim": {"lr": 5e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 4, "max_steps": 3},
    }
    (root / "rm.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: its own workspace, nothing left in os.environ
        mp.setenv("ALIGNFLOW_HOME", str(root / "ws"))
        mp.delenv("ALIGNFLOW_DB_URL", raising=False)
        res = CliRunner().invoke(app, ["rm", str(root / "rm.yaml")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads((root / "rm" / "final" / "ensemble.json").read_text())["heads"] == HEADS
    plain = root / "rm-plain"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(a, num_labels=1).save_pretrained(str(plain))
    tok.save_pretrained(str(plain))
    return {"a": a, "b": b, "rm": root / "rm" / "final", "plain": plain}


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, sqlite_workspace):  # noqa: ANN201
    from alignflow.cli import common

    # One line per table row. COLUMNS alone is not enough: the CLI's console is created once per process, so
    # a CLI test that ran earlier in the same pytest worker fixes its width at 80 ("overall head" then wraps).
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(common.console, "width", 200)

    def invoke(*args: Any) -> str:
        code, out, err = alignflow(monkeypatch, capsys, *args)
        assert code == 0, out + err
        return out

    return invoke


# ------------------------------------------------------------------------------------------------ by hand


def test_head_accuracy_by_hand() -> None:
    from alignflow.evaluate.rm_eval import head_accuracy, wilson_interval

    # Gaps (chosen - rejected) per pair, columns overall / accuracy:
    #   p0 (+1, +2) label 1.0: both right;   p1 (+1, -1) label 0.0: head right, overall wrong;
    #   p2 (+1,  0) label 0.2: head ties (1/2), overall wrong;   p3 label 0.5: undecided, left out;
    #   p4 no accuracy label: left out.  Head: (1 + 1 + 0.5) / 3; overall: 1 / 3.
    chosen = np.array([[1.0, 2.0], [1.0, -1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    rejected = np.zeros_like(chosen)
    labels = [{"accuracy": 1.0}, {"accuracy": 0.0}, {"accuracy": 0.2}, {"accuracy": 0.5}, {"tone": 1.0}]
    (got,) = head_accuracy(chosen, rejected, ["overall", "accuracy"], labels)
    assert got["dimension"] == "accuracy" and got["n"] == 3 and got["ties"] == 1 and got["overall_ties"] == 0
    assert got["accuracy"] == pytest.approx(2.5 / 3) and got["overall_accuracy"] == pytest.approx(1 / 3)
    assert (got["ci_low"], got["ci_high"]) == wilson_interval(2.5, 3)
    assert (got["overall_ci_low"], got["overall_ci_high"]) == wilson_interval(1, 3)
    # A head whose dimension no pair decides is left out.
    assert head_accuracy(chosen, rejected, ["overall", "tone"], [{}] * 5) == []


# ------------------------------------------------------------------------------------------------ rm-eval


def test_rm_eval_reports_each_dimension_heads_accuracy_beside_the_overall_heads(
    run, models, sqlite_workspace, tmp_path
):
    from alignflow.evaluate.rm_eval import subset_result
    from alignflow.models.reward import load_reward_scorer
    from alignflow.store import Store

    rows = _pair_rows()
    pairs = _jsonl(tmp_path / "pairs.jsonl", rows)
    out = run("rm-eval", models["rm"], "--pairs", pairs, "--out", tmp_path / "ev")
    assert "accuracy against each dimension's labels" in out and "overall head" in out
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert ev["heads"] == HEADS

    # Recomputed from the checkpoint's own head scores.
    scorer = load_reward_scorer(models["rm"])
    prompts = [r["prompt"] for r in rows]
    c = scorer.score_heads(prompts, [r["chosen"] for r in rows])[0].double().numpy()
    rj = scorer.score_heads(prompts, [r["rejected"] for r in rows])[0].double().numpy()
    by_id = {s["id"]: s for s in ev["scores"]}
    for i, r in enumerate(rows):
        s = by_id[r["id"]]
        assert s["chosen_heads"] == pytest.approx(c[i].tolist(), abs=1e-5)
        assert s["rejected_heads"] == pytest.approx(rj[i].tolist(), abs=1e-5)
        assert s["chosen"] == pytest.approx(c[i, 0], abs=1e-5)  # the score is the overall head's
    per_head = {h["dimension"]: h for h in ev["per_head"]}
    assert list(per_head) == ["accuracy", "tone"]
    for h, dim in enumerate(HEADS[1:], start=1):
        decided = [(i, r["labels"][dim]) for i, r in enumerate(rows) if r["labels"].get(dim, 0.5) != 0.5]
        idx = [i for i, _ in decided]
        side = np.array([1.0 if v > 0.5 else -1.0 for _, v in decided])
        own, overall = (subset_result(dim, side * (c[idx, k] - rj[idx, k])) for k in (h, 0))
        got = per_head[dim]
        assert got["n"] == len(decided) == own.n
        assert got["accuracy"] == pytest.approx(own.accuracy) and got["ci_low"] == pytest.approx(own.ci[0])
        assert got["overall_accuracy"] == pytest.approx(overall.accuracy)
        assert got["overall_ci_high"] == pytest.approx(overall.ci[1])
        assert (
            f"{dim} " in out and f"{got['accuracy']:.3f}" in out and f"{got['overall_accuracy']:.3f}" in out
        )
    assert per_head["accuracy"]["n"] == 12 and per_head["tone"]["n"] == 10  # ties and missing labels left out
    assert ev["overall"]["n"] == N_PAIRS  # the pair accuracy still counts every pair
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "Dimension heads" in html and "tone" in html
    store = Store.open(sqlite_workspace)
    try:
        (art,) = store.find(kind="rm_evaluation")
        assert art.meta["head_accuracy"] == {d: per_head[d]["accuracy"] for d in per_head}
    finally:
        store.close()


def test_rm_eval_without_labels_or_with_one_head_is_unchanged(run, models, tmp_path):
    unlabelled = _jsonl(
        tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "labels"} for r in _pair_rows()]
    )
    labelled = _jsonl(tmp_path / "labelled.jsonl", _pair_rows())
    for ckpt, pairs, name in ((models["rm"], unlabelled, "a"), (models["plain"], labelled, "b")):
        out = run("rm-eval", ckpt, "--pairs", pairs, "--out", tmp_path / name)
        ev = json.loads((tmp_path / name / "evaluation.json").read_text())
        assert "per_head" not in ev and "heads" not in ev and "chosen_heads" not in ev["scores"][0]
        assert (
            "dimension" not in out and "Dimension heads" not in (tmp_path / name / "report.html").read_text()
        )


# ------------------------------------------------------------------------------------------------ eval


def test_eval_reports_every_heads_mean_per_policy(run, models, tmp_path):
    from alignflow.models.reward import load_reward_scorer

    prompts = _jsonl(
        tmp_path / "prompts.jsonl", [{"id": f"p{k}", "prompt": f"question {k}? "} for k in range(4)]
    )
    out = run(
        "eval", models["b"], "--baseline", models["a"], "--prompts", prompts, "--scorer", f"rm:{models['rm']}",
        "--temperature", "0", "--max-new-tokens", "6", "--out", tmp_path / "ev",
    )  # fmt: skip
    assert "mean reward per head" in out and "per-head difference from policy-a" in out
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["heads"] == HEADS
    responses = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2 * 4
    mean, _ = load_reward_scorer(models["rm"]).score_heads(
        [r["prompt"] for r in responses], [r["response"] for r in responses]
    )
    for r, want in zip(responses, mean.tolist(), strict=True):
        assert [r["heads"][h] for h in HEADS] == pytest.approx(want, abs=1e-5)
        assert r["score"] == r["heads"]["overall"]
    got = {r["policy"]: r for r in summary["results"]}
    for policy, res in got.items():
        mine = [r for r in responses if r["policy"] == policy]  # greedy: one response per prompt
        for h in HEADS:
            v = res["heads"][h]
            assert v["mean"] == pytest.approx(np.mean([r["heads"][h] for r in mine]))
            assert v["lo"] <= v["mean"] <= v["hi"]
            assert f"{v['mean']:.3f}" in out
        assert res["heads"]["overall"]["mean"] == pytest.approx(res["score"]["mean"])
    diff = got["policy-b"]["vs_baseline"]["heads"]
    for h in HEADS:
        assert diff[h]["mean"] == pytest.approx(
            got["policy-b"]["heads"][h]["mean"] - got["policy-a"]["heads"][h]["mean"]
        )
    assert "heads" not in got["policy-a"].get("vs_baseline", {})
    page = (tmp_path / "ev" / "index.html").read_text()
    assert "Mean reward per head" in page and "Per-head difference from policy-a" in page


def test_eval_with_a_one_head_reward_model_is_unchanged(run, models, tmp_path):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": "question 0? "}])
    out = run(
        "eval", models["a"], "--prompts", prompts, "--scorer", f"rm:{models['plain']}", "--temperature", "0",
        "--max-new-tokens", "4", "--out", tmp_path / "ev",
    )  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "heads" not in summary and all("heads" not in r for r in summary["results"])
    (resp,) = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert "heads" not in resp and "per head" not in out
    assert "Mean reward per head" not in (tmp_path / "ev" / "index.html").read_text()
