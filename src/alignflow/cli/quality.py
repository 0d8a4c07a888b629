"""`alignflow quality report|actions`: thin shells over `alignflow.quality`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from alignflow.cli.common import console

if TYPE_CHECKING:
    from alignflow.quality.policy import QCPolicy

app = typer.Typer(help="Annotation quality: agreement, annotator scores, aggregation and QC actions.")


def _policy(path: Path | None) -> QCPolicy | None:
    # Imports are lazy so `alignflow --help` stays fast.
    if path is None:
        return None
    import yaml

    from alignflow.errors import ConfigError
    from alignflow.quality.policy import QCPolicy

    try:
        return QCPolicy.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except Exception as exc:  # pydantic errors carry the field path; add the file name
        raise ConfigError(f"{path}: invalid QC policy: {exc}") from exc


def _judgments(source: str, home: str | None):
    """(validated judgments, display name) of a file, or else of a workspace artifact."""
    from alignflow.quality.schema import load_judgments, read_judgments_artifact

    path = Path(source)
    if path.exists() or path.suffix in (".jsonl", ".json", ".ndjson", ".parquet"):
        return load_judgments(path), path.name
    from alignflow.cli.common import open_store

    return read_judgments_artifact(open_store(home), source), source


@app.command("report")
def report(
    source: str = typer.Argument(
        ...,
        help="A judgments file (.jsonl or .parquet), or a judgments/annotations dataset artifact "
        "(`alignflow annotate export --as judgments`).",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for report.html and one CSV per table."),
    policy: Path | None = typer.Option(None, "--policy", help="A QC policy YAML (default: built-in policy)."),
    window: str = typer.Option("7D", "--window", help="Time window for agreement over time (pandas freq)."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not print the tables."),
    home: str | None = typer.Option(
        None, "--home", help="Workspace folder for an artifact SOURCE (default $ALIGNFLOW_HOME)."
    ),
) -> None:
    """Compute agreement, annotator figures, aggregation and QC actions for SOURCE and write a report."""
    from alignflow.quality.report import build_report, render_terminal, write_report

    judgments, name = _judgments(source, home)
    rep = build_report(judgments, policy=_policy(policy), window=window, title=f"Annotation quality: {name}")
    if not quiet:
        render_terminal(rep, console)
    paths = write_report(rep, out)
    console.print(f"wrote {paths['html']} and {len(paths) - 1} CSV tables")


@app.command("actions")
def actions(
    source: Path = typer.Argument(..., help="A judgments file (.jsonl or .parquet)."),
    policy: Path | None = typer.Option(None, "--policy", help="A QC policy YAML (default: built-in policy)."),
    dimension: str | None = typer.Option(
        None, "--dimension", help="Dimension to evaluate (default: the first)."
    ),
) -> None:
    """Print the QC actions the policy decides for SOURCE as JSON lines (nothing is enforced)."""
    from alignflow.quality.policy import evaluate_policy
    from alignflow.quality.schema import load_judgments

    judgments = load_judgments(source)
    dim = dimension or sorted(judgments["dimension"].unique())[0]
    for action in evaluate_policy(judgments[judgments["dimension"] == dim], _policy(policy)):
        typer.echo(action.model_dump_json())
