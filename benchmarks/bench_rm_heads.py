"""Wall-time cost of a multi-head reward model: `alignflow rm` with one head vs `heads: auto` (overall + 4).

The same pairs (the quickstart's customer-support domain: two replies per ticket written with random per-dimension
quality, the chosen one the gold-better, `labels` = gold's per-dimension verdicts) train the same causal model
(the quickstart's size: 4 layers, hidden 128) through the recipe's real `run(cfg)`, alternating one-head and
five-head runs. The rate is the median per-step `pairs_per_sec` after `--warmup` steps; the end-to-end time is
the whole `run()` (load, tokenise, train, evaluate, export). Writes a section of RESULTS.md.

    .venv/bin/python benchmarks/bench_rm_heads.py [--steps 20] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402


def make_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """`n` labelled pairs from the support domain; ties on the overall gold utility are skipped."""
    from alignflow.domains import support

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        t = support.sample_ticket(rng)
        prompt = t.prompt(rng)
        a, b = (
            support.write_response(t, {d: rng.random() < 0.5 for d in support.DIMENSIONS}, rng)
            for _ in range(2)
        )
        ga, gb = support.gold_scores(prompt, a), support.gold_scores(prompt, b)
        ua, ub = support.gold_utility(prompt, a), support.gold_utility(prompt, b)
        if abs(ua - ub) < 1e-9 or a.strip() == b.strip():
            continue
        (chosen, gc), (rejected, gr) = sorted(
            [(a, ga), (b, gb)], key=lambda x: -support.gold_utility(prompt, x[0])
        )
        labels = {d: 1.0 if gc[d] > gr[d] else 0.0 for d in support.DIMENSIONS if gc[d] != gr[d]}
        rows.append(
            {
                "id": f"p{len(rows)}",
                "prompt": prompt,
                "chosen": " " + chosen,
                "rejected": " " + rejected,
                "labels": labels,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(
    model_dir: Path, data: Path, work: Path, steps: int, warmup: int, heads: str | None
) -> tuple[float, float]:
    """(median pairs/s after warm-up, end-to-end seconds) of one `alignflow rm` run."""
    from alignflow.config import validate_config
    from alignflow.recipes.reward import RewardConfig, run
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    out = work / f"rm-{len(list(work.iterdir()))}"
    cfg = {
        "stage": "rm",
        "output_dir": str(out),
        "model": {"path": str(model_dir), "dtype": "float32", "backbone": "causal"},
        "heads": heads,
        "data": {"train": str(data), "eval_fraction": 0.1, "max_length": 128},
        "optim": {"lr": 5e-4},
        "train": {"seed": 0, "batch_size": 16, "max_steps": steps},
    }
    store = Store.open(Workspace.from_env(work / "ws"))
    t0 = time.perf_counter()
    try:
        run(validate_config(cfg, RewardConfig), store)
    finally:
        store.close()
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_sec"] for r in rows if "pairs_per_sec" in r and r["step"] > warmup]
    return statistics.median(rates), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two-thread runs on a shared 2-core machine thrash)",
    )
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)

    from alignflow.domains import support
    from alignflow.models import make_tiny_model_dir

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-rm-heads-"))
    data = make_pairs(work / "pairs.jsonl", a.pairs)
    model = make_tiny_model_dir(
        work / "model",
        texts=support.corpus(4000, seed=0),
        vocab_size=600,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        max_position_embeddings=256,
        seed=0,
    )
    results: dict[str, list[tuple[float, float]]] = {"1 head (overall)": [], "5 heads (heads: auto)": []}
    for _ in range(a.repeats):  # alternate, so drifting machine load hits both alike
        for label, heads in (("1 head (overall)", None), ("5 heads (heads: auto)", "auto")):
            results[label].append(measure(model, data, work, a.steps, a.warmup, heads))
            print(label, results[label][-1], flush=True)
    base_rate = statistics.median(r for r, _ in results["1 head (overall)"])
    base_time = statistics.median(s for _, s in results["1 head (overall)"])
    rows = []
    for label, runs in results.items():
        rate, secs = statistics.median(r for r, _ in runs), statistics.median(s for _, s in runs)
        rows.append(
            [
                label,
                f"{rate:.1f} ({min(r for r, _ in runs):.1f}–{max(r for r, _ in runs):.1f})",
                f"{rate / base_rate:.3f}",
                f"{secs:.1f}",
                f"{secs / base_time:.3f}",
            ]
        )
    table = markdown_table(
        [
            "reward model",
            "pairs/s, median (min–max)",
            "rate vs 1 head",
            "end-to-end s (median)",
            "time vs 1 head",
        ],
        rows,
    )
    print(table)
    if not a.no_write:
        body = (
            f"{table}\n\n{a.pairs} support-domain pairs with per-dimension gold labels, causal model of the quickstart's "
            f"size (4 layers, hidden 128, vocab 600), fp32, {a.threads} torch thread(s), batch 16, max_length 128, {a.steps} steps, rate = median "
            f"per-step pairs/s after the first {a.warmup}; end-to-end = the whole recipe run (load, tokenise, train, "
            f"evaluate on 10% of prompts, export). {a.repeats} runs per setting, alternating. 1-minute load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the machine is shared).\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_rm_heads.py {' '.join(sys.argv[1:])}`"
        )
        write_section(
            "rm-heads",
            "Multi-head reward model: cost of the dimension heads",
            body,
            ("torch", "transformers"),
        )


if __name__ == "__main__":
    main()
