"""The machine's ceiling: dense fp32 matmul FLOP/s through torch (the denominator of every MFU figure).

A square ``n x n`` fp32 matmul costs ``2 n^3`` FLOPs. For each size: one warm-up, then the median of
``--repeats`` timed calls (min–max shown). The peak is the best median over the sizes. Run:

    .venv/bin/python benchmarks/bench_ceiling.py [--sizes 1024 2048 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from _results import markdown_table, summarize, write_section
from _trl_common import fmt, load_average, save_json


def matmul_flops(n: int, repeats: int) -> list[float]:
    """FLOP/s of ``repeats`` timed ``(n, n) @ (n, n)`` fp32 matmuls after one warm-up."""
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    out = torch.empty(n, n, dtype=torch.float32)
    torch.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--name", default="ceiling", help="name of the raw-results file for run_all")
    args = ap.parse_args(argv)
    load = load_average()
    rows, peak = [], 0.0
    for n in args.sizes:
        med, lo, hi = summarize(matmul_flops(n, args.repeats))
        peak = max(peak, med)
        rows.append([f"{n}×{n} · {n}×{n}", f"{fmt(med / 1e9)} ({fmt(lo / 1e9)}–{fmt(hi / 1e9)})"])
    table = markdown_table(["fp32 matmul", "GFLOP/s, median (min–max)"], rows)
    print(table)
    print(
        f"peak (best median): {peak / 1e9:.1f} GFLOP/s; torch threads {torch.get_num_threads()}; load {load:.2f}"
    )
    save_json(args.name, {"peak_flops": peak, "rows": rows, "threads": torch.get_num_threads(), "load": load})
    if not args.no_write:
        body = (
            f"Dense fp32 `torch.matmul`, {torch.get_num_threads()} threads, one warm-up then median of "
            f"{args.repeats} (min–max). 1-minute load average at the start: {load:.2f}.\n\n{table}\n\n"
            f"**Peak used for MFU: {peak / 1e9:.1f} GFLOP/s.**"
        )
        write_section("ceiling", "Machine ceiling: fp32 matmul", body, ("torch",))
    return peak


if __name__ == "__main__":
    main()
