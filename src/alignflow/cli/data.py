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


@app.command("synthesize")
def synthesize(
    method: str = typer.Option(
        ...,
        "--method",
        help="self-instruct: continue a list of k sampled seed tasks (Wang et al. 2023); evol: rewrite one "
        "seed into a harder version by one WizardLM operation (Xu et al. 2023).",
    ),
    seed_prompts: str = typer.Option(
        ...,
        "--seed-prompts",
        help="Seed instructions: a JSONL/Parquet file (imported as 'prompts') or a dataset.",
    ),
    generator: str = typer.Option(
        ...,
        "--generator",
        help="Who writes: hf:MODEL_DIR_OR_ARTIFACT[#chat=true], openai:MODEL@BASE_URL or fn:MODULE:FN.",
    ),
    requests: int = typer.Option(16, "--requests", min=1, help="Generator calls to make."),
    k: int = typer.Option(4, "--k", min=1, help="Seed examples shown per self-instruct call."),
    near: float = typer.Option(
        0.7, "--near", min=0.0, max=1.0, help="Near-duplicate Jaccard threshold (MinHash); 0 = exact only."
    ),
    min_chars: int = typer.Option(10, "--min-chars", min=1, help="Drop instructions shorter than this."),
    max_chars: int = typer.Option(1000, "--max-chars", min=1, help="Drop instructions longer than this."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, help="Cap on each generation."),
    temperature: float = typer.Option(0.9, "--temperature", min=0.0, help="Sampling temperature."),
    seed: int = typer.Option(0, "--seed", help="Seeds the choice of examples/operations and sampling."),
    name: str | None = typer.Option(None, "--name", help="Dataset name (default synth-<method>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Write new instructions from a seed set, drop empty, too short/long and duplicate ones (exact and
    near-duplicates of a seed or of each other), and store the rest as a 'prompts' dataset linked to the
    seeds and the generator."""
    from alignflow.cli.generate import progress_bar
    from alignflow.judges.generators import load_generator
    from alignflow.rollout.generations import resolve_prompts
    from alignflow.synth.instructions import synthesize as synthesize_lib

    store = open_store(home)
    seeds_id = resolve_prompts(store, seed_prompts, "--seed-prompts")
    gen = load_generator(generator, store)
    with progress_bar(f"synthesize ({method})") as update:
        result = synthesize_lib(
            store,
            method,  # type: ignore[arg-type]  # checked by the library, with the accepted values
            seeds_id,
            gen,
            requests=requests,
            k=k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            near=near or None,
            min_chars=min_chars,
            max_chars=max_chars,
            name=name,
            progress=update,
        )
    r = result.report
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    dropped = ", ".join(f"{k_} {v}" for k_, v in r["dropped"].items() if v) or "none"
    console.print(
        f"{r['requests']} requests -> {r['candidates']} candidates; dropped: {dropped}; kept {r['kept']}",
        highlight=False,
    )
    console.print(f"prompts -> [bold]{r['output']}[/]" if r["output"] else "nothing kept; no dataset written")
