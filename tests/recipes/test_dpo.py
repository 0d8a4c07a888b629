"""DPO recipe through the real CLI: held-out margin and accuracy rise, pinned steps, reference cache, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import base_config, read_metrics, train_metrics, write_config

# Recorded once (seed 0, session tiny model, fp32, full fine-tuning, sigmoid loss beta 0.1, batch 8,
# lr 2e-3 constant, precomputed reference log-probs).
PINNED_DPO_LOSSES = [0.6931473016738892, 0.5376094579696655, 0.392485648393631]


def test_dpo_raises_heldout_margin_and_accuracy(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "dpo.yaml", base_config("dpo", tiny_model, toy_data["pairs"], out, train={"max_steps": 8})
    )
    res = cli("dpo", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = train_metrics(out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[:3] == pytest.approx(PINNED_DPO_LOSSES, abs=1e-4)
    m = json.loads((out / "summary.json").read_text())["metrics"]
    # before training the policy IS the reference: margin ~0, and the held-out accuracy is low
    assert abs(m["eval_initial/rewards/margin"]) < 1e-4
    assert m["eval/rewards/margin"] > m["eval_initial/rewards/margin"] + 0.5
    assert m["eval/rewards/accuracy"] >= 0.9 > m["eval_initial/rewards/accuracy"]
    assert m["eval/rewards/chosen"] > m["eval/rewards/rejected"]

    # the reference log-probs were cached as an artifact with lineage to the pairs and the reference model
    store = Store.open(Workspace.from_env())
    summary = json.loads((out / "summary.json").read_text())
    ref_id = summary["reference_logps"]
    parents = {e["role"] for e in store.lineage(ref_id, direction="up").as_dict()["edges"]}
    assert {"pairs", "reference_model"} <= parents
    # a second run with the same inputs reuses it (no new ref_logps artifact)
    before = len(store.find(kind="ref_logps"))
    res2 = cli("dpo", cfg, f"output_dir={tmp_path / 'run2'}", "train.max_steps=1")
    assert res2.exit_code == 0, res2.output + repr(res2.exception)
    assert len(store.find(kind="ref_logps")) == before
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["reference_logps"] == ref_id
    store.close()


def test_dpo_lora_with_on_the_fly_reference(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "dpo.yaml",
        base_config(
            "dpo",
            tiny_model,
            toy_data["pairs"],
            out,
            lora={"enabled": True, "r": 4},
            reference={"precompute": False},
            optim={"lr": 1e-2},
            train={"max_steps": 5},
        ),
    )
    res = cli("dpo", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads((out / "summary.json").read_text())["metrics"]
    assert m["eval/rewards/margin"] > m["eval_initial/rewards/margin"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    first = [x for x in read_metrics(out) if x["step"] == 1][0]
    # LoRA's B matrix starts at zero, so at step 1 the policy equals its adapter-disabled reference
    assert abs(first["rewards/margin"]) < 1e-5


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo", "robust"])
def test_dpo_family_losses_run(cli, tiny_model, toy_data, tmp_path: Path, loss_type: str) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "dpo.yaml",
        base_config(
            "dpo",
            tiny_model,
            toy_data["pairs"],
            out,
            loss={"type": loss_type, "label_smoothing": 0.1 if loss_type == "robust" else 0.0},
            train={"max_steps": 3},
        ),
    )
    res = cli("dpo", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = train_metrics(out)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_dpo_rejects_an_sft_dataset(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "dpo.yaml", base_config("dpo", tiny_model, toy_data["sft"], tmp_path / "run")
    )
    res = cli("dpo", cfg)
    assert res.exit_code != 0 and "sft.jsonl:1" in str(res.exception) and "chosen" in str(res.exception)


def test_dpo_padded_rows_give_the_packed_losses(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    # data.packing (default on) shares each pair's prompt; padded rows are the plain layout: same losses.
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "dpo.yaml",
        base_config("dpo", tiny_model, toy_data["pairs"], out, train={"max_steps": 3}),
    )
    res = cli("dpo", cfg, "data.packing=false")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert train_metrics(out) == pytest.approx(PINNED_DPO_LOSSES, abs=1e-4)


def test_dpo_soft_labels_use_the_pairs_weights(cli, tiny_model, tmp_path: Path) -> None:
    """loss.soft_labels reads each pair's weight as P(chosen better): all-1 weights give plain DPO's losses,
    other weights other losses; a weight outside [0, 1] and a non-sigmoid loss are refused."""
    from . import toy

    rows = toy.pair_rows(48)
    ones = toy.write_jsonl(tmp_path / "ones.jsonl", [{**r, "weight": 1.0} for r in rows])
    soft = toy.write_jsonl(
        tmp_path / "soft.jsonl", [{**r, "weight": 0.6 if i % 2 else 0.9} for i, r in enumerate(rows)]
    )
    losses = {}
    for name, data, soft_on in (("plain", ones, False), ("ones", ones, True), ("soft", soft, True)):
        out = tmp_path / name
        cfg = base_config("dpo", tiny_model, data, out, train={"max_steps": 3}, loss={"soft_labels": soft_on})
        res = cli("dpo", write_config(tmp_path / f"{name}.yaml", cfg))
        assert res.exit_code == 0, res.output + repr(res.exception)
        losses[name] = train_metrics(out)
    assert losses["ones"] == pytest.approx(losses["plain"], abs=1e-6)
    # Step 1 is log 2 whatever the labels (policy == reference); afterwards the soft targets pull less hard.
    assert losses["soft"][0] == pytest.approx(losses["plain"][0], abs=1e-6)
    assert losses["soft"][1:] != pytest.approx(losses["plain"][1:], abs=1e-4)

    bad = toy.write_jsonl(tmp_path / "bad.jsonl", [{**r, "weight": 2.0} for r in rows])
    cfg = base_config("dpo", tiny_model, bad, tmp_path / "bad", loss={"soft_labels": True})
    res = cli("dpo", write_config(tmp_path / "bad.yaml", cfg))
    assert res.exit_code != 0 and "is not a probability" in str(res.exception)
    cfg = base_config("dpo", tiny_model, ones, tmp_path / "ipo", loss={"soft_labels": True, "type": "ipo"})
    res = cli("dpo", write_config(tmp_path / "ipo.yaml", cfg))
    assert res.exit_code != 0 and "soft_labels applies to type 'sigmoid'" in (str(res.exception) + res.output)
