"""The benchmark harness compares like with like: alignflow's recipes and TRL's trainers, from the same saved
weights on the same single batch, produce the same losses for several optimizer steps (so the same loss, the
same gradients and the same AdamW update). Plus the harness arithmetic (warm-up exclusion, MFU, the table).

No timing is asserted anywhere here; the throughput figures live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _trl_common as H  # noqa: E402
import bench_trl_dpo  # noqa: E402
import bench_trl_rm  # noqa: E402
import bench_trl_sft  # noqa: E402
import run_all  # noqa: E402

pytestmark = pytest.mark.skipif(not H.HH.is_file(), reason=f"{H.HH} (shared HH data) is missing")

BATCH = 4
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> H.Assets:
    return H.build_assets(tmp_path_factory.mktemp("bench"), H.TINY_TEST, max_length=128, n_rows=300)


@pytest.fixture(scope="module")
def store(assets: H.Assets) -> Any:
    return H.alignflow_store(assets.root)


def _check(result: dict[str, Any]) -> None:
    af, trl = result["alignflow"], result["trl"]
    assert len(af) == len(trl) == STEPS
    assert all(math.isfinite(x) for x in af + trl)
    assert result["max_abs_diff"] < 1e-4, result
    # The steps differ from each other, so the agreement covers the updates, not only the initial forward.
    assert abs(af[-1] - af[0]) > 1e-4


def test_assets_token_ids_agree_with_trl_tokenisation(assets: H.Assets) -> None:
    """Kept examples encode the same under alignflow's encoder and TRL's single-string tokenisation."""
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.policy_dir))
    enc = H.encode_pairs(assets, assets.pairs[:20])
    assert len(assets.pairs) >= 20
    for row, e in zip(assets.pairs[:20], enc, strict=True):
        text = tok.bos_token + row["prompt"] + row["chosen"] + tok.eos_token
        assert e["chosen_ids"] == list(tok(text)["input_ids"])
        assert len(e["chosen_ids"]) <= assets.max_length
        assert e["chosen_ids"][0] == tok.bos_token_id and e["chosen_ids"][-1] == tok.eos_token_id


def test_sft_losses_match_trl_sfttrainer_with_packing(assets: H.Assets, store: Any) -> None:
    _check(bench_trl_sft.loss_check(assets, store, BATCH, STEPS))


def test_reward_losses_match_trl_rewardtrainer(assets: H.Assets, store: Any) -> None:
    _check(bench_trl_rm.loss_check(assets, store, BATCH, STEPS))


def test_dpo_losses_match_trl_dpotrainer_with_precomputed_reference(assets: H.Assets, store: Any) -> None:
    result = bench_trl_dpo.loss_check(assets, store, BATCH, STEPS)
    _check(result)
    # Policy == reference at step 1: the sigmoid DPO loss is exactly log 2 on both sides.
    assert result["alignflow"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert result["trl"][0] == pytest.approx(math.log(2), abs=1e-6)


def test_measured_excludes_warmup_and_weights_by_time() -> None:
    m = H.Measured("x", "u/s")
    # Warm-up (100 s for 1 unit) is dropped; then 30 units in 2 s + 10 units in 2 s = 10 u/s, not mean(15, 5).
    assert m.add([(100.0, 1.0), (2.0, 30.0), (2.0, 10.0)]) == pytest.approx(10.0)
    m.add([(1.0, 1.0), (1.0, 2.0)])
    m.add([(9.0, 9.0), (1.0, 4.0)])
    assert m.runs == [10.0, 2.0, 4.0] and m.median == 4.0
    with pytest.raises(ValueError, match="no timed steps"):
        m.add([(1.0, 1.0)])


def test_counting_collator_records_in_build_order() -> None:
    c = H.CountingCollator(lambda xs: {"n": sum(xs)}, lambda b: b["n"])
    assert c([1, 2]) == {"n": 3}
    c([5])
    assert c.counts == [3, 5]


def test_mfu_is_six_n_tokens_over_peak() -> None:
    # 10M params x 1,000 tokens/s x 6 = 60 GFLOP/s of 120 GFLOP/s peak = 50 %.
    assert H.mfu(10_000_000, 1_000.0, 120e9) == pytest.approx(0.5)


def test_model_size_param_count_matches_the_built_model() -> None:
    from alignflow.models.tiny import tiny_llama

    s = H.TINY_TEST
    model = tiny_llama(s.vocab, s.hidden, s.layers, s.heads, intermediate_size=s.intermediate)
    assert s.num_params() == sum(p.numel() for p in model.parameters())


def test_comparison_table_ratios_goals_and_mfu() -> None:
    size = {"vocab": 100, "hidden": 10}
    results = [
        {
            "name": "sft",
            "title": "SFT",
            "unit": "tokens/s",
            "alignflow": [120.0, 130.0, 110.0],
            "trl": [100.0, 100.0, 90.0],
            "tokens_per_unit": 1.0,
            "n_params_matmul": 1_000_000,
            "size": size,
            "loss_check": {"alignflow": [1.0, 0.9], "trl": [1.0, 0.9], "max_abs_diff": 2e-7},
        },
        {
            "name": "ppo",
            "title": "PPO",
            "unit": "episodes/s",
            "alignflow": [3.0],
            "trl": [2.0],
            "tokens_per_unit": None,
            "n_params_matmul": 1_000_000,
            "size": size,
        },
    ]
    table, checks = run_all.comparison_table(results, peak=6e9)
    sft_row, ppo_row = table.splitlines()[2:4]
    assert "**1.20×**" in sft_row and "≥ 1.2× met" in sft_row
    assert "12.0% / 10.0%" in sft_row  # 6 x 1M x 120 (resp. 100) tokens/s / 6 GFLOP/s
    assert "**1.50×**" in ppo_row and "≥ 2.0× MISSED" in ppo_row
    assert "2.0e-07" in checks[0]
    assert "–" in ppo_row  # no MFU for the sampling-bound RL rows
