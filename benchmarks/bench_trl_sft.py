"""SFT throughput, alignflow vs TRL ``SFTTrainer``, both with packing: real (non-pad) tokens/s.

Same tiny Llama (loaded from the same directory), same HH-harmless prompt/completion examples and token ids,
rows of ``--max-length`` tokens, ``--batch-size`` packed rows per optimizer step, fp32 (``bf16=False``: this
CPU has no native bf16), gradient checkpointing off on both sides, AdamW with a constant learning rate.
alignflow runs through ``alignflow.recipes.sft.run`` (the public recipe API); TRL packs with its default
best-fit-decreasing strategy (padding-free batches with position ids). Run:

    .venv/bin/python benchmarks/bench_trl_sft.py [--runs 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from _trl_common import (
    TINY_TEST,
    Assets,
    CountingCollator,
    ModelSize,
    alignflow_store,
    build_assets,
    compare,
    recording,
    run_alignflow,
    silence,
    step_clock,
    trl_common_args,
)

LR = 1e-4


def _encoded(assets: Assets, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """alignflow's encoding of each example: ``input_ids`` and ``labels`` (-100 on bos + prompt)."""
    from alignflow.data.encode import SequenceEncoder
    from alignflow.models import load_tokenizer

    enc = SequenceEncoder(load_tokenizer(str(assets.policy_dir)), assets.max_length)
    out = []
    for r in rows:
        e = enc.encode(r["prompt"], r["completion"])
        out.append({"input_ids": e.input_ids, "labels": e.labels})
    return out


def alignflow_sft(
    assets: Assets, store: Any, data: Path, steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One recipe run; returns ``(seconds, real tokens)`` per step and the per-step losses."""
    cfg = {
        "stage": "sft",
        "output_dir": str(assets.root / "runs" / f"af-sft-{tag}"),
        "model": {
            "path": str(assets.policy_dir),
            "dtype": "float32",
            "device": "cpu",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": assets.max_length, "packing": True},
        "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"batch_size": batch_size, "max_steps": steps, "seed": 0, "log_every": 1},
    }
    _, metrics = run_alignflow("sft", cfg, store)
    return [(m["num_tokens"] / m["tokens_per_sec"], m["num_tokens"]) for m in metrics], [
        m["loss"] for m in metrics
    ]


def trl_sft(
    assets: Assets, rows: list[dict[str, list[int]]], steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One ``SFTTrainer.train()``; returns ``(seconds, real tokens)`` per step and the per-step losses."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.policy_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(assets.policy_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    args = SFTConfig(
        **trl_common_args(steps, batch_size, LR, assets.root / "runs" / f"trl-sft-{tag}"),
        max_length=assets.max_length,
        packing=True,
        dataset_num_proc=None,
    )
    clock = step_clock()
    trainer = silence(
        recording(SFTTrainer)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[clock],
        )
    )

    def real_tokens(batch: dict[str, Any]) -> int:
        # Padding-free batches are one flat row of real tokens; padded ones count their attention mask.
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    counter = CountingCollator(trainer.data_collator, real_tokens)
    trainer.data_collator = counter
    trainer.train()
    durations = clock.durations()
    return list(zip(durations, counter.counts[: len(durations)], strict=True)), trainer.__dict__.get(
        "recorded", []
    )


def loss_check(assets: Assets, store: Any, batch_size: int, steps: int = 3) -> dict[str, Any]:
    """Same initial weights, same data (one batch that is the whole dataset): per-step losses of both systems."""
    rows = assets.sft[:batch_size]
    path = assets.write_jsonl("sft-check.jsonl", rows)
    _, af = alignflow_sft(assets, store, path, steps, batch_size, "check")
    _, tr = trl_sft(assets, _encoded(assets, rows), steps, batch_size, "check")
    return {"alignflow": af, "trl": tr, "max_abs_diff": max(abs(a - b) for a, b in zip(af, tr, strict=True))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run; the first is a warm-up")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke tests)")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-sft-"))
    assets = build_assets(root, TINY_TEST if args.tiny else ModelSize(), args.max_length)
    store = alignflow_store(root)
    check = loss_check(assets, store, args.batch_size)
    print(
        f"SFT loss check (3 steps): alignflow {check['alignflow']} TRL {check['trl']} max |diff| {check['max_abs_diff']:.2e}"
    )

    rows = assets.sft[: args.examples]
    path = assets.write_jsonl("sft.jsonl", rows)
    encoded = _encoded(assets, rows)
    return compare(
        args,
        name="sft",
        title="SFT (packing on both sides)",
        unit="real tokens/s",
        trl_label="TRL SFTTrainer",
        alignflow_run=lambda tag: alignflow_sft(assets, store, path, args.steps, args.batch_size, tag)[0],
        trl_run=lambda tag: trl_sft(assets, encoded, args.steps, args.batch_size, tag)[0],
        assets=assets,
        check=check,
        tokens_per_unit=1.0,
        examples=len(rows),
    )


if __name__ == "__main__":
    from _trl_common import save_json

    save_json("sft", main())
