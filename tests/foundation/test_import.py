"""`data import`: strict validation with file:line errors, nothing written on failure, dedup by content."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.conftest import SHARED_DATA

from alignflow.data.io import export_dataset, import_dataset
from alignflow.errors import DataFormatError

PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_nothing_stored(store) -> None:
    assert store.find() == []
    leftovers = [p for p in store.workspace.artifact_root.rglob("*") if p.is_file()]
    assert leftovers == []


def test_same_content_twice_same_id(store, tmp_path: Path) -> None:
    a = import_dataset(store, write_jsonl(tmp_path / "a.jsonl", PAIRS), "pairs")
    b = import_dataset(store, write_jsonl(tmp_path / "b.jsonl", PAIRS), "pairs")
    assert a == b and len(a) == 64
    assert len(store.find(kind="pairs")) == 1
    c = import_dataset(store, write_jsonl(tmp_path / "c.jsonl", PAIRS[:4]), "pairs")
    assert c != a


def test_bad_json_line(store, tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=rf"{p}:3: invalid JSON"):
        import_dataset(store, p, "pairs")
    assert_nothing_stored(store)


def test_missing_chosen(store, tmp_path: Path) -> None:
    rows = [*PAIRS[:2], {"prompt": "q", "rejected": "r"}]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"{p}:3: field 'chosen': missing field 'chosen'"):
        import_dataset(store, p, "pairs")
    assert_nothing_stored(store)


def test_empty_file(store, tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataFormatError, match="no records"):
        import_dataset(store, p, "pairs")
    assert_nothing_stored(store)


def test_ten_megabyte_line(store, tmp_path: Path) -> None:
    p = tmp_path / "huge.jsonl"
    big = {"prompt": "q", "chosen": "x" * (10 * 1024 * 1024), "rejected": "r"}
    write_jsonl(p, [PAIRS[0], big])
    with pytest.raises(DataFormatError, match=rf"{p}:2: line is 10,485,8\d\d bytes, over the"):
        import_dataset(store, p, "pairs")
    assert_nothing_stored(store)
    # The limit is a setting, not a wall.
    aid = import_dataset(store, p, "pairs", max_line_bytes=11 * 1024 * 1024)
    assert store.get(aid).meta["num_rows"] == 2


def test_wrong_encoding(store, tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        (json.dumps(PAIRS[0]) + "\n").encode()
        + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    with pytest.raises(DataFormatError, match=rf"{p}:2: not valid UTF-8"):
        import_dataset(store, p, "pairs")
    assert_nothing_stored(store)


def test_errors_are_listed_with_field_and_count(store, tmp_path: Path) -> None:
    rows = [
        {"prompt": "q", "chosen": 3, "rejected": "r"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "weight": -1},
    ]
    p = write_jsonl(tmp_path / "types.jsonl", rows)
    with pytest.raises(DataFormatError) as exc:
        import_dataset(store, p, "pairs")
    msg = str(exc.value)
    assert "2 invalid pairs record(s)" in msg
    assert f"{p}:1: field 'chosen': field 'chosen' must be a string, got int" in msg
    assert f"{p}:2: field 'weight'" in msg


@pytest.mark.skipif(not (SHARED_DATA / "hh-harmless").exists(), reason="../shared/data is absent")
def test_hh_transcripts_split_into_prompt_and_replies(store) -> None:
    aid = import_dataset(store, SHARED_DATA / "hh-harmless" / "train.jsonl", "pairs")
    table = store.read_dataset(aid)
    assert table.num_rows == 1908
    raw = [
        json.loads(line) for line in (SHARED_DATA / "hh-harmless" / "train.jsonl").read_text().splitlines()
    ]
    for row, rec in zip(table.to_pylist(), raw, strict=True):
        assert row["prompt"].endswith("\n\nAssistant:")
        assert rec["chosen"].startswith(row["prompt"]) and rec["rejected"].startswith(row["prompt"])
        assert rec["chosen"][len(row["prompt"]) :].strip() == row["chosen"]


def test_sft_and_rankings_kinds_and_roundtrip(store, tmp_path: Path) -> None:
    sft = [
        {"prompt": "Hi", "completion": "Hello!"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
    ]
    sid = import_dataset(store, write_jsonl(tmp_path / "sft.jsonl", sft), "sft")
    rows = store.read_dataset(sid).to_pylist()
    assert rows[0]["completion"] == "Hello!" and rows[1]["messages"][1]["content"] == "Hey"

    bad = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataFormatError, match="last message must be the assistant"):
        import_dataset(store, write_jsonl(tmp_path / "sftbad.jsonl", bad), "sft")

    ranks = [{"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5], "source": "x"}]
    rid = import_dataset(store, write_jsonl(tmp_path / "rk.jsonl", ranks), "rankings")
    row = store.read_dataset(rid).to_pylist()[0]
    assert row["ranking"] == [1, 2, 0]
    assert json.loads(row["meta"]) == {"source": "x"}
    with pytest.raises(DataFormatError, match="permutation"):
        import_dataset(
            store,
            write_jsonl(
                tmp_path / "rk2.jsonl", [{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}]
            ),
            "rankings",
        )

    out = tmp_path / "out.jsonl"
    assert export_dataset(store, rid, out) == 1
    back = json.loads(out.read_text())
    assert back["completions"] == ["a", "b", "c"] and back["source"] == "x"
    # Parquet in, same logical content as the JSONL import -> same id.
    pq.write_table(pa.Table.from_pylist(ranks), tmp_path / "rk.parquet")
    assert import_dataset(store, tmp_path / "rk.parquet", "rankings") == rid
