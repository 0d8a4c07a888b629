"""`make bench`: the machine's ceiling, alignflow vs TRL side by side, then every other benchmark script.

Order: ``bench_ceiling.py`` (peak fp32 matmul FLOP/s, the MFU denominator), the TRL comparisons (SFT, reward
model, DPO, PPO, GRPO), generation (``bench_generation.py``, when present), then the other benchmark
scripts of this folder. Each script runs in its own process (one model in memory at a time). Prints the
comparison table and writes it to the ``trl`` section of RESULTS.md, with ratios, MFU, the like-for-like loss
differences and the load average. Run:

    .venv/bin/python benchmarks/run_all.py [--only trl] [--runs 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import markdown_table, summarize, write_section  # noqa: E402
from _trl_common import OUT, fmt, mfu  # noqa: E402

GOALS = {"sft": 1.2, "rm": 1.2, "dpo": 1.5, "ppo": 2.0, "grpo": 1.5, "rloo": 1.5, "generation": 1.5}
OTHERS = (
    "bench_recipes.py",
    "bench_rm_heads.py",
    "bench_hh_reward.py",
    "bench_packing.py",
    "bench_checkpoint.py",
    "bench_store.py",
    "bench_quality_realdata.py",
    "bench_quality_scale.py",
    "bench_annotation.py",
)


def run(script: str, *args: str) -> tuple[int, float]:
    """Run one benchmark script with this interpreter; returns (exit code, seconds)."""
    t0 = time.perf_counter()
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "CI": os.environ.get("CI", "true"),
    }  # CI=true: no per-step progress bars from the recipes
    code = subprocess.call([sys.executable, str(HERE / script), *args], env=env)
    dt = time.perf_counter() - t0
    print(f"=== {script}: exit {code}, {dt:.0f} s", flush=True)
    return code, dt


def comparison_table(results: list[dict[str, Any]], peak: float | None) -> tuple[str, list[str]]:
    """The side-by-side table (markdown) and the loss-check lines."""
    rows, checks = [], []
    for r in results:
        af_med, af_lo, af_hi = summarize(r["alignflow"])
        tr_med, tr_lo, tr_hi = summarize(r["trl"])
        ratio = af_med / tr_med
        goal = GOALS.get(r["name"])
        mfus = "–"
        if peak and r.get("tokens_per_unit"):
            # Trained tokens/s = units/s x real tokens per unit; 6N FLOPs per trained token.
            n = r["n_params_matmul"]
            # Each system's MFU counts the tokens it runs through the model: alignflow's packed prefix
            # trees (RM, DPO) hold each pair's prompt once, TRL's padded rows twice (pads not counted).
            a = mfu(n, af_med * r.get("alignflow_tokens_per_unit", r["tokens_per_unit"]), peak)
            t = mfu(n, tr_med * r["tokens_per_unit"], peak)
            mfus = f"{100 * a:.1f}% / {100 * t:.1f}%"
        rows.append(
            [
                r["title"],
                r["unit"],
                f"{fmt(af_med)} ({fmt(af_lo)}–{fmt(af_hi)})",
                f"{fmt(tr_med)} ({fmt(tr_lo)}–{fmt(tr_hi)})",
                f"**{ratio:.2f}×**",
                f"≥ {goal}× {'met' if goal and ratio >= goal else 'MISSED'}" if goal else "–",
                mfus,
                str(len(r["alignflow"])),
            ]
        )
        if "loss_check" in r:
            c = r["loss_check"]
            checks.append(
                f"- {r['title']}: max |loss diff| over the first {len(c['alignflow'])} steps = "
                f"{c['max_abs_diff']:.1e} (alignflow {', '.join(f'{x:.6f}' for x in c['alignflow'])}; "
                f"TRL {', '.join(f'{x:.6f}' for x in c['trl'])})"
            )
    header = [
        "benchmark",
        "unit",
        "alignflow median (min–max)",
        "TRL median (min–max)",
        "ratio",
        "goal",
        "MFU alignflow / TRL",
        "runs",
    ]
    return markdown_table(header, rows), checks


def pg_url() -> str | None:
    """The PostgreSQL URL for the store and annotation benchmarks: the env's, or the build machines' server."""
    import socket

    if os.environ.get("ALIGNFLOW_TEST_PG_URL"):
        return os.environ["ALIGNFLOW_TEST_PG_URL"]
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return None
    return "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", choices=("trl", "all"), default="all", help="trl: the ceiling and TRL comparisons only"
    )
    ap.add_argument("--runs", type=int, default=5, help="timed runs per system (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run, the first a warm-up")
    ap.add_argument(
        "--table-only", action="store_true", help="rebuild the table and RESULTS.md from the last raw results"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="a 2-layer toy model: checks the plumbing, not a benchmark"
    )
    args = ap.parse_args(argv)
    if url := pg_url():  # the store and annotation benchmarks measure PostgreSQL too when a server answers
        os.environ["ALIGNFLOW_TEST_PG_URL"] = url
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    if not args.table_only:
        for f in OUT.glob("*.json"):
            f.unlink()
    timings: dict[str, float] = {}
    failures: list[str] = []
    common = [
        "--runs",
        str(args.runs),
        "--steps",
        str(args.steps),
        *(["--tiny"] if args.tiny else []),
    ]
    plan: list[tuple[str, list[str]]] = [
        ("bench_ceiling.py", ["--no-write"] if args.tiny else []),
        ("bench_trl_sft.py", common),
        ("bench_trl_rm.py", common),
        ("bench_trl_dpo.py", common),
        ("bench_trl_ppo.py", common),
        ("bench_trl_grpo.py", [*common, "--algo", "grpo"]),
        ("bench_trl_grpo.py", [*common, "--algo", "rloo"]),
        *([] if args.tiny else [("bench_generation.py", [])]),
        (
            "bench_ceiling.py",
            ["--no-write", "--name", "ceiling-end"],
        ),  # again at the end: did the ceiling move during the run?
    ]
    loads = []
    for script, extra in [] if args.table_only else plan:
        loads.append(os.getloadavg()[0])
        code, dt = run(script, *extra)
        timings[f"{script} {' '.join(extra)}".strip()] = dt
        if code:
            failures.append(script)
    ceiling = json.loads((OUT / "ceiling.json").read_text()) if (OUT / "ceiling.json").exists() else None
    results = []
    for name in ("sft", "rm", "dpo", "ppo", "grpo", "rloo"):
        path = OUT / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            size = r["size"]
            r["n_params_matmul"] = (
                r["n_params"] - size["vocab"] * size["hidden"]
            )  # the input embedding is a lookup
            results.append(r)
    for path in sorted(OUT.glob("generation-b*.json"), key=lambda p: int(p.stem.split("-b")[1])):
        results.append(json.loads(path.read_text()))
    peak = ceiling["peak_flops"] if ceiling else None
    end = OUT / "ceiling-end.json"
    peak_end = json.loads(end.read_text())["peak_flops"] if end.exists() else None
    table, checks = comparison_table(results, peak)
    print("\n" + table + "\n\n" + "\n".join(checks))
    if results and not args.tiny:
        end_loads = ", ".join(f"{r['load']:.1f}" if "load" in r else "n/a" for r in results)
        r0 = results[0]
        size = r0["size"]
        body = [
            f"One process per benchmark, the two systems' runs alternating; each run = {args.steps} optimizer steps, "
            f"the first a warm-up (not timed), throughput = work / wall time of the timed steps (step end to step "
            f"end, collation and logging included). Median of {args.runs} runs per system (min–max). Model: a "
            f"Llama built from a config (random init), {size['layers']} layers, hidden {size['hidden']}, "
            f"{size['heads']} heads, MLP {size['intermediate']}, vocab {size['vocab']}, untied embeddings: "
            f"{r0['n_params'] / 1e6:.1f}M parameters. Both systems: **fp32** (`bf16=False`; this CPU has no native "
            f"bf16), gradient checkpointing **off**, AdamW (constant LR, weight decay 0, clip 1.0), SDPA attention, "
            f"same saved weights loaded with `from_pretrained`, the same HH-harmless examples with identical token "
            f"ids, batch 8 (pairs / packed rows of 256 tokens / prompts), sequences ≤ 256 tokens. alignflow runs "
            f"through its public recipe API (`alignflow.recipes.<name>.run(cfg, store)`). TRL 1.16 in the main "
            f"venv; PPO against TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` in `benchmarks/.venv-trl112`.",
            "",
            table,
            "",
            "MFU = 6 × N × trained tokens/s ÷ peak fp32 matmul FLOP/s, N = parameters without the input embedding "
            f"({results[0]['n_params_matmul'] / 1e6:.1f}M); tokens = the real (non-pad) tokens each system runs "
            "through the model (alignflow's RM/DPO prefix trees hold a pair's prompt once, so for the same pairs "
            "it runs fewer tokens than TRL and its MFU understates its speed-up). "
            + (
                f"Peak {peak / 1e9:.1f} GFLOP/s (`bench_ceiling.py`, same run, before the comparisons"
                + (f"; {peak_end / 1e9:.1f} GFLOP/s after them" if peak_end else "")
                + "). "
                if peak
                else ""
            )
            + "PPO/GRPO/RLOO have no MFU column: much of their time is sampling, one token per forward. "
            "Generation rows: alignflow's sampler vs `model.generate` on the same model and prompts, same "
            "sampling settings, fixed length (`bench_generation.py`, which also times smaller models).",
            "",
            "Like-for-like (same initial weights, the same single batch each step, 3 optimizer steps):",
            *checks,
            "",
            f"1-minute load average: {load_start:.2f} at the start, before each script "
            f"{', '.join(f'{x:.1f}' for x in loads) or 'n/a (table rebuilt with --table-only)'}, at the end of each "
            f"comparison {end_loads} "
            f"(2 cores shared with other engineers' test runs"
            + (
                "; **above 1.5: figures are noisy**"
                if max([*loads, *(r.get("load", 0.0) for r in results)]) > 1.5
                else ""
            )
            + (
                f"). Wall time of this part: {(time.perf_counter() - t_start) / 60:.1f} min."
                if not args.table_only
                else ")."
            ),
        ]
        for r in results:
            if r.get("threads", 2) != 2:
                body.append(
                    f"\n{r['title']}: measured separately with `OMP_NUM_THREADS={r['threads']}` for both systems "
                    "(see the notes below the table)."
                )
            if "mean_response" in r:
                m = r["mean_response"]
                body.append(
                    f"\n{r['title']}: mean response length alignflow {m['alignflow']:.1f}, TRL {m['trl']:.1f} tokens."
                )
            if "alignflow_mean_response" in r:
                body.append(
                    f"\n{r['title']}: mean response length alignflow {r['alignflow_mean_response']:.1f} tokens "
                    f"(stops at EOS), TRL {r['response_length']} (never stops, `stop_token=None`)."
                )
        write_section(
            "trl",
            "alignflow vs TRL: training throughput, MFU, like-for-like losses",
            "\n".join(body),
            ("torch", "transformers", "trl", "accelerate"),
        )
    if args.only == "all":
        for script in OTHERS:
            if (HERE / script).exists():
                code, dt = run(script)
                timings[script] = dt
                if code:
                    failures.append(script)
    print("\nwall time per script: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
