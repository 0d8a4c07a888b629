"""`alignflow.evaluate.policies`: the evaluation summary derived by hand on small arrays, and the page."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.evaluate import stats
from alignflow.evaluate.policies import Condition, render_html, summarize, summary_rows, verdicts

# 4 prompts x 2 samples. Per-prompt means: base [0.5, 0.5, 0.0, 1.0], new [1.0, 0.5, 0.5, 0.0].
BASE = np.array([[0.0, 1.0], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0]])
NEW = np.array([[1.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])
LENGTHS = np.array([[1, 2], [3, 4], [5, 6], [7, 100]])


def conditions() -> list[Condition]:
    return [
        Condition("base", 1.0, BASE, LENGTHS),
        Condition("new", 1.0, NEW, LENGTHS),
        Condition("base", 0.0, BASE[:, :1], LENGTHS[:, :1]),
        Condition("new", 0.0, NEW[:, :1], LENGTHS[:, :1]),
    ]


def test_summary_by_hand() -> None:
    s = summarize(conditions(), baseline="base", n_boot=500, seed=3)
    base, new, base0, new0 = s["results"]
    assert base["per_prompt_score"] == [0.5, 0.5, 0.0, 1.0] and new["per_prompt_score"] == [
        1.0,
        0.5,
        0.5,
        0.0,
    ]
    assert base["score"]["mean"] == 0.5 and new["score"]["mean"] == 0.5
    assert "vs_baseline" not in base and "vs_baseline" not in base0
    # Paired by prompt: wins on prompts 0 and 2, a tie on 1, a loss on 3 -> (1 + 0.5 + 1 + 0) / 4.
    vs = new["vs_baseline"]
    assert vs["win_rate"]["rate"] == 0.625 and vs["diff"]["mean"] == 0.0
    assert (vs["win_rate"]["rate"], vs["win_rate"]["lo"], vs["win_rate"]["hi"]) == stats.win_rate(
        [1.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 1.0], n_boot=500, seed=3
    )
    # Greedy rows are compared with the greedy baseline: base0 [0, .5, 0, 1], new0 [1, .5, 1, 0].
    assert new0["vs_baseline"]["diff"]["mean"] == pytest.approx(0.25)
    assert new0["vs_baseline"]["win_rate"]["rate"] == 0.625
    # Lengths: mean of per-prompt means (1.5 + 3.5 + 5.5 + 53.5) / 4; median, p90, max over all 8 responses.
    ln = new["length"]
    assert ln["mean"] == 16.0 and ln["median"] == 4.5 and ln["max"] == 100.0 and ln["min"] == 1.0
    assert ln["p90"] == pytest.approx(np.quantile(LENGTHS.reshape(-1), 0.9))
    assert ln["lo"] <= ln["mean"] <= ln["hi"]
    assert new["samples_per_prompt"] == 2 and new0["samples_per_prompt"] == 1 and s["confidence"] == 0.95


def test_rows_verdicts_and_page() -> None:
    s = summarize(conditions(), baseline="base", n_boot=200)
    rows = summary_rows(s)
    assert [r["T"] for r in rows] == ["1", "1", "greedy", "greedy"]
    assert rows[0]["Δ vs base"] == "baseline" and rows[1]["win rate vs base"].startswith("0.62 [")
    assert len(verdicts(s)) == 2 and verdicts(s)[1].startswith(
        "new is not distinguishable from base on score (greedy)"
    )
    page = render_html(
        s,
        "Eval <x>",
        lengths={f"{c.policy}@{c.temperature:g}": c.lengths.reshape(-1).tolist() for c in conditions()},
        samples=[
            {"prompt": "<b>p</b>", "policy": "new", "temperature": 1.0, "response": "r & s", "score": 0.5}
        ],
    )
    assert "<title>Eval &lt;x&gt;</title>" in page and "&lt;b&gt;p&lt;/b&gt;" in page and "r &amp; s" in page
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        summarize([Condition("a", 1.0, BASE, LENGTHS), Condition("b", 1.0, BASE[:2], LENGTHS[:2])])
    with pytest.raises(ValueError, match="baseline 'zzz' is not among"):
        summarize(conditions(), baseline="zzz")
    with pytest.raises(ValueError, match="one shape"):
        Condition("a", 1.0, BASE, LENGTHS[:, :1])
    # Without a baseline there is nothing to compare.
    assert all("vs_baseline" not in r for r in summarize(conditions())["results"])
