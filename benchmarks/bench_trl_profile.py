"""Where the time goes: one benchmark run of one system under ``torch.profiler`` and ``cProfile``.

Prints the top operators by self CPU time (torch.profiler) and the top Python functions by own time
(cProfile) for one run of ``--bench`` (sft, rm, dpo, ppo, grpo, rloo) on ``--system`` (alignflow or trl; ppo:
alignflow only, TRL 1.12 runs in its own venv), with the
same model and data as the comparison scripts. The profile covers the whole ``run()`` / ``train()`` call,
setup included, so read it for the shape of the step, not for absolute step times. Run:

    .venv/bin/python benchmarks/bench_trl_profile.py --bench sft --system alignflow [--steps 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from pathlib import Path
from typing import Any

from _trl_common import TINY_TEST, ModelSize, alignflow_store, build_assets


def profile_once(bench: str, system: str, steps: int, tiny: bool, top: int) -> dict[str, Any]:
    import bench_trl_dpo
    import bench_trl_grpo
    import bench_trl_rm
    import bench_trl_sft
    import torch
    from torch.profiler import ProfilerActivity, profile

    root = Path(tempfile.mkdtemp(prefix=f"prof-{bench}-"))
    assets = build_assets(root, TINY_TEST if tiny else ModelSize(), 256)
    store = alignflow_store(root)
    batch = 8
    if bench == "sft":
        rows = assets.sft[:200]
        path = assets.write_jsonl("sft.jsonl", rows)
        encoded = bench_trl_sft._encoded(assets, rows)
        fns = {
            "alignflow": lambda: bench_trl_sft.alignflow_sft(assets, store, path, steps, batch, "prof"),
            "trl": lambda: bench_trl_sft.trl_sft(assets, encoded, steps, batch, "prof"),
        }
    elif bench in ("rm", "dpo"):
        rows = assets.pairs[: batch * steps]
        path = assets.write_jsonl(f"{bench}.jsonl", rows)
        if bench == "rm":
            enc = bench_trl_rm.encode_pairs(assets, rows)
            fns = {
                "alignflow": lambda: bench_trl_rm.alignflow_rm(assets, store, path, steps, batch, "prof"),
                "trl": lambda: bench_trl_rm.trl_rm(assets, enc, steps, batch, "prof"),
            }
        else:
            fns = {
                "alignflow": lambda: bench_trl_dpo.alignflow_dpo(assets, store, path, steps, batch, "prof"),
                "trl": lambda: bench_trl_dpo.trl_dpo(assets, rows, steps, batch, "prof"),
            }
    elif bench == "ppo":
        import bench_trl_ppo

        if system != "alignflow":
            raise SystemExit("ppo: only --system alignflow (TRL 1.12's PPOTrainer runs in its own venv)")
        rows, _ = bench_trl_ppo.prompt_rows(assets, batch * steps)
        path = assets.write_jsonl("ppo-prompts.jsonl", rows)
        fns = {
            "alignflow": lambda: bench_trl_ppo.alignflow_ppo(assets, store, path, steps, batch, 32, 2, "prof")
        }
    else:
        prompts = assets.prompts[: 4 * steps]
        path = assets.write_jsonl(
            "rl-prompts.jsonl",
            [{"id": f"p{i}", "prompt": p, "completion": "-"} for i, p in enumerate(prompts)],
        )
        shape = (bench, steps, 4, 4, 32)
        fns = {
            "alignflow": lambda: bench_trl_grpo.alignflow_rl(assets, store, path, *shape, "prof"),
            "trl": lambda: bench_trl_grpo.trl_rl(assets, prompts, *shape, "prof"),
        }
    prof_py = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prof_py.enable()
        steps_out, _ = fns[system]()
        prof_py.disable()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    buf = io.StringIO()
    pstats.Stats(prof_py, stream=buf).sort_stats("tottime").print_stats(top)
    timed = steps_out[1:]
    return {
        "step_seconds": [round(s, 3) for s, _ in steps_out],
        "rate": sum(u for _, u in timed) / sum(s for s, _ in timed) if timed else float("nan"),
        "ops": ops,
        "python": buf.getvalue(),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", choices=("sft", "rm", "dpo", "ppo", "grpo", "rloo"), required=True)
    ap.add_argument("--system", choices=("alignflow", "trl"), required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    out = profile_once(args.bench, args.system, args.steps, args.tiny, args.top)
    print(f"{args.bench} / {args.system}: step seconds {out['step_seconds']}, timed rate {out['rate']:.2f}/s")
    print(out["ops"])
    print(out["python"])


if __name__ == "__main__":
    main()
