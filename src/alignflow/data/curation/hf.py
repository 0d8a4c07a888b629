"""Hugging Face `datasets` folders (`Dataset.save_to_disk`): import into the store and export from it.

`datasets` is imported only here and only when one of these is called (it is a heavy, optional backend).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignflow.data.formats import KINDS, SCHEMAS, _RowError, normalize_record
from alignflow.errors import DataFormatError
from alignflow.store import Store


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the install
        raise DataFormatError(
            "Hugging Face folders need the `datasets` package: pip install datasets"
        ) from None
    return datasets


def is_hf_folder(path: str | Path) -> bool:
    """A `save_to_disk` folder of one Dataset (dataset_info.json + state.json) or a DatasetDict (dataset_dict.json)."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def read_hf_folder(path: str | Path, kind: str, split: str | None = None) -> pa.Table:
    """Validate every record of a `save_to_disk` folder like a JSONL import (errors name the row and field)."""
    p = Path(path)
    if kind not in KINDS:
        raise DataFormatError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not is_hf_folder(p):
        raise DataFormatError(
            f"{p}: not a Hugging Face save_to_disk folder (no state.json or dataset_dict.json)"
        )
    ds = _datasets().load_from_disk(str(p))
    if hasattr(ds, "keys"):  # a DatasetDict
        names = list(ds.keys())
        if split is None:
            if len(names) != 1:
                raise DataFormatError(f"{p}: a DatasetDict with splits {names}; choose one with --split")
            split = names[0]
        if split not in names:
            raise DataFormatError(f"{p}: no split {split!r}; splits are {names}")
        ds = ds[split]
    rows, errors = [], []
    for i, rec in enumerate(ds):
        try:
            rows.append(normalize_record(kind, rec, default_id=str(i)))
        except _RowError as exc:
            errors.append(f"{p}: row {i + 1}: field '{exc.field}': {exc.msg}")
    if errors:
        raise DataFormatError(
            f"{p}: {len(errors)} invalid {kind} record(s), nothing imported:\n  " + "\n  ".join(errors[:10])
        )
    if not rows:
        raise DataFormatError(f"{p}: no records")
    return pa.Table.from_pylist(rows, schema=SCHEMAS[kind])


def import_hf_folder(
    store: Store,
    path: str | Path,
    kind: str,
    name: str | None = None,
    tags: Iterable[str] = (),
    split: str | None = None,
) -> str:
    p = Path(path)
    table = read_hf_folder(p, kind, split)
    return store.put_dataset(
        table,
        kind=kind,
        name=name or p.name,
        meta={"source": str(p.resolve()), "num_rows": table.num_rows, "format": kind, "hf_split": split},
        tags=tags,
    )


def export_hf_folder(store: Store, ref: str, out: str | Path) -> int:
    """Write a dataset artifact as a `save_to_disk` folder (the `meta` JSON expanded back into columns)."""
    table = store.read_dataset(store.get(ref).id)
    rows = []
    for row in table.to_pylist():
        meta = row.pop("meta", None)
        if meta:
            row.update(json.loads(meta))
        rows.append(row)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataFormatError(f"{out}: folder exists and is not empty")
    _datasets().Dataset.from_list(rows).save_to_disk(str(out))
    return len(rows)
