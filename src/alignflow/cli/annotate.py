"""`alignflow annotate create-project|import-items|status|qc|export`: annotation projects from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from alignflow.cli.common import console
from alignflow.errors import AlignflowError

app = typer.Typer(
    help="Annotation projects: create, import items, watch the queue, run QC, export preferences."
)

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")


def _sessions(home: str | None):
    from alignflow.feedback.services import connect
    from alignflow.workspace import Workspace

    return connect(Workspace.from_env(home))


@app.command("create-project")
def create_project(
    name: str = typer.Argument(..., help="Project name."),
    guideline: Path = typer.Option(..., "--guideline", help="Markdown file with the annotation guideline."),
    schema: Path | None = typer.Option(
        None,
        "--schema",
        help="JSON or YAML question schema (kind, allow_tie, dimensions, failure_tags, "
        "rationale_min_chars, max_candidates); default: pairwise with the four default dimensions.",
    ),
    overlap: int = typer.Option(3, "--overlap", help="Annotators per item."),
    gold_rate: float = typer.Option(0.1, "--gold-rate", help="Share of tasks drawn from gold items."),
    qa_rate: float = typer.Option(0.15, "--qa-rate", help="Share of answers routed to reviewers."),
    lease_seconds: int = typer.Option(
        900, "--lease-seconds", help="Seconds before an abandoned task returns to the queue."
    ),
    home: str | None = HOME,
) -> None:
    """Create a project with guideline version 1 and schema version 1."""
    from alignflow.feedback import services

    if not guideline.exists():
        raise AlignflowError(f"{guideline}: no such file")
    spec = None
    if schema is not None:
        if not schema.exists():
            raise AlignflowError(f"{schema}: no such file")
        import yaml

        try:
            spec = yaml.safe_load(schema.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise AlignflowError(f"{schema}: not valid YAML/JSON ({exc})") from exc
    with _sessions(home)() as s:
        p = services.create_project(
            s,
            name,
            guideline.read_text(encoding="utf-8"),
            spec,
            overlap=overlap,
            gold_rate=gold_rate,
            qa_rate=qa_rate,
            lease_seconds=lease_seconds,
        )
    console.print(f"created project [bold]{p.name}[/] (id {p.id})")


@app.command("import-items")
def import_items(
    project: str = typer.Argument(..., help="Project name."),
    file: Path | None = typer.Argument(
        None, help="JSONL items: {id, prompt, candidates, gold_label?, priority?, ambiguous?}."
    ),
    artifact: str | None = typer.Option(
        None,
        "--artifact",
        help="Instead of FILE: a generation dataset artifact (prompt, response, model, ...).",
    ),
    home: str | None = HOME,
) -> None:
    """Add items from a JSONL file or a generation run's dataset artifact (all-or-nothing)."""
    from alignflow.feedback import services

    if (file is None) == (artifact is None):
        raise AlignflowError("give exactly one of FILE or --artifact")
    if artifact is not None:
        from alignflow.cli.common import open_store

        store = open_store(home)
        aid = store.resolve(artifact)
        rows, source = services.items_from_generation(store.read_dataset(aid)), aid
    else:
        rows, source = services.read_items_jsonl(file), str(file)
    with _sessions(home)() as s:
        n = services.import_items(s, project, rows, source=source)
    console.print(f"imported {n} items into {project}")


@app.command("status")
def status(project: str = typer.Argument(..., help="Project name."), home: str | None = HOME) -> None:
    """Queue state and per-annotator throughput."""
    from alignflow.feedback import services

    with _sessions(home)() as s:
        q = services.queue_state(s, project)
        rows = services.throughput(s, project)
    console.print(json.dumps(q, indent=2))
    table = Table("annotator", "pod", "qc", "total", "last hour", "median s", "skips")
    for r in rows:
        med = "" if r["median_s"] is None else f"{r['median_s']:.1f}"
        table.add_row(
            r["annotator"],
            r["pod"] or "",
            r["qc_state"],
            str(r["total"]),
            str(r["recent"]),
            med,
            str(r["skips"]),
        )
    console.print(table)


@app.command("qc")
def qc(project: str = typer.Argument(..., help="Project name."), home: str | None = HOME) -> None:
    """Evaluate the QC policy on the project's judgments and apply (journal and enforce) new actions."""
    from alignflow.feedback import qc as fqc

    with _sessions(home)() as s:
        applied = fqc.evaluate_and_apply(s, project, None)
    for a in applied:
        console.print(f"{a['action']:<10} {a['annotator']}: {a['reason']}")
    console.print(f"{len(applied)} QC action(s) applied")


@app.command("export")
def export(
    project: str = typer.Argument(..., help="Project name."),
    method: str = typer.Option(
        "dawid_skene",
        "--method",
        help="Aggregation: majority_vote | dawid_skene | glad | mace | bradley_terry | noisy_bt.",
    ),
    home: str | None = HOME,
) -> None:
    """Write the preference dataset (every vote + aggregated label) with lineage to the individual annotations."""
    from alignflow.cli.common import open_store
    from alignflow.feedback.export import export_project

    store = open_store(home)
    with _sessions(home)() as s:
        out = export_project(s, store, project, method)
    console.print(
        f"preferences [bold]{out['preferences']}[/] ({out['n_pairs']} pairs) <- annotations {out['annotations']} "
        f"({out['n_judgments']} judgments)"
    )
