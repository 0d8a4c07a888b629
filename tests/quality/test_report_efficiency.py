"""`alignflow quality report` on an exported project: the annotation-efficiency table (held-out accuracy of the
embedding reward model against the number of labels, gain per 100 labels, cost by tier) in the terminal, the
CSV and the HTML; a judgments file without texts gets a note instead."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.feedback import auth, services
from alignflow.store import Store

PASSWORD = "correct-horse-battery"
TOPICS = [
    "refund",
    "password",
    "delivery",
    "invoice",
    "login",
    "shipping",
    "warranty",
    "upgrade",
    "billing",
    "account",
]
ANNOTATORS = {"e1": "expert", "s1": "standard", "s2": "standard"}


def _items(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        good = (
            f"Sorry about the {topic} problem: here are the steps to fix your {topic}, and I will follow up."
        )
        bad = f"{topic}? not my problem, figure it out yourself."
        a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
        rows.append(
            {
                "id": f"i{k}",
                "prompt": f"Customer {k} asks about a {topic} issue.",
                "candidates": [
                    {"id": "a", "text": a, "model": "m1", "version": "1", "sampling": {}},
                    {"id": "b", "text": b, "model": "m2", "version": "1", "sampling": {}},
                ],
            }
        )
    return rows


@pytest.fixture
def exported(sqlite_workspace, monkeypatch):
    """A 40-item pairwise project, three annotators (one in the expert tier), exported as judgments."""
    auth.set_password_cost(time_cost=1, memory_cost_kib=1024)
    monkeypatch.setenv("ALIGNFLOW_PASSWORD", PASSWORD)
    sqlite_workspace.ensure_dirs()
    factory = services.connect(sqlite_workspace)
    rng = random.Random(1)
    with factory() as s:
        for name, tier in ANNOTATORS.items():
            auth.create_user(s, name, PASSWORD, "annotator", pod="p", tier=tier)
        s.commit()
        services.create_project(s, "eff", "# Pick the helpful reply", overlap=3, gold_rate=0.0)
        services.import_items(s, "eff", _items(40), source="items.jsonl")
        for name in ANNOTATORS:
            while (t := services.next_task(s, name, "eff")) is not None:
                helpful = 0 if "Sorry" in t["candidates"][0]["text"] else 1
                pick = helpful if rng.random() < 0.85 else 1 - helpful
                body = {
                    "schema_version": t["schema_version"],
                    "choice": ("left", "right")[pick],
                    "strength": 2,
                    "dimensions": {d: ("left", "right")[pick] for d in t["schema"]["dimensions"]},
                    "rationale": "the helpful one",
                    "duration_s": 3.0,
                }
                services.submit(s, name, t["assignment_id"], body, f"{name}-{t['assignment_id']}")
    factory.kw["bind"].dispose()
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    out = run("annotate", "export", "eff", "--as", "judgments")
    return run, out.split()[1]


@pytest.mark.slow  # ~40 s: two reports, each fitting the reward model 20 times on MiniLM embeddings
def test_report_on_an_exported_artifact_has_the_efficiency_curve_with_costs(
    exported, sqlite_workspace, tmp_path
):
    run, aid = exported
    out = run(
        "quality", "report", aid, "--out", tmp_path / "rep", "--label-cost", "expert=1.0",
        "--label-cost", "standard=0.25",
    )  # fmt: skip
    assert "annotation_efficiency" in out and "held-out" in out
    curve = pd.read_csv(tmp_path / "rep" / "annotation_efficiency.csv")
    assert list(curve.columns) == [
        "n_labels", "accuracy", "gain_per_100_labels", "shuffled_accuracy", "shuffled_sd",
        "shuffled_gain_per_100_labels", "cost", "gain_per_unit_cost",
    ]  # fmt: skip
    assert len(curve) >= 3 and curve["n_labels"].is_monotonic_increasing
    assert curve["accuracy"].between(0, 1).all() and curve["shuffled_accuracy"].between(0, 1).all()
    # 40 items x 3 votes, a prompt-disjoint 20% held out: every label of the pool is priced at its tier.
    n = int(curve["n_labels"].iat[-1])
    assert 80 <= n <= 96
    experts = n // 3
    assert curve["cost"].iat[-1] == pytest.approx(experts * 1.0 + (n - experts) * 0.25, abs=1.0)
    gains = curve["gain_per_100_labels"].iloc[1:]
    steps = curve["accuracy"].diff().iloc[1:] / curve["n_labels"].diff().iloc[1:] * 100
    assert gains.to_numpy() == pytest.approx(steps.to_numpy())
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Annotation efficiency" in page and "gain_per_unit_cost" in page

    # The preferences artifact is a SOURCE too; without --label-cost there are no cost columns.
    store = Store.open(sqlite_workspace)
    (pref,) = store.find(kind="preferences")
    store.close()
    run("quality", "report", pref.id, "--out", tmp_path / "rep2", "--quiet")
    plain = pd.read_csv(tmp_path / "rep2" / "annotation_efficiency.csv")
    assert "cost" not in plain.columns and plain["accuracy"].tolist() == curve["accuracy"].tolist()


def test_report_on_a_judgments_file_without_texts_says_why_there_is_no_curve(exported, tmp_path):
    run, _ = exported
    run("annotate", "export", "eff", "--as", "judgments", "--out", tmp_path / "j.jsonl")
    out = run("quality", "report", tmp_path / "j.jsonl", "--out", tmp_path / "rep")
    assert "No annotation-efficiency table" in out and "j.jsonl has no prompt" in out
    assert not (tmp_path / "rep" / "annotation_efficiency.csv").exists()
    assert "No annotation-efficiency table" in (tmp_path / "rep" / "report.html").read_text()
