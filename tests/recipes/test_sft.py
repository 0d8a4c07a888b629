"""SFT recipe through the real CLI: learning, pinned first steps, LoRA/packing, bad input, NaN stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from . import toy
from .conftest import base_config, read_metrics, train_metrics, write_config

# Recorded once with seed 0 on the session tiny model (hidden 64, 2 layers, vocab 400), fp32, full
# fine-tuning, unpacked, batch 8, lr 2e-3 constant. They change if tokenisation, label masking, the loss
# normalisation or the optimizer change.
PINNED_SFT_LOSSES = [6.001070022583008, 5.72768497467041, 5.530760288238525]


def test_sft_full_loss_falls_and_first_steps_are_pinned(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "sft.yaml",
        base_config("sft", tiny_model, toy_data["sft"], out, train={"max_steps": 12}),
    )
    res = cli("sft", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = train_metrics(out)
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[:3] == pytest.approx(PINNED_SFT_LOSSES, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["metrics"]
    assert ev["eval/perplexity"] == pytest.approx(2.718281828 ** ev["eval/loss"], rel=1e-6)
    assert (out / "final" / "model.safetensors").is_file()
    assert summary["outputs"]["checkpoint"]


def test_sft_lora_with_packing_trains_an_adapter(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "sft.yaml",
        base_config(
            "sft", tiny_model, toy_data["sft"], out, lora={"enabled": True, "r": 4}, data={"packing": True}
        ),
    )
    res = cli("sft", cfg, "train.max_steps=5", "optim.lr=1e-2")
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = train_metrics(out)
    assert losses[-1] < losses[0]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert not (out / "final" / "model.safetensors").exists()
    # packing fills rows of max_length with several examples: a step then holds more than 8 examples' tokens
    per_example = [m["num_tokens"] for m in read_metrics(out) if "num_tokens" in m]
    assert max(per_example) > 8 * 42  # the longest toy example has 42 tokens


def test_sft_truncates_long_prompts_with_a_counted_warning(cli, tiny_model, tmp_path: Path) -> None:
    rows = toy.sft_rows(16)
    rows[0]["prompt"] = "word " * 400  # far beyond max_length=64
    rows[1]["prompt"] = "another " * 300
    data = toy.write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "sft.yaml", base_config("sft", tiny_model, data, out, train={"max_steps": 2})
    )
    res = cli("sft", cfg, "data.eval_fraction=0")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "2 of 16 sft examples were longer than the maximum length and were truncated" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated_examples"] == 2 and summary["train_examples"] == 16


def test_sft_rejects_a_pairs_dataset_naming_the_field(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "sft.yaml", base_config("sft", tiny_model, toy_data["pairs"], tmp_path / "run")
    )
    res = cli("sft", cfg)
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "pairs.jsonl:1" in msg and "completion" in msg


def test_sft_rejects_an_empty_dataset(cli, tiny_model, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = write_config(tmp_path / "sft.yaml", base_config("sft", tiny_model, empty, tmp_path / "run"))
    res = cli("sft", cfg)
    assert res.exit_code != 0
    assert "empty.jsonl" in str(res.exception) and "no records" in str(res.exception)


def test_sft_nan_loss_stops_naming_step_examples_and_checkpoint(
    cli, tiny_model, toy_data, tmp_path: Path
) -> None:
    from alignflow.recipes.common import NonFiniteLossError

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "sft.yaml", base_config("sft", tiny_model, toy_data["sft"], out))
    res = cli(
        "sft",
        cfg,
        "optim.lr=1e30",
        "optim.max_grad_norm=null",
        "train.save_every=1",
        "checkpoint.async_save=false",
    )
    assert isinstance(res.exception, NonFiniteLossError), res.output + repr(res.exception)
    msg = str(res.exception)
    assert "at step 2" in msg and "batch example ids: [s" in msg
    assert "step-000001" in msg


def test_sft_trains_on_a_mixture_spec_given_as_data_train(cli, tiny_model, toy_data, tmp_path: Path) -> None:
    """`data.train: "mix:A:w,B:w;rows=N"` builds the mixture version and trains on it; lineage reaches A and B."""
    from alignflow.cli.common import open_store

    rows = toy.sft_rows(48)
    half_a, half_b = (
        toy.write_jsonl(tmp_path / "a.jsonl", rows[:24]),
        toy.write_jsonl(tmp_path / "b.jsonl", rows[24:]),
    )
    for name, path in (("mix-a", half_a), ("mix-b", half_b)):
        assert cli("data", "import", path, "--kind", "sft", "--name", name).exit_code == 0
    out = tmp_path / "run"
    cfg = base_config("sft", tiny_model, toy_data["sft"], out, train={"max_steps": 2})
    cfg["data"]["train"] = "mix:mix-a:0.75,mix-b:0.25;rows=32;seed=3"
    res = cli("sft", write_config(tmp_path / "sft.yaml", cfg))
    assert res.exit_code == 0, res.output + repr(res.exception)
    checkpoint = json.loads((out / "summary.json").read_text())["outputs"]["checkpoint"]
    store = open_store()
    names = {node.name for node in store.lineage(checkpoint).nodes.values()}
    assert {"mix-a", "mix-b"} <= names, names
    bad = dict(cfg, data=dict(cfg["data"], train="mix:mix-a:0.75,mix-b:0.5"))
    res = cli("sft", write_config(tmp_path / "bad.yaml", bad))
    assert res.exit_code != 0 and "weight" in (res.output + str(res.exception)).lower()
