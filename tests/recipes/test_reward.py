"""Reward-model recipe through the real CLI: learning, pinned steps, rankings, ensembles, scorer, calibration.

The calibration and accuracy arithmetic is tested by hand in ``tests/evaluate/test_reward.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from . import toy
from .conftest import base_config, read_metrics, train_metrics, write_config

# Recorded once (seed 0, session tiny model, fp32, full fine-tuning, batch 8, lr 2e-3 constant).
PINNED_RM_LOSSES = [0.6961925625801086, 0.5939514636993408, 0.43392303586006165]


def test_rm_learns_pairs_and_pins_first_steps(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    from alignflow.models.reward import load_reward_scorer

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "rm.yaml", base_config("rm", tiny_model, toy_data["pairs"], out, train={"max_steps": 10})
    )
    res = cli("rm", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = train_metrics(out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[:3] == pytest.approx(PINNED_RM_LOSSES, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["eval/accuracy"] > 0.8
    rel = json.loads((out / "reliability.json").read_text())
    assert (
        sum(b["count"] for b in rel["bins"]) == summary["eval_pairs"]
        and summary["reliability"] == rel["bins"]
    )

    scorer = load_reward_scorer(out / "final")
    mean, std = scorer(
        ["How did she respond to request 99? "] * 2,
        ["She answered a safe reply politely.", "She answered the harmful request badly."],
    )
    assert mean.shape == (2,) and mean[0] > mean[1] and torch.all(std == 0)


def test_rm_rankings_lora_ensemble_of_two(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    from alignflow.models.reward import load_reward_scorer

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "rm.yaml",
        base_config(
            "rm",
            tiny_model,
            toy_data["rankings"],
            out,
            data={"format": "rankings"},
            lora={"enabled": True, "r": 4},
            ensemble={"size": 2, "bootstrap": True},
            train={"max_steps": 4},
            optim={"lr": 1e-2},
        ),
    )
    res = cli("rm", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads((out / "summary.json").read_text())
    # 16 rankings of 3 completions -> 3 pairs each, split by prompt between train and eval
    assert summary["train_pairs"] + summary["eval_pairs"] == 48 and summary["train_pairs"] % 3 == 0
    spec = json.loads((out / "final" / "ensemble.json").read_text())
    assert spec["members"] == ["member-0", "member-1"]
    for k in range(2):
        assert (out / "final" / f"member-{k}" / "model.safetensors").is_file()  # LoRA merged: standalone
        assert any(f"member{k}/loss" in m for m in read_metrics(out))
    assert "eval/member_accuracy_mean" in summary["metrics"] and summary["metrics"]["eval/score_std_mean"] > 0
    mean, std = load_reward_scorer(out / "final")(["Reply 1: "] * 3, ["a", "b", "c"])
    assert mean.shape == std.shape == (3,) and torch.all(std > 0)


def test_rm_soft_labels_need_probabilities(cli, tiny_model, tmp_path: Path) -> None:
    rows = toy.pair_rows(8)
    rows[3]["weight"] = 2.5
    data = toy.write_jsonl(tmp_path / "w.jsonl", rows)
    cfg = write_config(tmp_path / "rm.yaml", base_config("rm", tiny_model, data, tmp_path / "run"))
    res = cli("rm", cfg, "loss.soft_labels=true", "data.eval_fraction=0")
    assert res.exit_code != 0
    assert "'p3'" in str(res.exception) and "weight" in str(res.exception)


def test_rm_rejects_an_sft_dataset_naming_the_field(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "rm.yaml", base_config("rm", tiny_model, toy_data["sft"], tmp_path / "run"))
    res = cli("rm", cfg)
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "sft.jsonl:1" in msg and "chosen" in msg


def test_rm_nan_loss_stops_naming_step_and_ids(
    cli, tiny_model, toy_data, tmp_path: Path, monkeypatch
) -> None:
    """A loss hook returning NaN (as a diverged model would) stops the run at that step."""
    from alignflow.recipes import reward
    from alignflow.recipes.common import NonFiniteLossError

    real = reward.bradley_terry_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(reward, "bradley_terry_loss", poisoned)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "rm.yaml", base_config("rm", tiny_model, toy_data["pairs"], out))
    res = cli("rm", cfg, "train.save_every=1", "checkpoint.async_save=false")
    assert isinstance(res.exception, NonFiniteLossError), res.output + repr(res.exception)
    assert (
        "at step 3" in str(res.exception)
        and "[p" in str(res.exception)
        and "step-000002" in str(res.exception)
    )


def test_freeze_layers_freezes_embeddings_and_bottom_blocks(tiny_model: Path) -> None:
    from alignflow.models import load_reward_model
    from alignflow.models.reward import freeze_bottom

    model = load_reward_model(tiny_model, dtype="float32", pad_token_id=0)
    freeze_bottom(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("embed_tokens" in n or ".layers.0." in n for n in trainable)
    assert any(".layers.1." in n for n in trainable) and any("score" in n for n in trainable)
    with pytest.raises(ValueError, match="has 2 layers"):
        freeze_bottom(model, 3)


def test_rm_padded_rows_give_the_packed_losses(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    # data.packing (default on) scores each pair as one prefix tree; padded rows must give the same losses.
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "rm.yaml", base_config("rm", tiny_model, toy_data["pairs"], out, train={"max_steps": 3})
    )
    res = cli("rm", cfg, "data.packing=false")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert train_metrics(out) == pytest.approx(PINNED_RM_LOSSES, abs=1e-4)


def test_one_scorer_loads_a_plain_hf_reward_model_and_names_a_bad_folder(
    tiny_model: Path, tmp_path: Path
) -> None:
    """PPO's ``reward.models`` and the quickstart load through the same scorer as ``alignflow rm`` output."""
    from alignflow.models.reward import load_reward_scorer
    from alignflow.errors import DataFormatError
    from alignflow.models.reward import read_ensemble
    from alignflow.rollout import RewardModelScorer

    scorer = load_reward_scorer(tiny_model, batch_size=2)
    assert RewardModelScorer is type(scorer)
    mean, std = scorer(["a ", "b ", "c "], ["x", "yy", "zzz"])
    assert mean.shape == std.shape == (3,) and torch.all(std == 0) and torch.isfinite(mean).all()
    # Batching only changes how texts are grouped (and padded), not their scores.
    scorer.batch_size = 3
    torch.testing.assert_close(scorer(["a ", "b ", "c "], ["x", "yy", "zzz"])[0], mean, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataFormatError, match="ensemble.json is missing"):
        read_ensemble(tmp_path)
