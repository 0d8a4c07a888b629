"""`alignflow STAGE CONFIG --nproc N`: the same command under `torchrun --standalone --nproc-per-node N`.

The launcher stays in the foreground as torchrun's parent and does three things torchrun alone does not:

- it forwards SIGTERM, SIGINT and SIGUSR1 to the training processes themselves (torchrun would die of a
  SIGUSR1, and answers a SIGTERM by killing its workers 30 s later whatever they are doing), so every rank
  finishes its step, the ranks agree on it and checkpoint;
- it exits with the workers' verdict: ``EXIT_REQUEUE`` (75) when the run stopped on SIGTERM/SIGUSR1 after a
  checkpoint (requeue and re-run the same command to resume), 0 when it finished, torchrun's code otherwise;
- it sets the OpenMP thread count per process to the machine's cores divided by N (torchrun's default is 1).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Not alignflow.train.distributed: it imports torch, which `alignflow --help` and `alignflow serve` never need.
from alignflow.train.torchrun_env import EXIT_REQUEUE, under_torchrun

if TYPE_CHECKING:
    from alignflow.train.distributed import DistContext

STATUS_ENV = "ALIGNFLOW_STATUS_FILE"  # rank 0 writes {"exit_code": N} here before exiting
# torchrun's rendezvous arguments instead of --standalone, for several nodes (examples/slurm, examples/k8s):
# e.g. "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29500 --rdzv-id JOB"
TORCHRUN_ARGS_ENV = "ALIGNFLOW_TORCHRUN_ARGS"
NPROC_HELP = (
    "Processes on this machine: N > 1 runs the command under `torchrun --standalone --nproc-per-node N` "
    "(data parallel; train.distributed.strategy picks DDP or FSDP2). For several nodes set "
    "ALIGNFLOW_TORCHRUN_ARGS to torchrun's rendezvous options instead of --standalone (e.g. '--nnodes 2 "
    "--rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB'; see examples/slurm and examples/k8s). "
    "Exit code 75: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue the same command to resume."
)


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """The command line without its ``--nproc N`` / ``--nproc=N`` (what each torchrun worker runs)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run ``alignflow <argv>`` in ``nproc`` processes; returns the exit code the CLI should end with."""
    argv = strip_nproc(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="alignflow-launch-") as tmp:
        env = dict(os.environ)
        status = Path(tmp) / "status.json"
        env[STATUS_ENV] = str(status)
        rendezvous = shlex.split(env.get(TORCHRUN_ARGS_ENV, "")) or ["--standalone"]
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            f"--nproc-per-node={nproc}",
            "-m",
            "alignflow",
            *argv,
        ]

        def ignore_usr1() -> None:  # torchrun itself; each worker installs its own handler in the recipe
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

        proc = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)  # noqa: PLW1509 - no threads yet

        def forward(signum: int, _frame: object) -> None:
            for child in _workers(proc.pid):
                try:
                    os.kill(child, signum)
                except ProcessLookupError:
                    pass

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if status.is_file():
            return int(json.loads(status.read_text()).get("exit_code", code))
        return code


def _workers(pid: int) -> list[int]:
    """torchrun's descendants (the training processes), not torchrun itself."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def finish_code(result: dict) -> int:
    """The exit code of a recipe's result: EXIT_REQUEUE after a SIGTERM/SIGUSR1 stop, else 0.

    Under torchrun rank 0 also writes it to the launcher's status file; the workers themselves exit 0 there,
    so a torchrun with ``--max-restarts`` does not restart a job that is being preempted.
    """
    code = EXIT_REQUEUE if result.get("stopped") and result.get("signal") in ("SIGTERM", "SIGUSR1") else 0
    if not under_torchrun():
        return code
    if os.environ.get("RANK", "0") == "0" and os.environ.get(STATUS_ENV):
        Path(os.environ[STATUS_ENV]).write_text(json.dumps({"exit_code": code}))
    return 0


def preflight(cfg: Any, check_world: Callable[[Any, DistContext], None], nproc: int) -> None:
    """The recipe's world-size checks for ``nproc`` processes, in the launcher: a config torchrun's processes
    would reject fails here, in one process and before any of them starts (each process checks again)."""
    from alignflow.train.distributed import DistContext

    check_world(cfg, DistContext(rank=0, world_size=nproc, strategy=cfg.train.distributed.strategy))
