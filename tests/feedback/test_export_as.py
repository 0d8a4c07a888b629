"""`annotate export --as pairs|rankings|judgments` on a tie-heavy project, through the CLI: the tie rules, pair
weights equal to the aggregation's soft labels, lineage, `quality report` on the judgments (and on the raw
annotations export, which failed before), and `alignflow rm` training on the exported pairs artifact id."""

from __future__ import annotations

import json

import pytest
import yaml
from fb_helpers import answer, make_users, pair_items

from alignflow.feedback import services
from alignflow.quality import aggregate
from alignflow.quality.schema import validate_judgments
from alignflow.store import Store

# Votes per item (display terms; a tie is a tie in either order): 3 unanimous ties, 1 tie majority, 2 decisive.
VOTES = {
    "i0": ("tie", "tie", "tie"),
    "i1": ("tie", "tie", "tie"),
    "i2": ("tie", "tie", "tie"),
    "i3": ("tie", "tie", "left"),
    "i4": ("left", "left", "right"),
    "i5": ("right", "right", "right"),
}
ANNOTATORS = ("a1", "a2", "a3")


@pytest.fixture
def tie_project(sessions):
    with sessions() as s:
        make_users(s, {a: "annotator" for a in ANNOTATORS})
        services.create_project(
            s, "ties", "# Guide v1\nSay tie when neither is better.", overlap=3, gold_rate=0.0
        )
        services.import_items(s, "ties", pair_items(6), source="items.jsonl")
        for k, name in enumerate(ANNOTATORS):
            while (t := services.next_task(s, name, "ties")) is not None:
                item = "i" + t["prompt"].removeprefix("prompt ")
                services.submit(s, name, t["assignment_id"], answer(t, VOTES[item][k]), f"{name}-{item}-0001")
        judgments = validate_judgments(services.load_judgments(s, "ties"))
    return judgments[judgments["dimension"] == "overall"]


def _pairs(store: Store, out: str) -> tuple[str, list[dict]]:
    aid = out.split()[1]
    assert store.get(aid).kind == "pairs"
    return aid, store.read_dataset(aid).to_pylist()


@pytest.mark.parametrize("method", ["majority_vote", "dawid_skene"])
def test_pairs_weights_are_the_soft_labels_and_ties_follow_the_rule(cli, workspace, tie_project, method):
    consensus = aggregate.aggregate(tie_project, method).set_index("item_id")
    ties = sorted(consensus.index[consensus["label"] == "tie"])
    decisive = sorted(consensus.index[consensus["label"] != "tie"])
    assert len(ties) >= 3 and decisive  # a tie-heavy project, but not only ties
    store = Store.open(workspace)

    _, dropped = _pairs(store, cli("annotate", "export", "ties", "--as", "pairs", "--method", method).output)
    assert sorted(p["id"] for p in dropped) == decisive
    item_text = {it["id"]: it for it in pair_items(6)}
    for p in dropped:
        c = consensus.loc[p["id"]]
        # The weight is the aggregation's probability that `chosen` is the better reply.
        want = c["p_a"] if c["label"] == "A" else 1.0 - c["p_a"]
        assert p["weight"] == pytest.approx(want, abs=1e-12)
        a, b = (t["text"] for t in item_text[p["id"]]["candidates"])
        assert (p["chosen"], p["rejected"]) == ((a, b) if c["label"] == "A" else (b, a))

    out = cli("annotate", "export", "ties", "--as", "pairs", "--tie-rule", "both-half", "--method", method)
    _, both = _pairs(store, out.output)
    by_id = {p["id"]: p for p in both}
    assert len(both) == len(decisive) + 2 * len(ties)
    for t in ties:
        ab, ba = by_id[f"{t}/ab"], by_id[f"{t}/ba"]
        assert ab["weight"] == ba["weight"] == 0.5
        assert (ab["chosen"], ab["rejected"]) == (ba["rejected"], ba["chosen"])
    assert {k: by_id[k]["weight"] for k in decisive} == {p["id"]: p["weight"] for p in dropped}
    bad = cli("annotate", "export", "ties", "--as", "pairs", "--tie-rule", "a_wins", ok=False)
    assert bad.exit_code != 0 and "tie rule" in str(bad.exception)
    store.close()


def test_pairs_lineage_reaches_annotations_annotators_guideline_and_method(cli, workspace, tie_project):
    store = Store.open(workspace)
    aid, _ = _pairs(store, cli("annotate", "export", "ties", "--as", "pairs").output)
    graph = store.lineage(aid, "up", max_depth=1)
    parents = {(store.get(p).kind, role) for p, c, role in graph.edges if c == aid}
    assert {
        ("preferences", "preferences"),
        ("annotations", "annotations"),
        ("guideline", "guideline"),
        ("annotator", "annotator"),
        ("aggregation", "aggregation"),
    } <= parents
    docs = [json.loads(store.path(p).read_text()) for p, c, r in graph.edges if c == aid and r == "annotator"]
    assert sorted(d["username"] for d in docs) == list(ANNOTATORS)
    (agg,) = [p for p, c, r in graph.edges if c == aid and r == "aggregation"]
    assert json.loads(store.path(agg).read_text())["method"] == "dawid_skene"
    (ann,) = [p for p, c, r in graph.edges if c == aid and r == "annotations"]
    assert len(store.read_dataset(ann)) == 3 * len(VOTES)  # every individual judgment
    store.close()


def test_rankings_refused_for_a_pairwise_project(cli, tie_project):
    r = cli("annotate", "export", "ties", "--as", "rankings", ok=False)
    assert r.exit_code != 0 and "is pairwise" in str(r.exception)


def test_judgments_export_runs_through_quality_report(cli, workspace, tie_project, tmp_path):
    out = cli("annotate", "export", "ties", "--as", "judgments", "--out", tmp_path / "j.jsonl").output
    aid = out.split()[1]
    store = Store.open(workspace)
    assert store.get(aid).kind == "judgments"
    rows = store.read_dataset(aid).to_pylist()
    assert len([r for r in rows if r["dimension"] == "overall"]) == 18
    assert {r["kind"] for r in rows} == {"pairwise"}
    ann = next(p for p, c, r in store.lineage(aid, "up", max_depth=1).edges if r == "annotations")
    store.close()
    for source in (aid, tmp_path / "j.jsonl", ann):  # the artifact, the file, and the raw annotations export
        report = tmp_path / f"report-{str(source)[-6:]}"
        r = cli("quality", "report", source, "--out", report, "--quiet")
        assert (report / "report.html").exists(), r.output
        overview = (report / "overview.csv").read_text()
        assert "18" in overview  # every overall judgment counted
    # The annotations export read as judgments equals the direct judgments export.
    from alignflow.quality.schema import load_judgments

    store = Store.open(workspace)
    from alignflow.data.io import export_dataset

    export_dataset(store, ann, tmp_path / "ann.jsonl")
    store.close()
    a = load_judgments(tmp_path / "ann.jsonl").sort_values(["item_id", "annotator_id", "dimension"])
    b = load_judgments(tmp_path / "j.jsonl").sort_values(["item_id", "annotator_id", "dimension"])
    cols = ["item_id", "annotator_id", "dimension", "label", "shown_swapped", "kind"]
    assert a[cols].reset_index(drop=True).equals(b[cols].reset_index(drop=True))


def test_rm_trains_on_the_exported_pairs_artifact_id(cli, workspace, tie_project, tmp_path):
    from alignflow.models import make_tiny_model_dir

    store = Store.open(workspace)
    aid, pairs = _pairs(
        store, cli("annotate", "export", "ties", "--as", "pairs", "--tie-rule", "both-half").output
    )
    model = make_tiny_model_dir(tmp_path / "tiny", vocab_size=400, hidden_size=32, num_layers=1)
    cfg = {
        "stage": "rm",
        "output_dir": str(tmp_path / "rm"),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": aid, "eval_fraction": 0.0, "max_length": 32},
        "loss": {"soft_labels": True},
        "train": {"seed": 0, "batch_size": 4, "max_steps": 2},
    }
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    cli("rm", tmp_path / "rm.yaml")
    ckpt = [
        a
        for a in store.find(kind="checkpoint")
        if any(p == aid for p, _c, _r in store.lineage(a.id, "up").edges)
    ]
    assert ckpt, "the reward model's lineage does not reach the exported pairs"
    store.close()


def test_annotations_export_keeps_gold_answers_and_reviews_as_judgments(cli, sessions, workspace, tmp_path):
    """The raw `annotations` artifact read by `quality report` gives the same judgments as `--as judgments`:
    gold answers on gold items and a reviewer's label on the response it reviewed."""
    with sessions() as s:
        make_users(s, {"a1": "annotator", "a2": "annotator", "rev": "reviewer"})
        services.create_project(s, "qa", "# Guide", overlap=2, gold_rate=1.0, qa_rate=1.0)
        services.import_items(s, "qa", pair_items(2, gold=1), source="items.jsonl")
        for name in ("a1", "a2"):
            while (t := services.next_task(s, name, "qa")) is not None:
                services.submit(
                    s, name, t["assignment_id"], answer(t, "left"), f"{name}-{t['assignment_id']}"
                )
        rt = services.next_task(s, "rev", "qa")
        body = {"review_action": "correct", "answer": answer(rt, "right")}
        services.submit(
            s, "rev", rt["assignment_id"], {**body["answer"], "review_action": "correct"}, "rev-0001"
        )
    out = cli("annotate", "export", "qa", "--as", "judgments").output
    aid = out.split()[1]
    store = Store.open(workspace)
    ann = next(p for p, c, r in store.lineage(aid, "up", max_depth=1).edges if r == "annotations")
    from alignflow.quality.schema import read_judgments_artifact

    a, b = (
        read_judgments_artifact(store, ref)
        .sort_values(["item_id", "annotator_id", "dimension"])
        .reset_index(drop=True)
        for ref in (ann, aid)
    )
    store.close()
    cols = [
        "item_id",
        "annotator_id",
        "dimension",
        "label",
        "kind",
        "is_gold",
        "gold_label",
        "reviewer_label",
    ]
    assert a[cols].equals(b[cols])
    assert a["is_gold"].any() and (a.loc[a["is_gold"], "gold_label"] == "A").all()
    assert a["reviewer_label"].notna().any()
