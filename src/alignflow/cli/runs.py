"""`alignflow runs ls | show | compare | alerts`: the store's runs in the terminal (`--json` for scripts)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from alignflow.cli.common import console, open_store
from alignflow.errors import AlignflowError
from alignflow.monitor import runview

app = typer.Typer(help="Runs in the store: list, inspect, compare metrics, alerts.", no_args_is_help=True)

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")
SEVERITIES = ("info", "warning", "critical")


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str, allow_nan=True))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def _table(title: str | None, columns: list[str], ids: list[str] | None = None) -> Table:
    """A table whose first column holds `ids` (run ids) whole: a folded id cannot be copied back."""
    t = Table(title=title, title_justify="left", show_lines=False)
    for i, c in enumerate(columns):
        if i == 0 and ids:
            t.add_column(c, no_wrap=True, min_width=max(len(x) for x in ids))
        else:
            t.add_column(c, overflow="fold")
    return t


@app.command("ls")
def ls(
    stage: str | None = typer.Option(None, "--stage", help="Only runs of this stage (sft, rm, dpo, ppo...)."),
    status: str | None = typer.Option(None, "--status", help="running | finished | failed | stopped"),
    limit: int = typer.Option(50, "--limit", min=1, help="Newest N runs."),
    json_out: bool = JSON,
    home: str | None = HOME,
) -> None:
    """List runs, newest first, with their status and alert counts."""
    if status and status not in ("running", "finished", "failed", "stopped"):
        raise AlignflowError(f"--status must be running, finished, failed or stopped, got {status!r}")
    store = open_store(home)
    runs = runview.list_runs(store, stage=stage, status=status, limit=limit)
    counts: dict[str, int] = {}
    for a in runview.alert_rows(store):
        counts[a["run_id"]] = counts.get(a["run_id"], 0) + 1
    rows = [{**runview.run_dict(r), "alerts": counts.get(r.id, 0)} for r in runs]
    if json_out:
        _echo_json(rows)
        return
    t = _table(
        None, ["run", "stage", "name", "status", "started", "duration s", "alerts"], [r["id"] for r in rows]
    )
    for r in rows:
        t.add_row(
            r["id"],
            r["stage"],
            _fmt(r["name"]),
            r["status"],
            (r["started_at"] or "")[:19],
            _fmt(r["duration_s"]),
            str(r["alerts"]),
        )
    console.print(t if rows else "no runs in this workspace")


@app.command("show")
def show(
    run: str = typer.Argument(..., help="Run id, unique id prefix, or run name (newest)."),
    alerts: int = typer.Option(5, "--alerts", min=0, help="Show the last N alerts (0: all)."),
    config: bool = typer.Option(False, "--config", help="Print the whole resolved config."),
    json_out: bool = JSON,
    home: str | None = HOME,
) -> None:
    """A run's config summary, status, final metrics, outputs, lineage parents and last alerts."""
    store = open_store(home)
    r = runview.resolve_run(store, run)
    d = runview.run_detail(store, r, alerts_limit=alerts)
    if config:
        d["config"] = r.config
    if json_out:
        d.pop("samples", None)  # the sample table has its own file; keep the JSON a summary
        _echo_json(d)
        return
    head = _table(f"run {r.id}", ["field", "value"])
    for k in (
        "stage",
        "name",
        "status",
        "started_at",
        "ended_at",
        "duration_s",
        "host",
        "code_version",
        "run_dir",
    ):
        head.add_row(k, _fmt(d[k]))
    for k, v in d["summary"].items():
        if k in ("stopped_at_step", "error", "stopped_by"):
            head.add_row(k, _fmt(v))
    console.print(head)
    cfg = _table("config" if config else "config summary", ["key", "value"])
    for k, v in (runview.flatten(r.config or {}) if config else d["config_summary"]).items():
        cfg.add_row(k, _fmt(v))
    console.print(cfg)
    if d["final_metrics"]:
        mt = _table("final metrics", ["metric", "final", "step", "best", "best step"])
        for name, fm in d["final_metrics"].items():
            bm = d["best_metrics"][name]
            mt.add_row(
                name,
                _fmt(fm["value"]),
                str(fm["step"]),
                f"{_fmt(bm['value'])} ({bm['mode']})",
                str(bm["step"]),
            )
        console.print(mt)
    else:
        console.print("no metrics logged")
    if d["outputs"]:
        ot = _table("outputs", ["output", "artifact"])
        for k, v in d["outputs"].items():
            ot.add_row(k, _fmt(v))
        console.print(ot)
    lin = d["lineage"]
    if lin["inputs"] or lin["parent_runs"] or lin["child_runs"]:
        lt = _table("lineage", ["relation", "artifact / run", "kind", "name", "role"])
        for a in lin["inputs"]:
            lt.add_row("input", a["id"][:16], a["kind"], _fmt(a["name"]), a["role"])
        for rid in lin["parent_runs"]:
            lt.add_row("parent run", rid, "", "", "")
        for rid in lin["child_runs"]:
            lt.add_row("child run", rid, "", "", "")
        console.print(lt)
    _print_alerts(d["alerts"], title=f"alerts (last {len(d['alerts'])} of {d['alerts_total']})")


def _print_alerts(rows: list[dict[str, Any]], title: str, with_run: bool = False) -> None:
    if not rows:
        console.print("no alerts")
        return
    cols = ["run"] if with_run else []
    t = _table(
        title,
        [*cols, "step", "severity", "rule", "metric", "value", "threshold", "actions", "message"],
        [a["run_id"] for a in rows] if with_run else None,
    )
    for a in rows:
        t.add_row(
            *([a["run_id"]] if with_run else []),
            _fmt(a["step"]),
            _fmt(a["severity"]),
            _fmt(a["rule"]),
            _fmt(a["metric"]),
            _fmt(a["value"]),
            _fmt(a["threshold"]),
            _fmt(a["actions"]),
            _fmt(a["message"]),
        )
    console.print(t)


@app.command("compare")
def compare(
    runs: list[str] = typer.Argument(..., help="Two or more runs (ids, prefixes or names)."),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Only these metrics (repeatable)."),
    json_out: bool = JSON,
    home: str | None = HOME,
) -> None:
    """Final and best value of every metric the runs have in common."""
    if len(runs) < 2:
        raise AlignflowError("runs compare needs at least two runs")
    store = open_store(home)
    resolved = [runview.resolve_run(store, ref) for ref in runs]
    ids = [r.id for r in resolved]
    if len(set(ids)) != len(ids):
        raise AlignflowError(f"runs compare: the same run is named twice ({', '.join(runs)})")
    table = runview.compare_runs(store, resolved, metric)
    if json_out:
        _echo_json(table)
        return
    if not table["metrics"]:
        console.print("these runs have no metric in common")
        return
    cols = ["metric", "best is"]
    for rid in ids:
        cols += [f"{rid}\nfinal", f"{rid}\nbest (step)"]
    t = _table("metrics in common", cols)
    for row in table["metrics"]:
        cells = [row["metric"], "lower" if row["mode"] == "min" else "higher"]
        for rid in ids:
            v = row["runs"][rid]
            cells += [_fmt(v["final"]), f"{_fmt(v['best'])} ({v['best_step']})"]
        t.add_row(*cells)
    console.print(t)


@app.command("alerts")
def alerts(
    run: str | None = typer.Argument(None, help="One run (id, prefix or name); all runs when omitted."),
    severity: str | None = typer.Option(
        None, "--severity", help="Only alerts at or above this severity (info, warning, critical)."
    ),
    json_out: bool = JSON,
    home: str | None = HOME,
) -> None:
    """Alert rows the monitor stored, oldest first."""
    if severity is not None and severity not in SEVERITIES:
        raise AlignflowError(f"--severity must be info, warning or critical, got {severity!r}")
    store = open_store(home)
    run_id = runview.resolve_run(store, run).id if run else None
    rows = runview.alert_rows(store, run_id, min_severity=severity)
    if json_out:
        _echo_json(rows)
        return
    _print_alerts(rows, title=f"alerts of {run_id}" if run_id else "alerts", with_run=run_id is None)
