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
        None, help="JSONL items: {id, prompt, candidates, gold_label?, priority?, ambiguous?, meta?}."
    ),
    artifact: str | None = typer.Option(
        None,
        "--artifact",
        help="Instead of FILE: a generations dataset artifact (`alignflow generate`; id, prefix or name). "
        "Rows are grouped by prompt; identical candidates are dropped; K > 2 candidates in a pairwise "
        "project become disjoint consecutive pairs (<prompt_id>/0, /1, ...; odd K: the last with the first).",
    ),
    prioritize_by: str | None = typer.Option(
        None,
        "--prioritize-by",
        help="A reward-model checkpoint (an `alignflow rm` folder or artifact): items get a queue priority "
        "from its uncertainty (ensemble disagreement and margin), stored with the item.",
    ),
    expert_fraction: float = typer.Option(
        0.0,
        "--expert-fraction",
        min=0.0,
        max=1.0,
        help="With --prioritize-by: the most uncertain fraction of the items goes to the expert tier.",
    ),
    home: str | None = HOME,
) -> None:
    """Add items from a JSONL file or a generations dataset artifact (all-or-nothing), optionally prioritised
    by reward-model uncertainty."""
    from alignflow.feedback import services

    if (file is None) == (artifact is None):
        raise AlignflowError("give exactly one of FILE or --artifact")
    if expert_fraction and prioritize_by is None:
        raise AlignflowError("--expert-fraction needs --prioritize-by")
    sessions = _sessions(home)
    store = None
    if artifact is not None:
        from alignflow.cli.common import open_store

        store = open_store(home)
        aid = store.resolve(artifact)
        with sessions() as s:
            spec = services.schema_spec(s, services.get_project(s, project))
        table, dropped = store.read_dataset(aid), []
        rows, source = services.items_from_generation(table, spec.kind, spec.max_candidates, dropped), aid
        for d in dropped:
            console.print(
                f"left out prompt {d['prompt_id']} candidate {d['candidate']}: the reply {d['reason']}"
            )
    else:
        rows, source = services.read_items_jsonl(file), str(file)
    if prioritize_by is not None:
        from alignflow.cli.common import open_store
        from alignflow.models.reward import load_reward_scorer
        from alignflow.rollout.generations import resolve_model_folder

        store = store or open_store(home)
        path, rm_id, _ = resolve_model_folder(store, prioritize_by, "--prioritize-by")
        scorer = load_reward_scorer(path)
        rows = services.prioritize_items(
            rows, services.scorer_member_rewards(scorer), expert_fraction, reward_model=rm_id
        )
    with sessions() as s:
        n = services.import_items(s, project, rows, source=source)
    experts = sum(1 for r in rows if r.get("ambiguous"))
    routed = f" ({experts} to the expert tier)" if prioritize_by is not None else ""
    console.print(f"imported {n} items into {project}{routed}")


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
    _print_judges(project, home, {r["annotator"] for r in rows})


def _print_judges(project: str, home: str | None, annotators: set[str]) -> None:
    """The quality report's judge rows, when an AI judge has answered in the project."""
    from alignflow.feedback import qc as fqc
    from alignflow.feedback import services

    with _sessions(home)() as s:
        if not any(u.kind == "ai" and u.username in annotators for u in services.list_users(s)):
            return
        report = fqc.quality_report(s, project)
    table = Table(
        "judge", "kappa (95% CI)", "accuracy (95% CI)", "n", "order-consistent", "dropped", title="AI judges"
    )

    def ci(v, lo, hi) -> str:  # noqa: ANN001
        if v is None:
            return "–"
        return f"{v:.3f}" + ("" if lo is None else f" ({lo:.3f}–{hi:.3f})")

    for j in report["judges"]:
        oc = (
            "–" if j["order_consistency"] is None else f"{j['order_consistency']:.2f} of {j['n_both_orders']}"
        )
        table.add_row(
            j["judge"],
            ci(j["kappa"], j["kappa_ci_low"], j["kappa_ci_high"]),
            ci(j["accuracy"], j["accuracy_ci_low"], j["accuracy_ci_high"]),
            str(j["n_items"]),
            oc,
            str(j["n_dropped"]),
        )
    console.print(table)
    console.print(report["judges_note"])


@app.command("judge")
def judge(
    project: str = typer.Argument(..., help="Project name."),
    spec: str = typer.Option(
        ..., "--judge", help="Judge spec: rule:MODULE:FN, rm:CHECKPOINT, hf:MODEL_DIR or openai:MODEL@URL."
    ),
    name: str | None = typer.Option(
        None, "--name", help="The judge's ai account (created on first use; default from the spec)."
    ),
    fraction: float = typer.Option(
        1.0, "--fraction", help="Judge only this deterministic share of the items (by a hash of the item)."
    ),
    orders: str = typer.Option(
        "both", "--orders", help="both: each pair is also judged reversed; given: only as displayed."
    ),
    on_inconsistent: str = typer.Option(
        "tie",
        "--on-inconsistent",
        help="When the two orders disagree: submit a tie, or drop (skip) the task.",
    ),
    route: bool = typer.Option(
        False,
        "--route-uncertain-to-humans",
        help="The judge labels only confident, order-consistent items; the others go to the top of the "
        "human queue (within --human-budget).",
    ),
    threshold: float = typer.Option(
        0.75, "--confidence-threshold", help="Combined confidence at or above which a verdict is confident."
    ),
    human_budget: int | None = typer.Option(
        None,
        "--human-budget",
        help="Most items this judge routes to people in this project (default: no limit).",
    ),
    experts: bool = typer.Option(
        False, "--route-to-experts", help="Routed items also go to the expert tier."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Pairs per judge call when judging both orders."),
    device: str = typer.Option("cpu", "--device", help="Device for hf:/rm: judges."),
    seed: int = typer.Option(0, "--seed", help="Seeds the lease draws (display orders, gold mixing)."),
    home: str | None = HOME,
) -> None:
    """Label the project's tasks with an AI judge, through the same service path as people: the judge is an
    annotator account of kind "ai", so gold accuracy, agreement and the QC policy (position bias included)
    apply to it. Each judgment takes one of the item's overlap slots."""
    from alignflow.cli.common import open_store
    from alignflow.cli.generate import progress_bar
    from alignflow.feedback import services
    from alignflow.judges import load_judge

    store = open_store(home)
    j = load_judge(spec, store, device)
    with _sessions(home)() as s, progress_bar(f"judging {project}") as update:
        res = services.run_judge(
            s,
            project,
            j,
            name,
            fraction=fraction,
            orders=orders,
            on_inconsistent=on_inconsistent,
            route_uncertain_to_humans=route,
            confidence_threshold=threshold,
            human_budget=human_budget,
            route_to_experts=experts,
            batch_size=batch_size,
            seed=seed,
            progress=lambda stage, done, total: update(done, total),
        )
    table = Table("judge", res.username, title=f"AI judge {res.spec}")
    rows = [
        ("tasks leased", res.leased),
        ("submitted", res.submitted),
        ("  of which gold", res.gold_submitted),
        ("  ties from inconsistent orders", res.ties_from_inconsistency),
        ("dropped (inconsistent orders)", res.dropped),
        ("ties given back (schema has no ties)", res.ties_not_allowed),
        ("outside --fraction", res.outside_fraction),
    ]
    if route:
        budget = "no limit" if res.budget_left is None else str(res.budget_left)
        rows += [
            ("labeled: confident and consistent", res.labeled_confident),
            ("labeled: uncertain, over the budget", res.kept_over_budget),
            ("routed to humans", res.routed_to_humans),
            ("human budget left", budget),
        ]
    for label, value in rows:
        table.add_row(label, str(value))
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
    as_: str = typer.Option(
        "preferences",
        "--as",
        help="preferences (every vote + consensus) | pairs or rankings (datasets `alignflow rm` and "
        "`alignflow dpo` take as data.train; the soft label is the pair's weight) | judgments (the table "
        "`alignflow quality report` reads).",
    ),
    method: str = typer.Option(
        "dawid_skene",
        "--method",
        help="Aggregation: majority_vote | dawid_skene | glad | mace | bradley_terry | noisy_bt.",
    ),
    tie_rule: str = typer.Option(
        "drop",
        "--tie-rule",
        help="--as pairs: a tie consensus is dropped (drop) or kept as both orders at weight 0.5 (both-half).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Also write the exported dataset to this .jsonl or .parquet file."
    ),
    home: str | None = HOME,
) -> None:
    """Export the project's annotations as a dataset artifact with lineage to the individual annotations, the
    annotators, the guideline versions and the aggregation method."""
    from alignflow.cli.common import open_store
    from alignflow.feedback.export import export_as

    store = open_store(home)
    with _sessions(home)() as s:
        res = export_as(s, store, project, as_, method, tie_rule)  # type: ignore[arg-type]
    unit = "pairs" if res["kind"] in ("preferences", "pairs") else "rows"
    console.print(
        f"{res['kind']} [bold]{res['artifact']}[/] ({res['n_rows']} {unit}) <- annotations "
        f"{res['annotations']} ({res['n_judgments']} judgments)"
    )
    if out is not None:
        _write(store, res, out)


def _write(store, res: dict, out: Path) -> None:
    if res["kind"] == "judgments":
        from alignflow.quality.schema import write_judgments

        write_judgments(store.read_dataset(res["artifact"]).to_pandas(), out)
    else:
        from alignflow.data.io import export_dataset

        export_dataset(store, res["artifact"], out)
    console.print(f"wrote {out}")
