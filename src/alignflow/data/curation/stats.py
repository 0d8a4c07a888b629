"""Dataset statistics (rows, length distributions, languages, duplicates, tags, scores), diffs, and an HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alignflow.data.curation.common import (
    field_text,
    normalize_text,
    prompt_text,
    row_meta,
    row_text,
    text_fields,
)
from alignflow.data.curation.lang import detect_languages

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _distribution(values: Sequence[float], bins: int = 20) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0}
    qs = np.quantile(arr, QUANTILES)
    counts, edges = np.histogram(arr, bins=bins)
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "min": float(qs[0]),
        "p5": float(qs[1]),
        "p25": float(qs[2]),
        "p50": float(qs[3]),
        "p75": float(qs[4]),
        "p95": float(qs[5]),
        "max": float(qs[6]),
        "hist": {"counts": counts.tolist(), "edges": edges.tolist()},
    }


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in enc]


def compute_stats(
    rows: Sequence[Mapping[str, Any]],
    kind: str,
    tokenizer: Any = None,
    language_sample: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Statistics of a dataset's rows.

    lengths: per text field, characters and words (and tokens when a tokenizer is given): quantiles and a
    20-bin histogram. languages: counts over a seeded random sample of `language_sample` prompts (all rows
    if fewer). duplicates: rows sharing a normalised prompt / response / row with an earlier row. tags:
    counts of `meta.tags` values. scores: distributions of numeric `meta` fields (and `weight`).
    """
    n = len(rows)
    fields = text_fields(kind) if not any(r.get("messages") for r in rows[:1]) else ("prompt", "response")
    lengths: dict[str, dict[str, Any]] = {}
    for f in fields:
        texts = [field_text(r, f) for r in rows]
        per = {
            "chars": _distribution([len(t) for t in texts]),
            "words": _distribution([len(t.split()) for t in texts]),
        }
        if tokenizer is not None:
            per["tokens"] = _distribution(_token_lengths(tokenizer, texts))
        lengths[f] = per
    idx = list(range(n))
    if n > language_sample:
        idx = sorted(random.Random(seed).sample(idx, language_sample))
    langs = Counter(lang or "unknown" for lang in detect_languages([prompt_text(rows[i]) for i in idx]))
    duplicates = {}
    for by in ("prompt", "response", "row"):
        keys = Counter(normalize_text(row_text(r, by)) for r in rows)
        duplicates[by] = int(sum(c - 1 for c in keys.values()))
    tags: Counter[str] = Counter()
    numeric: dict[str, list[float]] = {}
    for r in rows:
        meta = row_meta(r)
        for t in meta.get("tags", []) or []:
            tags[str(t)] += 1
        for k, v in meta.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                numeric.setdefault(f"meta.{k}", []).append(float(v))
        if r.get("weight") is not None:
            numeric.setdefault("weight", []).append(float(r["weight"]))
    return {
        "kind": kind,
        "rows": n,
        "lengths": lengths,
        "languages": {
            "sampled": len(idx),
            "counts": dict(langs.most_common()),
        },
        "duplicates": duplicates,
        "tags": dict(tags.most_common()),
        "scores": {k: _distribution(v) for k, v in sorted(numeric.items())},
    }


def diff_stats(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """What changed from dataset A to B: rows added/removed (by normalised row content), and the change of
    every scalar statistic (B − A)."""
    ka = Counter(normalize_text(row_text(r, "row")) for r in rows_a)
    kb = Counter(normalize_text(row_text(r, "row")) for r in rows_b)
    changes: dict[str, dict[str, float]] = {}

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                if k == "hist":
                    continue
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
        elif isinstance(x, int | float) or isinstance(y, int | float):
            xv, yv = float(x or 0), float(y or 0)
            if xv != yv:
                changes[path] = {"a": xv, "b": yv, "delta": yv - xv}

    walk(a, b, "")
    return {
        "rows_a": len(rows_a),
        "rows_b": len(rows_b),
        "removed": int(sum((ka - kb).values())),
        "added": int(sum((kb - ka).values())),
        "changes": changes,
    }


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def stats_html(stats: Mapping[str, Any], title: str) -> str:
    """A self-contained HTML page (plots as inline PNGs) of `compute_stats` output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{stats['rows']:,} {html.escape(stats['kind'])} rows</p>",
        "<h2>Lengths</h2><table><tr><th>field</th><th>unit</th><th>min</th><th>p50</th><th>p95</th>"
        "<th>max</th><th>mean</th></tr>",
    ]
    for f, units in stats["lengths"].items():
        for unit, d in units.items():
            if d.get("count"):
                parts.append(
                    f"<tr><td>{html.escape(f)}</td><td>{unit}</td><td>{d['min']:.0f}</td><td>{d['p50']:.0f}</td>"
                    f"<td>{d['p95']:.0f}</td><td>{d['max']:.0f}</td><td>{d['mean']:.1f}</td></tr>"
                )
    parts.append("</table>")
    hists = [
        (f"{f} ({unit})", d) for f, u in stats["lengths"].items() for unit, d in u.items() if d.get("count")
    ]
    hists += [(k, d) for k, d in stats["scores"].items() if d.get("count")]
    for label, d in hists:
        fig, ax = plt.subplots(figsize=(6, 2.2))
        edges = d["hist"]["edges"]
        ax.stairs(d["hist"]["counts"], edges, fill=True)
        ax.set_title(label)
        parts.append(f"<img alt='{html.escape(label)}' src='data:image/png;base64,{_png(fig)}'>")
        plt.close(fig)
    for section in ("languages", "duplicates", "tags"):
        data = stats[section]["counts"] if section == "languages" else stats[section]
        parts.append(f"<h2>{section.title()}</h2><table>")
        parts += [f"<tr><td>{html.escape(str(k))}</td><td>{v:,}</td></tr>" for k, v in data.items()]
        parts.append("</table>")
    parts.append(
        f"<details><summary>JSON</summary><pre>{html.escape(json.dumps(stats, indent=1))}</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
