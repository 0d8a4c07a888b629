"""What `alignflow run --engine ray` costs over the local engine: the same pipeline both ways, real CLI.

Each run is `python -m alignflow.cli.main run PIPELINE [overrides] [--engine ray]` in a fresh workspace
(a fresh local Ray instance for the Ray runs, started and shut down by the command):

- `--quick` (the default): the runner tests' tiny pipeline (`tests/pipeline/stages.py`: data -> train ->
  evaluate; a few rows, no torch), `--repeats` times each way, in alternating order; then the Ray engine on
  the local run's workspace, where every stage is skipped (no Ray instance is started: the cost of the flag
  alone); then a compute-bound stage, SFT for `--sft-steps` steps on the quickstart's base model shape
  (4 layers, hidden 128), `--repeats` times each way, to see whether a stage computes slower in a Ray task;
- `--full`: also the small quickstart (`tests/quickstart/test_quickstart.py`'s SMALL overrides) once each way.

Columns: wall seconds of the command (median, range over repeats), the overhead (ray - local), `ray.init`
(from the command's "[ray]  started a local Ray instance ... in X s" line) and the sum of the stages' own
seconds from state.json (a stage's time under Ray includes submitting the task, starting a worker process and
the imports in it; `ray.init` is not inside any stage).

    .venv/bin/python benchmarks/bench_ray_pipeline.py [--quick | --full] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pipeline.stages import TOY_PIPELINE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INIT = re.compile(r"\[ray\]  started a local Ray instance \(\d+ CPUs\) in ([\d.]+) s")

SFT = """\
name: sftbench
stages:
  base:
    call: alignflow.domains.quickstart:make_base
    params: {corpus_size: 1000, vocab_size: 600, hidden_size: 128, num_layers: 4, num_heads: 4, seed: 0}
  sft:
    recipe: sft
    config:
      model: {path: "${base.model_dir}", dtype: float32}
      data: {train: DATA, eval_fraction: 0.25, max_length: 64}
      optim: {lr: 2.0e-3, scheduler: constant}
      train: {seed: 0, batch_size: 8, max_steps: STEPS, save_every: 0}
"""


def run_once(pipeline: Path, name: str, overrides: list[str], engine: str, home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    env["ALIGNFLOW_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "alignflow.cli.main", "run", str(pipeline), *overrides]
    if engine == "ray":
        cmd += ["--engine", "ray"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    state = json.loads((home / "pipelines" / name / "state.json").read_text())
    m = INIT.search(proc.stdout)
    return {
        "wall": wall,
        "init": float(m.group(1)) if m else 0.0,
        "stages": sum(e.get("seconds", 0.0) for e in state.values()),
        **{f"stage:{k}": e.get("seconds", 0.0) for k, e in state.items()},
        "state": state,
    }


def both_ways(
    pipeline: Path, name: str, overrides: list[str], root: Path, label: str, repeats: int, shown: str = "wall"
) -> dict[str, list[dict[str, Any]]]:
    """`repeats` runs each way, the order alternating (local first in even rounds), each in a fresh workspace
    `root / f"{name}-{engine}-{i}"`; prints `shown` of each run."""
    res: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
    for i in range(repeats):
        for engine in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
            r = run_once(pipeline, name, overrides, engine, root / f"{name}-{engine}-{i}")
            res[engine].append(r)
            print(f"{label}, {engine}, run {i + 1}: {r[shown]:.1f} s", flush=True)
    return res


def fmt(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:.1f}" if len(xs) == 1 else f"{med:.1f} ({min(xs):.1f}–{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the tiny pipeline only (the default)")
    size.add_argument("--full", action="store_true", help="also the small quickstart, once each way")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the tiny pipelines each way")
    ap.add_argument("--sft-steps", type=int, default=300, help="steps of the compute-bound SFT stage")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        tiny = root / "toy.yaml"
        tiny.write_text(TOY_PIPELINE.replace("DIE", "null"))
        res = both_ways(tiny, "toy", [], root, "tiny pipeline", args.repeats)
        cached = run_once(tiny, "toy", [], "ray", root / "toy-local-0")  # all three stages skipped
        print(f"tiny pipeline, ray, everything cached: {cached['wall']:.1f} s", flush=True)
        rows.append(_row(f"tiny pipeline (3 stages), {args.repeats} runs each", res))
        rows.append(
            [
                "tiny pipeline, every stage cached (no Ray instance started)",
                fmt([r["wall"] for r in res["local"]]),
                f"{cached['wall']:.1f}",
                f"{cached['wall'] - statistics.median(r['wall'] for r in res['local']):+.1f}",
                "–",
                "–",
                "–",
            ]
        )
        sys.path.insert(0, str(REPO))
        from tests.recipes import toy as toy_data

        data = toy_data.write_jsonl(root / "sft.jsonl", toy_data.sft_rows(48))
        sft = root / "sft.yaml"
        sft.write_text(SFT.replace("DATA", str(data)).replace("STEPS", str(args.sft_steps)))
        sres = both_ways(sft, "sftbench", [], root, "sft stage", args.repeats, shown="stage:sft")
        rows.append(
            _row(f"base + SFT {args.sft_steps} steps (h128, 4 layers), {args.repeats} runs each", sres)
        )
        sft_local = [r["stage:sft"] for r in sres["local"]]
        sft_ray = [r["stage:sft"] for r in sres["ray"]]
        ckpts = {r["state"]["sft"]["outputs"]["checkpoint"] for side in sres.values() for r in side}
        same = (
            "the same checkpoint id in every run"
            if len(ckpts) == 1
            else f"{len(ckpts)} different checkpoint ids"
        )
        sft_line = (
            f"The SFT stage alone: {fmt(sft_local)} s locally, {fmt(sft_ray)} s as a Ray task "
            f"({statistics.median(sft_ray) - statistics.median(sft_local):+.1f} s; {same})."
        )
        if args.full:
            sys.path.insert(0, str(REPO))
            from tests.quickstart.test_quickstart import SMALL

            qs = REPO / "examples" / "quickstart.yaml"
            full = both_ways(qs, "quickstart", SMALL, root, "small quickstart", 1)
            rows.append(
                _row("small quickstart (9 stages, the quickstart test's overrides), 1 run each", full)
            )

    header = [
        "pipeline",
        "local s",
        "ray s",
        "overhead s",
        "ray.init s",
        "stage s: local",
        "stage s: ray",
    ]
    table = markdown_table(header, rows)
    print(table)
    print(sft_line)
    if args.no_write:
        return
    body = (
        f"`benchmarks/bench_ray_pipeline.py{' --full' if args.full else ''} --repeats {args.repeats}`: the real "
        "CLI (`alignflow run PIPELINE` vs `... --engine ray`), each run in a fresh workspace; a Ray run starts "
        "its own local instance (all cores, no dashboard) and shuts it down. Wall seconds of the whole command "
        "(median and range); `ray.init` as the command reports it; the stage columns sum the stages' own seconds "
        "from state.json (under Ray: task submission, a worker process and its imports, the stage, the result "
        f"back). Load average at the start: {load:.1f} on {os.cpu_count()} cores (the machine is shared).\n\n"
        f"{table}\n\n{sft_line}\n\n"
        "The overhead has two parts: one per command, `ray.init` (which also writes the token-auth file under "
        "~/.ray the first time), the driver importing ray and torch (for the thread count it passes to the "
        "tasks) and `ray.shutdown`; and one per stage: the task round trip, the task opening its own store, and "
        "a new worker process (which imports alignflow and torch) whenever no idle one fits the stage's "
        "resources (compare the stage columns). A "
        "command whose stages are all cached starts no Ray instance, so the flag alone costs the ray import."
    )
    write_section(
        "ray-pipeline",
        "Pipelines on Ray: overhead of `--engine ray`",
        body,
        pkgs=("ray", "torch"),
    )


def _row(label: str, res: dict[str, list[dict[str, Any]]]) -> list[str]:
    local = [r["wall"] for r in res["local"]]
    ray = [r["wall"] for r in res["ray"]]
    return [
        label,
        fmt(local),
        fmt(ray),
        f"{statistics.median(ray) - statistics.median(local):+.1f}",
        fmt([r["init"] for r in res["ray"]]),
        fmt([r["stages"] for r in res["local"]]),
        fmt([r["stages"] for r in res["ray"]]),
    ]


if __name__ == "__main__":
    main()
