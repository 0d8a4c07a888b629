"""Reward-model recipe through the real CLI: learning, pinned steps, rankings, ensembles, scorer, calibration.

The calibration and accuracy arithmetic is tested by hand in ``tests/evaluate/test_reward.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignflow.models import make_tiny_encoder_dir

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
    from alignflow.errors import DataFormatError
    from alignflow.models.reward import load_reward_scorer, read_ensemble
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


# ---------------------------------------------------------------------------------------------------------------------
# encoder backbone: pooling, whole responses, temperature scaling, label smoothing


def test_fit_lengths_keep_completion_cuts_only_the_prompt() -> None:
    from alignflow.data.encode import fit_lengths

    # budget 20: the default gives the prompt half (10) and cuts the 15-token completion to 10.
    assert fit_lengths(30, 15, 20, None) == (10, 10)
    # keep_completion: the completion whole (15), the prompt the rest (5), from the left.
    assert fit_lengths(30, 15, 20, None, keep_completion=True) == (5, 15)
    assert fit_lengths(30, 15, 20, 3, keep_completion=True) == (3, 15)  # max_prompt still caps the prompt
    # A completion longer than the budget is cut, and the prompt keeps its last budget // 8 = 2 tokens.
    assert fit_lengths(30, 40, 20, None, keep_completion=True) == (2, 18)
    assert fit_lengths(0, 40, 20, None, keep_completion=True) == (0, 20)
    assert fit_lengths(5, 5, 20, None, keep_completion=True) == (5, 5)


def test_pooled_reward_model_means_by_hand(tmp_path: Path) -> None:
    from alignflow.models import load_reward_model
    from alignflow.models.reward import PooledRewardModel, unwrap_pooling, with_pooling

    model = load_reward_model(
        make_tiny_encoder_dir(tmp_path / "bert"), dtype="float32", pad_token_id=0
    ).eval()
    ids = torch.tensor([[101, 7, 8, 102, 9, 102, 0], [101, 7, 102, 9, 10, 11, 102]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]])
    hidden = model.base_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for pooling, m in (("mean", mask), ("response_mean", mask * types)):
        pooled = with_pooling(model, pooling)
        assert isinstance(pooled, PooledRewardModel) and unwrap_pooling(pooled) is model
        want = model.classifier((hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        got = pooled(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(got, want)
    assert with_pooling(model, "cls") is model


def test_encoder_rm_defaults_mean_pooling_whole_responses_and_temperature(
    cli, toy_data, tmp_path: Path
) -> None:
    from alignflow.data.encode import rows_to_pairs, split_by_prompt
    from alignflow.models.reward import ensemble_scores, load_reward_models, load_reward_scorer
    from alignflow.recipes.reward import calibration_split

    out = tmp_path / "run"
    model = make_tiny_encoder_dir(tmp_path / "bert")
    cfg = base_config(
        "rm", model, toy_data["pairs"], out, temperature={"fraction": 0.3}, train={"max_steps": 4}
    )
    cfg["model"]["backbone"] = "encoder"
    cfg = write_config(tmp_path / "rm.yaml", cfg)
    res = cli("rm", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"] == {"pooling": "mean", "keep_response": True, "calibration_fraction": 0.3}
    n_cal = summary["calibration_pairs"]
    assert n_cal > 0 and summary["train_pairs"] + summary["eval_pairs"] + n_cal == 48
    m = summary["metrics"]
    t = m["calibration/temperature"]
    assert t > 0 and 0 <= m["eval/ece_calibrated"] <= 1 and m["eval/accuracy"] >= 0
    rel = json.loads((out / "reliability.json").read_text())
    assert (
        rel["temperature"] == t and sum(b["count"] for b in rel["bins_calibrated"]) == summary["eval_pairs"]
    )
    spec = json.loads((out / "final" / "ensemble.json").read_text())
    assert (spec["pooling"], spec["keep_completion"], spec["temperature"]) == ("mean", True, t)

    # The calibration split is prompt-disjoint from train and eval.
    rows = [json.loads(x) for x in toy_data["pairs"].read_text().splitlines()]
    train, held = split_by_prompt(rows_to_pairs(rows, "pairs"), 0.25, lambda p: p.prompt)
    train, calib = calibration_split(train, 0.3)
    assert len(calib) == n_cal and len(held) == summary["eval_pairs"]
    assert not {p.prompt for p in calib} & ({p.prompt for p in train} | {p.prompt for p in held})

    # The scorer divides the members' raw (mean-pooled) rewards by T.
    scorer = load_reward_scorer(out / "final")
    prompts, responses = ["How did she respond to request 99? "] * 2, ["politely.", "badly."]
    mean, _ = scorer(prompts, responses)
    raw, _ = ensemble_scores(load_reward_models(out / "final").members, scorer._batches(prompts, responses))
    torch.testing.assert_close(mean, raw / t)


def test_rm_label_smoothing_targets(cli, tiny_model, toy_data, tmp_path: Path, monkeypatch) -> None:
    from alignflow.recipes import reward

    seen = []
    real = reward.bradley_terry_loss

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["soft_labels"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reward, "bradley_terry_loss", spy)
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "rm.yaml", base_config("rm", tiny_model, toy_data["pairs"], out, train={"max_steps": 2})
    )
    res = cli("rm", cfg, "loss.label_smoothing=0.1")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen and all(torch.allclose(t, torch.full_like(t, 0.9)) for t in seen)


@pytest.mark.parametrize("variant", ["full", "lora_ensemble"])
def test_rm_heads_report_held_out_accuracy_per_dimension(
    cli, tiny_model, tmp_path: Path, variant: str
) -> None:
    """heads: [overall, tone] on pairs whose `tone` label disagrees with the overall preference on odd rows:
    the held-out metrics name the tone head's accuracy and the overall head's on the same pairs. With LoRA and
    an ensemble of two, each merged member keeps both heads and the scorer returns both."""
    from alignflow.models.reward import load_reward_scorer

    rows = toy.pair_rows(48)
    for i, r in enumerate(rows):
        r["labels"] = {"tone": 0.0 if i % 2 else 1.0}
    data = toy.write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    extra = {"lora": {"enabled": True, "r": 4}, "ensemble": {"size": 2}} if variant == "lora_ensemble" else {}
    cfg = base_config("rm", tiny_model, data, out, heads=["overall", "tone"], train={"max_steps": 4}, **extra)
    res = cli("rm", write_config(tmp_path / "rm.yaml", cfg))
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    spec = json.loads((out / "final" / "ensemble.json").read_text())
    assert spec["heads"] == ["overall", "tone"]
    n_eval = json.loads((out / "summary.json").read_text())["eval_pairs"]
    assert metrics["eval/head/tone/pairs"] == n_eval
    for key in ("eval/head/tone/accuracy", "eval/head/tone/overall_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0 and spec["eval"][key] == metrics[key]
    mean, std = load_reward_scorer(out / "final").score_heads(["Reply 1: "] * 3, ["a", "b", "c"])
    assert mean.shape == std.shape == (3, 2)
    assert bool((std > 0).all()) == (variant == "lora_ensemble")
