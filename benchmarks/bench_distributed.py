"""Scale-out on this machine: SFT tokens/s at 1 and 2 processes, and DCP checkpoints against single files.

    python benchmarks/bench_distributed.py            # both parts, writes RESULTS.md
    python benchmarks/bench_distributed.py --part ckpt

Throughput: the real CLI (`alignflow sft`, `--nproc 2` = torchrun, gloo) on a small random-init Llama with the
same global batch (grad_accum 4 micro-batches of 8 rows); the figure is the median over steps 3.. of the
logged `tokens_per_sec` (global tokens of a step / its wall time), and per process = global / N. The
one-process run is measured with both cores (OMP 2 threads) and with one (the fair unit for scaling).

Checkpoints: the same model + AdamW state saved and restored by CheckpointManager in its one-process
format (safetensors + optimizer.pt) and as torch.distributed.checkpoint shards, in 1 process and (torchrun)
2 processes; blocking saves, median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 256, "num_layers": 4, "vocab_size": 4000}
CKPT_MODEL = {"hidden_size": 512, "num_layers": 6, "vocab_size": 8000}


def _tiny(folder: Path, spec: dict) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(folder, **spec)


def _sft_rows(n: int) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from tests.recipes import toy

    return toy.sft_rows(n)


def throughput(work: Path) -> list[list[str]]:
    model = _tiny(work / "model", MODEL)
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _sft_rows(400)))
    rows = []
    cases = [("1 process, 2 threads", 1, "ddp", "2"), ("1 process, 1 thread", 1, "ddp", "1")]
    cases += [("2 processes, DDP", 2, "ddp", None), ("2 processes, FSDP2", 2, "fsdp", None)]
    for label, nproc, strategy, threads in cases:
        out = work / f"run-{nproc}-{strategy}-{threads}"
        cfg = {
            "stage": "sft",
            "output_dir": str(out),
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": str(data), "eval_fraction": 0.05, "max_length": 64},
            "optim": {"lr": 1e-3, "scheduler": "constant"},
            "train": {
                "seed": 0,
                "batch_size": 8,
                "grad_accum": 4,
                "max_steps": 14,
                "distributed": {"strategy": strategy},
            },
            "checkpoint": {"async_save": False},
        }
        path = work / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, ALIGNFLOW_HOME=str(work / "ws"), HF_HUB_OFFLINE="1")
        env.pop("ALIGNFLOW_DB_URL", None)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        cmd = [sys.executable, "-m", "alignflow", "sft", str(path)] + (
            ["--nproc", str(nproc)] if nproc > 1 else []
        )
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tps = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m and m["step"] >= 3]
        glob = statistics.median(tps)
        loss3 = [m["loss"] for m in metrics if "loss" in m][:3]
        rows.append(
            [
                label,
                f"{glob:,.0f}",
                f"{glob / nproc:,.0f}",
                f"{wall:.1f}",
                ", ".join(f"{x:.6f}" for x in loss3),
            ]
        )
        print(rows[-1], flush=True)
    return rows


def dist_vocab(model: object) -> int:
    from alignflow.train.distributed import unwrap

    return unwrap(model).config.vocab_size


def _ckpt_worker(work: Path, fmt: str, strategy: str, reps: int) -> dict:
    """Save and restore `reps` times; under torchrun every rank runs this and rank 0 reports."""
    import torch

    from alignflow.config import DistributedSection
    from alignflow.models import load_policy
    from alignflow.train.checkpoint import CheckpointManager
    from alignflow.train.distributed import init_distributed

    dist = init_distributed(DistributedSection(strategy=strategy))
    model = load_policy(str(work / "ckpt-model"), dtype="float32", device="cpu")
    model = dist.wrap(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, dist_vocab(model), (2, 32))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    run_dir = work / f"ckpt-{fmt}-{dist.world_size}-{strategy}"
    mgr = CheckpointManager(run_dir, dist=dist, format=fmt)
    saves, loads = [], []
    for i in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(i + 1, model, opt, blocking=True)
        dist.barrier()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mgr.load_latest().restore(model, opt, rng=False)
        dist.barrier()
        loads.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in (run_dir / f"step-{reps:06d}").rglob("*") if p.is_file())
    dist.close()
    return {"save": statistics.median(saves), "load": statistics.median(loads), "bytes": size}


def checkpoints(work: Path) -> list[list[str]]:
    _tiny(work / "ckpt-model", CKPT_MODEL)
    rows = []
    for fmt, nproc, strategy in (
        ("single", 1, "ddp"),
        ("dcp", 1, "ddp"),
        ("dcp", 2, "ddp"),
        ("dcp", 2, "fsdp"),
    ):
        out = work / f"ckpt-{fmt}-{nproc}-{strategy}.json"
        cmd = [sys.executable, __file__, "--ckpt-worker", str(work), fmt, strategy, str(out)]
        if nproc > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                *cmd[1:],
            ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(out.read_text())
        label = {
            "single": "one-process format (safetensors + optimizer.pt)",
            "dcp": "torch.distributed.checkpoint",
        }[fmt]
        who = f"{nproc} process{'es' if nproc > 1 else ''}" + (f", {strategy.upper()}" if nproc > 1 else "")
        rows.append([label, who, f"{r['save']:.3f}", f"{r['load']:.3f}", f"{r['bytes'] / 2**20:.1f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "ckpt"], default="all")
    ap.add_argument(
        "--ckpt-worker", nargs=4, metavar=("WORK", "FORMAT", "STRATEGY", "OUT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.ckpt_worker:
        work, fmt, strategy, out = args.ckpt_worker
        result = _ckpt_worker(Path(work), fmt, strategy, 3)
        if os.environ.get("RANK", "0") == "0":
            Path(out).write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "throughput"):
            load = os.getloadavg()[0]
            rows = throughput(work)
            body = (
                f"SFT through the CLI, Llama {MODEL['hidden_size']}x{MODEL['num_layers']} (vocab "
                f"{MODEL['vocab_size']}), global batch 4 micro-batches x 8 rows x <= 64 tokens, gloo on CPU; "
                f"median of steps 3-14. Load average at the start: {load:.1f} on {os.cpu_count()} cores.\n\n"
                + markdown_table(
                    [
                        "run",
                        "tokens/s (global)",
                        "tokens/s per process",
                        "wall s (incl. start-up)",
                        "first 3 losses",
                    ],
                    rows,
                )
            )
            print(body)
            write_section(
                "distributed-throughput", "Scale-out: SFT tokens/s at 1 and 2 processes", body, ("torch",)
            )
        if args.part in ("all", "ckpt"):
            rows = checkpoints(work)
            body = (
                f"Checkpoint of a Llama {CKPT_MODEL['hidden_size']}x{CKPT_MODEL['num_layers']} (vocab "
                f"{CKPT_MODEL['vocab_size']}) with AdamW state; blocking save (incl. manifest hashing and fsync) "
                "and restore (incl. verification), median of 3.\n\n"
                + markdown_table(["format", "processes", "save s", "restore s", "MiB on disk"], rows)
            )
            print(body)
            write_section(
                "distributed-ckpt",
                "Scale-out: distributed checkpoints against single files",
                body,
                ("torch",),
            )


if __name__ == "__main__":
    main()
