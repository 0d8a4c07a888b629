"""Read-only views of runs for `alignflow runs ...` and the run pages of `alignflow serve`.

One module serves both front ends so the terminal and the browser show the same figures: a run resolved from
an id, a unique id prefix or a name; each metric's final and best value; the run's alert rows; the sample
tables the run helper writes to `<run_dir>/samples/step-<N>.jsonl`; and the run's lineage (the artifacts it
read and wrote, and the runs upstream and downstream of it), all from the store.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select

from alignflow.errors import StoreError
from alignflow.store.api import Store
from alignflow.store.models import Artifact, LineageEdge, Run

SAMPLES_DIR = "samples"
_SAMPLE_FILE = re.compile(r"^step-(\d+)\.jsonl$")
# Metrics where smaller is better. Everything else (rewards, accuracies, margins, throughput) is "higher is
# better"; the table names the direction it used so a reader can tell when this guess does not fit.
_LOWER_IS_BETTER = re.compile(
    r"(^|[/_])(loss|kl|ece|err|error|nll|perplexity|ppl|grad_norm|time|seconds|latency|value_loss)($|[/_])"
)


class RunNotFoundError(StoreError):
    """No run matches the id, prefix or name given."""


def best_mode(name: str) -> Literal["min", "max"]:
    return "min" if _LOWER_IS_BETTER.search(name.lower()) else "max"


@dataclass(frozen=True)
class MetricStat:
    name: str
    final: float
    final_step: int
    best: float
    best_step: int
    mode: Literal["min", "max"]
    points: int


@dataclass
class RunLineage:
    inputs: list[dict[str, Any]] = field(default_factory=list)  # artifacts the run read, with their role
    outputs: list[dict[str, Any]] = field(default_factory=list)  # artifacts the run wrote
    parent_runs: list[str] = field(default_factory=list)  # runs that wrote this run's inputs
    child_runs: list[str] = field(default_factory=list)  # runs that read this run's outputs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_run(store: Store, ref: str) -> Run:
    """A run by exact id, unique id prefix (≥ 4 characters) or name (the newest run of that name)."""
    with store.session() as s:
        run = s.get(Run, ref)
        if run is None and len(ref) >= 4:
            found = s.scalars(
                select(Run).where(Run.id.like(f"{_like_escape(ref)}%", escape="\\")).limit(2)
            ).all()
            if len(found) > 1:
                raise RunNotFoundError(
                    f"run id prefix {ref!r} is ambiguous ({found[0].id}, {found[1].id}, ...)"
                )
            run = found[0] if found else None
        if run is None:
            run = s.scalars(select(Run).where(Run.name == ref).order_by(Run.started_at.desc())).first()
        if run is None:
            raise RunNotFoundError(f"no run {ref!r} in {store.workspace.home} (see `alignflow runs ls`)")
        s.expunge(run)
        return run


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_runs(
    store: Store, stage: str | None = None, status: str | None = None, limit: int = 50
) -> list[Run]:
    with store.session() as s:
        q = select(Run).order_by(Run.started_at.desc()).limit(limit)
        if stage:
            q = q.where(Run.stage == stage)
        if status:
            q = q.where(Run.status == status)
        runs = list(s.scalars(q).all())
        for r in runs:
            s.expunge(r)
        return runs


def metric_series(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) points in step order; a step logged twice (a resumed run) keeps the last."""
    by_name: dict[str, dict[int, float]] = {}
    for step, name, value in store.metrics(run_id):
        by_name.setdefault(name, {})[int(step)] = float(value)
    return {name: sorted(points.items()) for name, points in sorted(by_name.items())}


def metric_stats(series: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, MetricStat]:
    stats = {}
    for name, points in series.items():
        finite = [(st, v) for st, v in points if math.isfinite(v)]
        if not finite:
            continue
        mode = best_mode(name)
        pick = min if mode == "min" else max
        # The earliest step wins a tie: that is the checkpoint a rollback would choose.
        best_step, best = pick(finite, key=lambda p: (p[1], -p[0]) if mode == "max" else (p[1], p[0]))
        final_step, final = finite[-1]
        stats[name] = MetricStat(name, final, final_step, best, best_step, mode, len(finite))
    return stats


def compare_runs(store: Store, runs: Sequence[Run], metrics: Sequence[str] = ()) -> dict[str, Any]:
    """Final and best values of the metrics every run logged (or of `metrics`, when given)."""
    per_run = {r.id: metric_stats(metric_series(store, r.id)) for r in runs}
    common = set.intersection(*(set(st) for st in per_run.values())) if per_run else set()
    if metrics:
        missing = {m: [rid for rid, st in per_run.items() if m not in st] for m in metrics}
        missing = {m: rids for m, rids in missing.items() if rids}
        if missing:
            detail = "; ".join(f"{m}: not logged by {', '.join(rids)}" for m, rids in missing.items())
            raise StoreError(f"--metric names a metric some runs did not log ({detail})")
        names = list(metrics)
    else:
        names = sorted(common)
    rows = []
    for name in names:
        row: dict[str, Any] = {"metric": name, "mode": best_mode(name), "runs": {}}
        for rid, st in per_run.items():
            m = st[name]
            row["runs"][rid] = {
                "final": m.final,
                "final_step": m.final_step,
                "best": m.best,
                "best_step": m.best_step,
            }
        rows.append(row)
    return {"runs": [r.id for r in runs], "metrics": rows}


def alert_rows(
    store: Store, run_id: str | None = None, min_severity: str | None = None
) -> list[dict[str, Any]]:
    """The store's alert rows as plain dicts: one run's by step, or every run's in the order recorded."""
    return [_alert_dict(a) for a in store.alerts(run_id=run_id, min_severity=min_severity)]


_ALERT_FIELDS = (
    "id",
    "run_id",
    "step",
    "rule",
    "severity",
    "metric",
    "value",
    "threshold",
    "message",
    "actions",
)


def _alert_dict(a: Any) -> dict[str, Any]:
    get = a.get if isinstance(a, Mapping) else (lambda k, d=None: getattr(a, k, d))
    d = {k: get(k) for k in _ALERT_FIELDS}
    created = get("created_at") or get("time")
    d["created_at"] = created.isoformat() if isinstance(created, datetime) else created
    if d["actions"] is not None and not isinstance(d["actions"], str):
        d["actions"] = list(d["actions"])
    return d


def sample_steps(run_dir: str | Path | None) -> list[int]:
    """Steps with a sample table in `<run_dir>/samples/`, ascending."""
    if not run_dir:
        return []
    folder = Path(run_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SAMPLE_FILE.match(p.name)))


def read_samples(run_dir: str | Path, step: int) -> list[dict[str, Any]]:
    """One sample table; a line cut short by a run still writing it is skipped, not an error."""
    path = Path(run_dir) / SAMPLES_DIR / f"step-{step}.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def latest_samples(run_dir: str | Path | None) -> tuple[int | None, list[dict[str, Any]]]:
    steps = sample_steps(run_dir)
    if not steps or run_dir is None:
        return None, []
    return steps[-1], read_samples(run_dir, steps[-1])


def run_lineage(store: Store, run_id: str) -> RunLineage:
    """Inputs are the parents of the edges the run recorded; outputs the artifacts it wrote; parent runs wrote
    its inputs; child runs recorded edges from its outputs."""
    lin = RunLineage()
    with store.session() as s:
        outputs = s.scalars(
            select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.created_at)
        ).all()
        out_ids = {a.id for a in outputs}
        lin.outputs = [_art(a) for a in outputs]
        edges = s.execute(
            select(LineageEdge.parent_id, LineageEdge.role).where(LineageEdge.run_id == run_id)
        ).all()
        roles: dict[str, set[str]] = {}
        for parent, role in edges:
            if parent not in out_ids:
                roles.setdefault(parent, set()).add(role)
        if roles:
            arts = s.scalars(select(Artifact).where(Artifact.id.in_(sorted(roles)))).all()
            lin.inputs = [
                {**_art(a), "role": ",".join(sorted(roles[a.id]))} for a in sorted(arts, key=lambda a: a.id)
            ]
            lin.parent_runs = sorted({a.run_id for a in arts if a.run_id and a.run_id != run_id})
        if out_ids:
            child = s.scalars(
                select(LineageEdge.run_id)
                .where(LineageEdge.parent_id.in_(sorted(out_ids)))
                .where(LineageEdge.run_id.is_not(None))
                .where(LineageEdge.run_id != run_id)
                .distinct()
            ).all()
            lin.child_runs = sorted(c for c in child if c)
    return lin


def _art(a: Artifact) -> dict[str, Any]:
    return {"id": a.id, "kind": a.kind, "name": a.name, "run_id": a.run_id}


# The settings a reader wants first; `alignflow runs show --config` prints the whole resolved config.
KEY_CONFIG = (
    "model.path",
    "model.policy",
    "data.train",
    "data.eval",
    "data.prompts",
    "train.max_steps",
    "train.epochs",
    "train.batch_size",
    "train.seed",
    "optim.lr",
    "loss.type",
    "loss.beta",
    "reward.model",
    "reward.aggregate",
    "kl.coef",
    "tracking.backends",
    "monitor.alerts.enabled",
    "checkpoint.best_metric",
    "output_dir",
)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten(config or {})
    return {k: flat[k] for k in KEY_CONFIG if flat.get(k) not in (None, "", [], {})}


def run_dict(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "stage": run.stage,
        "name": run.name,
        "status": run.status,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None,
        "duration_s": duration_s(run),
        "host": run.host,
        "code_version": run.code_version,
        "run_dir": run.run_dir,
    }


def duration_s(run: Run) -> float | None:
    if run.started_at is None or run.ended_at is None:
        return None
    start, end = run.started_at, run.ended_at
    if (start.tzinfo is None) != (end.tzinfo is None):  # SQLite returns naive datetimes
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return round((end - start).total_seconds(), 3)


def run_detail(store: Store, run: Run, alerts_limit: int = 10) -> dict[str, Any]:
    """Everything `runs show` prints and the run page shows, as JSON-able data."""
    stats = metric_stats(metric_series(store, run.id))
    summary = dict(run.summary or {})
    alerts = alert_rows(store, run.id)
    step, samples = latest_samples(run.run_dir)
    return {
        **run_dict(run),
        "config_summary": config_summary(run.config or {}),
        "final_metrics": {n: {"value": m.final, "step": m.final_step} for n, m in stats.items()},
        "best_metrics": {n: {"value": m.best, "step": m.best_step, "mode": m.mode} for n, m in stats.items()},
        "summary": summary,
        "outputs": dict(summary.get("outputs") or {}),
        "lineage": run_lineage(store, run.id).as_dict(),
        "alerts": alerts[-alerts_limit:] if alerts_limit else alerts,
        "alerts_total": len(alerts),
        "samples_step": step,
        "samples": samples,
    }
