"""`alignflow run PIPELINE.yaml` and `alignflow quickstart`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table

from alignflow.cli.common import console
from alignflow.errors import AlignflowError

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


ENGINE_HELP = (
    "Where each stage runs: 'local' (in this process) or 'ray' (each stage a Ray task; needs "
    "pip install 'alignflow\\[ray]'). Caching, resume and lineage are the same for both, so a pipeline run "
    "with one engine is skipped by the other. A stage's `resources: {num_cpus, num_gpus, nproc}` applies "
    "to Ray only."
)
ADDRESS_HELP = (
    "With --engine ray: an existing Ray cluster ('auto', 'HOST:6379' or 'ray://HOST:10001'), left running "
    "afterwards. Without it a local Ray instance is started (all CPUs, no dashboard) and shut down at the end. "
    "The workspace folder must be the same path on the cluster's nodes."
)


def _check_engine(engine: Engine, address: str | None) -> None:
    import importlib.util

    if address and engine is not Engine.ray:
        raise AlignflowError(f"--address {address} is for the Ray engine: add --engine ray")
    if engine is Engine.ray and importlib.util.find_spec("ray") is None:
        raise AlignflowError("--engine ray needs Ray, which is not installed: pip install 'alignflow[ray]'")


def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see examples/quickstart.yaml)."),
    overrides: list[str] = typer.Argument(
        None, help="Overrides like ppo.config.optim.lr=1e-5 or data.params.n=100."
    ),
    force: list[str] = typer.Option([], "--force", help="Re-run this stage even if unchanged (repeatable)."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP, case_sensitive=False),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP, metavar="ADDR"),
) -> None:
    """Run a pipeline: unchanged stages are skipped, a crashed stage resumes from its checkpoints.

    With --engine ray each stage runs as a Ray task: its output is printed here as it is written (and kept in the stage's folder as ray-task.log), and a failing stage reports the same error as locally.
    """
    from alignflow.pipeline import run_pipeline
    from alignflow.pipeline.runner import PipelineStopped
    from alignflow.train.torchrun_env import EXIT_REQUEUE

    _check_engine(engine, address)
    try:
        result = run_pipeline(
            pipeline,
            overrides or [],
            force=force,
            log=lambda m: console.print(m, highlight=False, markup=False),
            engine=engine.value,
            address=address,
        )
    except PipelineStopped as exc:
        if exc.signal not in ("SIGTERM", "SIGUSR1"):
            raise  # Ctrl-C or a `stop` alert: an error (exit 2) naming the stage
        console.print(f"{exc}; exit {EXIT_REQUEUE} (requeue)", highlight=False, markup=False)
        raise typer.Exit(EXIT_REQUEUE) from None
    table = Table("stage", "status", "seconds")
    for name in result["outputs"]:
        status = "ran" if name in result["ran"] else "skipped"
        table.add_row(name, status, f"{result['times'].get(name, 0.0):.1f}")
    console.print(table)
    report = next((o.get("report_path") for o in result["outputs"].values() if o.get("report_path")), None)
    if report:
        console.print(f"report: [bold]{report}[/]")


def quickstart(
    overrides: list[str] = typer.Argument(None, help="Overrides for examples/quickstart.yaml stages."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP, case_sensitive=False),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP, metavar="ADDR"),
) -> None:
    """Run the bundled end-to-end example (examples/quickstart.yaml) in the current workspace."""
    if not QUICKSTART.is_file():
        raise AlignflowError(f"{QUICKSTART} not found: quickstart needs a source checkout of alignflow")
    run(QUICKSTART, overrides, force=[], engine=engine, address=address)
