"""Run pages of `alignflow serve`: the store's runs, and one run's metric plots, alerts, samples and lineage.

Only leads and admins may open them. Annotators and reviewers label blind: a page showing which responses the
reward model scores high, or the policy's samples with their rewards, would teach them what the model prefers
and bias the very labels the reward model is trained on; the runs also expose configs, hosts and paths that
labellers have no need for. The pages are read-only GETs (no form changes state, so none needs a CSRF token;
the logout form in the header carries it as on every page).

Plots are inline SVG drawn here on the server from the store's metrics: no script, no library, nothing fetched,
and the Content-Security-Policy (no inline style or script) holds, since SVG presentation attributes are not
styles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from alignflow.feedback.deps import DB, MANAGERS, page_user
from alignflow.feedback.pages import render
from alignflow.monitor import runview
from alignflow.store.api import Store

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).parent / "static"

CHART_W, CHART_H = 420, 170
PAD_L, PAD_R, PAD_T, PAD_B = 58, 12, 10, 26
MAX_POINTS = 400  # a polyline of a few hundred points draws as fast as any; longer series are thinned
MAX_CHARTS = 60
SAMPLE_ROWS = 50


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """Browsers ask every site for /favicon.ico; without it each first page load logs a 404 console error
    (the platform's pages included, so this is here, with the first page test that watches the console)."""
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def _store(request: Request) -> Store:
    """A Store on the app's own engine (one connection pool for the platform and the run pages)."""
    sessions = request.app.state.sessions
    return Store(request.app.state.workspace, sessions.kw["bind"])


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, s: DB, stage: str = "", status: str = "") -> HTMLResponse:
    p = page_user(request, s, roles=MANAGERS)
    store = _store(request)
    runs = runview.list_runs(store, stage=stage or None, status=status or None, limit=200)
    counts: dict[str, int] = {}
    for a in runview.alert_rows(store):
        counts[a["run_id"]] = counts.get(a["run_id"], 0) + 1
    rows = [{**runview.run_dict(r), "alerts": counts.get(r.id, 0)} for r in runs]
    return render(
        request,
        "runs.html",
        user=p.user,
        csrf=p.csrf_token,
        runs=rows,
        stage=stage,
        status_filter=status,  # `status` is render's HTTP status
        stages=sorted({r["stage"] for r in rows} | ({stage} if stage else set())),
    )


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, s: DB) -> HTMLResponse:
    p = page_user(request, s, roles=MANAGERS)
    store = _store(request)
    try:
        run = runview.resolve_run(store, run_id)
    except runview.RunNotFoundError as exc:
        return render(request, "message.html", status=404, title="No such run", message=str(exc), user=p.user,
                      csrf=p.csrf_token)  # fmt: skip
    detail = runview.run_detail(store, run, alerts_limit=0)
    series = runview.metric_series(store, run.id)
    alert_steps: dict[str, list[int]] = {}
    for a in detail["alerts"]:
        if a.get("metric") and a.get("step") is not None:
            alert_steps.setdefault(a["metric"], []).append(int(a["step"]))
    names = list(series)[:MAX_CHARTS]
    charts = [chart(n, series[n], alert_steps.get(n, ())) for n in names]
    samples = detail["samples"][:SAMPLE_ROWS]
    columns: list[str] = []
    for row in samples:
        columns += [k for k in row if k not in columns]
    return render(
        request,
        "runs_detail.html",
        user=p.user,
        csrf=p.csrf_token,
        run=detail,
        charts=charts,
        charts_hidden=max(0, len(series) - MAX_CHARTS),
        samples=samples,
        sample_columns=columns,
        samples_total=len(detail["samples"]),
        fmt=fmt,
    )


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def _thin(points: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """Keep every k-th point, and always the last, so the line's end is the final value."""
    if len(points) <= limit:
        return list(points)
    k = math.ceil(len(points) / limit)
    out = list(points[::k])
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def chart(name: str, points: Sequence[tuple[int, float]], marks: Sequence[int] = ()) -> dict[str, Any]:
    """Geometry of one line chart in SVG user units: polyline points, axis labels, alert markers."""
    pts = [(st, v) for st, v in _thin(points) if math.isfinite(v)]
    x0, x1 = PAD_L, CHART_W - PAD_R
    y0, y1 = CHART_H - PAD_B, PAD_T  # SVG y grows downwards
    if not pts:
        return {"name": name, "empty": True, "w": CHART_W, "h": CHART_H}
    smin, smax = pts[0][0], pts[-1][0]
    vmin, vmax = min(v for _, v in pts), max(v for _, v in pts)
    if vmax == vmin:  # a flat line sits in the middle, not on an edge
        vmin, vmax = vmin - 0.5 * (abs(vmin) or 1.0), vmax + 0.5 * (abs(vmax) or 1.0)

    def sx(step: float) -> float:
        return x0 + (x1 - x0) * ((step - smin) / (smax - smin) if smax > smin else 0.5)

    def sy(v: float) -> float:
        return y0 - (y0 - y1) * (v - vmin) / (vmax - vmin)

    coords = [(round(sx(st), 1), round(sy(v), 1)) for st, v in pts]
    return {
        "name": name,
        "empty": False,
        "w": CHART_W,
        "h": CHART_H,
        "x0": x0,
        "x1": x1,
        "y0": y0,
        "y1": y1,
        "polyline": " ".join(f"{x},{y}" for x, y in coords),
        "single": coords[0] if len(coords) == 1 else None,
        "last": coords[-1],
        "y_max": fmt(float(vmax)),
        "y_min": fmt(float(vmin)),
        "x_min": smin,
        "x_max": smax,
        "final": fmt(pts[-1][1]),
        "points": len(points),
        "marks": [round(sx(m), 1) for m in sorted(set(marks)) if smin <= m <= smax],
    }
