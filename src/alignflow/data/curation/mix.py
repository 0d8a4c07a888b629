"""Mixtures with exact weights and temperature-scaled language balancing.

Counts are apportioned by largest remainders, so source i gets floor(w_i·N) or one more row and the realised
shares differ from the weights by under 1/N. Within a source, with `temperature` t, language l (lingua on
the prompt) gets a share q_l ∝ p_l^t of that source's rows, p_l being its share in the source: t = 1 keeps
the natural shares, t → 0 makes them uniform (XLM-R / mT5-style exponent). Sampling is seeded numpy;
a source (or language) asked for more rows than it has is repeated whole before sampling the remainder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alignflow.data.curation.common import CurationError, load, prompt_text, row_meta, save_version
from alignflow.data.curation.lang import detect_languages
from alignflow.store import Store


def parse_source(text: str) -> tuple[str, float]:
    """`REF:WEIGHT` -> (ref, weight); the weight is after the last colon."""
    ref, sep, w = text.rpartition(":")
    if not sep or not ref:
        raise CurationError(f"--source {text!r}: expected DATASET:WEIGHT, e.g. hh@v2:0.5")
    try:
        weight = float(w)
    except ValueError:
        raise CurationError(f"--source {text!r}: weight {w!r} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise CurationError(f"--source {text!r}: weight must be a finite number > 0, got {w}")
    return ref, weight


def parse_languages(text: str | None) -> float | None:
    """`temperature=T` -> T in (0, 1]."""
    if text is None:
        return None
    key, sep, val = text.partition("=")
    if key.strip() != "temperature" or not sep:
        raise CurationError(f"--languages {text!r}: expected temperature=T, e.g. temperature=0.7")
    try:
        t = float(val)
    except ValueError:
        raise CurationError(f"--languages {text!r}: temperature {val!r} is not a number") from None
    if not 0.0 < t <= 1.0:
        raise CurationError(f"--languages {text!r}: temperature must be in (0, 1], got {t}")
    return t


def check_weights(weights: Sequence[float]) -> None:
    total = float(sum(weights))
    if abs(total - 1.0) > 1e-6:
        raise CurationError(f"--source weights sum to {total:g}; they must sum to 1")


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to `total`, each within 1 of weight·total (largest remainder method)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    exact = w * total
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def _sample(n_avail: int, count: int, rng: np.random.Generator) -> list[int]:
    reps, rest = divmod(count, n_avail)
    idx = [i for _ in range(reps) for i in range(n_avail)]
    return idx + rng.choice(n_avail, size=rest, replace=False).tolist()


def language_counts(langs: Sequence[str | None], count: int, temperature: float) -> dict[str, int]:
    """Rows per language for `count` rows: q_l ∝ p_l^temperature, apportioned exactly."""
    codes = sorted({lang or "unknown" for lang in langs})
    p = np.array([sum((lang or "unknown") == c for lang in langs) for c in codes], dtype=np.float64)
    q = (p / p.sum()) ** temperature
    return dict(zip(codes, apportion(count, q / q.sum()), strict=True))


def mix_rows(
    sources: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    weights: Sequence[float],
    rows: int | None = None,
    seed: int = 0,
    temperature: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mix sources [(label, rows)] with exact weights; returns (rows, report). `rows` defaults to the largest
    total no source has to repeat rows for."""
    check_weights(weights)
    if rows is None:
        rows = int(min(len(r) / w for (_, r), w in zip(sources, weights, strict=True)))
    if rows < 1:
        raise CurationError(f"--rows must be at least 1, got {rows}")
    rng = np.random.default_rng(seed)
    counts = apportion(rows, weights)
    out: list[dict[str, Any]] = []
    report: dict[str, Any] = {"rows": rows, "sources": []}
    for (label, src), count in zip(sources, counts, strict=True):
        entry: dict[str, Any] = {"source": label, "available": len(src), "rows": count}
        if temperature is None:
            picks = _sample(len(src), count, rng)
        else:
            langs = detect_languages([prompt_text(r) for r in src])
            per_lang = language_counts(langs, count, temperature)
            picks = []
            for code, n_lang in per_lang.items():
                members = [i for i, lang in enumerate(langs) if (lang or "unknown") == code]
                picks += [members[j] for j in _sample(len(members), n_lang, rng)]
            entry["languages"] = per_lang
        entry["repeated"] = max(0, count - len(set(picks)))
        seen: dict[int, int] = {}
        metas: dict[int, str] = {}  # a row picked k times carries the same meta each time
        for i in picks:
            row = dict(src[i])
            k = seen.get(i, 0)
            seen[i] = k + 1
            row["id"] = f"{label}:{row['id']}" + (f"#{k}" if k else "")
            if i not in metas:
                meta = row_meta(row)
                meta["mix_source"] = label
                metas[i] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
            row["meta"] = metas[i]
            out.append(row)
        report["sources"].append(entry)
    order = rng.permutation(len(out))
    return [out[i] for i in order], report


def mix_datasets(
    store: Store,
    sources: Sequence[str],
    rows: int | None = None,
    seed: int = 0,
    languages: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """`--source REF:WEIGHT ...` -> a new mixture dataset with an edge to every source; returns the report."""
    if not sources:
        raise CurationError("give at least one --source DATASET:WEIGHT")
    parsed = [parse_source(s) for s in sources]
    check_weights([w for _, w in parsed])
    temperature = parse_languages(languages)
    if rows is not None and rows < 1:
        raise CurationError(f"--rows must be at least 1, got {rows}")
    loaded = []
    kinds = set()
    for ref, _ in parsed:
        aid, kind, src_name, data, schema = load(store, ref)
        loaded.append((aid, src_name or aid[:12], data, schema))
        kinds.add(kind)
    labels = [label for _, label, _, _ in loaded]
    if len(set(labels)) != len(labels):  # two versions of one name: label rows by id instead
        loaded = [(aid, aid[:12], data, schema) for aid, _, data, schema in loaded]
    if len(kinds) > 1:
        raise CurationError(
            f"--source datasets are of different kinds ({', '.join(sorted(kinds))}); mix one kind"
        )
    if len({aid for aid, *_ in loaded}) != len(loaded):
        raise CurationError("--source: the same dataset is given twice; give it once with the summed weight")
    kind = kinds.pop()
    out, report = mix_rows(
        [(ref, data) for _, ref, data, _ in loaded], [w for _, w in parsed], rows, seed, temperature
    )
    params = {
        "sources": [
            {"ref": ref, "id": aid, "weight": w}
            for (aid, _, _, _), (ref, w) in zip(loaded, parsed, strict=True)
        ],
        "rows": rows,
        "seed": seed,
        "temperature": temperature,
    }
    new_id, _ = save_version(
        store,
        out,
        loaded[0][3],
        kind,
        [(aid, "source") for aid, *_ in loaded],
        name or "mix",
        "mix",
        params,
        report,
    )
    return {"output": new_id, **report}


def parse_mix_spec(spec: str) -> dict[str, Any]:
    """`mix:A:0.5,B:0.5[;rows=N][;seed=S][;temperature=T]` (how a recipe's `data.train` names a mixture)."""
    body = spec[len("mix:") :]
    parts = [p.strip() for p in body.split(";") if p.strip()]
    if not parts:
        raise CurationError(
            f"data mixture {spec!r}: expected mix:A:0.5,B:0.5[;rows=N][;seed=S][;temperature=T]"
        )
    out: dict[str, Any] = {"sources": [s.strip() for s in parts[0].split(",") if s.strip()]}
    for opt in parts[1:]:
        key, sep, val = opt.partition("=")
        key = key.strip()
        if not sep or key not in ("rows", "seed", "temperature"):
            raise CurationError(
                f"data mixture {spec!r}: unknown option {opt!r}; expected rows=, seed=, temperature="
            )
        try:
            out[key] = float(val) if key == "temperature" else int(val)
        except ValueError:
            raise CurationError(f"data mixture {spec!r}: {key} must be a number, got {val!r}") from None
    return out


def resolve_mixture(store: Store, spec: str, kind: str) -> str:
    """The dataset id of a `mix:` spec (built once; the same spec gives the same content and id)."""
    args = parse_mix_spec(spec)
    temp = args.get("temperature")
    report = mix_datasets(
        store,
        args["sources"],
        rows=args.get("rows"),
        seed=args.get("seed", 0),
        languages=f"temperature={temp}" if temp is not None else None,
    )
    info = store.get(report["output"])
    if info.kind != kind:
        raise CurationError(f"data mixture {spec!r} is a {info.kind} dataset; this stage needs {kind}")
    return info.id
