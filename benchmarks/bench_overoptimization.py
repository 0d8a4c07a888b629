"""Over-optimization caught live: PPO pushed to hack its reward model on the quickstart's support domain.

Materials: the quickstart pipeline (``examples/quickstart.yaml``) up to its reward model, at the quickstart
test's small settings (SFT policy, 3-member RM ensemble trained on a few hundred noisy simulated labels), in
a workspace of its own (reused when present). Then PPO runs through ``alignflow ppo``:

* ``hack``: no KL penalty, a 10x learning rate, many steps, the ``overall`` head alone (``reward.aggregate:
  mean``), gold utility (``alignflow.domains.support:gold_utility_batch``) logged as ``heldout/gold`` every
  few steps, the default PPO alerts on (``monitor.alerts.rules`` unset) plus ``proxy_heldout_divergence`` with
  the ``stop`` action, ``checkpoint.best_metric: heldout/gold``. When it stops, the same command with the
  alerts off resumes it to the end (exact resume), so one run gives both the stop and the whole gold curve.
* ``hack-min`` / ``hack-mean_minus_std``: the same with ``reward.aggregate: min`` / ``mean_minus_std`` (k=1),
  alerts off: the gold drop under each objective.
* ``normal``: the quickstart's own PPO settings (the small test's step count), default alerts: false alarms.

Figures (gold peak, start of decline, 10%-below step, first alert per rule, stop and best checkpoint steps,
gold drop per aggregate, alerts of severity >= warning on the normal run) go to RESULTS.md.
Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_overoptimization.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOLD = "alignflow.domains.support:gold_utility_batch"
SMALL = [  # tests/quickstart/test_quickstart.py's SMALL, for the stages up to the reward model
    "data.params.n_demonstrations=1500",
    "data.params.n_feedback_prompts=300",
    "data.params.n_rl_prompts=256",
    "data.params.n_eval_prompts=120",
    "sft.config.train.epochs=2",
    "rm.config.train.epochs=2",
]


def env(home: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    e.update(ALIGNFLOW_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CI="true")
    return e


def prepare(home: Path) -> dict[str, Any]:
    """The quickstart up to its reward model (cached in ``home``); returns the pipeline state."""
    state_file = home / "pipelines" / "overopt-prep" / "state.json"
    if not state_file.is_file():
        pipe = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
        for stage in ("ppo", "dpo", "evaluate", "report"):
            pipe["stages"].pop(stage)
        pipe["name"] = "overopt-prep"
        home.mkdir(parents=True, exist_ok=True)
        path = home / "prep.yaml"
        path.write_text(yaml.safe_dump(pipe, sort_keys=False))
        cmd = [sys.executable, "-m", "alignflow.cli.main", "run", str(path), *SMALL]
        subprocess.run(cmd, env=env(home), check=True, capture_output=True)
    return json.loads(state_file.read_text())


def quickstart_ppo(state: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's PPO stage config with the prepared SFT policy, prompts and reward model filled in."""
    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["stages"]["ppo"]["config"]
    out = lambda stage, key: state[stage]["outputs"][key]  # noqa: E731
    cfg["model"]["path"] = out("sft", "checkpoint_dir")
    cfg["data"].update(train=out("data", "rl_prompts"), eval=out("data", "eval_prompts"))
    cfg["reward"]["models"] = [out("rm", "checkpoint_dir")]
    return {"stage": "ppo", **cfg}


def hack_config(
    base: dict[str, Any], steps: int, aggregate: str, every: int, lr: float = 1e-3
) -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    reward = cfg["reward"]
    reward.pop("ensemble_k", None)
    reward.pop("combine", None)  # the overall head alone: no constraints holding the dimensions up
    reward.update(aggregate=aggregate, k=1.0, normalize=True)
    cfg["kl"] = {"coef": 0.0}
    cfg["optim"] = {"lr": lr, "scheduler": "constant"}
    cfg["train"] = {"seed": 0, "steps": steps, "save_every": 0}
    cfg["monitor"] = {"every": every, "score_fn": GOLD, "num_prompts": 32}
    cfg["checkpoint"] = {"best_metric": "heldout/gold", "best_mode": "max"}
    return cfg


def run_ppo(home: Path, name: str, cfg: dict[str, Any], *overrides: str) -> tuple[dict[str, Any], float]:
    run_dir = home / "bench-runs" / name
    cfg = {**cfg, "output_dir": str(run_dir), "run_name": f"overopt-{name}"}
    path = home / "bench-configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "alignflow.cli.main", "ppo", str(path), *overrides],
        env=env(home),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name}: alignflow ppo failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    secs = time.perf_counter() - t0
    stop = re.search(r"stopped at step (\d+)", proc.stdout + proc.stderr)
    if stop:  # a stopped run prints no result JSON: read the run folder
        best = run_dir / "checkpoints" / "best"
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        return {
            "stopped": True,
            "step": int(stop.group(1)),
            "run_id": run_id,
            "best_checkpoint": best.read_text().strip() if best.is_file() else None,
        }, secs
    return json.loads(proc.stdout[proc.stdout.index("{") :]), secs


def metrics(home: Path, name: str) -> list[dict[str, float]]:
    lines = (home / "bench-runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def alerts(home: Path, run_id: str) -> list[Any]:
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    store = Store.open(Workspace.from_env(home, f"sqlite:///{home / 'alignflow.db'}"))
    try:
        return list(store.alerts(run_id=run_id))
    finally:
        store.close()


def _field(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else getattr(row, key)


def gold_curve(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Peak, start of decline and the first step 10% below the peak, on a 3-point moving average of gold
    (32 prompts per point: single points are noisy). Start of decline: the last step before the 10%-below
    step where the smoothed gold was still at its running maximum, i.e. where the fall began."""
    pts = [(int(r["step"]), r["heldout/gold"]) for r in rows if "heldout/gold" in r]
    steps = np.array([s for s, _ in pts])
    gold = np.array([g for _, g in pts])
    smooth = np.convolve(np.pad(gold, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    i_peak = int(np.argmax(smooth))
    peak = float(smooth[i_peak])
    below = [i for i in range(i_peak, len(smooth)) if smooth[i] <= peak - 0.1 * abs(peak)]
    out: dict[str, Any] = {
        "peak_step": int(steps[i_peak]),
        "peak": peak,
        "start": float(smooth[0]),
        "final": float(smooth[-1]),
        "drop_from_peak": peak - float(smooth[-1]),
        "steps": steps.tolist(),
        "gold": gold.tolist(),
    }
    if below:
        i10 = below[0]
        out["below10_step"] = int(steps[i10])
        # the decline starts after the last point, before i10, that sat within 2% of the peak
        near = [i for i in range(i_peak, i10) if smooth[i] >= peak - 0.02 * abs(peak)]
        out["decline_start_step"] = int(steps[near[-1]]) if near else int(steps[i_peak])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=Path("/tmp/alignflow-bench-overopt"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--normal-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3, help="PPO learning rate of the hacking runs")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    home = args.home.resolve()
    t0 = time.perf_counter()
    state = prepare(home)
    prep_s = time.perf_counter() - t0
    base = quickstart_ppo(state)
    report: dict[str, Any] = {"prep_seconds": prep_s}

    # ---- hack (mean) with a stop on proxy/gold divergence, then resumed to the end with alerts off
    cfg = hack_config(base, args.steps, "mean", args.every, args.lr)
    from alignflow.monitor.alerts import default_rules

    rules = [r.model_dump() for r in default_rules("ppo")]
    for r in rules:
        if r["rule"] == "proxy_heldout_divergence":
            r["metric"] = "heldout/gold"
            r["actions"] = sorted({*r["actions"], "stop"})
    cfg["monitor"]["alerts"] = {"rules": rules}
    first, secs1 = run_ppo(home, "hack-mean", cfg)
    stopped = first.get("stopped", False)
    stop_step, best_ckpt = first.get("step"), first.get("best_checkpoint")
    found = alerts(home, first["run_id"])
    secs2 = 0.0
    if stopped:
        _, secs2 = run_ppo(home, "hack-mean", cfg, "monitor.alerts.enabled=false")
    rows = metrics(home, "hack-mean")
    curve = gold_curve(rows)
    first_alert: dict[str, int] = {}
    for a in found:
        rule, step = str(_field(a, "rule")), int(_field(a, "step"))
        first_alert[rule] = min(step, first_alert.get(rule, step))
    report["hack-mean"] = {
        "curve": curve,
        "alerts": [
            {k: _field(a, k) for k in ("rule", "severity", "step", "metric", "value", "threshold")}
            for a in found
        ],
        "first_alert": first_alert,
        "stopped_at": stop_step if stopped else None,
        "best_checkpoint": best_ckpt,
        "seconds": secs1 + secs2,
    }

    # ---- the conservative objectives, same settings, alerts off
    for agg in ("min", "mean_minus_std"):
        c = hack_config(base, args.steps, agg, args.every, args.lr)
        c["monitor"]["alerts"] = {"enabled": False}
        _, secs = run_ppo(home, f"hack-{agg}", c)
        report[f"hack-{agg}"] = {"curve": gold_curve(metrics(home, f"hack-{agg}")), "seconds": secs}

    # ---- the normal quickstart PPO (the small test's 30 steps), default alerts
    normal = json.loads(json.dumps(base))
    normal["train"]["steps"] = args.normal_steps
    out, secs = run_ppo(home, "normal", normal)
    found = alerts(home, out["run_id"])
    report["normal"] = {
        "alerts": [{k: _field(a, k) for k in ("rule", "severity", "step", "metric", "value")} for a in found],
        "warning_or_above": sum(str(_field(a, "severity")) in ("warning", "critical") for a in found),
        "curve": gold_curve(metrics(home, "normal")),
        "seconds": secs,
    }
    (home / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    if not args.no_results:
        write_section(
            "overoptimization",
            "Over-optimization caught live (`benchmarks/bench_overoptimization.py`)",
            render(report, args),
            ("torch", "transformers"),
        )


def render(rep: dict[str, Any], args: argparse.Namespace) -> str:
    h = rep["hack-mean"]
    c = h["curve"]
    lines = [
        "1 thread on a shared 2-core machine. Quickstart domain at the quickstart test's small settings (SFT, "
        f"3-member RM on noisy simulated labels; prep {rep['prep_seconds']:.0f} s). Hack runs: kl.coef 0, lr "
        f"{args.lr:g}, {args.steps} steps, the RM's overall head, gold (`{GOLD}`) on 32 held-out prompts every "
        f"{args.every} steps (points below: 3-point moving average). Default PPO alerts; "
        "proxy_heldout_divergence reads heldout/gold and has the `stop` action; after the stop the same "
        "command with alerts off resumed the run to the end.",
        "",
        "| hack (aggregate: mean) | step |",
        "|---|---|",
        f"| gold peak ({c['peak']:.3f}) | {c['peak_step']} |",
        f"| start of decline | {c.get('decline_start_step', 'none')} |",
        f"| gold 10% below peak | {c.get('below10_step', 'never')} |",
    ]
    for rule, step in sorted(h["first_alert"].items(), key=lambda t: t[1]):
        lines.append(f"| first `{rule}` alert | {step} |")
    lines += [
        f"| stopped by the alert at | {h['stopped_at']} |",
        f"| best checkpoint (heldout/gold) | {Path(h['best_checkpoint']).name if h['best_checkpoint'] else None} |",
        "",
        "| aggregate | gold start | gold peak (step) | gold final | drop from peak | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for agg in ("mean", "min", "mean_minus_std"):
        r = rep[f"hack-{agg}"]
        cc = r["curve"]
        lines.append(
            f"| {agg} | {cc['start']:.3f} | {cc['peak']:.3f} ({cc['peak_step']}) | {cc['final']:.3f} | "
            f"{cc['drop_from_peak']:.3f} | {r['seconds']:.0f} |"
        )
    n = rep["normal"]
    lines += [
        "",
        f"Normal quickstart PPO ({args.normal_steps} steps, default alerts): {n['warning_or_above']} alerts of "
        f"severity >= warning ({len(n['alerts'])} in all: "
        + (", ".join(f"{a['rule']}@{a['step']} {a['severity']}" for a in n["alerts"]) or "none")
        + f"); gold {n['curve']['start']:.3f} -> {n['curve']['final']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
