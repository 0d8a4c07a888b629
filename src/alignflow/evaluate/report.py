"""The evaluation report: one self-contained HTML page, plus a terminal summary.

`write_report(out_dir, data)` writes `out_dir/index.html`: inline CSS, plots embedded as base64 PNG
(matplotlib, Agg canvas), no JavaScript, no external fonts, stylesheets or images, so the file can be
mailed, archived as an artifact or opened from disk. Every string that comes from data (prompts, model
responses, names, titles) is HTML-escaped.

Schema of `data` (every key optional except `title`; a section whose key is absent or empty is skipped;
an unknown top-level key is an error, to catch typos):

    title:          str                                   page title and <h1>
    created_at:     str                                   shown under the title
    verdict:        str                                   headline, e.g. from `verdict_text(...)`;
                                                          default: the best policy on gold utility
    summary_rows:   [ {column: value, ...}, ... ]         summary table (columns: union of keys, in order)
    warnings:       [ str, ... ]                          highlighted box under the header
    facts:          { label: value }                      key figures (a two-column table)
    dimensions:     [ {"policy", "decoding", metric: value, ...} ]   per-dimension scores, one row per policy
                                                          and decoding (e.g. from `dimension_rows(...)`)
    dimension_note: str                                   a diagnosis shown under that table
    stage_times:    { stage: seconds }                    table with proportional bars
    policies:       { name: {"mean", "lo", "hi", "n"} }   bar chart of mean gold utility with 95% CI
    win_rates:      { name: {"rate", "lo", "hi"} }        bar chart of win rate vs the reference (SFT)
    win_rate_reference: str                               name of that reference (default "SFT")
    curves:         { plot title: { series: [[step, value], ...] } }   one line plot per title
    proxy_vs_gold:  {"steps": [...], "proxy": [...], "gold": [...], "length": [...]}
                                                          proxy and gold on twin axes; length below
                                                          ("gold" and "length" optional)
    reliability:    {"ece": float, "bins": [{"lo", "hi", "confidence", "accuracy", "count"}]}
                                                          reliability diagram (the output of
                                                          `alignflow.evaluate.reward.calibration`)
    annotators:     [ {"annotator", "type", "true_reliability", "estimated_skill", "gold_accuracy",
                       "flagged"} ]                       scatter (estimated vs true) + table
                                                          (true_reliability / gold_accuracy may be None)
    lineage:        [ str, ... ]                          lines of a tree, shown in a <pre> block
    samples:        [ {"prompt", "policy", "response", "gold"} ]   example responses

`print_summary(data, console, report_path)` prints the summary rows and warnings with rich.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KNOWN_KEYS = (
    "title",
    "created_at",
    "verdict",
    "summary_rows",
    "warnings",
    "facts",
    "dimensions",
    "dimension_note",
    "stage_times",
    "policies",
    "win_rates",
    "win_rate_reference",
    "curves",
    "proxy_vs_gold",
    "reliability",
    "annotators",
    "lineage",
    "samples",
)

PALETTE = ["#3b6fb6", "#e07b39", "#3a9d5d", "#c4443d", "#8c62b0", "#8a6d3b", "#d46fa8", "#6b7280"]
_DPI = 120


# ----------------------------------------------------------------------------------------------- helpers
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _mpl(x: Any) -> str:
    """Text for matplotlib: a literal '$' would otherwise start mathtext and can fail to parse."""
    return str(x).replace("$", r"\$")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    if isinstance(v, numbers.Real):
        v = float(v)
        if math.isnan(v):
            return "—"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _num(v: Any, where: str, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    # numbers.Real covers Python and NumPy scalars; bool is excluded because True is not a measurement.
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: missing key {key!r}")
    return d[key]


def _seq(v: Any, where: str) -> Sequence[Any]:
    if isinstance(v, str | bytes) or not hasattr(v, "__len__") or not hasattr(v, "__getitem__"):
        raise ValueError(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _img(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    w = int(fig.get_figwidth() * _DPI)
    h = int(fig.get_figheight() * _DPI)
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}" width="{w}" height="{h}">'


def _fig(w: float = 7.0, h: float = 3.6) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)


def _fmt_fact(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]], where: str, columns: Sequence[str] | None = None) -> str:
    cols: list[str] = list(columns) if columns else []
    if not columns:
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise ValueError(f"{where}[{i}]: expected a mapping, got {type(r).__name__}")
            for k in r:
                if k not in cols:
                    cols.append(k)

    def numeric(c: str) -> bool:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        return bool(vals) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals)

    head = "".join(f'<th class="num">{_e(c)}</th>' if numeric(c) else f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, numbers.Real) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_e(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(sec_id: str, title: str, inner: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{sec_id}"><h2>{_e(title)}</h2>{note_html}{inner}</section>'


# ---------------------------------------------------------------------------------------------- verdicts
def verdict_text(
    a_name: str, b_name: str, diff: float, lo: float, hi: float, metric: str = "gold utility"
) -> str:
    """Headline for a paired comparison, e.g. "PPO beats SFT on gold utility: +0.120 [0.080, 0.160]".

    `diff, lo, hi` is the mean paired difference a - b and its CI (from `stats.paired_diff_ci`): the claim
    is "beats" only when the whole interval is above 0, "is worse than" when it is below 0, and otherwise
    "is not distinguishable from".
    """
    if lo > 0:
        rel = "beats"
    elif hi < 0:
        rel = "is worse than"
    else:
        rel = "is not distinguishable from"
    # Decimals give the interval's width two significant digits, so the headline does not claim more
    # precision than the CI supports; a zero-width interval falls back to 3 significant figures.
    width = hi - lo
    if width > 0 and math.isfinite(width):
        d = min(6, max(0, 1 - math.floor(math.log10(width))))
        return f"{a_name} {rel} {b_name} on {metric}: {diff:+.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"
    return f"{a_name} {rel} {b_name} on {metric}: {diff:+.3g} [{lo:.3g}, {hi:.3g}]"


def ci_text(value: float, lo: float, hi: float, signed: bool = False, digits: int = 3) -> str:
    """``"0.512 [0.480, 0.544]"``: a point estimate and its interval; ``signed`` writes ``+``/``-`` on all three."""
    f = f"{'+' if signed else ''}.{digits}f"
    return f"{value:{f}} [{lo:{f}}, {hi:{f}}]"


def comparison_rows(
    policies: Mapping[str, Mapping[str, Any]],
    diffs: Mapping[str, Mapping[str, Any]],
    win_rates: Mapping[str, Mapping[str, Any]],
    baseline: str,
    metric: str = "gold utility",
) -> list[dict[str, str]]:
    """Summary rows comparing policies with a baseline, one per policy in the order of `policies`.

    `policies`: {name: {"mean", "lo", "hi"}} (`stats.bootstrap_mean_ci`); `diffs`: {name: {"mean", "lo", "hi"}},
    the paired difference name - baseline (`stats.paired_diff_ci`); `win_rates`: {name: {"rate", "lo", "hi"}}
    (`stats.win_rate`). The baseline (absent from `diffs`) gets only its own `metric` column.
    """
    rows = []
    for name, p in policies.items():
        row = {"policy": name, metric: ci_text(p["mean"], p["lo"], p["hi"])}
        if name in diffs:
            d, w = diffs[name], win_rates[name]
            row[f"Δ vs {baseline}"] = ci_text(d["mean"], d["lo"], d["hi"], signed=True)
            row[f"win rate vs {baseline}"] = ci_text(w["rate"], w["lo"], w["hi"], digits=2)
        rows.append(row)
    return rows


def decoding_rows(
    by_decoding: Mapping[str, Mapping[str, Any]], baseline: str, metric: str = "gold utility"
) -> list[dict[str, str]]:
    """Summary rows with the decodings side by side: one row per policy, for each decoding its `metric` with a
    CI and its paired gain over `baseline` with a CI (prompt-paired, `stats.paired_diff_ci`).

    `by_decoding`: {decoding label: {"policies": ..., "diffs": ..., "win_rates": ...}}, each as for
    `comparison_rows`, e.g. {"sampled": {...}, "greedy": {...}}; the policies are those of the first decoding.
    """
    if not by_decoding:
        return []
    first = next(iter(by_decoding.values()))
    rows = []
    for name in first["policies"]:
        row = {"policy": name}
        for label, dec in by_decoding.items():
            p = dec["policies"].get(name)
            row[f"{metric}, {label}"] = ci_text(p["mean"], p["lo"], p["hi"]) if p else "—"
            d, w = dec["diffs"].get(name), dec.get("win_rates", {}).get(name)
            row[f"Δ vs {baseline}, {label}"] = ci_text(d["mean"], d["lo"], d["hi"], signed=True) if d else "—"
            if w is not None:
                row[f"win rate vs {baseline}, {label}"] = ci_text(w["rate"], w["lo"], w["hi"], digits=2)
        rows.append(row)
    return rows


def dimension_rows(
    by_decoding: Mapping[str, Mapping[str, Mapping[str, float]]], digits: int = 3
) -> list[dict[str, Any]]:
    """Rows of the per-dimension table: `by_decoding` is {decoding: {policy: {metric: mean}}}; one row per
    policy and decoding, policies grouped, values rounded to `digits`."""
    policies: list[str] = []
    for per_policy in by_decoding.values():
        policies += [n for n in per_policy if n not in policies]
    rows = []
    for name in policies:
        for decoding, per_policy in by_decoding.items():
            if name in per_policy:
                vals = {k: round(float(v), digits) for k, v in per_policy[name].items()}
                rows.append({"policy": name, "decoding": decoding, **vals})
    return rows


def _check_policies(policies: Any) -> dict[str, dict[str, Any]]:
    """Validate `data['policies']`; returns {name: {"mean", "lo", "hi", "n"}} with float bounds."""
    if not isinstance(policies, Mapping):
        raise ValueError("data['policies']: expected {name: {'mean', 'lo', 'hi', 'n'}}")
    out = {}
    for name, d in policies.items():
        w = f"data['policies'][{name!r}]"
        vals = {k: _num(_get(d, k, w), f"{w}[{k!r}]") for k in ("mean", "lo", "hi")}
        vals["n"] = d.get("n")
        out[str(name)] = vals
    return out


def _default_verdict(policies: Mapping[str, Mapping[str, Any]]) -> str:
    best = max(policies, key=lambda k: policies[k]["mean"])
    p = policies[best]
    return f"Best on gold utility: {best} {p['mean']:.3g} [{p['lo']:.3g}, {p['hi']:.3g}]"


# ---------------------------------------------------------------------------------------------- sections
def _ci_bars(
    items: Mapping[str, Mapping[str, Any]],
    value_key: str,
    where: str,
    ylabel: str,
    ref: float | None,
    colors: Mapping[str, str],
) -> Figure:
    names, vals, los, his = [], [], [], []
    for name, d in items.items():
        w = f"{where}[{name!r}]"
        v = _num(_get(d, value_key, w), f"{w}[{value_key!r}]")
        lo = _num(_get(d, "lo", w), f"{w}['lo']")
        hi = _num(_get(d, "hi", w), f"{w}['hi']")
        assert v is not None and lo is not None and hi is not None
        names.append(str(name))
        vals.append(v)
        los.append(max(0.0, v - lo))
        his.append(max(0.0, hi - v))
    fig = _fig(max(4.5, 1.1 * len(names) + 2.5), 3.4)
    ax = fig.add_subplot()
    x = list(range(len(names)))
    ax.bar(x, vals, color=[colors.get(n, PALETTE[-1]) for n in names], alpha=0.85, width=0.6)
    ax.errorbar(x, vals, yerr=[los, his], fmt="none", ecolor="#111827", capsize=6, linewidth=1.4)
    for xi, v, h in zip(x, vals, his, strict=True):
        ax.annotate(
            f"{v:.3g}", (xi, v + h), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9
        )
    if ref is not None:
        ax.axhline(ref, color="#6b7280", linestyle="--", linewidth=1)
    ax.set_xticks(x, [_mpl(n) for n in names])
    ax.set_ylabel(ylabel, fontsize=10)
    _style(ax)
    return fig


def _policies_section(policies: Mapping[str, Any], colors: Mapping[str, str]) -> str:
    fig = _ci_bars(policies, "mean", "data['policies']", "mean gold utility", None, colors)
    rows = [
        {"policy": k, "mean": v["mean"], "95% CI": f"[{_fmt(v['lo'])}, {_fmt(v['hi'])}]", "n": v.get("n")}
        for k, v in policies.items()
    ]
    return _section(
        "policies",
        "Gold utility by policy",
        f'<div class="figure">{_img(fig, "mean gold utility per policy with 95% CI")}</div>'
        + _table(rows, "data['policies']"),
        "Mean gold utility of each policy's responses on held-out prompts; error bars are 95% bootstrap "
        "intervals over prompts.",
    )


def _win_rates_section(win_rates: Mapping[str, Any], ref_name: str, colors: Mapping[str, str]) -> str:
    if not isinstance(win_rates, Mapping):
        raise ValueError("data['win_rates']: expected {name: {'rate', 'lo', 'hi'}}")
    fig = _ci_bars(win_rates, "rate", "data['win_rates']", f"win rate vs {_mpl(ref_name)}", 0.5, colors)
    fig.axes[0].set_ylim(0, 1.05)
    return _section(
        "win-rates",
        f"Win rate against {ref_name}",
        f'<div class="figure">{_img(fig, f"win rate against {ref_name} with 95% CI")}</div>',
        f"Fraction of prompts where the policy's response has higher gold utility than {_e(ref_name)}'s "
        "(ties count one half); the dashed line at 0.5 is parity.",
    )


def _points(series: Any, where: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, pt in enumerate(_seq(series, where)):
        pt = _seq(pt, f"{where}[{i}]")
        if len(pt) != 2:
            raise ValueError(f"{where}[{i}]: expected [step, value], got {list(pt)!r}")
        xs.append(_num(pt[0], f"{where}[{i}][0]"))
        ys.append(_num(pt[1], f"{where}[{i}][1]"))
    return xs, ys  # type: ignore[return-value]


def _curves_section(curves: Mapping[str, Any]) -> str:
    figs = []
    for title, series in curves.items():
        where = f"data['curves'][{title!r}]"
        if not isinstance(series, Mapping):
            raise ValueError(f"{where}: expected {{series name: [[step, value], ...]}}")
        fig = _fig(5.4, 3.1)
        ax = fig.add_subplot()
        for i, (name, pts) in enumerate(series.items()):
            xs, ys = _points(pts, f"{where}[{name!r}]")
            ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], linewidth=1.6, label=_mpl(name),
                    marker="o" if len(xs) <= 12 else None, markersize=3)  # fmt: skip
        ax.set_title(_mpl(title), fontsize=11, loc="left")
        ax.set_xlabel("step", fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=8, frameon=False)
        _style(ax)
        figs.append(f'<div class="figure">{_img(fig, str(title))}</div>')
    return _section("curves", "Training curves", f'<div class="grid">{"".join(figs)}</div>')


def _proxy_gold_section(pg: Mapping[str, Any]) -> str:
    where = "data['proxy_vs_gold']"
    steps = [_num(v, f"{where}['steps'][{i}]") for i, v in enumerate(_seq(_get(pg, "steps", where), where))]
    cols: dict[str, list[float]] = {}
    for key in ("proxy", "gold", "length"):
        if pg.get(key) is None:
            continue
        vals = [_num(v, f"{where}[{key!r}][{i}]") for i, v in enumerate(_seq(pg[key], f"{where}[{key!r}]"))]
        if len(vals) != len(steps):
            raise ValueError(f"{where}[{key!r}]: has {len(vals)} values but 'steps' has {len(steps)}")
        cols[key] = vals  # type: ignore[assignment]
    if "proxy" not in cols:
        raise ValueError(f"{where}: missing key 'proxy'")
    has_len = "length" in cols
    fig = _fig(7.5, 4.6 if has_len else 3.4)
    if has_len:
        ax, ax_len = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, ax_len = fig.add_subplot(), None
    ax.plot(steps, cols["proxy"], color=PALETTE[0], linewidth=1.8, label="proxy reward (RM)")
    ax.set_ylabel("proxy reward", color=PALETTE[0], fontsize=10)
    _style(ax)
    handles = ax.get_lines()
    if "gold" in cols:
        ax2 = ax.twinx()
        ax2.plot(steps, cols["gold"], color=PALETTE[1], linewidth=1.8, label="gold utility")
        ax2.set_ylabel("gold utility", color=PALETTE[1], fontsize=10)
        ax2.spines["top"].set_visible(False)
        ax2.tick_params(labelsize=9)
        handles = handles + ax2.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, frameon=False, loc="upper left")
    if ax_len is not None:
        ax_len.plot(steps, cols["length"], color=PALETTE[2], linewidth=1.6)
        ax_len.set_ylabel("mean length", fontsize=10)
        ax_len.set_xlabel("PPO step", fontsize=9)
        _style(ax_len)
    else:
        ax.set_xlabel("PPO step", fontsize=9)
    return _section(
        "proxy-vs-gold",
        "Proxy reward vs gold utility",
        f'<div class="figure">{_img(fig, "proxy reward and gold utility over PPO steps")}</div>',
        "The reward model's score (what PPO optimises) against the gold utility it stands in for. Proxy "
        "rising while gold falls is reward hacking.",
    )


def _reliability_section(rel: Mapping[str, Any]) -> str:
    where = "data['reliability']"
    ece = _num(_get(rel, "ece", where), f"{where}['ece']")
    bins = _seq(_get(rel, "bins", where), f"{where}['bins']")
    fig = _fig(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0.5, 1], [0.5, 1], linestyle="--", color="#6b7280", linewidth=1, label="perfect calibration")
    total = 0
    for i, b in enumerate(bins):
        w = f"{where}['bins'][{i}]"
        lo = _num(_get(b, "lo", w), f"{w}['lo']")
        hi = _num(_get(b, "hi", w), f"{w}['hi']")
        conf = _num(_get(b, "confidence", w), f"{w}['confidence']")
        acc = _num(_get(b, "accuracy", w), f"{w}['accuracy']")
        cnt = int(_num(_get(b, "count", w), f"{w}['count']") or 0)
        total += cnt
        assert lo is not None and hi is not None and conf is not None and acc is not None
        ax.bar(lo, acc, width=hi - lo, align="edge", color=PALETTE[0], alpha=0.25, edgecolor=PALETTE[0])
        ax.plot([conf], [acc], "o", color=PALETTE[0], markersize=5)
        ax.annotate(str(cnt), (lo + (hi - lo) / 2, acc), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7, color="#374151")  # fmt: skip
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence in the preferred side, max(p, 1 - p)", fontsize=9)
    ax.set_ylabel("fraction of pairs it got right", fontsize=9)
    ax.set_title(f"ECE = {ece:.3f}  (n = {total})", fontsize=10, loc="left")
    _style(ax)
    return _section(
        "reliability",
        "Reward-model calibration",
        f'<div class="figure">{_img(fig, "reliability diagram")}</div>',
        "Top-label calibration: bars are the fraction of pairs where the side the reward model preferred was "
        "the preferred one, per confidence bin (count above); dots: mean confidence in the bin. On the "
        "diagonal means calibrated.",
    )


def _annotators_section(anns: Sequence[Any]) -> str:
    where = "data['annotators']"
    fig = _fig(5.6, 4.0)
    ax = fig.add_subplot()
    by_type: dict[str, tuple[list[float], list[float]]] = {}
    flagged_pts: tuple[list[float], list[float]] = ([], [])
    for i, a in enumerate(anns):
        w = f"{where}[{i}]"
        t = str(_get(a, "type", w))
        true = _num(a.get("true_reliability"), f"{w}['true_reliability']", allow_none=True)
        est = _num(_get(a, "estimated_skill", w), f"{w}['estimated_skill']", allow_none=True)
        if true is None or est is None:
            continue  # real (non-simulated) annotators have no true reliability: table only
        xs, ys = by_type.setdefault(t, ([], []))
        xs.append(true)
        ys.append(est)
        if a.get("flagged"):
            flagged_pts[0].append(true)
            flagged_pts[1].append(est)
    for k, (t, (xs, ys)) in enumerate(by_type.items()):
        ax.scatter(xs, ys, color=PALETTE[k % len(PALETTE)], s=36, alpha=0.85, label=_mpl(t))
    if flagged_pts[0]:
        ax.scatter(
            *flagged_pts,
            facecolors="none",
            edgecolors="#111827",
            s=150,
            linewidths=1.4,
            label="flagged by QC",
        )
    plotted = bool(by_type)
    ax.set_xlabel("true reliability (simulation)", fontsize=9)
    ax.set_ylabel("estimated skill", fontsize=9)
    if plotted:
        ax.legend(fontsize=8, frameon=False, loc="best")
    _style(ax)
    rows = [
        {
            k: a.get(k)
            for k in ("annotator", "type", "true_reliability", "estimated_skill", "gold_accuracy", "flagged")
        }  # fmt: skip
        for a in anns
    ]
    flagged = sum(1 for a in anns if a.get("flagged"))
    fig_html = (
        f'<div class="figure">{_img(fig, "estimated skill vs true reliability")}</div>' if plotted else ""
    )
    return _section(
        "annotators",
        "Annotators",
        fig_html + _table(rows, where),
        f"{len(anns)} annotators, {flagged} flagged by QC (ringed in black). Estimated skill comes from the "
        "aggregation model; true reliability is known only in simulation.",
    )


def _samples_section(samples: Sequence[Any]) -> str:
    where = "data['samples']"
    body = []
    for i, s in enumerate(samples):
        w = f"{where}[{i}]"
        gold = s.get("gold") if isinstance(s, Mapping) else None
        body.append(
            "<tr>"
            f'<td class="text">{_e(_get(s, "prompt", w))}</td>'
            f"<td>{_e(_get(s, 'policy', w))}</td>"
            f'<td class="text">{_e(_get(s, "response", w))}</td>'
            f'<td class="num">{_e(_fmt(gold))}</td>'
            "</tr>"
        )
    table = (
        '<table class="samples"><thead><tr><th>prompt</th><th>policy</th><th>response</th><th>gold</th>'
        f"</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
    return _section("samples", "Example responses", table)


def _stage_times_section(times: Mapping[str, Any]) -> str:
    vals = {str(k): _num(v, f"data['stage_times'][{k!r}]") or 0.0 for k, v in times.items()}
    top = max(vals.values()) or 1.0
    total = sum(vals.values())
    rows = []
    for k, v in vals.items():
        pct = 100.0 * v / top
        rows.append(
            f'<tr><td>{_e(k)}</td><td class="num">{v:,.1f} s</td>'
            f'<td class="barcell"><div class="bar" style="width:{pct:.1f}%"></div></td></tr>'
        )
    rows.append(f'<tr class="total"><td>total</td><td class="num">{total:,.1f} s</td><td></td></tr>')
    return _section(
        "stage-times",
        "Stage times",
        f'<table class="times"><thead><tr><th>stage</th><th>wall time</th><th></th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>",
    )


CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff; --accent:#3b6fb6; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header { background: linear-gradient(135deg, #1f3a68, #3b6fb6); color:#fff; padding: 28px 20px; }
header .inner { max-width:1120px; margin:0 auto; padding: 0 20px; }
header h1 { margin:0 0 4px; font-size: 26px; font-weight: 650; }
header .meta { opacity: .8; font-size: 13px; }
.verdict { margin-top: 14px; display:inline-block; background: rgba(255,255,255,.14);
  border: 1px solid rgba(255,255,255,.35); border-radius: 8px; padding: 10px 16px; font-size: 18px;
  font-weight: 600; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding: 18px 22px;
  margin: 18px 0; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
h2 { margin: 0 0 8px; font-size: 18px; font-weight: 650; }
.note { color: var(--muted); margin: 0 0 12px; font-size: 13.5px; }
.warnings { background:#fff7e6; border:1px solid #f0b44c; border-left: 6px solid #e08e0b; }
.warnings h2 { color:#8a4b00; }
.warnings li { margin: 4px 0; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin-top: 6px; }
th, td { text-align:left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background:#f3f4f6; font-weight:600; color:#374151; }
tbody tr:hover { background:#fafafa; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; word-break: break-word; max-width: 420px; }
table.samples td { font-size: 13px; }
table.times td.barcell { width: 55%; }
.bar { height: 10px; background: var(--accent); border-radius: 3px; opacity:.75; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
.figure { text-align:center; margin: 6px 0 10px; }
.figure img { max-width:100%; height:auto; }
.grid { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px 16px; }
pre { background:#0f172a; color:#e2e8f0; padding: 14px 16px; border-radius: 8px; overflow-x:auto;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; margin: 0; }
nav { font-size: 13px; margin-top: 12px; }
nav a { color:#fff; opacity:.85; margin-right: 14px; text-decoration:none; }
nav a:hover { opacity:1; text-decoration:underline; }
footer { color: var(--muted); font-size: 12px; text-align:center; }
"""


def render_html(data: Mapping[str, Any]) -> str:
    """The report page as a string (see the module docstring for the schema of `data`)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in KNOWN_KEYS]
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; expected some of {list(KNOWN_KEYS)}")
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("data['title']: required, a non-empty string")

    policies = _check_policies(data.get("policies") or {})
    verdict = data.get("verdict") or (_default_verdict(policies) if policies else "")
    sections: list[tuple[str, str, str]] = []  # (id, nav label, html)
    # One colour per policy name across the policy and win-rate charts.
    names = list(policies) + [str(k) for k in (data.get("win_rates") or {}) if str(k) not in policies]
    colors = {n: PALETTE[i % (len(PALETTE) - 1)] for i, n in enumerate(names)}

    warnings = data.get("warnings") or []
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in _seq(warnings, "data['warnings']"))
        sections.append(("warnings", "", f'<section id="warnings" class="warnings"><h2>Warnings</h2>'
                                           f"<ul>{items}</ul></section>"))  # fmt: skip
    if data.get("summary_rows"):
        rows = _seq(data["summary_rows"], "data['summary_rows']")
        sections.append(
            ("summary", "Summary", _section("summary", "Summary", _table(rows, "data['summary_rows']")))
        )
    if data.get("facts"):
        if not isinstance(data["facts"], Mapping):
            raise ValueError("data['facts']: expected {label: value}")
        rows = [{"figure": str(k), "value": _fmt_fact(v)} for k, v in data["facts"].items()]
        sections.append(
            ("facts", "Key figures", _section("facts", "Key figures", _table(rows, "data['facts']")))
        )
    if data.get("dimensions"):
        rows = _seq(data["dimensions"], "data['dimensions']")
        note = (
            "Mean gold score per dimension over every evaluated reply: which dimension a policy gains, "
            "and which it trades away."
        )
        if data.get("dimension_note"):
            if not isinstance(data["dimension_note"], str):
                raise ValueError("data['dimension_note']: expected a string")
            note += " " + data["dimension_note"]
        table = _table(rows, "data['dimensions']")
        sections.append(("dimensions", "Per dimension", _section("dimensions", "Per dimension", table, note)))
    if policies:
        sections.append(("policies", "Policies", _policies_section(policies, colors)))
    if data.get("win_rates"):
        ref = str(data.get("win_rate_reference") or "SFT")
        sections.append(("win-rates", "Win rates", _win_rates_section(data["win_rates"], ref, colors)))
    if data.get("proxy_vs_gold"):
        sections.append(("proxy-vs-gold", "Proxy vs gold", _proxy_gold_section(data["proxy_vs_gold"])))
    if data.get("curves"):
        sections.append(("curves", "Training", _curves_section(data["curves"])))
    if data.get("reliability"):
        sections.append(("reliability", "Calibration", _reliability_section(data["reliability"])))
    if data.get("annotators"):
        anns = _seq(data["annotators"], "data['annotators']")
        sections.append(("annotators", "Annotators", _annotators_section(anns)))
    if data.get("samples"):
        sections.append(("samples", "Samples", _samples_section(_seq(data["samples"], "data['samples']"))))
    if data.get("lineage"):
        lines = _seq(data["lineage"], "data['lineage']")
        pre = f"<pre>{_e(chr(10).join(str(x) for x in lines))}</pre>"
        sections.append(("lineage", "Lineage", _section("lineage", "Lineage of the final policy", pre)))
    if data.get("stage_times"):
        if not isinstance(data["stage_times"], Mapping):
            raise ValueError("data['stage_times']: expected {stage: seconds}")
        sections.append(("stage-times", "Stage times", _stage_times_section(data["stage_times"])))

    nav = "".join(f'<a href="#{sid}">{_e(label)}</a>' for sid, label, _ in sections if label)
    created = f'<div class="meta">{_e(data["created_at"])}</div>' if data.get("created_at") else ""
    verdict_html = f'<div class="verdict" id="verdict">{_e(verdict)}</div>' if verdict else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<header><div class="inner"><h1>{_e(title)}</h1>{created}{verdict_html}<nav>{nav}</nav></div></header>'
        f"<main>{''.join(s for _, _, s in sections)}"
        "<footer>Generated by alignflow.evaluate.report — self-contained page, no scripts.</footer></main>"
        "</body></html>\n"
    )


def write_report(out_dir: Path, data: Mapping[str, Any]) -> Path:
    """Write `out_dir/index.html` (creating `out_dir`) and return its path.

    The page is rendered completely before anything is written, so a bad `data` raises `ValueError` (naming
    the offending key path) and leaves no half-written file; the write itself goes through a temporary
    file and an atomic rename.
    """
    page = render_html(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def print_summary(data: Mapping[str, Any], console: Any, report_path: Path | None = None) -> None:
    """Print the verdict, the summary rows as a rich table, warnings, and the report path.

    `console` is a `rich.console.Console`.
    """
    from rich.table import Table
    from rich.text import Text

    title = str(data.get("title") or "Evaluation")
    policies = _check_policies(data.get("policies") or {})
    verdict = data.get("verdict") or (_default_verdict(policies) if policies else "")
    rows = list(data.get("summary_rows") or [])
    if rows:
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        table = Table(title=title, title_justify="left")
        for c in cols:
            numeric = all(isinstance(r.get(c), numbers.Real) and not isinstance(r.get(c), bool)
                          for r in rows if r.get(c) is not None)  # fmt: skip
            table.add_column(str(c), justify="right" if numeric else "left")
        for r in rows:
            table.add_row(*(Text(_fmt(r.get(c))) for c in cols))
        console.print(table)
    else:
        console.print(Text(title, style="bold"))
    if verdict:
        console.print(Text(str(verdict), style="bold green"))
    for w in data.get("warnings") or []:
        console.print(Text(f"warning: {w}", style="yellow"))
    if report_path is not None:
        console.print(Text(f"report: {report_path}", style="cyan"))
