"""Dataset formats with TRL-compatible column names, and the strict file readers behind `data import`.

Normalised rows by kind (every row also has `id` and `meta`, a JSON object of extra fields):

| kind       | accepted input columns                                   | stored columns                          |
|------------|----------------------------------------------------------|-----------------------------------------|
| `sft`      | `prompt` + `completion`, or `messages` [{role, content}] | prompt, completion, messages            |
| `pairs`    | `prompt` + `chosen` + `rejected`; or HH-style `chosen`/`rejected` transcripts sharing the text up to the last `\\n\\nAssistant:` | prompt, chosen, rejected, weight |
| `rankings` | `prompt` + `completions` + (`ranking` best-first indices, or `scores`, higher is better) | prompt, completions, ranking, scores |

A file is validated completely before anything is stored: an error names the file, the line
(or Parquet row) and the field, and nothing is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignflow.errors import DataFormatError

KINDS = ("sft", "pairs", "rankings")
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
HH_ASSISTANT = "\n\nAssistant:"
_MAX_REPORTED = 10

_FIELDS = {
    "sft": {"id", "prompt", "completion", "messages"},
    "pairs": {"id", "prompt", "chosen", "rejected", "weight"},
    "rankings": {"id", "prompt", "completions", "ranking", "scores"},
}

SCHEMAS = {
    "sft": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("meta", pa.string()),
        ]
    ),
    "pairs": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("weight", pa.float64()),
            ("meta", pa.string()),
        ]
    ),
    "rankings": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("completions", pa.list_(pa.string())),
            ("ranking", pa.list_(pa.int64())),
            ("scores", pa.list_(pa.float64())),
            ("meta", pa.string()),
        ]
    ),
}


class _RowError(Exception):
    def __init__(self, field: str | None, msg: str) -> None:
        super().__init__(msg)
        self.field = field
        self.msg = msg


def iter_records(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a JSONL or Parquet file; location is `line N` or `row N`.

    Malformed lines raise DataFormatError naming `file:line`.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataFormatError(f"{path}: not a readable Parquet file: {exc}") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield f"row {i}", rec
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected .jsonl or .parquet")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > max_line_bytes:
                raise DataFormatError(
                    f"{path}:{lineno}: line is {len(raw):,} bytes, over the {max_line_bytes:,}-byte limit "
                    "(raise it with --max-line-bytes if this is intended)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: not valid UTF-8 at byte {exc.start} (re-encode the file as UTF-8)"
                ) from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
                ) from None
            yield f"line {lineno}", rec


def _text(rec: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise _RowError(key, f"missing field '{key}'")
    val = rec[key]
    if not isinstance(val, str):
        raise _RowError(key, f"field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise _RowError(key, f"field '{key}' is empty")
    return val


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF transcripts into (prompt, chosen reply, rejected reply).

    The prompt is the longest common prefix of the two transcripts that ends with
    `\\n\\nAssistant:` (as TRL's `extract_prompt`): cutting at the last such marker of `chosen`
    alone fails on replies that themselves contain a marker. Replies may be empty (HH has such pairs).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    while cut >= 0 and cut + len(HH_ASSISTANT) > n:
        cut = chosen.rfind(HH_ASSISTANT, 0, cut)
    if cut < 0:
        raise _RowError("chosen", "HH-style transcripts share no '\\n\\nAssistant:' turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt) :].strip(), rejected[len(prompt) :].strip()


def _messages(val: Any) -> list[dict[str, str]]:
    if not isinstance(val, list) or not val:
        raise _RowError("messages", "field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(val):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _RowError(f"messages[{i}]", "each message needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise _RowError(f"messages[{i}].role", f"unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise _RowError("messages", "the last message must be the assistant's (the completion to learn)")
    return out


def _meta(rec: dict[str, Any], kind: str) -> str:
    extra = {k: v for k, v in rec.items() if k not in _FIELDS[kind]}
    return json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)


def normalize_record(kind: str, rec: Any, default_id: str) -> dict[str, Any]:
    """One input record -> one normalised row of `kind` (raises _RowError)."""
    if not isinstance(rec, dict):
        raise _RowError(None, f"expected a JSON object, got {type(rec).__name__}")
    rid = rec.get("id", default_id)
    row: dict[str, Any] = {"id": str(rid)}
    if kind == "sft":
        if "messages" in rec and rec["messages"] is not None:
            row.update(prompt=None, completion=None, messages=_messages(rec["messages"]))
        else:
            row.update(
                prompt=_text(rec, "prompt", allow_empty=True),
                completion=_text(rec, "completion"),
                messages=None,
            )
    elif kind == "pairs":
        chosen, rejected = _text(rec, "chosen", allow_empty=True), _text(rec, "rejected", allow_empty=True)
        if rec.get("prompt") is None:
            prompt, chosen, rejected = split_hh(chosen, rejected)
            if chosen == rejected:
                raise _RowError("rejected", "chosen and rejected replies are identical")
        else:
            prompt = _text(rec, "prompt", allow_empty=True)
        weight = rec.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise _RowError("weight", f"field 'weight' must be a finite number ≥ 0, got {weight!r}")
        row.update(prompt=prompt, chosen=chosen, rejected=rejected, weight=float(weight))
    elif kind == "rankings":
        prompt = _text(rec, "prompt", allow_empty=True)
        comps = rec.get("completions")
        if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
            raise _RowError("completions", "field 'completions' must be a list of at least 2 strings")
        scores = rec.get("scores")
        ranking = rec.get("ranking")
        if ranking is None and scores is None:
            raise _RowError("ranking", "need 'ranking' (best-first indices) or 'scores' (higher is better)")
        if scores is not None:
            if (
                not isinstance(scores, list)
                or len(scores) != len(comps)
                or not all(
                    isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
                    for s in scores
                )
            ):
                raise _RowError("scores", f"field 'scores' must be {len(comps)} finite numbers")
            scores = [float(s) for s in scores]
        if ranking is None:
            ranking = sorted(range(len(comps)), key=lambda i: -scores[i])  # type: ignore[index]
        elif not isinstance(ranking, list) or sorted(ranking) != list(range(len(comps))):
            raise _RowError("ranking", f"field 'ranking' must be a permutation of 0..{len(comps) - 1}")
        row.update(prompt=prompt, completions=comps, ranking=[int(i) for i in ranking], scores=scores)
    else:
        raise DataFormatError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    row["meta"] = _meta(rec, kind)
    return row


def load_dataset_file(
    path: str | Path, kind: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pa.Table, dict[str, int]]:
    """Read and validate a whole file into a normalised Arrow table. Returns (table, stats)."""
    p = Path(path)
    if kind not in KINDS:
        raise DataFormatError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not p.is_file():
        raise DataFormatError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    n_errors = 0
    for idx, (where, rec) in enumerate(iter_records(p, max_line_bytes)):
        try:
            rows.append(normalize_record(kind, rec, default_id=str(idx)))
        except _RowError as exc:
            n_errors += 1
            if len(errors) < _MAX_REPORTED:
                loc = where.replace("line ", "") if where.startswith("line ") else where
                field = f" field '{exc.field}':" if exc.field else ""
                errors.append(f"{p}:{loc}:{field} {exc.msg}")
    if n_errors:
        more = f"\n  ... and {n_errors - len(errors)} more" if n_errors > len(errors) else ""
        raise DataFormatError(
            f"{p}: {n_errors} invalid {kind} record(s), nothing imported:\n  " + "\n  ".join(errors) + more
        )
    if not rows:
        raise DataFormatError(f"{p}: no records (the file is empty)")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise DataFormatError(f"{p}: duplicate record id {dup!r}; ids must be unique within a dataset")
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind])
    return table, {"rows": len(rows)}
