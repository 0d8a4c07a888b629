"""The quickstart report's side-by-side decodings and per-dimension table, and quiet model loads (fast: no
pipeline run; `test_quickstart.py` checks the same on a real run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignflow.domains import support
from alignflow.evaluate.report import decoding_rows, dimension_rows, render_html

DIMS = ("utility", *support.DIMENSIONS)


def _ci(mean: float) -> dict[str, float]:
    return {"mean": mean, "lo": mean - 0.01, "hi": mean + 0.01, "n": 10}


def _decoding(sft: float, ppo: float) -> dict:
    return {
        "policies": {"sft": _ci(sft), "ppo": _ci(ppo)},
        "diffs": {"ppo": _ci(ppo - sft)},
        "win_rates": {"ppo": {"rate": 0.6, "lo": 0.5, "hi": 0.7}},
    }


def test_decoding_rows_put_sampled_and_greedy_side_by_side() -> None:
    rows = decoding_rows({"sampled": _decoding(0.46, 0.60), "greedy": _decoding(0.73, 0.70)}, "sft")
    assert [r["policy"] for r in rows] == ["sft", "ppo"]
    ppo = rows[1]
    assert ppo["gold utility, sampled"] == "0.600 [0.590, 0.610]"
    assert ppo["Δ vs sft, sampled"] == "+0.140 [+0.130, +0.150]"
    assert ppo["Δ vs sft, greedy"] == "-0.030 [-0.040, -0.020]"
    assert ppo["win rate vs sft, greedy"] == "0.60 [0.50, 0.70]"
    assert rows[0]["Δ vs sft, greedy"] == "—"  # the baseline has no gain over itself


def test_dimension_rows_one_row_per_policy_and_decoding() -> None:
    means = {d: 0.5 for d in DIMS}
    by = {dec: {p: dict(means, accuracy=0.1 * i) for i, p in enumerate(("sft", "ppo", "dpo"))}
          for dec in ("sampled", "greedy")}  # fmt: skip
    rows = dimension_rows(by)
    assert [(r["policy"], r["decoding"]) for r in rows] == [
        (p, d) for p in ("sft", "ppo", "dpo") for d in ("sampled", "greedy")
    ]
    assert all(set(DIMS) <= set(r) for r in rows)
    assert rows[2]["accuracy"] == pytest.approx(0.1)


def test_page_shows_both_decodings_and_the_dimension_table() -> None:
    by = {dec: {p: {d: 0.5 for d in DIMS} for p in ("sft", "ppo")} for dec in ("sampled", "greedy")}
    page = render_html(
        {
            "title": "t",
            "summary_rows": decoding_rows(
                {"sampled": _decoding(0.4, 0.5), "greedy": _decoding(0.7, 0.8)}, "sft"
            ),
            "dimensions": dimension_rows(by),
        }
    )
    assert 'id="dimensions"' in page
    for col in ("Δ vs sft, sampled", "Δ vs sft, greedy", *DIMS):
        assert f">{col}</th>" in page, col


def test_model_loads_and_saves_draw_no_transformers_progress_bar(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from alignflow.models import load_policy, load_reward_model, make_tiny_model_dir

    hf_logging.enable_progress_bar()
    model_dir = make_tiny_model_dir(tmp_path / "m", vocab_size=300, hidden_size=32, num_layers=1)
    assert "Writing model shards" not in capfd.readouterr().err
    AutoModelForCausalLM.from_pretrained(str(model_dir))  # transformers' own load: its bar, as before
    assert "Loading weights" in capfd.readouterr().err

    load_policy(model_dir, dtype="float32")
    load_reward_model(model_dir, dtype="float32")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored after our loads
