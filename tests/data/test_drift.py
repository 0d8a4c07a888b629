"""Drift: the permutation MMD and classifier tests are calibrated under no shift and detect a shift; the CLI
gate fails or warns; MiniLM on HH vs MT-Bench prompts (embedded once per session)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.data.curation.common import CurationError
from alignflow.data.curation.drift import classifier_test, drift_report, kmeans, mmd_test

from .conftest import SHARED, write_jsonl

runner = CliRunner()


def test_false_alarm_rate_and_power_on_gaussians() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(4000, 8))
    alarms = {"mmd": 0, "clf": 0}
    reps = 200
    for r in range(reps):
        idx = rng.permutation(len(pool))[:80]
        X, Y = pool[idx[:40]], pool[idx[40:]]
        alarms["mmd"] += mmd_test(X, Y, n_perm=99, seed=r)["p_value"] < 0.05
        alarms["clf"] += classifier_test(X, Y, seed=r)["p_value"] < 0.05
    # Binomial(200, 0.05) lies in [3, 19] with probability > 0.99
    assert 3 <= alarms["mmd"] <= 19 and 3 <= alarms["clf"] <= 19, alarms
    shifted = pool[:40] + np.array([1.5] + [0.0] * 7)
    assert mmd_test(pool[40:80], shifted, n_perm=199)["p_value"] < 0.01
    assert classifier_test(pool[40:120], pool[:80] + np.array([1.5] + [0.0] * 7))["auc"] > 0.75


def test_mmd_statistic_by_hand() -> None:
    X, Y = np.array([[0.0], [1.0]]), np.array([[0.0], [3.0]])
    # squared distances 1, 0, 9, 1, 4, 9 -> median 2.5; k = exp(-d²/2.5), diagonal excluded
    k = lambda d2: np.exp(-d2 / 2.5)  # noqa: E731
    expected = (2 * k(1) / 4) + (2 * k(9) / 4) - 2 * (k(0) + k(9) + k(1) + k(4)) / 4
    assert mmd_test(X, Y, n_perm=19)["mmd2"] == pytest.approx(expected)


def test_clusters_that_moved() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 2)) * 0.1, rng.normal(size=(60, 2)) * 0.1 + 5
    labels = kmeans(np.concatenate([a, b]), 2)
    assert len(set(labels[:60])) == 1 and len(set(labels[60:])) == 1 and labels[0] != labels[60]
    X = np.concatenate([a[:30], b[:30]])
    Y = np.concatenate([a[30:], b[30:35]])  # cluster b lost most of its share
    rep = drift_report(X, Y, ["a"] * 30 + ["b"] * 30, ["a"] * 30 + ["b"] * 5, n_perm=99, clusters=2)
    top = rep["clusters"][0]
    assert (
        top["example"] == "b"
        and top["ref_share"] == pytest.approx(0.5)
        and top["new_share"] == pytest.approx(5 / 35)
    )
    with pytest.raises(CurationError, match="--alpha"):
        drift_report(X, Y, alpha=1.5)


def _hh_prompts(n: int) -> list[str]:
    from alignflow.data.formats import split_hh

    out = []
    with open(SHARED / "hh-harmless" / "train.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            # the first human turn: as long as an MT-Bench question, so length alone does not separate them
            out.append(split_hh(rec["chosen"], rec["rejected"])[0].split("\n\nAssistant:")[0].strip())
            if len(out) >= n:
                break
    return out


@pytest.mark.slow
def test_cli_drift_gate_on_minilm_embeddings(sqlite_workspace, tmp_path) -> None:
    hh = _hh_prompts(120)
    mt = [json.loads(line)["turns"][0] for line in open(SHARED / "mt-bench" / "question.jsonl")][:60]
    write_jsonl(tmp_path / "ref.jsonl", [{"prompt": p, "completion": "x"} for p in hh[:60]])
    write_jsonl(tmp_path / "same.jsonl", [{"prompt": p, "completion": "x"} for p in hh[60:]])
    write_jsonl(tmp_path / "mt.jsonl", [{"prompt": p, "completion": "x"} for p in mt])
    for name in ("ref", "same", "mt"):
        assert (
            runner.invoke(
                app, ["data", "import", str(tmp_path / f"{name}.jsonl"), "--kind", "sft", "--name", name]
            ).exit_code
            == 0
        )
    res = runner.invoke(app, ["data", "drift", "ref", "mt", "--json", "--permutations", "199"])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.stdout)
    assert rep["drift"] and rep["mmd"]["p_value"] < 0.01 and rep["classifier"]["auc"] > 0.8
    assert rep["clusters"][0]["change"] != 0
    res = runner.invoke(app, ["data", "drift", "ref", "mt", "--on-drift", "warn", "--permutations", "199"])
    assert res.exit_code == 0 and "drift" in res.output
    res = runner.invoke(app, ["data", "drift", "ref", "same", "--json", "--permutations", "199"])
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["drift"]
    from alignflow.cli.common import open_store

    store = open_store()
    report_id = json.loads(res.stdout)["id"]
    assert {e[2] for e in store.lineage(report_id).edges} == {"ref", "new"}
    # a preference set's prompts vs a policy's samples: NEW embedded by its responses
    res = runner.invoke(
        app, ["data", "drift", "ref", "same", "--new-by", "response", "--json", "--permutations", "99"]
    )
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["new_by"] == "response"
    res = runner.invoke(app, ["data", "drift", "ref", "mt", "--by", "title"])
    assert isinstance(res.exception, CurationError) and "--by" in str(res.exception)


@pytest.mark.slow
def test_drift_gate_as_a_pipeline_stage(sqlite_workspace, tmp_path) -> None:
    """`call: alignflow.data.curation.drift:drift_stage` stops a pipeline on drift (fail) or only warns (warn)."""
    from alignflow.pipeline import PipelineError, run_pipeline
    from alignflow.store import Store

    hh = _hh_prompts(60)
    mt = [json.loads(line)["turns"][0] for line in open(SHARED / "mt-bench" / "question.jsonl")][:40]
    write_jsonl(tmp_path / "ref.jsonl", [{"prompt": p, "completion": "x"} for p in hh[:40]])
    write_jsonl(tmp_path / "mt.jsonl", [{"prompt": p, "completion": "x"} for p in mt])
    for name in ("ref", "mt"):
        res = runner.invoke(
            app, ["data", "import", str(tmp_path / f"{name}.jsonl"), "--kind", "sft", "--name", name]
        )
        assert res.exit_code == 0, res.output
    pipe = tmp_path / "gate.yaml"
    pipe.write_text(
        "name: gate\nstages:\n"
        "  gate:\n    call: alignflow.data.curation.drift:drift_stage\n"
        "    params: {ref: ref, new: mt, permutations: 99, on_drift: ACTION}\n"
    )
    store = Store.open(sqlite_workspace)
    logs: list[str] = []
    warned = run_pipeline(pipe, ["gate.params.on_drift=warn"], store=store, log=logs.append)
    assert warned["outputs"]["gate"]["drift"] is True and warned["outputs"]["gate"]["classifier_auc"] > 0.8
    assert any("warning: gate: drift" in m for m in logs)
    assert warned["ran"] == ["gate"]  # a warning lets the pipeline go on
    with pytest.raises((PipelineError, CurationError), match="drift between ref and mt"):
        run_pipeline(pipe, ["gate.params.on_drift=fail"], store=store, log=lambda m: None)
    with pytest.raises((PipelineError, CurationError), match="on_drift must be fail or warn"):
        run_pipeline(pipe, ["gate.params.on_drift=stop"], store=store, log=lambda m: None)
    store.close()
