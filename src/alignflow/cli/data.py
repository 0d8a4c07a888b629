"""`alignflow data import|ls|show|export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from alignflow.cli.common import console, human_bytes, open_store
from alignflow.data.formats import DEFAULT_MAX_LINE_BYTES, KINDS
from alignflow.data.io import export_dataset, import_dataset

app = typer.Typer(help="Import, list, inspect and export versioned datasets.")


@app.command("import")
def import_(
    # readable=False: the library says why a file cannot be read, in the file:line form of every error.
    file: Path = typer.Argument(
        ..., help="A JSONL or Parquet file, or a Hugging Face save_to_disk folder.", readable=False
    ),
    kind: str = typer.Option(..., "--kind", help=f"Dataset kind: {' | '.join(KINDS)}."),
    name: str | None = typer.Option(None, "--name", help="A name to find it by (default: the file name)."),
    tag: list[str] = typer.Option([], "--tag", help="Tag to attach (repeatable)."),
    max_line_bytes: int = typer.Option(
        DEFAULT_MAX_LINE_BYTES, min=1, help="Reject JSONL lines longer than this many bytes."
    ),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Validate FILE completely and store it as a content-addressed dataset artifact.

    Columns follow TRL: prompt/completion or messages (sft); prompt/chosen/rejected or HH-style
    chosen/rejected transcripts (pairs); prompt/completions/ranking|scores (rankings).
    """
    store = open_store(home)
    aid = import_dataset(store, file, kind, name=name, tags=tag, max_line_bytes=max_line_bytes)
    info = store.get(aid)
    console.print(
        f"imported {info.meta.get('num_rows')} {kind} rows from {escape(str(file))} -> [bold]{aid}[/]"
    )


@app.command("ls")
def ls(
    kind: str | None = typer.Option(None, "--kind", help="Only artifacts of this kind."),
    tag: list[str] = typer.Option([], "--tag", help="Only artifacts with this tag (repeatable)."),
    limit: int = typer.Option(50, help="At most this many rows."),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """List artifacts, newest first."""
    store = open_store(home)
    table = Table("id", "kind", "name", "rows", "size", "created", "tags")
    for a in store.find(kind=kind, tags=tag, limit=limit):
        table.add_row(
            a.id[:12],
            a.kind,
            a.name or "",
            str(a.meta.get("num_rows", "")),
            human_bytes(a.bytes),
            a.created_at.strftime("%Y-%m-%d %H:%M"),
            ",".join(a.tags),
        )
    console.print(table)


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="Artifact id, unique id prefix, or name."),
    rows: int = typer.Option(3, help="Sample rows to print for a dataset."),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Show an artifact's metadata (and a few rows of a dataset)."""
    store = open_store(home)
    info = store.get(ref)
    console.print_json(json.dumps(info.as_dict(), default=str))
    if info.uri.endswith(".parquet") and rows > 0:
        for row in store.read_dataset(info.id).slice(0, rows).to_pylist():
            console.print_json(json.dumps(row, ensure_ascii=False, default=str))


@app.command("export")
def export(
    ref: str = typer.Argument(..., help="Dataset artifact id, prefix or name."),
    file: Path = typer.Argument(..., help="Output file: .jsonl or .parquet (a folder with --format hf)."),
    fmt: str | None = typer.Option(
        None, "--format", help="hf: a Hugging Face save_to_disk folder (default: by the file suffix)."
    ),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Write a dataset artifact to a JSONL or Parquet file or a HF datasets folder (its hash is verified first)."""
    n = export_dataset(open_store(home), ref, file, fmt=fmt)
    console.print(f"wrote {n} rows to {file}")
