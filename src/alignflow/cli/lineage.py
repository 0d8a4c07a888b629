"""`alignflow lineage ID`."""

from __future__ import annotations

import json

import typer

from alignflow.cli.common import console, open_store
from alignflow.errors import AlignflowError
from alignflow.store.render import to_dot, to_tree_lines


def lineage(
    ref: str = typer.Argument(..., help="Artifact id, unique id prefix, or name."),
    direction: str = typer.Option(
        "up", "--direction", help="up: what it was made from; down: what was made from it."
    ),
    format: str = typer.Option("tree", "--format", help="tree | json | dot"),
    depth: int | None = typer.Option(None, "--depth", help="Stop after this many hops."),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Trace an artifact to everything it came from (or everything made from it)."""
    if format not in ("tree", "json", "dot"):
        raise AlignflowError(f"--format must be tree, json or dot, got {format!r}")
    graph = open_store(home).lineage(ref, direction=direction, max_depth=depth)  # type: ignore[arg-type]
    if format == "json":
        typer.echo(json.dumps(graph.as_dict(), indent=1, default=str))
    elif format == "dot":
        typer.echo(to_dot(graph))
    else:
        for line in to_tree_lines(graph):
            console.print(line, highlight=False, markup=False)
