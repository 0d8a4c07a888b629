"""PPO's live monitoring through the real `alignflow ppo` CLI on a tiny Llama: held-out signals (gold, judge,
held-out pairs), sample tables, `reward.aggregate`, `checkpoint.best_metric` on a held-out metric with best-k
retention, and a `stop` alert that leaves a resumable checkpoint and the best one marked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import base_config, read_metrics, write_config
from .test_ppo import ppo_config, run_cli

GOLD = "alignflow.rollout.toy:brevity"
# Only `latest` and the best-k survive: nothing is kept for being recent, hourly or daily.
NO_TIME_RETENTION = {"keep_recent_minutes": 0, "keep_hourly_for_hours": 0, "keep_daily": False}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_heldout_signals_samples_and_best_k(cli, tiny_model, toy_data, tmp_path):
    run_dir = tmp_path / "heldout"
    cfg = ppo_config(
        tiny_model,
        toy_data["sft"],
        run_dir,
        data={"eval_fraction": 0.3},
        monitor={
            "every": 1,
            "score_fn": GOLD,
            "num_prompts": 4,
            "judge_models": [str(tiny_model)],  # a fresh score head: a judge the policy never trained on
            "heldout_pairs": str(toy_data["pairs"]),
            "num_pairs": 12,
            "alerts": {"enabled": False},
        },
        tracking={"samples_every": 2},
        checkpoint={"best_metric": "heldout/gold", "best_mode": "max", "keep_best": 2, **NO_TIME_RETENTION},
        train={"seed": 0, "steps": 5, "save_every": 0},
    )
    out = run_cli(cli, tmp_path, cfg)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r["heldout/gold"] == r["monitor/score"]
        assert 0.0 <= r["heldout/rm_accuracy"] <= 1.0 and 0.0 <= r["heldout/rm_ece"] <= 0.5
        assert "heldout/judge_reward" in r
    # the judge scores each step's own held-out responses: it moves as the policy does
    assert len({r["heldout/judge_reward"] for r in rows}) > 1

    # sample tables every 2 steps: the training batch's prompt, response, reward and KL
    for step in (2, 4):
        samples = [
            json.loads(x) for x in (run_dir / "samples" / f"step-{step}.jsonl").read_text().splitlines()
        ]
        assert len(samples) == 16 and {"prompt", "response", "reward", "kl"} <= set(samples[0])
        assert sum(s["reward"] for s in samples) / 16 == pytest.approx(
            rows[step - 1]["reward/raw_mean"], 1e-5
        )
    assert not (run_dir / "samples" / "step-3.jsonl").exists()

    # best-k by heldout/gold (logged every step, saved whenever it entered the top 2) + latest (step 5)
    gold = {r["step"]: r["heldout/gold"] for r in rows}
    ranked = sorted(gold, key=lambda s: (-gold[s], s))
    assert set(_steps(run_dir)) == set(ranked[:2]) | {5}
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "best").read_text().strip() == f"step-{ranked[0]:06d}"
    best = json.loads((ckpts / "best.json").read_text())
    assert [b["step"] for b in best["best"]] == ranked[:2] and best["metric"] == "heldout/gold"
    assert out["metrics"]["heldout/gold"] > 0


def test_reward_aggregate_min_mean_minus_std_and_deprecated_alias(cli, tiny_model, toy_data, tmp_path):
    # Two loads of the tiny model get two different fresh score heads: a 2-member ensemble. With two members
    # the population std is |a - b| / 2, so mean - 1 * std is exactly their min.
    first: dict[str, float] = {}
    spread: dict[str, float] = {}
    for agg in ("mean", "min", "mean_minus_std"):
        run_dir = tmp_path / agg
        cfg = ppo_config(
            tiny_model,
            toy_data["sft"],
            run_dir,
            reward={"fn": None, "models": [str(tiny_model), str(tiny_model)], "aggregate": agg, "k": 1.0},
            rollout={"batch_size": 4, "num_generations": 2, "max_new_tokens": 8},
            advantage={"estimator": "rloo"},
            train={"seed": 0, "steps": 1},
        )
        run_cli(cli, tmp_path, cfg)
        first[agg] = read_metrics(run_dir)[0]["reward/raw_mean"]  # step 1: the same rollouts in all three
        spread[agg] = read_metrics(run_dir)[0]["reward/ensemble_std"]
    assert first["min"] < first["mean"]
    # the logged disagreement is that population std: mean - min of two members, per row, averaged
    assert spread["mean"] == pytest.approx(first["mean"] - first["min"], abs=1e-6) == spread["min"]
    assert first["mean_minus_std"] == pytest.approx(first["min"], abs=1e-6)

    # reward.ensemble_k stays the deprecated alias with its old arithmetic; both at once is a config error
    cfg = ppo_config(
        tiny_model,
        toy_data["sft"],
        tmp_path / "both",
        reward={"fn": None, "models": [str(tiny_model)], "aggregate": "min", "ensemble_k": 1.0},
    )
    res = cli("ppo", write_config(tmp_path / "both.yaml", cfg))
    assert res.exit_code != 0 and "reward.k=1.0 instead of ensemble_k" in str(res.exception) + res.output
    res = cli(
        "ppo",
        write_config(tmp_path / "fn.yaml", ppo_config(tiny_model, toy_data["sft"], tmp_path / "f")),
        "reward.aggregate=min",
    )
    assert res.exit_code != 0 and "needs reward.models" in str(res.exception) + res.output
    res = cli("ppo", tmp_path / "fn.yaml", f"monitor.judge_models=[{tiny_model}]")
    assert res.exit_code != 0 and "monitor.every" in str(res.exception) + res.output


def test_stop_alert_leaves_resumable_checkpoint_and_best_marked(cli, tiny_model, toy_data, tmp_path):
    run_dir = tmp_path / "stop"
    stop_rule = {
        "rule": "kl_ceiling",
        "metric": "kl/seq_sum_mean",
        "threshold": 1e-3,  # far below what lr=3e-3 reaches after two updates: it must fire
        "warmup": 2,
        "cooldown": 0,
        "severity": "critical",
        "actions": ["store", "stop"],
    }
    cfg: dict[str, Any] = ppo_config(
        tiny_model,
        toy_data["sft"],
        run_dir,
        data={"eval_fraction": 0.3},
        monitor={"every": 1, "score_fn": GOLD, "num_prompts": 4, "alerts": {"rules": [stop_rule]}},
        checkpoint={"best_metric": "heldout/gold", "best_mode": "max", **NO_TIME_RETENTION},
        train={"seed": 0, "steps": 8, "save_every": 0},
    )
    path = write_config(tmp_path / "stop.yaml", cfg)
    res = cli("ppo", path)
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    found = re.search(r"stopped at step (\d+)", res.output)
    assert found, res.output
    stopped = int(found.group(1))
    assert 3 <= stopped < 8
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == stopped and rows[-1]["kl/seq_sum_mean"] > 1e-3
    # resumable: the stop step is checkpointed and `latest`; the best by heldout/gold so far is marked
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{stopped:06d}"
    gold = {r["step"]: r["heldout/gold"] for r in rows}
    best_step = min(gold, key=lambda s: (-gold[s], s))
    assert (ckpts / "best").read_text().strip() == f"step-{best_step:06d}"
    assert best_step in _steps(run_dir)

    # the same command without the alert resumes from the stop step and completes
    res = cli("ppo", path, "monitor.alerts.enabled=false")
    assert res.exit_code == 0, res.output
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == [*range(1, stopped + 1), *range(stopped + 1, 9)]
    assert "best_checkpoint" in json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_best_metric_names_an_eval_metric_in_sft_and_dpo(cli, tiny_model, toy_data, tmp_path, stage):
    run_dir = tmp_path / stage
    cfg = base_config(
        stage,
        tiny_model,
        toy_data["sft" if stage == "sft" else "pairs"],
        run_dir,
        train={"seed": 0, "batch_size": 8, "max_steps": 6, "eval_every": 1, "save_every": 0},
        checkpoint={"best_metric": "eval/loss", "best_mode": "min", **NO_TIME_RETENTION},
    )
    res = cli(stage, write_config(tmp_path / f"{stage}.yaml", cfg))
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    evals = {
        int(r["step"]): r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r and r["step"] < 6
    }
    best = min(evals, key=lambda s: (evals[s], s))
    assert (run_dir / "checkpoints" / "best").read_text().strip() == f"step-{best:06d}"
    assert set(_steps(run_dir)) == {best, 6}
