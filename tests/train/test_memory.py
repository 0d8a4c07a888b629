"""Memory-aware token budgets: the estimator by hand, the planner, and ``train.tokens_per_batch`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.recipes import toy
from tests.recipes.conftest import MODEL, base_config, read_metrics, write_config
from transformers import LlamaConfig

from alignflow.config import TrainSection, load_config
from alignflow.errors import ConfigError
from alignflow.train import memory
from alignflow.train.memory import (
    GIB,
    MemoryEstimate,
    estimate_memory,
    mem_available_bytes,
    plan_batches,
    resolve_token_budget,
)

TINY = LlamaConfig(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)


# --------------------------------------------------------------------------------------------- the estimator


def test_fixed_bytes_by_hand_fp32_adamw() -> None:
    est = estimate_memory(TINY, trainable_params=1000, total_params=1000, param_dtype="float32")
    assert est.parts["parameters"] == 4000  # 1000 x 4 bytes
    assert est.parts["gradients"] == 4000
    assert est.parts["optimizer"] == 8000  # exp_avg + exp_avg_sq, fp32
    assert est.parts["frozen"] == 0
    assert est.fixed_bytes == 16000 + memory.RUNTIME_OVERHEAD


def test_fixed_bytes_by_hand_lora_bf16_frozen_reference_and_mixed_precision() -> None:
    # LoRA: 100 of 1000 parameters train; bf16 (2 bytes); AdamW states in the parameters' dtype; a reference
    # of 1000 frozen parameters beside it.
    est = estimate_memory(
        TINY, trainable_params=100, total_params=1000, param_dtype="bfloat16", lora=True, frozen_params=1000
    )
    assert (est.parts["parameters"], est.parts["gradients"], est.parts["optimizer"]) == (2000, 200, 400)
    assert est.parts["frozen"] == 2000
    # Mixed precision: fp32 moments (2 x 4) and an fp32 master copy (4) per trainable parameter.
    mixed = estimate_memory(
        TINY, trainable_params=100, total_params=1000, param_dtype="bfloat16", mixed_precision=True
    )
    assert mixed.parts["optimizer"] == 100 * 12
    sgd = estimate_memory(TINY, trainable_params=100, total_params=1000, optimizer="sgd")
    assert sgd.parts["optimizer"] == 0
    two = estimate_memory(TINY, trainable_params=100, total_params=1000, n_models=2)
    assert two.parts["parameters"] == 2 * 4000 and two.parts["optimizer"] == 2 * 100 * 8
    # FSDP over 4 ranks: the trained model's parameters, gradients and state split four ways, not the reference
    fsdp = estimate_memory(TINY, trainable_params=1000, total_params=1000, shards=4, frozen_params=1000)
    assert [fsdp.parts[k] for k in ("parameters", "gradients", "optimizer", "frozen")] == [
        1000,
        1000,
        2000,
        4000,
    ]


def test_bytes_per_token_by_hand() -> None:
    # h=8, h_kv=8, I=16, a=2, L=2, V=32, fp32. One layer keeps 8h + 2h_kv + 4I + a = 64 + 16 + 64 + 2 = 146
    # elements per token; outside the layers 3h = 24; the backward pass one more layer (146); the allocator
    # keeps 7h = 56 forward temporaries per layer; a padded row of 10 tokens has a float mask per layer
    # (2 x 10); the loss holds five vocabulary-wide fp32 buffers (5 x 32).
    est = estimate_memory(TINY, trainable_params=1, total_params=1, seq_len=10)
    assert est.parts["layers_per_token"] == (2 * 146 + 24) * 4
    assert est.parts["backward_per_token"] == 146 * 4
    assert est.parts["transient_per_token"] == 2 * 56 * 4
    assert est.parts["mask_per_token"] == 2 * 10 * 4
    assert est.parts["logits_per_token"] == 5 * 32 * 4
    assert est.parts["reference_per_token"] == 0
    assert est.bytes_per_token == (316 + 146 + 112 + 20 + 160) * 4
    assert est.peak_bytes(100) == est.fixed_bytes + 100 * est.bytes_per_token
    # Gradient checkpointing keeps each layer's input (h) and recomputes one layer: 2*8 + 146 instead of
    # 2*146; the forward frees each layer whole, so one layer's temporaries.
    gc = estimate_memory(TINY, trainable_params=1, total_params=1, seq_len=10, grad_checkpointing=True)
    assert gc.parts["layers_per_token"] == (2 * 8 + 146 + 24) * 4
    assert gc.parts["transient_per_token"] == 56 * 4
    # LoRA on q/k/v/o: 5h + 2h_kv + 3I + a = 40 + 16 + 48 + 2 = 106 per layer, nothing outside, and
    # 7h + 4 x 3h = 152 temporaries per layer.
    lora = estimate_memory(TINY, trainable_params=1, total_params=1, lora=True)
    assert lora.parts["layers_per_token"] == 2 * 106 * 4
    assert lora.parts["transient_per_token"] == 2 * 152 * 4
    # A score head (reward model): no vocabulary term. A live reference: two vocabulary buffers and a layer.
    rm = estimate_memory(TINY, trainable_params=1, total_params=1, lm_head=False)
    assert rm.parts["logits_per_token"] == 0
    live = estimate_memory(TINY, trainable_params=1, total_params=1, reference_forward=True)
    assert live.parts["reference_per_token"] == (2 * 32 + 146) * 4
    # Eager attention keeps heads x seq_len probabilities per token and layer.
    eager = estimate_memory(TINY, trainable_params=1, total_params=1, seq_len=10, attn_implementation="eager")
    assert eager.parts["layers_per_token"] == (2 * (146 + 2 * 10) + 24) * 4


def test_estimate_is_monotone_in_model_size_and_cheaper_with_lora_and_checkpointing() -> None:
    def est(cfg: LlamaConfig, **kw: object) -> MemoryEstimate:
        return estimate_memory(cfg, trainable_params=10**6, total_params=10**6, seq_len=64, **kw)  # type: ignore[arg-type]

    small = est(TINY)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        bigger = LlamaConfig(**{**TINY.to_dict(), field: 2 * getattr(TINY, field)})
        assert est(bigger).bytes_per_token > small.bytes_per_token, field
    assert est(TINY, grad_checkpointing=True).bytes_per_token < small.bytes_per_token
    # LoRA keeps fewer activations, though its adapters add forward temporaries the allocator keeps
    assert est(TINY, lora=True).parts["layers_per_token"] < small.parts["layers_per_token"]
    lora = estimate_memory(TINY, trainable_params=10**4, total_params=10**6, lora=True)
    assert lora.fixed_bytes < small.fixed_bytes
    peaks = [small.peak_bytes(t) for t in (64, 128, 256, 512)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4


# --------------------------------------------------------------------------------------------- the planner

EST = MemoryEstimate(fixed_bytes=1_000_000, bytes_per_token=100)


def test_plan_takes_the_whole_micro_batch_when_it_fits() -> None:
    plan = plan_batches(EST, 10 * GIB, global_tokens=8 * 64 * 2, max_length=64, batch_size=8)
    assert (plan.tokens_per_batch, plan.grad_accum) == (8 * 64, 2)  # batch_size caps the rows
    assert plan.est_peak_bytes == EST.peak_bytes(8 * 64) and plan.mode == "auto"


def test_plan_picks_the_largest_fitting_rows_and_keeps_the_global_batch() -> None:
    row = 100 * 64
    limit = 1_000_000 + 3 * row + 5  # three rows fit, four do not
    plan = plan_batches(EST, limit, global_tokens=8 * 64, max_length=64, batch_size=8)
    assert plan.est_peak_bytes is not None and plan.est_peak_bytes <= limit
    assert plan.tokens_per_batch % 64 == 0 and plan.tokens_per_batch <= 3 * 64
    assert plan.grad_accum == 3  # ceil(8 rows / 3)
    assert plan.tokens_per_batch == 3 * 64  # ceil(8 / 3) rows: 9 per step, the closest to 8 at that split
    # seven rows fit: two micro-batches of four rows give the 8 rows exactly
    seven = plan_batches(EST, 1_000_000 + 7 * row, global_tokens=8 * 64, max_length=64, batch_size=8)
    assert (seven.tokens_per_batch, seven.grad_accum) == (4 * 64, 2)
    # data parallel over 4 ranks: grad_accum rounded up to a multiple of 4
    dp = plan_batches(EST, limit, global_tokens=8 * 64, max_length=64, batch_size=8, accum_multiple=4)
    assert (dp.tokens_per_batch, dp.grad_accum) == (2 * 64, 4)


def test_plan_is_monotone_in_the_limit() -> None:
    plans = [
        plan_batches(EST, 1_000_000 + k * 3200, global_tokens=16 * 64, max_length=64, batch_size=16)
        for k in range(2, 40)
    ]
    tokens = [p.tokens_per_batch for p in plans]
    accum = [p.grad_accum for p in plans]
    assert tokens == sorted(tokens) and accum == sorted(accum, reverse=True)
    assert all(p.tokens_per_batch * p.grad_accum >= 16 * 64 for p in plans)


def test_plan_names_the_limit_the_estimate_and_the_remedies_when_one_row_does_not_fit() -> None:
    with pytest.raises(ConfigError) as err:
        plan_batches(EST, 1_000_000 + 6399, global_tokens=8 * 64, max_length=64, batch_size=8)
    msg = str(err.value)
    assert "tokens_per_batch=auto" in msg and "one row of 64 tokens" in msg
    assert f"{(1_000_000 + 6400) / GIB:.2f} GiB" in msg  # the estimate of one row
    assert "memory limit" in msg
    for remedy in ("lora.enabled", "gradient_checkpointing", "data.max_length", "memory_limit_gb"):
        assert remedy in msg
    with pytest.raises(ConfigError, match="alone exceed it"):
        plan_batches(EST, 999_999, global_tokens=8 * 64, max_length=64, batch_size=8)


# --------------------------------------------------------------------------------------------- resolving from config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from alignflow.models import make_tiny_model_dir

    d = tmp_path_factory.mktemp("memory")
    return {
        "model": make_tiny_model_dir(d / "tiny", **MODEL),
        "sft": toy.write_jsonl(d / "sft.jsonl", toy.sft_rows(48)),
    }


@pytest.fixture(scope="module")
def tiny_estimate(tiny: dict[str, Path]) -> MemoryEstimate:
    from alignflow.models import load_policy

    model = load_policy(tiny["model"], dtype="float32")
    return memory.model_estimate(model, grad_checkpointing=False, seq_len=64)


def test_resolve_none_fixed_auto_and_a_kept_plan(tiny: dict[str, Path], tmp_path: Path) -> None:
    from alignflow.config import ModelSection
    from alignflow.models import load_policy

    model = load_policy(tiny["model"], dtype="float32")
    section = ModelSection(path=str(tiny["model"]))
    default = resolve_token_budget(TrainSection(batch_size=4, grad_accum=3), model, section, 64)
    assert (default.tokens_per_batch, default.grad_accum, default.mode) == (256, 3, "default")
    assert default.est_peak_bytes is None
    fixed = resolve_token_budget(TrainSection(batch_size=4, tokens_per_batch=100), model, section, 64)
    assert (fixed.tokens_per_batch, fixed.grad_accum, fixed.mode) == (100, 1, "fixed")
    with pytest.raises(ConfigError, match="below the longest example"):
        resolve_token_budget(TrainSection(tokens_per_batch=32), model, section, 64)

    auto = TrainSection(batch_size=8, tokens_per_batch="auto", memory_limit_gb=100.0)
    plan = resolve_token_budget(auto, model, section, 64, state_dir=tmp_path)
    assert (plan.tokens_per_batch, plan.grad_accum) == (8 * 64, 1)
    assert json.loads((tmp_path / memory.PLAN_FILE).read_text())["plan"]["tokens_per_batch"] == 512
    # a resumed run keeps its plan whatever memory is free now
    tight = TrainSection(batch_size=8, tokens_per_batch="auto", memory_limit_gb=1e-6)
    assert resolve_token_budget(tight, model, section, 64, state_dir=tmp_path) == plan
    with pytest.raises(ConfigError, match="tokens_per_batch=auto"):
        resolve_token_budget(tight, model, section, 64, state_dir=tmp_path / "fresh")


def test_resolve_counts_a_frozen_reference_unless_lora(tiny: dict[str, Path]) -> None:
    from alignflow.config import ModelSection
    from alignflow.models import load_policy

    model = load_policy(tiny["model"], dtype="float32")
    section = ModelSection(path=str(tiny["model"]))
    train = TrainSection(tokens_per_batch=128)
    alone = resolve_token_budget(train, model, section, 64)
    cached = resolve_token_budget(train, model, section, 64, reference="cached")
    live = resolve_token_budget(train, model, section, 64, reference="live")
    n = sum(p.numel() for p in model.parameters())
    assert cached.fixed_bytes == alone.fixed_bytes + 4 * n  # the reference's fp32 parameters
    assert live.bytes_per_token > cached.bytes_per_token  # its forward per micro-batch


def test_mem_available_and_the_default_cpu_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24683584 kB\nMemFree:  1000 kB\nMemAvailable:    1000000 kB\n")
    assert mem_available_bytes(info) == 1000000 * 1024
    monkeypatch.setattr(memory, "mem_available_bytes", lambda: 1000 * 1024**2)
    cpu = torch.device("cpu")
    assert memory.default_memory_limit(cpu) == int(0.8 * 1000 * 1024**2)
    # what the loaded model holds is added back (MemAvailable no longer counts it, the estimate does)
    assert memory.default_memory_limit(cpu, resident_bytes=24 * 1024**2) == int(0.8 * 1024 * 1024**2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on one host share the RAM
    assert memory.default_memory_limit(cpu) == int(0.8 * 1000 * 1024**2 / 2)


# --------------------------------------------------------------------------------------------- config


def test_config_rejects_an_unknown_budget_and_a_limit_without_auto(tmp_path: Path) -> None:
    import alignflow.recipes.sft  # noqa: F401 - registers the stage

    path = tmp_path / "sft.yaml"
    path.write_text(
        "stage: sft\nmodel: {path: m}\ndata: {train: d.jsonl}\ntrain:\n  tokens_per_batch: lots\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "sft.yaml:5: train.tokens_per_batch" in msg
    assert "a positive number of tokens, 'auto'" in msg and "'lots'" in msg
    for bad in ("train.tokens_per_batch=0", "train.tokens_per_batch=true", "train.memory_limit_gb=2"):
        with pytest.raises(ConfigError):
            load_config(path, ["train.tokens_per_batch=64", bad] if "memory" in bad else [bad])
    cfg = load_config(path, ["train.tokens_per_batch=auto", "train.memory_limit_gb=1.5"])
    assert cfg.train.tokens_per_batch == "auto" and cfg.train.memory_limit_gb == 1.5  # type: ignore[attr-defined]


def test_an_unset_budget_records_exactly_as_before() -> None:
    """The record (and so its artifact id) of a config that does not use the new keys has no trace of them."""
    from alignflow.config import to_record

    record = to_record(TrainSection())
    assert "tokens_per_batch" not in record and "memory_limit_gb" not in record
    assert to_record(TrainSection(tokens_per_batch=64))["tokens_per_batch"] == 64
    auto = to_record(TrainSection(tokens_per_batch="auto", memory_limit_gb=2.0))
    assert (auto["tokens_per_batch"], auto["memory_limit_gb"]) == ("auto", 2.0)
    assert TrainSection.model_validate(auto) == TrainSection(tokens_per_batch="auto", memory_limit_gb=2.0)


# --------------------------------------------------------------------------------------------- through the CLI


@pytest.fixture
def cli(sqlite_workspace):  # noqa: ANN001, ANN201 - pytest fixture
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _sft(tiny: dict[str, Path], tmp_path: Path, **train: object) -> tuple[Path, Path]:
    out = tmp_path / "run"
    cfg = base_config("sft", tiny["model"], tiny["sft"], out, train={"max_steps": 4, **train})
    return write_config(tmp_path / "sft.yaml", cfg), out


def test_sft_tokens_per_batch_caps_every_micro_batch(cli, tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg, out = _sft(tiny, tmp_path)
    res = cli("sft", cfg, "train.tokens_per_batch=64")
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = [m for m in read_metrics(out) if "num_tokens" in m]
    assert len(steps) == 4
    # grad_accum 1: a step is one micro-batch, and its (unpadded) tokens are within the padded budget
    assert all(0 < m["num_tokens"] <= 64 for m in steps), steps
    plan = json.loads((out / "summary.json").read_text())["batch_plan"]
    assert (plan["tokens_per_batch"], plan["grad_accum"], plan["mode"]) == (64, 1, "fixed")
    assert "batch plan (fixed): 64 tokens per micro-batch" in res.output


def test_sft_packed_tokens_per_batch(cli, tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg, out = _sft(tiny, tmp_path, tokens_per_batch=100)
    res = cli("sft", cfg, "data.packing=true")
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = [m for m in read_metrics(out) if "num_tokens" in m]
    assert steps and all(0 < m["num_tokens"] <= 100 for m in steps), steps


def test_sft_auto_plans_under_the_limit_and_finishes(
    cli, tiny: dict[str, Path], tiny_estimate: MemoryEstimate, tmp_path: Path
) -> None:
    # a limit with room for two and a half rows of 64 tokens: micro-batches of 2 rows, 4 of them per step
    limit = tiny_estimate.fixed_bytes + 2.5 * 64 * tiny_estimate.bytes_per_token
    cfg, out = _sft(tiny, tmp_path, tokens_per_batch="auto", memory_limit_gb=limit / GIB)
    res = cli("sft", cfg)
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["batch_plan"]
    assert (plan["tokens_per_batch"], plan["grad_accum"], plan["mode"]) == (128, 4, "auto")
    assert plan["est_peak_bytes"] <= plan["limit_bytes"] == int(limit / GIB * GIB)
    assert summary["steps"] == 4 and (out / "final" / "model.safetensors").is_file()
    assert (out / memory.PLAN_FILE).is_file()
    steps = [m for m in read_metrics(out) if "num_tokens" in m]
    assert all(m["num_tokens"] <= 4 * 128 for m in steps)
    assert "batch plan (auto): 128 tokens per micro-batch, grad_accum 4" in res.output


def test_sft_auto_with_an_absurd_limit_fails_naming_the_limit(
    cli, tiny: dict[str, Path], tmp_path: Path
) -> None:
    cfg, _ = _sft(tiny, tmp_path, tokens_per_batch="auto", memory_limit_gb=1e-6)
    res = cli("sft", cfg)
    assert res.exit_code != 0
    msg = str(res.exception)
    assert isinstance(res.exception, ConfigError), repr(res.exception)
    assert "tokens_per_batch=auto" in msg and "over the memory limit of 0.00 GiB" in msg
    assert "lora.enabled=true" in msg and "model.gradient_checkpointing" in msg


@pytest.fixture(scope="module")
def pairs(tiny: dict[str, Path]) -> Path:
    return toy.write_jsonl(tiny["sft"].parent / "pairs.jsonl", toy.pair_rows(48))


def test_rm_and_dpo_take_the_budget_and_record_the_plan(
    cli, tiny: dict[str, Path], pairs: Path, tmp_path: Path
) -> None:
    # rm: a pair costs chosen + rejected (2 x its longer side). Responses long enough to be cut to
    # data.max_length=64 cost 128 each, so a budget of 128 tokens holds one pair per micro-batch.
    rows = toy.pair_rows(24)
    for row in rows:
        row["chosen"] += " and then" * 60
        row["rejected"] += " and then" * 60
    long_pairs = toy.write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "rm"
    cfg = write_config(
        tmp_path / "rm.yaml", base_config("rm", tiny["model"], long_pairs, out, train={"max_steps": 3})
    )
    res = cli("rm", cfg, "train.tokens_per_batch=128")
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = [m for m in read_metrics(out) if "num_pairs" in m]
    assert len(steps) == 3 and all(m["num_pairs"] == 1 for m in steps), steps
    plan = json.loads((out / "summary.json").read_text())["batch_plan"]
    assert (plan["tokens_per_batch"], plan["mode"]) == (128, "fixed")
    # dpo with auto and room to spare: the configured micro-batch (8 pairs of 2 x 64 tokens), grad_accum as set
    out = tmp_path / "dpo"
    cfg = write_config(
        tmp_path / "dpo.yaml",
        base_config("dpo", tiny["model"], pairs, out, train={"max_steps": 2, "grad_accum": 2}),
    )
    res = cli("dpo", cfg, "train.tokens_per_batch=auto", "train.memory_limit_gb=8")
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = json.loads((out / "summary.json").read_text())["batch_plan"]
    assert (plan["tokens_per_batch"], plan["grad_accum"], plan["mode"]) == (8 * 128, 2, "auto")
    assert plan["fixed_bytes"] > 0 and plan["est_peak_bytes"] < 8 * GIB
