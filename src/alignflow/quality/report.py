"""Quality report: tables of agreement, annotator figures, aggregation comparison and QC actions, rendered to
the terminal (rich) or to one self-contained HTML page (plots embedded as base64 PNG, no external assets).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignflow.quality import agreement as agr
from alignflow.quality import annotators as ann
from alignflow.quality.aggregate import aggregate
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
) -> QualityReport:
    """Compute every table of the report from validated judgments.

    Tables: overview (per dimension), agreement_by_pod, agreement_over_time (when timestamps exist),
    kappa_pairs (Cohen's kappa per annotator pair, first dimension), annotators (per dimension of the first
    pairwise dimension, or all rows), review_by_pod, aggregation (methods compared per item: agreement between
    methods and, on gold items, accuracy), qc_actions.
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
    report.tables = {name: nan_to_none(table) for name, table in report.tables.items()}
    return report


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
