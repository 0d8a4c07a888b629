"""`alignflow run PIPELINE.yaml` and `alignflow quickstart`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from alignflow.cli.common import console
from alignflow.errors import AlignflowError

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"


def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see examples/quickstart.yaml)."),
    overrides: list[str] = typer.Argument(
        None, help="Overrides like ppo.config.optim.lr=1e-5 or data.params.n=100."
    ),
    force: list[str] = typer.Option([], "--force", help="Re-run this stage even if unchanged (repeatable)."),
) -> None:
    """Run a pipeline: unchanged stages are skipped, a crashed stage resumes from its checkpoints."""
    from alignflow.pipeline import run_pipeline

    result = run_pipeline(
        pipeline, overrides or [], force=force, log=lambda m: console.print(m, highlight=False, markup=False)
    )
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
) -> None:
    """Run the bundled end-to-end example (examples/quickstart.yaml) in the current workspace."""
    if not QUICKSTART.is_file():
        raise AlignflowError(f"{QUICKSTART} not found: quickstart needs a source checkout of alignflow")
    run(QUICKSTART, overrides, force=[])
