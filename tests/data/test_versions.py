"""Dataset versions: `name@vN` and `name@tag` resolve wherever an id is accepted; operations chain in lineage."""

from __future__ import annotations

import pytest
from tests.data.conftest import write_jsonl

from alignflow.data.curation.common import save_version, version_label
from alignflow.data.curation.tags import tag_dataset
from alignflow.data.io import import_dataset, resolve_dataset
from alignflow.errors import StoreError


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": "good", "rejected": "bad"} for i in range(n)]


def test_versions_tags_and_lineage(cstore, tmp_path) -> None:
    v1 = import_dataset(cstore, write_jsonl(tmp_path / "d.jsonl", _rows(4)), "pairs", name="d", tags=["raw"])
    v2 = tag_dataset(cstore, "d", "prompt == 'question 1'", "one")["output"]
    v3 = tag_dataset(cstore, "d@v2", "prompt == 'question 2'", "two")["output"]
    assert len({v1, v2, v3}) == 3
    assert cstore.resolve("d@v1") == v1
    assert cstore.resolve("d@v2") == v2
    assert cstore.resolve("d@v3") == v3 == cstore.resolve("d")
    assert cstore.resolve("d@raw") == v1
    assert resolve_dataset(cstore, "d@v2", "pairs") == v2
    assert version_label(cstore, v3) == "d@v3"
    graph = cstore.lineage(v3)
    assert (v2, v3, "input") in graph.edges and (v1, v2, "input") in graph.edges
    meta = cstore.get(v3).meta
    assert meta["operation"] == "tag" and meta["params"]["tag"] == "two" and meta["counts"]["tagged"] == 1
    with pytest.raises(StoreError, match="versions v1..v3"):
        cstore.resolve("d@v4")
    with pytest.raises(StoreError, match="no version of 'd' has the tag 'nope'"):
        cstore.resolve("d@nope")
    with pytest.raises(StoreError, match="no artifact named 'zz'"):
        cstore.resolve("zz@v1")


def test_unchanged_result_is_not_a_new_version(cstore, tmp_path) -> None:
    aid = import_dataset(cstore, write_jsonl(tmp_path / "d.jsonl", _rows(3)), "pairs", name="d")
    table = cstore.read_dataset(aid)
    new_id, created = save_version(
        cstore, table.to_pylist(), table.schema, "pairs", [(aid, "input")], "d", "noop", {}, {}
    )
    assert (new_id, created) == (aid, False)
    assert len(cstore.find(name="d")) == 1
