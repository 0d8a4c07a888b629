"""Training stall per checkpoint save: synchronous vs asynchronous CheckpointManager.save.

A ~50M-parameter Llama (vocab 8000, hidden 512, 10 layers) trains with AdamW on 2x128-token batches
and saves the full state (model + AdamW moments + scheduler + RNG, ~600 MB) every ``--every`` steps.
"stall" is the time ``save()`` blocks the training loop; for async saves it is the CPU snapshot (plus
any wait for the previous write). "loop" is the wall time of all steps and saves, including the final
``wait()``, so it shows what the background writer costs the training thread in CPU contention.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_checkpoint.py [--steps 9] [--every 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.models import tiny_llama  # noqa: E402
from alignflow.train.checkpoint import CheckpointManager  # noqa: E402


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(mode: str, args: argparse.Namespace, root: Path) -> list[str]:
    model = tiny_llama(vocab_size=8000, hidden_size=512, num_layers=10, num_heads=8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(3, 8000, (2, 128), generator=torch.Generator().manual_seed(0))
    run_dir = root / mode
    mgr = CheckpointManager(run_dir)
    stalls, step_times = [], []
    t_loop = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        if mode != "none" and step % args.every == 0:
            mgr.save(step, model, opt, sched, data_state={"step": step}, blocking=(mode == "sync"))
            stalls.append(mgr.last_stall_seconds)
    mgr.close()
    loop = time.perf_counter() - t_loop
    size = dir_size(run_dir / f"step-{args.steps:06d}") if mode != "none" else 0
    n_params = sum(p.numel() for p in model.parameters())
    return [
        mode,
        f"{n_params / 1e6:.1f}M",
        f"{size / 1e6:.0f} MB" if size else "-",
        str(len(stalls)),
        f"{statistics.median(stalls):.2f} ({min(stalls):.2f}–{max(stalls):.2f})" if stalls else "-",
        f"{statistics.median(step_times):.2f}",
        f"{loop:.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    try:
        for mode in ("none", "sync", "async"):
            rows.append(run(mode, args, root))
            print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = [
        "save mode",
        "params",
        "checkpoint size",
        "saves",
        "stall s (median, min–max)",
        "step s",
        "loop s",
    ]
    table = markdown_table(header, rows)
    load = (
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine). "
    )
    print()
    print(table)
    if not args.no_write:
        body = (
            f"{args.steps} training steps (2x128 tokens, AdamW, fp32, {args.threads} threads), a full-state save "
            f"every {args.every} steps; 'none' is the same loop without saves. " + load + "\n\n" + table
        )
        write_section("checkpoint", "Checkpoint stall: sync vs async save", body, ("torch", "safetensors"))


if __name__ == "__main__":
    main()
