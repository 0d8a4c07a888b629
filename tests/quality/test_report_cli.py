"""Report builder, HTML rendering and the `alignflow quality` CLI through the real Typer app."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.quality.annotators import gold_accuracy, position_bias, reviewer_discrepancy, wilson_interval
from alignflow.quality.policy import ACTIONS, QCPolicy
from alignflow.quality.report import build_report, render_html
from alignflow.quality.schema import validate_judgments, write_judgments
from alignflow.quality.simulate import PoolSpec, simulate_pool


@pytest.fixture(scope="module")
def sim_frame():
    pool = [
        PoolSpec("expert", 2, 0.95),
        PoolSpec("regular", 5, 0.85),
        PoolSpec("position_biased", 1, 0.85, 0.95),
    ]
    sim = simulate_pool(pool, n_items=150, n_gold_items=20, gold_rate=0.15, seed=7)
    df = sim.judgments.copy()
    df.loc[df.index[:60], "reviewer_label"] = sim.truth.reindex(df["item_id"][:60]).to_numpy()
    return validate_judgments(df), sim


def test_wilson_interval_known_value():
    # Wilson (1927) for 8/10 at 95%: about (0.490, 0.943).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_annotator_figures(sim_frame):
    df, sim = sim_frame
    biased = sim.annotators.loc[sim.annotators["type"] == "position_biased", "annotator_id"].iat[0]
    pb = position_bias(df).set_index("annotator_id")
    assert pb.loc[biased, "left_rate"] > 0.85 and pb.loc[biased, "left_p_value"] < 1e-6
    g = gold_accuracy(df)
    assert (g["n_gold"] > 0).all() and g["gold_accuracy"].between(0, 1).all()
    r = reviewer_discrepancy(df, by="pod")
    assert set(r["pod"]) == set(df["pod"]) and r["n_reviewed"].sum() == 60


def test_report_tables_and_html(sim_frame):
    df, _ = sim_frame
    report = build_report(df, policy=QCPolicy())
    for name in (
        "overview",
        "agreement_by_pod",
        "agreement_over_time",
        "kappa_pairs",
        "annotators",
        "review_by_pod",
        "aggregation",
        "qc_actions",
    ):
        assert name in report.tables, name
    for name, table in report.tables.items():
        for col in table.columns:
            assert not any(isinstance(v, float) and math.isnan(v) for v in table[col]), (name, col)
            assert not any(v is pd.NaT for v in table[col]), (name, col)
    assert set(report.tables["qc_actions"]["action"]) <= set(ACTIONS)
    page = render_html(report)
    assert page.count("data:image/png;base64,") >= 2
    # Self-contained: no external script, stylesheet or image references.
    assert not re.search(r"<(script|link)\b", page) and "src='http" not in page


def test_cli_report_and_actions(sim_frame, tmp_path):
    df, _ = sim_frame
    src = write_judgments(df, tmp_path / "judgments.jsonl")
    runner = CliRunner()
    result = runner.invoke(app, ["quality", "report", str(src), "--out", str(tmp_path / "rep"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").stat().st_size > 1000
    assert (tmp_path / "rep" / "qc_actions.csv").exists()
    policy = tmp_path / "policy.yaml"
    policy.write_text("gold:\n  enabled: false\nposition_bias:\n  max_deviation: 0.3\n")
    result = runner.invoke(app, ["quality", "actions", str(src), "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    assert '"rule":"position_bias"' in result.output and '"rule":"gold"' not in result.output
    policy.write_text("gold:\n  min_acuracy: 0.5\n")
    result = runner.invoke(app, ["quality", "actions", str(src), "--policy", str(policy)])
    assert result.exit_code != 0 and "min_acuracy" in str(result.exception)
