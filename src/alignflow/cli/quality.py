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
    """(validated judgments, display name, item texts or None, why no texts, annotator tiers) of a file, or
    else of a workspace artifact (judgments, annotations or preferences)."""
    from alignflow.quality.schema import load_judgments, read_judgments_artifact

    path = Path(source)
    if path.exists() or path.suffix in (".jsonl", ".json", ".ndjson", ".parquet"):
        df = load_judgments(path)
        if {"prompt", "response_a", "response_b"} <= set(df.columns):
            texts = df.drop_duplicates("item_id").set_index("item_id")[["prompt", "response_a", "response_b"]]
            return df, path.name, texts, "", {}
        why = f"{path.name} has no prompt, response_a and response_b columns (export the project as an artifact)"
        return df, path.name, None, why, {}
    from alignflow.cli.common import open_store
    from alignflow.quality.report import annotations_of, item_texts

    store = open_store(home)
    ref = source
    if store.get(source).kind == "preferences":
        ref = annotations_of(store, source) or source
    judgments = read_judgments_artifact(store, ref)
    texts, why = item_texts(store, source)
    return judgments, source, texts, why, _tiers(store, sorted(set(judgments["annotator_id"])))


def _tiers(store, names: list[str]) -> dict[str, str]:
    """Annotator -> tier from the workspace's annotation platform (absent accounts are left out)."""
    from alignflow.feedback import services

    out = {}
    with services.connect(store.workspace)() as s:
        for name in names:
            try:
                out[name] = services.get_user(s, name).tier
            except services.NotFound:
                continue
    return out


def _label_costs(specs: list[str]) -> dict[str, float]:
    from alignflow.errors import ConfigError

    out = {}
    for spec in specs:
        tier, sep, rate = spec.partition("=")
        try:
            out[tier.strip()] = float(rate)
        except ValueError:
            sep = ""
        if not sep or not tier.strip() or out[tier.strip()] < 0:
            raise ConfigError(f"--label-cost {spec!r}: expected TIER=RATE with a rate >= 0, e.g. expert=1.0")
    return out


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
    label_cost: list[str] = typer.Option(
        [],
        "--label-cost",
        help="TIER=RATE, repeatable: cost of one label by an annotator of that tier (tiers from the workspace's "
        "annotation accounts; unknown annotators are 'standard'); adds cost and gain per unit of cost.",
    ),
) -> None:
    """Compute agreement, annotator figures, aggregation and QC actions for SOURCE and write a report; with
    item texts (an exported artifact), also the annotation-efficiency learning curve."""
    from alignflow.quality.report import build_report, render_terminal, write_report

    judgments, name, texts, why, tiers = _judgments(source, home)
    rep = build_report(
        judgments,
        policy=_policy(policy),
        window=window,
        title=f"Annotation quality: {name}",
        texts=texts,
        texts_missing=why,
        cost_per_label=_label_costs(label_cost) or None,
        tier_of=tiers,
    )
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
