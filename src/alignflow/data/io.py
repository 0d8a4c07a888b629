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
    if p.is_dir():  # a Hugging Face `save_to_disk` folder
        from alignflow.data.curation.hf import import_hf_folder

        return import_hf_folder(store, p, kind, name=name, tags=tags)
    table, stats = load_dataset_file(p, kind, max_line_bytes=max_line_bytes)
    return store.put_dataset(
        table,
        kind=kind,
        name=name or p.stem,
        meta={"source": str(p.resolve()), "num_rows": stats["rows"], "format": kind},
        tags=tags,
    )


def resolve_dataset(store: Store, ref: str, kind: str) -> str:
    """An artifact id/name (`name@vN`, `name@tag`), a file path imported on the fly, or a mixture spec
    `mix:A:0.5,B:0.5[;rows=N][;seed=S][;temperature=T]` (how recipes accept `data.train`)."""
    if ref.startswith("mix:"):
        from alignflow.data.curation.mix import resolve_mixture

        return resolve_mixture(store, ref, kind)
    p = Path(ref)
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson", ".parquet") and p.is_file():
        return import_dataset(store, p, kind)
    info = store.get(ref)
    if info.kind != kind:
        raise StoreError(f"artifact {ref!r} is a {info.kind} dataset; this stage needs {kind}")
    return info.id


def export_dataset(store: Store, ref: str, out: str | Path, fmt: str | None = None) -> int:
    """Write a dataset artifact to JSONL or Parquet (by the file suffix), or with `fmt="hf"` to a Hugging Face
    `save_to_disk` folder; return the row count."""
    out = Path(out)
    if fmt == "hf":
        from alignflow.data.curation.hf import export_hf_folder

        return export_hf_folder(store, ref, out)
    if fmt is not None:
        raise DataFormatError(f"--format must be hf or omitted (the file suffix decides), got {fmt!r}")
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
