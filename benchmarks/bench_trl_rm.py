"""Reward-model throughput, alignflow vs TRL ``RewardTrainer``: preference pairs/s.

Same scalar-head tiny Llama (``LlamaForSequenceClassification``, one saved directory loaded by both), same
HH-harmless pairs and token ids (``[bos] prompt reply [eos]``), ``--batch-size`` pairs per optimizer step,
Bradley-Terry loss ``-log sigmoid(r_c - r_r)``, fp32, no gradient checkpointing, AdamW at a constant rate.
alignflow runs through ``alignflow.recipes.reward.run``. Run:

    .venv/bin/python benchmarks/bench_trl_rm.py [--runs 5] [--steps 4]
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
    encode_pairs,
    recording,
    run_alignflow,
    silence,
    step_clock,
    trl_common_args,
)

LR = 1e-4


def alignflow_rm(
    assets: Assets, store: Any, data: Path, steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One recipe run; returns ``(seconds, pairs)`` per step and the per-step losses."""
    cfg = {
        "stage": "rm",
        "output_dir": str(assets.root / "runs" / f"af-rm-{tag}"),
        "model": {
            "path": str(assets.rm_dir),
            "dtype": "float32",
            "device": "cpu",
            "backbone": "causal",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": assets.max_length},
        "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"batch_size": batch_size, "max_steps": steps, "seed": 0, "log_every": 1},
    }
    _, metrics = run_alignflow("rm", cfg, store)
    return [(m["num_pairs"] / m["pairs_per_sec"], m["num_pairs"]) for m in metrics], [
        m["loss"] for m in metrics
    ]


def trl_rm(
    assets: Assets, rows: list[dict[str, Any]], steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One ``RewardTrainer.train()`` on pre-tokenised pairs; returns ``(seconds, pairs)`` per step and losses."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.rm_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(assets.rm_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    args = RewardConfig(
        **trl_common_args(steps, batch_size, LR, assets.root / "runs" / f"trl-rm-{tag}"),
        max_length=assets.max_length,
        center_rewards_coefficient=None,
    )
    ds = Dataset.from_list([{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in rows])
    clock = step_clock()
    trainer = silence(
        recording(RewardTrainer)(
            model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock]
        )
    )
    # The collator stacks [chosen; rejected]: half the rows are pairs.
    counter = CountingCollator(trainer.data_collator, lambda b: b["input_ids"].shape[0] // 2)
    trainer.data_collator = counter
    trainer.train()
    durations = clock.durations()
    return list(zip(durations, counter.counts[: len(durations)], strict=True)), trainer.__dict__.get(
        "recorded", []
    )


def loss_check(assets: Assets, store: Any, batch_size: int, steps: int = 3) -> dict[str, Any]:
    """Same initial weights, same data (one batch that is the whole dataset): per-step losses of both systems."""
    rows = assets.pairs[:batch_size]
    _, af = alignflow_rm(
        assets, store, assets.write_jsonl("rm-check.jsonl", rows), steps, batch_size, "check"
    )
    _, tr = trl_rm(assets, encode_pairs(assets, rows), steps, batch_size, "check")
    return {"alignflow": af, "trl": tr, "max_abs_diff": max(abs(a - b) for a, b in zip(af, tr, strict=True))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run; the first is a warm-up")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke tests)")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-rm-"))
    assets = build_assets(root, TINY_TEST if args.tiny else ModelSize(), args.max_length)
    store = alignflow_store(root)
    check = loss_check(assets, store, args.batch_size)
    print(
        f"RM loss check (3 steps): alignflow {check['alignflow']} TRL {check['trl']} max |diff| {check['max_abs_diff']:.2e}"
    )

    rows = assets.pairs[: args.batch_size * args.steps]
    path = assets.write_jsonl("rm.jsonl", rows)
    encoded = encode_pairs(assets, rows)
    tokens_per_pair = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in encoded) / len(encoded)
    tree_tokens_per_pair = sum(p["tree_tokens"] for p in encoded) / len(encoded)
    return compare(
        args,
        name="rm",
        title="Reward model",
        unit="pairs/s",
        trl_label="TRL RewardTrainer",
        alignflow_run=lambda tag: alignflow_rm(assets, store, path, args.steps, args.batch_size, tag)[0],
        trl_run=lambda tag: trl_rm(assets, encoded, args.steps, args.batch_size, tag)[0],
        assets=assets,
        check=check,
        tokens_per_unit=tokens_per_pair,
        alignflow_tokens_per_unit=tree_tokens_per_pair,
        examples=len(rows),
    )


if __name__ == "__main__":
    from _trl_common import save_json

    save_json("rm", main())
