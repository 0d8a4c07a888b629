"""Dedup: planted near-duplicates found at ≥ 0.95 precision and recall, exact mode without false positives,
semantic duplicates, prompts shared across splits, and the CLI writing a version (or nothing on error)."""

from __future__ import annotations

import json

import bench_dedup
import numpy as np
import pytest
from tests.data.conftest import write_jsonl
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.data.curation.common import CurationError
from alignflow.data.curation.dedup import (
    exact_clusters,
    find_duplicates,
    near_clusters,
    semantic_clusters,
    shared_prompts,
)
from alignflow.data.io import import_dataset

runner = CliRunner()


def test_near_duplicates_precision_and_recall_on_planted_hh(hh_base) -> None:
    rows, planted = bench_dedup.plant(hh_base, 140, seed=3)
    res = find_duplicates(rows, by="prompt", exact=False, near=0.7)
    s = bench_dedup.score(res.keep, planted)
    assert s["precision"] >= 0.95 and s["recall"] >= 0.95, s
    for t in bench_dedup.PLANT_TYPES:
        assert s["per_type"][t] >= 0.8, (t, s["per_type"])


def test_exact_mode_has_no_false_positives(hh_base) -> None:
    rows, planted = bench_dedup.plant(hh_base, 140, seed=4)
    res = find_duplicates(rows, by="row", exact=True)
    s = bench_dedup.score(res.keep, planted)
    assert s["false_positives"] == 0
    # case and whitespace copies normalise to their source; the others must survive exact mode
    assert s["per_type"]["case"] == 1.0 and s["per_type"]["whitespace"] == 1.0
    assert s["per_type"]["word_drops"] == 0.0


def test_cluster_functions_by_hand() -> None:
    texts = ["Hello, World!", "hello world", "HELLO   world.", "something else entirely"]
    assert exact_clusters(texts) == [[0, 1, 2]]
    long = "the quick brown fox jumps over the lazy dog near the river bank today " * 3
    assert near_clusters(
        [long, long.replace("lazy", "sleepy"), "unrelated text about cooking pasta"], 0.7
    ) == [[0, 1]]
    emb = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert semantic_clusters(emb, 0.99) == [[0, 1]]
    with pytest.raises(CurationError, match="--threshold"):
        near_clusters(texts, 1.5)


@pytest.mark.slow
def test_semantic_mode_with_minilm() -> None:
    rows = [
        {"id": "0", "prompt": "How do I reset my password?", "completion": "Use the link."},
        {"id": "1", "prompt": "How can I reset my password?", "completion": "Use the link."},
        {"id": "2", "prompt": "What is the capital of France?", "completion": "Paris."},
    ]
    res = find_duplicates(rows, by="prompt", exact=False, semantic=0.9)
    assert res.keep == [True, False, True]


def test_shared_prompts_across_splits() -> None:
    train = [{"prompt": "Tell me a joke"}, {"prompt": "tell me a JOKE!"}, {"prompt": "Write a poem"}]
    held = [{"prompt": "Tell me a joke."}]
    assert shared_prompts(train, held) == [True, True, False]


def test_across_splits_by_meta_split(cstore, tmp_path) -> None:
    from alignflow.data.curation.dedup import dedup_dataset

    rows = [
        {"id": "t1", "prompt": "Tell me a joke", "chosen": "a", "rejected": "b", "split": "train"},
        {"id": "t2", "prompt": "Write a poem", "chosen": "a", "rejected": "b", "split": "train"},
        {"id": "e1", "prompt": "tell me a joke!", "chosen": "c", "rejected": "d", "split": "eval"},
    ]
    aid = import_dataset(cstore, write_jsonl(tmp_path / "s.jsonl", rows), "pairs", name="s")
    rep = dedup_dataset(cstore, aid, across_splits=True)
    assert rep["dropped"] == {"shared_with_eval": 1} and rep["rows_out"] == 2
    kept = [r["id"] for r in cstore.read_dataset(rep["output"]).to_pylist()]
    assert kept == ["t2", "e1"]
    plain = import_dataset(
        cstore, write_jsonl(tmp_path / "n.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]), "pairs"
    )
    with pytest.raises(CurationError, match="no row has meta.split"):
        dedup_dataset(cstore, plain, across_splits=True)


def test_cli_dedup_writes_a_version_with_clusters_and_lineage(sqlite_workspace, tmp_path) -> None:
    rows = [
        {"id": "a", "prompt": "How do I bake bread at home?", "chosen": "Knead.", "rejected": "No."},
        {"id": "b", "prompt": "how do I bake bread at home", "chosen": "Knead.", "rejected": "No."},
        {"id": "c", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"id": "d", "prompt": "Name a colour", "chosen": "red", "rejected": "no"},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "What is 2 + 2", "chosen": "4", "rejected": "3"}])
    assert runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "p"]).exit_code == 0
    assert runner.invoke(app, ["data", "import", str(held), "--kind", "pairs", "--name", "e"]).exit_code == 0
    report = tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "data",
            "dedup",
            "p",
            "--exact",
            "--by",
            "row",
            "--across-splits",
            "--eval",
            "e",
            "--report",
            str(report),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote p@v2" in res.output
    rep = json.loads(report.read_text())
    assert rep["clusters"]["exact"] == [{"kept": "a", "dropped": ["b"]}]
    assert rep["dropped"]["shared_with_eval"] == 1  # "What is 2+2?" and "What is 2 + 2" normalise alike
    assert rep["rows_out"] == 2
    res = runner.invoke(
        app,
        [
            "data",
            "dedup",
            "p@v2",
            "--near",
            "--threshold",
            "0.5",
            "--by",
            "prompt",
            "--across-splits",
            "--eval",
            "e",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lineage", "p", "--format", "json"])
    edges = json.loads(res.output)["edges"]
    assert {e["role"] for e in edges} == {"input", "eval"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "title", "--exact"], "--by must be one of"),
        (["--near", "--threshold", "2"], "--threshold for --near"),
        (["--threshold", "0.5"], "--threshold needs --near or --semantic"),
        ([], "choose at least one of"),
        (["--eval", "x", "--exact"], "pass --across-splits too"),
    ],
)
def test_cli_dedup_errors_name_the_argument_and_write_nothing(
    sqlite_workspace, tmp_path, args, message
) -> None:
    from alignflow.cli.main import main

    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 1)
    runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "p"])
    import sys

    argv = sys.argv
    sys.argv = ["alignflow", "data", "dedup", "p", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    assert exc.value.code == 2
    from alignflow.cli.common import open_store

    assert len(open_store().find(name="p")) == 1


def test_import_dataset_id_is_stable(cstore, tmp_path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert import_dataset(cstore, src, "pairs") == import_dataset(cstore, src, "pairs")
