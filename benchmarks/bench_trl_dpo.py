"""DPO throughput, alignflow vs TRL ``DPOTrainer`` at its fastest settings: preference pairs/s.

Both sides: the sigmoid DPO loss (beta 0.1), reference log-probs precomputed once before training (setup,
not timed; alignflow caches them as a store artifact, TRL as a dataset column), one forward over
``[chosen; rejected]`` per step, same tiny Llama and HH-harmless pairs with identical token ids,
``--batch-size`` pairs per step, fp32, no gradient checkpointing, AdamW at a constant rate. TRL 1.16's
``padding_free`` is disabled inside ``DPOTrainer`` (it logs that it falls back to padding), so both pad.
alignflow runs through ``alignflow.recipes.dpo.run``. Run:

    .venv/bin/python benchmarks/bench_trl_dpo.py [--runs 5] [--steps 4]
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
BETA = 0.1


def alignflow_dpo(
    assets: Assets, store: Any, data: Path, steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One recipe run; returns ``(seconds, pairs)`` per step and the per-step losses."""
    cfg = {
        "stage": "dpo",
        "output_dir": str(assets.root / "runs" / f"af-dpo-{tag}"),
        "model": {
            "path": str(assets.policy_dir),
            "dtype": "float32",
            "device": "cpu",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": assets.max_length},
        "loss": {"type": "sigmoid", "beta": BETA},
        "reference": {"precompute": True},
        "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"batch_size": batch_size, "max_steps": steps, "seed": 0, "log_every": 1},
    }
    _, metrics = run_alignflow("dpo", cfg, store)
    return [(m["num_pairs"] / m["pairs_per_sec"], m["num_pairs"]) for m in metrics], [
        m["loss"] for m in metrics
    ]


def trl_dpo(
    assets: Assets, rows: list[dict[str, Any]], steps: int, batch_size: int, tag: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """One ``DPOTrainer.train()`` with precomputed reference log-probs; ``(seconds, pairs)`` per step and losses.

    TRL tokenises text itself; the prompt carries the bos token as text, so its ids equal alignflow's
    ``[bos] prompt reply [eos]`` (``build_assets`` keeps only pairs where they do).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.policy_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(assets.policy_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    args = DPOConfig(
        **trl_common_args(steps, batch_size, LR, assets.root / "runs" / f"trl-dpo-{tag}"),
        max_length=assets.max_length,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        padding_free=False,
    )
    ds = Dataset.from_list(
        [
            {"prompt": tok.bos_token + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows
        ]
    )
    clock = step_clock()
    trainer = silence(
        recording(DPOTrainer)(
            model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock]
        )
    )
    counter = CountingCollator(trainer.data_collator, lambda b: b["input_ids"].shape[0] // 2)
    trainer.data_collator = counter
    trainer.train()
    durations = clock.durations()
    return list(zip(durations, counter.counts[: len(durations)], strict=True)), trainer.__dict__.get(
        "recorded", []
    )


def loss_check(assets: Assets, store: Any, batch_size: int, steps: int = 3) -> dict[str, Any]:
    """Same initial weights, same data (one batch that is the whole dataset): per-step losses of both systems.

    Step 1 is ``log 2`` on both sides (policy = reference); steps 2 and 3 test the gradients and the update.
    """
    rows = assets.pairs[:batch_size]
    _, af = alignflow_dpo(
        assets, store, assets.write_jsonl("dpo-check.jsonl", rows), steps, batch_size, "check"
    )
    _, tr = trl_dpo(assets, rows, steps, batch_size, "check")
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
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    assets = build_assets(root, TINY_TEST if args.tiny else ModelSize(), args.max_length)
    store = alignflow_store(root)
    check = loss_check(assets, store, args.batch_size)
    print(
        f"DPO loss check (3 steps): alignflow {check['alignflow']} TRL {check['trl']} max |diff| {check['max_abs_diff']:.2e}"
    )

    rows = assets.pairs[: args.batch_size * args.steps]
    path = assets.write_jsonl("dpo.jsonl", rows)
    encoded = encode_pairs(assets, rows)
    tokens_per_pair = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in encoded) / len(encoded)
    tree_tokens_per_pair = sum(p["tree_tokens"] for p in encoded) / len(encoded)
    return compare(
        args,
        name="dpo",
        title="DPO (precomputed reference log-probs)",
        unit="pairs/s",
        trl_label="TRL DPOTrainer",
        alignflow_run=lambda tag: alignflow_dpo(assets, store, path, args.steps, args.batch_size, tag)[0],
        trl_run=lambda tag: trl_dpo(assets, rows, args.steps, args.batch_size, tag)[0],
        assets=assets,
        check=check,
        tokens_per_unit=tokens_per_pair,
        alignflow_tokens_per_unit=tree_tokens_per_pair,
        examples=len(rows),
    )


if __name__ == "__main__":
    from _trl_common import save_json

    save_json("dpo", main())
