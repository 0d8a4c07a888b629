"""The store on SQLite and PostgreSQL: lineage, find, integrity, runs and metrics."""

from __future__ import annotations

import pytest

from alignflow.errors import IntegrityError, StoreError


def test_lineage_three_levels_round_trip(store) -> None:
    raw = store.put_dataset([{"x": 1}], kind="annotations", name="raw")
    guide = store.put_json({"version": 3}, kind="guideline")
    prefs = store.put_dataset(
        [{"x": 2}], kind="pairs", name="prefs", parents=[(raw, "annotations"), (guide, "guideline")]
    )
    cfg = store.put_json({"lr": 1e-4}, kind="config")
    ckpt = store.put_dataset(
        [{"w": 0.5}], kind="checkpoint", name="rm", parents=[(prefs, "dataset"), (cfg, "config")]
    )

    up = store.lineage(ckpt, "up")
    assert set(up.nodes) == {raw, guide, prefs, cfg, ckpt}
    assert set(up.edges) == {
        (raw, prefs, "annotations"),
        (guide, prefs, "guideline"),
        (prefs, ckpt, "dataset"),
        (cfg, ckpt, "config"),
    }
    down = store.lineage(raw, "down")
    assert set(down.nodes) == {raw, prefs, ckpt}
    assert store.lineage(ckpt, "up", max_depth=1).nodes.keys() == {prefs, cfg, ckpt}
    # JSON form round-trips the same graph.
    d = up.as_dict()
    assert {(e["parent"], e["child"], e["role"]) for e in d["edges"]} == set(up.edges)
    with pytest.raises(StoreError, match="does not exist"):
        store.add_edge("f" * 64, ckpt, "dataset")


def test_find_by_kind_tags_and_prefix(store) -> None:
    a = store.put_dataset([{"x": 1}], kind="pairs", tags=["v1", "gold"])
    b = store.put_dataset([{"x": 2}], kind="pairs", tags=["v1"])
    store.put_dataset([{"x": 3}], kind="sft")
    assert {i.id for i in store.find(kind="pairs")} == {a, b}
    assert [i.id for i in store.find(tags=["v1", "gold"])] == [a]
    assert store.get(a[:10]).id == a
    assert store.get(a).tags == ("gold", "v1")
    with pytest.raises(StoreError, match="no artifact"):
        store.get("nothing-like-this")


def test_tampered_artifact_is_detected_naming_the_file(store) -> None:
    aid = store.put_dataset([{"x": i} for i in range(10)], kind="pairs")
    path = store.workspace.artifact_root / store.get(aid).uri
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=str(path)):
        store.read_dataset(aid)
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.read_dataset(aid)


def test_directory_artifacts(store, tmp_path) -> None:
    ck = tmp_path / "ckpt"
    (ck / "sub").mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"weights")
    (ck / "sub" / "config.json").write_text("{}")
    aid = store.put_directory(ck, kind="checkpoint")
    assert store.put_directory(ck, kind="checkpoint") == aid
    p = store.path(aid)
    assert (p / "sub" / "config.json").read_text() == "{}"
    (p / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="does not match"):
        store.path(aid)


def test_runs_and_metrics(store) -> None:
    rid = store.start_run("sft", config={"optim": {"lr": 1e-4}}, name="demo")
    for step in range(3):
        store.log_metrics(rid, step, {"loss": 1.0 / (step + 1), "lr": 1e-4})
    store.finish_run(rid, summary={"final_loss": 1 / 3})
    run = store.get_run(rid)
    assert run.status == "finished" and run.ended_at is not None and run.config["optim"]["lr"] == 1e-4
    assert run.code_version and run.host
    assert [v for _, _, v in store.metrics(rid, "loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert store.start_run("sft", run_id=rid) == rid  # a resumed run keeps its id
    assert store.get_run(rid).status == "running"
    with pytest.raises(StoreError):
        store.finish_run(rid, status="weird")
    aid = store.put_dataset([{"x": 9}], kind="checkpoint", run_id=rid)
    assert store.get(aid).run_id == rid


def test_lookup_directory_finds_stored_content_anywhere(store, tmp_path) -> None:
    ck = tmp_path / "run" / "final"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"w1")
    assert store.lookup_directory(ck) is None
    aid = store.put_directory(ck, kind="checkpoint")
    assert store.lookup_directory(ck) == aid  # the run folder's copy, not the stored one
    (ck / "model.safetensors").write_bytes(b"w2")
    assert store.lookup_directory(ck) is None
