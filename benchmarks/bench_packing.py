"""Packed vs padded batches on a length-skewed dataset: useful-token fraction and real tokens/s.

Lengths are lognormal (median ~e^4.3 ≈ 74 tokens, heavy right tail, clipped to [8, 512]). Three ways to
batch the same examples, each under the same per-step token budget (rows x width ≤ budget):

* padded-random: shuffled, a fixed number of examples per batch, padded to the longest in the batch;
* padded-grouped: TokenBudgetSampler(mode="padded") — length-grouped, padded to the longest;
* packed: the whole set packed once by pack_examples into rows of ``--row-tokens``, budget/row rows per step.

Each step is forward + backward + AdamW on a tiny Llama (fp32, SDPA). "real tok/s" counts only
non-padding tokens. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_packing.py [--examples 192] [--budget 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.data.packing import TokenBudgetSampler, pack_examples  # noqa: E402
from alignflow.models import tiny_llama  # noqa: E402
from alignflow.train.accum import global_token_mean_loss  # noqa: E402

Batch = tuple[dict[str, torch.Tensor], torch.Tensor, int]  # (model inputs, labels, real tokens)


def padded_batch(seqs: list[list[int]]) -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    return {"input_ids": ids, "attention_mask": attn}, labels, int(attn.sum())


def packed_batches(seqs: list[list[int]], row_tokens: int, rows_per_step: int) -> list[Batch]:
    """Pack the whole dataset once (first-fit-decreasing), then feed ``rows_per_step`` rows per step."""
    pb = pack_examples(seqs, max_tokens=row_tokens, pad_token_id=0, pad_to="max_tokens")
    out = []
    for r0 in range(0, pb.input_ids.shape[0], rows_per_step):
        sl = slice(r0, r0 + rows_per_step)
        inputs = {
            "input_ids": pb.input_ids[sl],
            "attention_mask": pb.attention_mask[sl],
            "position_ids": pb.position_ids[sl],
        }
        out.append((inputs, pb.labels[sl], int((pb.segment_ids[sl] >= 0).sum())))
    return out


def run_interleaved(configs: list[tuple[str, list[Batch]]], vocab: int, warmup: int = 1) -> list[list[str]]:
    """One epoch per config on its own fresh tiny Llama, steps interleaved round-robin across configs.

    Interleaving spreads load from other processes on a shared machine evenly over the configs. The first
    ``warmup`` steps of each config are not timed.
    """
    states = []
    for _ in configs:
        model = tiny_llama(vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=4, seed=0)
        states.append(
            {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-4), "times": [], "real": []}
        )
    for k in range(max(len(b) for _, b in configs)):
        for (_, batches), st in zip(configs, states, strict=True):
            if k >= len(batches):
                continue
            inputs, labels, n_real = batches[k]
            t0 = time.perf_counter()
            logits = st["model"](**inputs).logits
            n_target = int((labels[:, 1:] != -100).sum())
            global_token_mean_loss(logits, labels, n_target).backward()
            st["opt"].step()
            st["opt"].zero_grad(set_to_none=True)
            if k >= warmup:
                st["times"].append(time.perf_counter() - t0)
                st["real"].append(n_real)
    rows = []
    for (label, batches), st in zip(configs, states, strict=True):
        real = sum(n for _, _, n in batches)
        slots = sum(inputs["input_ids"].numel() for inputs, _, _ in batches)
        t = sum(st["times"])
        rows.append(
            [
                label,
                str(len(batches)),
                f"{slots:,}",
                f"{real / slots:.1%}",
                f"{t / len(st['times']):.2f}",
                f"{sum(st['real']) / t:,.0f}",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=192)
    ap.add_argument("--budget", type=int, default=4096, help="max tokens (rows x width) per step")
    ap.add_argument("--row-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.3, 0.8, args.examples).astype(int), 8, args.row_tokens).tolist()
    vocab = 2000
    data = [rng.integers(3, vocab, n).tolist() for n in lengths]
    print(
        f"{args.examples} examples, {sum(lengths)} tokens, median {int(np.median(lengths))}, max {max(lengths)}"
    )

    # padded-random: as many examples per batch as the budget allows at the longest possible length
    per_batch = max(1, args.budget // args.row_tokens)
    perm = rng.permutation(len(data)).tolist()
    random_batches = [
        padded_batch([data[i] for i in perm[j : j + per_batch]]) for j in range(0, len(perm), per_batch)
    ]
    grouped = TokenBudgetSampler(lengths, max_tokens=args.budget, seed=0, mode="padded")
    grouped_batches = [padded_batch([data[i] for i in b]) for b in grouped.batches_for_epoch(0)]
    packed = packed_batches(data, args.row_tokens, per_batch)

    rows = run_interleaved(
        [
            ("padded, random batches", random_batches),
            ("padded, length-grouped (TokenBudgetSampler)", grouped_batches),
            ("packed (pack_examples, first-fit-decreasing)", packed),
        ],
        vocab,
    )

    header = ["batching", "steps", "token slots", "non-pad fraction", "s/step", "real tok/s"]
    table = markdown_table(header, rows)
    load = (
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine). "
    )
    print()
    print(table)
    if not args.no_write:
        body = (
            f"{args.examples} examples, lognormal lengths (median {int(np.median(lengths))}, max {max(lengths)}, "
            f"{sum(lengths)} tokens); budget {args.budget} tokens/step, packed rows of {args.row_tokens}; "
            f"tiny Llama 4x256 (vocab {vocab}), fp32, SDPA, fwd+bwd+AdamW, {args.threads} threads; "
            "steps interleaved across configs; time excludes the first step of each. " + load + "\n\n" + table
        )
        write_section("packing", "Packing vs padding (training steps)", body, ("torch", "transformers"))


if __name__ == "__main__":
    main()
