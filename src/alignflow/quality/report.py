"""Quality report: tables of agreement, annotator figures, aggregation comparison and QC actions, rendered to
the terminal (rich) or to one self-contained HTML page (plots embedded as base64 PNG, no external assets).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignflow.quality import agreement as agr
from alignflow.quality import annotators as ann
from alignflow.quality import efficiency
from alignflow.quality.aggregate import aggregate
from alignflow.quality.efficiency import FitAndScore
from alignflow.quality.policy import QCPolicy, evaluate_policy
from alignflow.quality.schema import nan_to_none


@dataclass
class QualityReport:
    """Tables of a quality report; `tables` keeps insertion order for rendering."""

    title: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_report(
    judgments: pd.DataFrame,
    *,
    policy: QCPolicy | None = None,
    methods: tuple[str, ...] = ("majority_vote", "dawid_skene"),
    window: str = "7D",
    title: str = "Annotation quality report",
    texts: pd.DataFrame | None = None,
    texts_missing: str = "the source carries no item texts",
    cost_per_label: Mapping[str, float] | None = None,
    tier_of: Mapping[str, str] | None = None,
    fit_and_score: FitAndScore | None = None,
) -> QualityReport:
    """Compute every table of the report from validated judgments.

    Tables: overview (per dimension), agreement_by_pod, agreement_over_time (when timestamps exist),
    kappa_pairs (Cohen's kappa per annotator pair, first dimension), annotators (per dimension of the first
    pairwise dimension, or all rows), review_by_pod, aggregation (methods compared per item: agreement between
    methods and, on gold items, accuracy), qc_actions, and annotation_efficiency (see
    :func:`annotation_efficiency`) when ``texts`` (item_id -> prompt, response_a, response_b) are given; else a
    note saying why it is missing (``texts_missing``).
    """
    report = QualityReport(title=title)
    report.tables["overview"] = agr.agreement_by(judgments.assign(project="all"), "project")
    if judgments["pod"].notna().any():
        report.tables["agreement_by_pod"] = agr.agreement_by(judgments, "pod")
    if judgments["created_at"].notna().any():
        report.tables["agreement_over_time"] = agr.agreement_over_time(judgments, window)
    dims = sorted(judgments["dimension"].unique())
    first = judgments[judgments["dimension"] == dims[0]]
    if len(dims) > 1:
        report.notes.append(f"Per-annotator figures and QC use dimension {dims[0]!r} (of {dims}).")
    report.tables["kappa_pairs"] = agr.cohen_kappa_matrix(agr.reliability_matrix(first), min_overlap=5)
    multi = first["annotator_id"].nunique() >= 2 and first["kind"].iat[0] != "ranking"
    report.tables["annotators"] = ann.annotator_table(first, skills=multi)
    report.tables["review_by_pod"] = ann.reviewer_discrepancy(judgments, by="pod")
    if multi:
        agg_rows = []
        results = {m: aggregate(first, m).set_index("item_id") for m in methods}
        gold = first[first["is_gold"]].drop_duplicates("item_id").set_index("item_id")["gold_label"]
        base = results[methods[0]]["label"]
        for m, res in results.items():
            row: dict[str, Any] = {
                "method": m,
                "n_items": len(res),
                f"agrees_with_{methods[0]}": float((res["label"] == base.reindex(res.index)).mean()),
            }
            if len(gold):
                row["gold_accuracy"] = float((res["label"].reindex(gold.index) == gold).mean())
                row["gold_items"] = len(gold)
            if res["p_a"].notna().any():
                row["mean_margin"] = float(res["margin"].astype(float).mean())
            agg_rows.append(row)
        report.tables["aggregation"] = pd.DataFrame(agg_rows)
        actions = evaluate_policy(first, policy)
        report.tables["qc_actions"] = pd.DataFrame(
            [
                {"annotator_id": a.annotator_id, "action": a.action, "rule": a.rule, "reason": a.reason}
                for a in actions
            ],
            columns=["annotator_id", "action", "rule", "reason"],
        )
    else:
        report.notes.append("Aggregation and QC need at least two annotators on non-ranking judgments.")
    if texts is None:
        report.notes.append(f"No annotation-efficiency table: {texts_missing}.")
    else:
        table, notes = annotation_efficiency(
            judgments, texts, cost_per_label=cost_per_label, tier_of=tier_of, fit_and_score=fit_and_score
        )
        report.notes += notes
        if table is not None:
            report.tables["annotation_efficiency"] = table
    report.tables = {name: nan_to_none(table) for name, table in report.tables.items()}
    return report


MIN_GOLD_HELDOUT = 20  # fewer decisive gold items give an accuracy too coarse to read a curve from


def annotation_efficiency(
    judgments: pd.DataFrame,
    texts: pd.DataFrame,
    *,
    cost_per_label: Mapping[str, float] | None = None,
    tier_of: Mapping[str, str] | None = None,
    fit_and_score: FitAndScore | None = None,
    shuffles: int = 3,
    seed: int = 0,
) -> tuple[pd.DataFrame | None, list[str]]:
    """Held-out accuracy of a reward model against the number of labels: (table or None, notes).

    One label is one pairwise judgment of the "overall" dimension (or the first dimension), taken in the order
    the judgments were collected (``created_at``, then table order) and, beside it, the mean of ``shuffles``
    random orders (:func:`alignflow.quality.efficiency.efficiency_table`). The reward model is
    ``fit_and_score`` (default: the embedding Bradley-Terry model on MiniLM); several votes on one pair train
    it as that pair's soft label would. Held-out: the gold answers of gold items when at least
    ``MIN_GOLD_HELDOUT`` decisive gold items have texts; else a prompt-disjoint 20% of the regular items,
    labelled by their majority-vote consensus over all their votes, whose votes stay out of the pool.
    Cost: with ``cost_per_label`` (tier -> rate), each label costs its annotator's tier rate (``tier_of``;
    an annotator not in it is in the "standard" tier).

    Args:
        judgments: validated judgments.
        texts: indexed by item_id, columns prompt, response_a, response_b (the item's canonical order).
    """
    notes: list[str] = []
    dims = sorted(judgments["dimension"].unique())
    dim = "overall" if "overall" in dims else dims[0]
    rows = judgments[(judgments["dimension"] == dim) & (judgments["kind"] == "pairwise")]
    rows = rows[rows["item_id"].isin(texts.index)]
    if rows.empty:
        return None, [f"No annotation-efficiency table: no pairwise {dim!r} judgment has item texts."]
    order = rows.assign(_pos=np.arange(len(rows))).sort_values(["created_at", "_pos"], na_position="last")
    order = order.join(texts[["prompt", "response_a", "response_b"]], on="item_id")
    gold = order[order["is_gold"] & order["gold_label"].isin(("A", "B"))].drop_duplicates("item_id")
    regular = order[~order["is_gold"]]
    if len(gold) >= MIN_GOLD_HELDOUT:
        heldout = gold.assign(label=gold["gold_label"])
        pool = regular
        which = f"the gold answers of {len(heldout)} gold items"
    else:
        consensus = aggregate(regular.drop(columns=["prompt", "response_a", "response_b"]), "majority_vote")
        items = consensus.set_index("item_id")["label"].rename("consensus").to_frame().join(texts)
        train_items, held_items = efficiency.prompt_disjoint_split(items.reset_index())
        heldout = held_items.assign(label=held_items["consensus"])
        pool = regular[regular["item_id"].isin(set(train_items["item_id"]))]
        which = (
            f"the majority-vote consensus of a prompt-disjoint 20% of the items ({len(heldout)} items; "
            f"{len(gold)} gold items with texts are fewer than {MIN_GOLD_HELDOUT})"
        )
    heldout = heldout[heldout["label"].isin(("A", "B"))]
    if len(pool) < 4 or heldout.empty:
        return None, [
            f"No annotation-efficiency table: {len(pool)} labels to train on and {len(heldout)} decisive "
            "held-out items are too few."
        ]
    pool = pool[["item_id", "annotator_id", "prompt", "response_a", "response_b", "label"]].reset_index(
        drop=True
    )
    cost = None
    if cost_per_label:
        tiers = {a: (tier_of or {}).get(a, "standard") for a in pool["annotator_id"]}
        unpriced = sorted(set(tiers.values()) - set(cost_per_label))
        if unpriced:
            raise ValueError(f"--label-cost: no cost per label for tier(s) {unpriced}")
        pool["cost"] = pool["annotator_id"].map(tiers).map(cost_per_label).astype(float)
        cost = "cost"
    table = efficiency.efficiency_table(
        pool, heldout, fit_and_score or efficiency.embedding_fit_and_score(), cost=cost, shuffles=shuffles,
        seed=seed,
    )  # fmt: skip
    notes.append(
        f"Annotation efficiency: held-out accuracy of an embedding Bradley-Terry reward model (MiniLM) after the "
        f"first n of {len(pool)} {dim!r} labels in the order collected (shuffled: mean of {shuffles} random "
        f"orders); held-out = {which}."
    )
    return table, notes


def annotations_of(store: Any, ref: str) -> str | None:
    """The `annotations` artifact behind a judgments, annotations or preferences artifact (None if none)."""
    info = store.get(ref)
    if info.kind == "annotations":
        return info.id
    ups = store.lineage(info.id, "up", max_depth=1).edges
    return next((p for p, c, role in ups if c == info.id and role == "annotations"), None)


def item_texts(store: Any, ref: str) -> tuple[pd.DataFrame | None, str]:
    """(item_id -> prompt, response_a, response_b, or None; why None) for an exported artifact.

    The texts come from the `preferences` artifact exported with the same annotations (``annotate export``
    writes it beside every annotations artifact): prompt, chosen and rejected with the consensus label, from
    which the canonical A/B order follows. Gold items are not in it, so they have no texts here.
    """
    info = store.get(ref)
    if info.kind == "preferences":
        prefs = [info]
    else:
        ann_id = annotations_of(store, ref)
        if ann_id is None:
            return None, f"artifact {ref!r} has no annotations artifact in its lineage to find item texts by"
        downs = store.lineage(ann_id, "down", max_depth=1).edges
        prefs = [store.get(c) for p, c, role in downs if p == ann_id and role == "annotations"]
        prefs = [a for a in prefs if a.kind == "preferences"]
        if not prefs:
            return None, f"no preferences artifact (with the item texts) was exported from {ann_id[:12]}"
    latest = max(prefs, key=lambda a: a.created_at)
    rows = store.read_dataset(latest.id).to_pandas()
    b_won = rows["label"] == "B"
    texts = pd.DataFrame(
        {
            "item_id": rows["item_id"].astype(str),
            "prompt": rows["prompt"],
            "response_a": rows["rejected"].where(b_won, rows["chosen"]),
            "response_b": rows["chosen"].where(b_won, rows["rejected"]),
        }
    )
    return texts.set_index("item_id"), ""


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d")
    return str(v)


_TERMINAL_ANNOTATOR_COLUMNS = [
    "annotator_id",
    "pod",
    "n_judgments",
    "gold_accuracy",
    "loo_agreement",
    "ds_skill",
    "mace_competence",
    "left_rate",
    "median_duration_s",
    "agree_recent",
    "discrepancy_rate",
]


def _compact(df: pd.DataFrame) -> pd.DataFrame:
    """Terminal view: drop columns with no value at all and long-winded note columns whose rows are all blank."""
    if "annotator_id" in df.columns and "gold_accuracy" in df.columns:
        df = df[[c for c in _TERMINAL_ANNOTATOR_COLUMNS if c in df.columns]]
    keep = []
    for col in df.columns:
        values = df[col].tolist()
        if all(v is None or v == "" or (isinstance(v, float) and math.isnan(v)) for v in values) and len(
            values
        ):
            continue
        keep.append(col)
    return df[keep]


def render_terminal(report: QualityReport, console: Any | None = None, max_rows: int = 30) -> None:
    """Print every table with rich; long tables are cut to `max_rows` rows."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.rule(report.title)
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    for name, df in report.tables.items():
        df = _compact(df)
        table = Table(title=name, show_lines=False)
        for col in df.columns:
            table.add_column(str(col))
        for row in df.head(max_rows).itertuples(index=False):
            table.add_row(*[_fmt(v) for v in row])
        console.print(table)
        if len(df) > max_rows:
            console.print(f"[dim]... {len(df) - max_rows} more rows[/]")


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: QualityReport) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    a = report.tables.get("annotators")
    if a is not None and "gold_accuracy" in a and a["gold_accuracy"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        part = a[a["gold_accuracy"].notna()]
        x = np.arange(len(part))
        acc = part["gold_accuracy"].astype(float).to_numpy()
        lo = acc - part["gold_ci_low"].astype(float).to_numpy()
        hi = part["gold_ci_high"].astype(float).to_numpy() - acc
        ax.errorbar(x, acc, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], fmt="o", capsize=2)
        ax.set_xticks(x, part["annotator_id"], rotation=90, fontsize=7)
        ax.set_ylabel("gold accuracy (95% Wilson)")
        ax.set_ylim(0, 1.02)
        plots.append(("Gold accuracy per annotator", _png(fig)))
    if a is not None and "left_rate" in a and a["left_rate"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        part = a[a["left_rate"].notna()]
        ax.bar(part["annotator_id"], part["left_rate"].astype(float))
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_ylabel("rate of choosing displayed-left")
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        plots.append(("Position bias", _png(fig)))
    t = report.tables.get("agreement_over_time")
    if t is not None and len(t) and t["alpha"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for dim, part in t.groupby("dimension"):
            part = part[part["alpha"].notna()]
            ax.plot(pd.to_datetime(part["window"]), part["alpha"].astype(float), marker="o", label=str(dim))
        ax.set_ylabel("Krippendorff's alpha")
        ax.legend(fontsize=7)
        fig.autofmt_xdate()
        plots.append(("Agreement over time", _png(fig)))
    e = report.tables.get("annotation_efficiency")
    if e is not None and len(e):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        n = e["n_labels"].astype(float)
        ax.plot(n, e["accuracy"].astype(float), marker="o", label="order collected")
        sd = e["shuffled_sd"].astype(float)
        ax.errorbar(n, e["shuffled_accuracy"].astype(float), yerr=sd, marker="s", capsize=2, label="shuffled")
        ax.set_xlabel("labels")
        ax.set_ylabel("held-out RM accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        plots.append(("Annotation efficiency", _png(fig)))
    return plots


def render_html(report: QualityReport) -> str:
    """One self-contained HTML page: inline CSS, tables, plots as data: URIs."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:12px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#f0f0f0}h2{margin-top:1.5em}.note{color:#666}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    for title, png in _plots(report):
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
        )
    for name, df in report.tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr>")
        parts += [f"<th>{html.escape(str(c))}</th>" for c in df.columns]
        parts.append("</tr>")
        for row in df.itertuples(index=False):
            parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(report: QualityReport, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html and one CSV per table into `out_dir`; return the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html"}
    paths["html"].write_text(render_html(report), encoding="utf-8")
    for name, df in report.tables.items():
        paths[name] = out / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    return paths
