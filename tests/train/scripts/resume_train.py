"""Tiny training run with checkpointing, used by the resume-equality test.

Trains a dropout-free tiny Llama on seeded synthetic data drawn through a TokenBudgetSampler and packed
with pack_examples, saving a checkpoint every ``--save-every`` steps (asynchronously unless
``--blocking``). The loss is multiplied by a random factor from torch, numpy and python RNGs each step,
so a resume that restored any RNG stream wrongly would end with different weights. Started again with
the same arguments it resumes from the latest intact checkpoint. Prints ``step N`` after every step and
writes the final weights to ``--out``.

    python resume_train.py --run-dir RUN --out final.safetensors --steps 24 --save-every 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from alignflow.data.packing import TokenBudgetSampler, pack_examples
from alignflow.models import tiny_llama
from alignflow.train.accum import global_token_mean_loss
from alignflow.train.checkpoint import CheckpointManager, RetentionPolicy

VOCAB = 89


def dataset(n: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--blocking", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic kernels and light on a shared machine

    data = dataset()
    model = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    sampler = TokenBudgetSampler([len(x) for x in data], max_tokens=96, seed=5, mode="packed")
    config = {"steps": args.steps, "save_every": args.save_every, "lr": 3e-3}

    mgr = CheckpointManager(args.run_dir, retention=RetentionPolicy(keep_recent_minutes=0.0, keep_last=3))
    ckpt = mgr.load_latest()
    if ckpt is None:
        step = 0
        torch.manual_seed(1)
        np.random.seed(2)
        random.seed(3)
    else:
        sampler.load_state_dict(ckpt.restore(model, opt, sched))
        step = ckpt.step
        print(f"resumed {step}", flush=True)

    model.train()
    while step < args.steps:
        for batch in sampler:
            pb = pack_examples([data[i] for i in batch], max_tokens=96, pad_token_id=0)
            logits = model(**pb.model_inputs()).logits
            noise = 1.0 + 0.1 * (torch.rand(()).item() + np.random.rand() + random.random())
            loss = global_token_mean_loss(logits, pb.labels, pb.num_target_tokens) * noise
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % args.save_every == 0:
                mgr.save(
                    step,
                    model,
                    opt,
                    sched,
                    data_state=sampler.state_dict(),
                    config=config,
                    metrics={"loss": loss.item()},
                    blocking=args.blocking,
                )
            print(f"step {step}", flush=True)
            if step >= args.steps:
                break
    mgr.close()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
