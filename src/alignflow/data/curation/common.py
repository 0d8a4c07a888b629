"""What the curation operations share: row texts, text normalisation, and writing a derived version."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from alignflow.errors import AlignflowError
from alignflow.store import Store
from alignflow.store.api import dataset_content_hash

Progress = Callable[[int], None] | None
"""A callback advanced by the number of rows done (the CLI passes a progress bar's `advance`)."""

BY_CHOICES = ("prompt", "response", "row")
_NON_WORD = re.compile(r"\W+")  # one pass: each run of punctuation and spaces becomes one space


class CurationError(AlignflowError):
    """A bad rule, spec, weight or argument; the message names the argument."""


def normalize_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of a text (NFKC, lower case, words by one space)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return _NON_WORD.sub(" ", text).strip()


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    raw = row.get("meta")
    if not raw:
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def prompt_text(row: Mapping[str, Any]) -> str:
    """The prompt of a row of any kind (an SFT chat's prompt is every turn before the last)."""
    if row.get("messages"):
        return "\n".join(m["content"] for m in row["messages"][:-1])
    return row.get("prompt") or ""


def response_text(row: Mapping[str, Any]) -> str:
    """The response side: completion (sft), chosen + rejected (pairs), all completions (rankings)."""
    if row.get("messages"):
        return row["messages"][-1]["content"]
    if "completion" in row and row.get("completion") is not None:
        return row["completion"]
    if "chosen" in row:
        return f"{row.get('chosen') or ''}\n{row.get('rejected') or ''}"
    if row.get("completions"):
        return "\n".join(row["completions"])
    return ""


def row_text(row: Mapping[str, Any], by: str) -> str:
    """The text a row is compared by: `prompt`, `response` or the whole `row`."""
    if by == "prompt":
        return prompt_text(row)
    if by == "response":
        return response_text(row)
    if by == "row":
        return f"{prompt_text(row)}\n{response_text(row)}"
    raise CurationError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")


def field_text(row: Mapping[str, Any], field: str) -> str:
    """A named text field: a column, `response`, `row`, or `meta.KEY`."""
    if field in BY_CHOICES:
        return row_text(row, field)
    if field.startswith("meta."):
        val = row_meta(row).get(field[5:])
        return "" if val is None else str(val)
    val = row.get(field)
    if isinstance(val, list):
        return "\n".join(str(v) for v in val)
    return "" if val is None else str(val)


def text_fields(kind: str) -> tuple[str, ...]:
    return {
        "sft": ("prompt", "completion"),
        "pairs": ("prompt", "chosen", "rejected"),
        "rankings": ("prompt", "completions"),
    }.get(kind, ("prompt",))


def load(store: Store, ref: str) -> tuple[str, str, str | None, list[dict[str, Any]], pa.Schema]:
    """(id, kind, name, rows, schema) of a dataset version."""
    info = store.get(ref)
    if not info.uri.endswith(".parquet"):
        raise CurationError(f"artifact {ref!r} is a {info.kind}, not a dataset")
    table = store.read_dataset(info.id)
    return info.id, info.kind, info.name, table.to_pylist(), table.schema


def save_version(
    store: Store,
    rows: Sequence[Mapping[str, Any]],
    schema: pa.Schema,
    kind: str,
    parents: Iterable[tuple[str, str]],
    name: str | None,
    op: str,
    params: Mapping[str, Any],
    counts: Mapping[str, Any],
    tags: Iterable[str] = (),
) -> tuple[str, bool]:
    """Store `rows` as a new version of `name`, with edges to `parents` and the operation in its metadata.

    Returns (id, created). When the result has exactly the content of one of its parents (nothing was removed
    or changed) no version is written and that parent's id is returned with created=False: a dataset
    cannot be its own parent, and the content-addressed store would give it the same id anyway.
    """
    parents = list(parents)
    if not rows:
        raise CurationError(f"{op}: no rows left; nothing written")
    digest = dataset_content_hash(kind, pa.Table.from_pylist(list(rows), schema=schema).to_pylist())
    for pid, _ in parents:
        if pid == digest:
            return pid, False
    table = pa.Table.from_pylist(list(rows), schema=schema)
    meta = {
        "num_rows": table.num_rows,
        "format": kind,
        "operation": op,
        "params": dict(params),
        "counts": dict(counts),
    }
    return store.put_dataset(table, kind=kind, name=name, meta=meta, tags=tags, parents=parents), True


def version_label(store: Store, aid: str) -> str:
    """`name@vN` of an artifact (N counts the versions of its name, oldest = v1), or its short id."""
    info = store.get(aid)
    if not info.name:
        return aid[:12]
    versions = [a.id for a in reversed(store.find(name=info.name))]
    return f"{info.name}@v{versions.index(aid) + 1}" if aid in versions else aid[:12]
