"""comparison_rows and ci_text: the summary table a policy comparison prints."""

from __future__ import annotations

from alignflow.evaluate.report import ci_text, comparison_rows


def test_ci_text_formats():
    assert ci_text(0.5, 0.4812, 0.52) == "0.500 [0.481, 0.520]"
    assert ci_text(0.04, -0.01, 0.09, signed=True) == "+0.040 [-0.010, +0.090]"
    assert ci_text(0.625, 0.5, 0.75, digits=2) == "0.62 [0.50, 0.75]"


def test_comparison_rows_baseline_first_then_differences():
    policies = {"sft": {"mean": 0.5, "lo": 0.45, "hi": 0.55}, "ppo": {"mean": 0.62, "lo": 0.58, "hi": 0.66}}
    diffs = {"ppo": {"mean": 0.12, "lo": 0.08, "hi": 0.16}}
    wins = {"ppo": {"rate": 0.71, "lo": 0.64, "hi": 0.78}}
    rows = comparison_rows(policies, diffs, wins, "sft", metric="score")
    assert rows == [
        {"policy": "sft", "score": "0.500 [0.450, 0.550]"},
        {
            "policy": "ppo",
            "score": "0.620 [0.580, 0.660]",
            "Δ vs sft": "+0.120 [+0.080, +0.160]",
            "win rate vs sft": "0.71 [0.64, 0.78]",
        },
    ]
