"""Generation speed: alignflow's KV-cache sampler vs `model.generate`, and PPO time by phase.

Run: `.venv/bin/python benchmarks/bench_generation.py [--threads N] [--repeats R]`. Prints tables and writes
the `generation` section of benchmarks/RESULTS.md.

Both samplers use the same settings (temperature 1, top-p 1, no top-k, fixed length: EOS disabled so every row
produces exactly `max_new_tokens` and the token counts are equal). Models: the TRL comparisons' model (hidden 256,
8 layers, vocab 4096, HH tokenizer and prompts; batches 8/16/64 x 32 new tokens, also written for `run_all.py`'s
table), the test-size tiny Llama (hidden 64, 2 layers, vocab 400) and the DEPENDENCY-NOTES reference size
(hidden 256, 4 layers, vocab 2000), fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, summarize, write_section  # noqa: E402
from _trl_common import ModelSize, build_assets, save_json  # noqa: E402

from alignflow.models import default_corpus, load_policy, load_tokenizer, make_tiny_model_dir  # noqa: E402
from alignflow.rollout import sample  # noqa: E402

BENCH_LABEL = "bench (h256, L8, V4096, HH prompts)"
SIZES = {
    "tiny (h64, L2, V400)": {"hidden_size": 64, "num_layers": 2, "vocab_size": 400},
    "small (h256, L4, V2000)": {"hidden_size": 256, "num_layers": 4, "vocab_size": 2000},
}


def bench_generation(
    model_dir: Path, batch: int, new_tokens: int, repeats: int, prompts: list[str] | None = None
) -> dict[str, Any]:
    tok = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, dtype="float32").eval()
    if prompts is None:
        prompts = [" ".join(default_corpus(n=1 + i % 3, seed=i)) for i in range(batch)]
    enc = tok(prompts[:batch], return_tensors="pt", padding=True)
    ids, am = enc.input_ids, enc.attention_mask

    def ours(fast: bool = True) -> int:
        r = sample(
            model,
            ids,
            am,
            max_new_tokens=new_tokens,
            eos_token_id=[],
            pad_token_id=tok.pad_token_id,
            fast=fast,
        )
        return r.new_tokens

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=am,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - ids.shape[1]) * batch

    fns = {"ours": ours, "ours_hf_path": lambda: ours(False), "generate": hf}
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    # Interleaved, order rotated each round, so load from other processes hits all three alike; the speed-up is
    # the median of per-round ratios.
    names = list(fns)
    for i in range(repeats):
        for name in names[i % 3 :] + names[: i % 3]:
            t0 = time.perf_counter()
            n = fns[name]()
            rates[name].append(n / (time.perf_counter() - t0))
    res: dict[str, Any] = {k: summarize(v)[0] for k, v in rates.items()}
    res["rates"] = rates
    res["speedup"] = summarize([o / g for o, g in zip(rates["ours"], rates["generate"], strict=True)])[0]
    res["speedup_hf_path"] = summarize(
        [o / g for o, g in zip(rates["ours_hf_path"], rates["generate"], strict=True)]
    )[0]
    return res


def bench_ppo(model_dir: Path, steps: int) -> dict[str, float]:
    """A short PPO run (GAE, separate value model, toy reward); phase times from its metrics."""
    from alignflow.config import validate_config
    from alignflow.recipes.ppo import PPOConfig, run
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": s + " ", "completion": "."}) for s in default_corpus(n=128, seed=1))
    )
    cfg = validate_config(
        {
            "stage": "ppo",
            "output_dir": str(work / "run"),
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"train": str(prompts)},
            "rollout": {"batch_size": 16, "max_new_tokens": 32},
            "reward": {"fn": "alignflow.rollout.toy:lowercase_fraction"},
            "ppo": {"epochs": 2, "minibatch_size": 8},
            "optim": {"lr": 1e-3, "scheduler": "constant"},
            "train": {"steps": steps},
        },
        PPOConfig,
    )
    store = Store.open(Workspace.from_env(str(work / "ws")))
    run(cfg, store)
    store.close()
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()][
        1:
    ]  # skip warm-up
    keys = (
        "time/generation",
        "time/scoring",
        "time/training",
        "time/step",
        "throughput/episodes_per_s",
        "throughput/gen_tokens_per_s",
    )
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (2 = the TRL comparisons' setting)"
    )
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--ppo-steps", type=int, default=6)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    gen_rows, ppo_rows = [], []

    def gen_row(label: str, batch: int, new_tokens: int, r: dict[str, Any]) -> None:
        gen_rows.append(
            [
                label,
                str(batch),
                str(new_tokens),
                f"{r['generate']:,.0f}",
                f"{r['ours']:,.0f}",
                f"{r['speedup']:.2f}x",
                f"{r['ours_hf_path']:,.0f}",
                f"{r['speedup_hf_path']:.2f}x",
            ]
        )
        print(gen_rows[-1], flush=True)

    # The model of the TRL comparisons (HH tokenizer, 8 x 256, vocab 4096) on HH prompts, at the RL batch sizes.
    assets = build_assets(tmp / "bench", ModelSize(), 256)
    for batch in (8, 16, 64):
        r = bench_generation(assets.policy_dir, batch, 32, args.repeats, prompts=assets.prompts)
        gen_row(BENCH_LABEL, batch, 32, r)
        save_json(
            f"generation-b{batch}",
            {
                "name": "generation",
                "title": f"Generation, {batch} HH prompts x 32 new tokens (vs `model.generate`)",
                "unit": "new tokens/s",
                "alignflow": r["rates"]["ours"],
                "trl": r["rates"]["generate"],
                "tokens_per_unit": None,
                "n_params": assets.n_params,
                "size": assets.size.__dict__,
                "batch": batch,
            },
        )
    for label, size in SIZES.items():
        model_dir = make_tiny_model_dir(tmp / label.split()[0], **size)
        for batch, new_tokens in ((16, 64), (64, 64)):
            gen_row(label, batch, new_tokens, bench_generation(model_dir, batch, new_tokens, args.repeats))
        p = bench_ppo(model_dir, args.ppo_steps)
        ppo_rows.append(
            [
                label,
                f"{p['time/generation']:.3f}",
                f"{p['time/scoring']:.3f}",
                f"{p['time/training']:.3f}",
                f"{p['time/step']:.3f}",
                f"{p['throughput/episodes_per_s']:.1f}",
                f"{p['throughput/gen_tokens_per_s']:,.0f}",
            ]
        )
        print(ppo_rows[-1], flush=True)
    gen_table = markdown_table(
        [
            "model",
            "batch",
            "new tokens",
            "generate tok/s",
            "alignflow tok/s (default: lean Llama path)",
            "speed-up",
            "alignflow tok/s (`fast=False`: HF forward, static cache)",
            "speed-up",
        ],
        gen_rows,
    )
    ppo_table = markdown_table(
        [
            "model",
            "generation s",
            "scoring s",
            "training s (incl. ref/value fwd)",
            "step s",
            "episodes/s",
            "gen tok/s",
        ],
        ppo_rows,
    )
    print(gen_table, "\n", ppo_table, sep="\n")
    if not args.no_write:
        load = os.getloadavg()[0]
        body = (
            f"Load average during the run: {load:.1f} on {os.cpu_count()} cores (shared machine; absolute "
            "numbers vary with load, the interleaved ratios less so).\n\n"
            f"New tokens per second, median of {args.repeats} interleaved runs, fp32, {args.threads} torch thread(s); "
            "same sampling settings (temperature 1, top-p 1, no top-k, fixed length); speed-up = median of "
            "per-round ratios to `generate`.\n\n"
            f"{gen_table}\n\nPPO step by phase (GAE + separate value model, 16 prompts x 32 new tokens, "
            f"2 epochs of minibatch 8, rule-based reward; mean of steps 2..{args.ppo_steps}):\n\n{ppo_table}\n\n"
            "Reproduce: `.venv/bin/python benchmarks/bench_generation.py`"
        )
        write_section("generation", "Rollout generation and PPO phases", body, ("torch", "transformers"))


if __name__ == "__main__":
    main()
