"""Import and export of dataset artifacts (the library behind `alignflow data ...`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq

from alignflow.data.formats import DEFAULT_MAX_LINE_BYTES, KINDS, load_dataset_file
from alignflow.errors import DataFormatError, StoreError
from alignflow.store import Store


def import_dataset(
    store: Store,
    path: str | Path,
    kind: str,
    name: str | None = None,
    tags: Iterable[str] = (),
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> str:
    """Validate a JSONL/Parquet file completely, then store it as a dataset artifact; return its id.

    The same content imported twice gives the same id (the second import writes nothing new).
    """
    p = Path(path)
    table, stats = load_dataset_file(p, kind, max_line_bytes=max_line_bytes)
    return store.put_dataset(
        table,
        kind=kind,
        name=name or p.stem,
        meta={"source": str(p.resolve()), "num_rows": stats["rows"], "format": kind},
        tags=tags,
    )


def resolve_dataset(store: Store, ref: str, kind: str) -> str:
    """An artifact id/name, or a file path imported on the fly (how recipes accept `data.train`)."""
    p = Path(ref)
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson", ".parquet") and p.is_file():
        return import_dataset(store, p, kind)
    info = store.get(ref)
    if info.kind != kind:
        raise StoreError(f"artifact {ref!r} is a {info.kind} dataset; this stage needs {kind}")
    return info.id


def export_dataset(store: Store, ref: str, out: str | Path) -> int:
    """Write a dataset artifact to JSONL or Parquet (by the file suffix); return the row count."""
    out = Path(out)
    info = store.get(ref)
    if info.kind not in KINDS and not info.uri.endswith(".parquet"):
        raise StoreError(f"artifact {ref!r} is a {info.kind}, not a dataset")
    table = store.read_dataset(info.id)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        pq.write_table(table, out)
    elif out.suffix.lower() in (".jsonl", ".ndjson"):
        with open(out, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                meta = row.pop("meta", None)
                if meta:
                    row.update(json.loads(meta))
                f.write(
                    json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n"
                )
    else:
        raise DataFormatError(f"{out}: unsupported export type; use .jsonl or .parquet")
    return table.num_rows
