"""Throughput of the SFT, reward-model and DPO recipes on tiny Llama models (fp32, CPU).

Each recipe runs `--steps` optimizer steps through its real `run(cfg)` (data import, tokenisation,
checkpointing and evaluation excluded from the rate: the rate is the median of the per-step
`tokens_per_sec` / `pairs_per_sec` metrics after `--warmup` steps). Writes a section of RESULTS.md.

    .venv/bin/python benchmarks/bench_recipes.py [--steps 12] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402

MODELS = {
    "tiny (2 layers, hidden 64, vocab 512)": {"hidden_size": 64, "num_layers": 2, "vocab_size": 512},
    "small (4 layers, hidden 256, vocab 2000)": {"hidden_size": 256, "num_layers": 4, "vocab_size": 2000},
}


def _text(rng: random.Random, corpus: list[str], n_sentences: int) -> str:
    return " ".join(rng.choice(corpus) for _ in range(n_sentences))


def make_data(work: Path, seed: int = 0) -> dict[str, Path]:
    """Synthetic rows of realistic length: prompts ~3 sentences, completions/responses ~8 sentences."""
    from alignflow.models import default_corpus

    corpus = default_corpus(4000, seed=seed)
    rng = random.Random(seed)
    sft = [
        {"id": f"s{i}", "prompt": _text(rng, corpus, 3), "completion": _text(rng, corpus, 8)}
        for i in range(256)
    ]
    pairs = [
        {
            "id": f"p{i}",
            "prompt": _text(rng, corpus, 3),
            "chosen": _text(rng, corpus, 8),
            "rejected": _text(rng, corpus, 8),
        }
        for i in range(256)
    ]
    out = {}
    for name, rows in (("sft", sft), ("pairs", pairs)):
        p = work / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = p
    return out


def measure(
    stage: str, model_dir: Path, data_file: Path, work: Path, steps: int, warmup: int, extra: dict
) -> tuple[float, float]:
    """Median and max of the per-step throughput metric after `warmup` steps."""
    from alignflow.config import validate_config
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    if stage == "sft":
        from alignflow.recipes.sft import SFTConfig as Cfg
        from alignflow.recipes.sft import run
    elif stage == "rm":
        from alignflow.recipes.reward import RewardConfig as Cfg
        from alignflow.recipes.reward import run
    else:
        from alignflow.recipes.dpo import DPOConfig as Cfg
        from alignflow.recipes.dpo import run
    out = work / f"{stage}-{len(list(work.iterdir()))}"
    cfg = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data_file), "eval_fraction": 0.02, "max_length": 256},
        "optim": {"lr": 1e-4},
        "train": {"seed": 0, "batch_size": 8, "max_steps": steps},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    store = Store.open(Workspace.from_env(work / "ws"))
    try:
        run(validate_config(cfg, Cfg), store)
    finally:
        store.close()
    key = "tokens_per_sec" if stage == "sft" else "pairs_per_sec"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r[key] for r in rows if key in r and r["step"] > warmup]
    return statistics.median(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    from alignflow.models import make_tiny_model_dir

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    data = make_data(work)
    rows = []
    for label, spec in MODELS.items():
        model_dir = make_tiny_model_dir(work / label.split()[0], **spec)
        cases = [
            ("SFT, padded", "sft", "sft", {}, "tokens/s"),
            ("SFT, packed", "sft", "sft", {"data": {"packing": True}}, "tokens/s"),
            ("SFT, LoRA r=8", "sft", "sft", {"lora": {"enabled": True}}, "tokens/s"),
            ("RM (causal backbone)", "rm", "pairs", {}, "pairs/s"),
            ("DPO sigmoid, precomputed reference", "dpo", "pairs", {}, "pairs/s"),
            (
                "DPO sigmoid, reference on the fly",
                "dpo",
                "pairs",
                {"reference": {"precompute": False}},
                "pairs/s",
            ),
            (
                "DPO, LoRA r=8 (adapter-disabled reference)",
                "dpo",
                "pairs",
                {"lora": {"enabled": True}},
                "pairs/s",
            ),
        ]
        for name, stage, dkey, extra, unit in cases:
            med, best = measure(stage, model_dir, data[dkey], work, a.steps, a.warmup, extra)
            rows.append(
                [
                    label,
                    name,
                    unit,
                    f"{med:,.0f}" if unit == "tokens/s" else f"{med:.1f}",
                    f"{best:,.0f}" if unit == "tokens/s" else f"{best:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["model", "recipe", "unit", "median", "best step"], rows)
    print(table)
    if not a.no_write:
        body = (
            f"{table}\n\nfp32 on CPU, batch 8 (SFT: 8 examples or 8 packed rows of 256 tokens), max_length 256, "
            f"synthetic rows (prompt ~3 sentences, completion/response ~8), {a.steps} steps, median over steps after "
            f"the first {a.warmup}. SFT tokens/s counts prompt + completion tokens (no padding); RM and DPO pairs/s "
            "count preference pairs (two sequences each). The machine is shared with other jobs (1-minute load "
            f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after), so rates vary run to run.\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_recipes.py {' '.join(sys.argv[1:])}`"
        )
        write_section(
            "recipes-throughput", "Recipe throughput (SFT, RM, DPO)", body, ("torch", "transformers")
        )


if __name__ == "__main__":
    main()
