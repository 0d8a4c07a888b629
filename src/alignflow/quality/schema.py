"""The judgments data contract, its validation, and the `Undefined` result.

A judgments table has one row per judgment:

| column | type | meaning |
|---|---|---|
| `item_id` | str | the item judged (a prompt with two responses, or one response to rate) |
| `annotator_id` | str | who judged it |
| `label` | "A" / "B" / "tie", a number, or a list | pairwise choice in the ITEM's canonical order (not display order), a rating, or a ranking |
| `kind` | "pairwise" / "rating" / "ranking" | optional; inferred from the labels when absent |
| `dimension` | str | what was judged ("overall", "accuracy", ...); default "overall" |
| `shown_swapped` | bool | the display order was swapped for this annotator (A was shown on the right) |
| `is_gold` | bool | a gold (known-answer) item |
| `gold_label` | like `label` | the known answer of a gold item |
| `duration_s` | float | seconds spent on the judgment |
| `created_at` | timestamp | when the judgment was submitted |
| `pod` | str or null | the annotator's pod (team) |
| `reviewer_label` | like `label` | a QA re-rating of the same item, when sampled for review |

`load_judgments` also reads the annotation platform's `annotations` export (`kind` = "annotate"/"review", JSON
labels) through `from_annotations`; ``alignflow annotate export --as judgments`` writes this contract directly.

Every function in `alignflow.quality` that returns a table reports an undefined statistic as a `None` value with a
reason in a sibling `<name>_note` column, never a NaN; scalar functions return `Undefined(reason)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignflow.errors import DataFormatError

PAIRWISE_LABELS = ("A", "B", "tie")
KINDS = ("pairwise", "rating", "ranking")
REQUIRED_COLUMNS = ("item_id", "annotator_id", "label")
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "dimension": "overall",
    "shown_swapped": False,
    "is_gold": False,
    "gold_label": None,
    "duration_s": np.nan,
    "created_at": pd.NaT,
    "pod": None,
    "reviewer_label": None,
}


class JudgmentError(DataFormatError, ValueError):
    """A judgments table is malformed; the message names the row and column."""


@dataclass(frozen=True)
class Undefined:
    """A statistic that has no value on this data, with the reason (e.g. "all labels identical")."""

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"undefined ({self.reason})"


def is_defined(value: object) -> bool:
    """True when `value` is a real number (not `Undefined`, `None` or NaN)."""
    if value is None or isinstance(value, Undefined):
        return False
    return not (isinstance(value, float) and math.isnan(value))


def split_value(value: float | Undefined) -> tuple[float | None, str]:
    """Turn a scalar result into the `(value, note)` pair used in tables: `(x, "")` or `(None, reason)`."""
    if isinstance(value, Undefined):
        return None, value.reason
    return float(value), ""


def _row_error(row: int, column: str, message: str, source: str | None = None) -> JudgmentError:
    where = f"{source}: " if source else ""
    return JudgmentError(f"{where}row {row}, column '{column}': {message}")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NaT


def infer_kind(label: Any) -> str | None:
    """The judgment kind a single label implies, or None when it fits none."""
    if isinstance(label, str):
        return "pairwise" if label in PAIRWISE_LABELS else None
    if isinstance(label, (list, tuple, np.ndarray)):
        return "ranking"
    if isinstance(label, (bool, np.bool_)):
        return None
    if isinstance(label, (int, float, np.integer, np.floating)) and not math.isnan(float(label)):
        return "rating"
    return None


def _check_label(label: Any, kind: str, row: int, column: str, source: str | None) -> None:
    if kind == "pairwise":
        if not isinstance(label, str) or label not in PAIRWISE_LABELS:
            raise _row_error(
                row, column, f"pairwise label must be one of {PAIRWISE_LABELS}, got {label!r}", source
            )
    elif kind == "rating":
        if infer_kind(label) != "rating":
            raise _row_error(row, column, f"rating label must be a finite number, got {label!r}", source)
    elif kind == "ranking":
        if not isinstance(label, (list, tuple, np.ndarray)) or len(label) < 2:
            raise _row_error(
                row, column, f"ranking label must be a list of at least 2 ids, got {label!r}", source
            )
        if len(set(map(str, label))) != len(label):
            raise _row_error(row, column, f"ranking label repeats an entry: {list(label)!r}", source)


def validate_judgments(
    judgments: pd.DataFrame,
    *,
    items: Iterable[str] | pd.DataFrame | None = None,
    annotators: Iterable[str] | pd.DataFrame | None = None,
    source: str | None = None,
) -> pd.DataFrame:
    """Check a judgments table against the contract and return a normalised copy.

    The copy has every optional column (filled with its default), string ids, a `kind` per row, boolean
    `shown_swapped`/`is_gold`, and `created_at` parsed to timestamps. `items`/`annotators` (ids, or tables with
    an `item_id`/`annotator_id` column) make unknown references an error. Rows are numbered from 0 as in the
    input; `source` (a file name) is prefixed to error messages.

    Raises:
        JudgmentError: naming the first bad row and column.
    """
    if not isinstance(judgments, pd.DataFrame):
        raise JudgmentError(f"judgments must be a pandas DataFrame, got {type(judgments).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in judgments.columns]
    if missing:
        where = f"{source}: " if source else ""
        raise JudgmentError(f"{where}missing required column(s) {missing}; have {list(judgments.columns)}")
    df = judgments.reset_index(drop=True).copy()
    for column, default in OPTIONAL_DEFAULTS.items():
        if column not in df.columns:
            df[column] = default
    if "kind" not in df.columns:
        df["kind"] = None

    for column in ("item_id", "annotator_id"):
        values = df[column].tolist()
        for row, value in enumerate(values):
            if _is_missing(value) or (isinstance(value, str) and not value.strip()):
                raise _row_error(row, column, "missing id", source)
        df[column] = [str(v) for v in values]

    kinds = df["kind"].tolist()
    labels = df["label"].tolist()
    for row, (kind, label) in enumerate(zip(kinds, labels, strict=True)):
        if _is_missing(kind):
            kind = infer_kind(label)
            if kind is None:
                raise _row_error(
                    row,
                    "label",
                    f"cannot tell the kind of label {label!r}: expected 'A'/'B'/'tie', a number or a list",
                    source,
                )
            kinds[row] = kind
        elif kind not in KINDS:
            hint = (
                " (an annotations export: read it with load_judgments, or export --as judgments)"
                if kind in ("annotate", "review")
                else ""
            )
            raise _row_error(row, "kind", f"must be one of {KINDS}, got {kind!r}{hint}", source)
        _check_label(label, kinds[row], row, "label", source)
    df["kind"] = kinds

    for column in ("gold_label", "reviewer_label"):
        for row, (value, kind) in enumerate(zip(df[column].tolist(), kinds, strict=True)):
            if not _is_missing(value) and not isinstance(value, (list, tuple, np.ndarray)):
                _check_label(value, kind, row, column, source)
            elif isinstance(value, (list, tuple, np.ndarray)):
                _check_label(value, kind, row, column, source)

    for column in ("shown_swapped", "is_gold"):
        out = []
        for row, value in enumerate(df[column].tolist()):
            if _is_missing(value):
                out.append(False)
            elif isinstance(value, (bool, np.bool_)) or value in (0, 1):
                out.append(bool(value))
            else:
                raise _row_error(row, column, f"must be a boolean, got {value!r}", source)
        df[column] = out
    for row, (gold, label) in enumerate(zip(df["is_gold"], df["gold_label"], strict=True)):
        if gold and _is_missing(label):
            raise _row_error(row, "gold_label", "is_gold is true but gold_label is missing", source)

    durations = pd.to_numeric(df["duration_s"], errors="coerce")
    for row, (raw, num) in enumerate(zip(df["duration_s"].tolist(), durations.tolist(), strict=True)):
        if not _is_missing(raw) and (math.isnan(num) or num < 0):
            raise _row_error(
                row, "duration_s", f"must be a non-negative number of seconds, got {raw!r}", source
            )
    df["duration_s"] = durations.astype(float)
    try:
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        where = f"{source}: " if source else ""
        raise JudgmentError(f"{where}column 'created_at': unparseable timestamp ({exc})") from exc
    df["dimension"] = [("overall" if _is_missing(v) else str(v)) for v in df["dimension"]]
    df["pod"] = [(None if _is_missing(v) else str(v)) for v in df["pod"]]

    for ref, column in ((items, "item_id"), (annotators, "annotator_id")):
        if ref is None:
            continue
        known = set(map(str, ref[column])) if isinstance(ref, pd.DataFrame) else set(map(str, ref))
        unknown = ~df[column].isin(known)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise _row_error(
                row,
                column,
                f"unknown {column.removesuffix('_id')} {df[column][row]!r} "
                f"({int(unknown.sum())} row(s) reference ids not in the {column.removesuffix('_id')} table)",
                source,
            )

    dup = df.duplicated(subset=["item_id", "annotator_id", "dimension"], keep="first")
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise _row_error(
            row,
            "annotator_id",
            f"annotator {df['annotator_id'][row]!r} judged item {df['item_id'][row]!r} "
            f"(dimension {df['dimension'][row]!r}) more than once",
            source,
        )
    return df


# `review_of` is not required: a JSONL export leaves out null fields, and only review rows have one.
ANNOTATIONS_COLUMNS = ("response_id", "kind", "label", "dimension_labels")


def is_annotations_table(df: pd.DataFrame) -> bool:
    """True for the annotation platform's `annotations` export (one row per response, JSON-encoded labels,
    `kind` = "annotate" or "review"), which :func:`from_annotations` turns into judgments."""
    return all(c in df.columns for c in ANNOTATIONS_COLUMNS) and set(df["kind"].dropna()) <= {
        "annotate",
        "review",
    }


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def from_annotations(df: pd.DataFrame) -> pd.DataFrame:
    """Judgments from an `annotations` export (``alignflow annotate export``; its `kind` column is the
    response kind, annotate or review, not the judgment kind): one row per annotate response and dimension
    ("overall" plus each of its `dimension_labels`), labels decoded from JSON, and a review's label as the
    `reviewer_label` of the response it reviews. Gold answers are kept when the export carries `gold_label`
    (exports before it did not: their gold items count as regular items)."""
    reviews = {
        int(r["review_of"]): r
        for r in df.to_dict(orient="records")
        if r["kind"] == "review" and r["review_of"]
    }
    has_gold = "gold_label" in df.columns
    rows = []
    for r in df.to_dict(orient="records"):
        if r["kind"] != "annotate":
            continue
        rv = reviews.get(int(r["response_id"]))
        gold = bool(r.get("is_gold")) and has_gold and not _is_missing(r.get("gold_label"))
        base = {
            "item_id": r["item_id"],
            "annotator_id": r["annotator_id"],
            "shown_swapped": r.get("shown_swapped", False),
            "duration_s": r.get("duration_s"),
            "created_at": r.get("created_at"),
            "pod": r.get("pod"),
        }
        rows.append(
            {
                **base,
                "label": _json_value(r["label"]),
                "dimension": "overall",
                "is_gold": gold,
                "gold_label": _json_value(r["gold_label"]) if gold else None,
                "reviewer_label": None if rv is None else _json_value(rv["label"]),
            }
        )
        review_dims = {} if rv is None else _json_value(rv.get("dimension_labels")) or {}
        for dim, lab in (_json_value(r.get("dimension_labels")) or {}).items():
            rows.append(
                {
                    **base,
                    "label": lab,
                    "dimension": dim,
                    "is_gold": False,
                    "gold_label": None,
                    "reviewer_label": review_dims.get(dim),
                }
            )
    return pd.DataFrame(rows)


def load_judgments(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """Read a judgments file (`.jsonl`/`.json` lines, or `.parquet`) and validate it.

    Extra keyword arguments go to `validate_judgments` (e.g. `items=`, `annotators=`).
    """
    path = Path(path)
    if not path.exists():
        raise JudgmentError(f"{path}: no such file")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        # Parquet stores list labels as numpy arrays; the contract uses lists.
        for column in ("label", "gold_label", "reviewer_label"):
            if column in df.columns:
                df[column] = [v.tolist() if isinstance(v, np.ndarray) else v for v in df[column]]
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        records = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JudgmentError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise JudgmentError(
                        f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                records.append(record)
        df = pd.DataFrame.from_records(records)
        if df.empty:
            raise JudgmentError(f"{path}: no judgments")
    else:
        raise JudgmentError(f"{path}: unsupported judgments format {path.suffix!r} (use .jsonl or .parquet)")
    if is_annotations_table(df):
        df = from_annotations(df)
    return validate_judgments(df, source=str(path), **kwargs)


def read_judgments_artifact(store: Any, ref: str) -> pd.DataFrame:
    """Validated judgments from a `judgments` or `annotations` dataset artifact (``alignflow annotate export``)
    of a workspace :class:`alignflow.store.Store`; `ref` is an id, prefix or name."""
    info = store.get(ref)
    if info.kind not in ("judgments", "annotations"):
        raise JudgmentError(f"artifact {ref!r} is a {info.kind}; expected a judgments or annotations dataset")
    df = store.read_dataset(info.id).to_pandas()
    for column in ("label", "gold_label", "reviewer_label"):
        if column in df.columns:
            df[column] = [v.tolist() if isinstance(v, np.ndarray) else v for v in df[column]]
    if is_annotations_table(df):
        df = from_annotations(df)
    return validate_judgments(df, source=f"artifact {info.name or info.id[:12]}")


def write_judgments(judgments: pd.DataFrame, path: str | Path) -> Path:
    """Write a judgments table as JSONL or Parquet (by suffix), timestamps in ISO 8601."""
    path = Path(path)
    df = judgments.copy()
    if "created_at" in df.columns:
        df["created_at"] = [None if pd.isna(t) else pd.Timestamp(t).isoformat() for t in df["created_at"]]
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        with path.open("w", encoding="utf-8") as fh:
            for record in df.to_dict(orient="records"):
                clean = {
                    k: (None if (isinstance(v, float) and math.isnan(v)) else v) for k, v in record.items()
                }
                fh.write(json.dumps(clean, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def nan_to_none(table: pd.DataFrame) -> pd.DataFrame:
    """Replace NaN/NaT by None (object dtype) in every column that has one, so that an undefined figure in a
    table is always None with a reason beside it, never NaN."""
    out = table.copy()
    for col in out.columns:
        mask = out[col].isna()
        if mask.any():
            out[col] = out[col].astype(object).where(~mask, None)
    return out
