"""Per-dimension verdicts from annotation to a multi-head reward model, through the CLI.

Annotators rate four dimensions beside the overall choice. `annotate export --as pairs` carries each dimension's
aggregated verdict as the pair's `labels` (P(chosen better on it)); `alignflow rm` with `heads: auto` trains one
head per dimension; the checkpoint records its heads and scores every head. A `pairs` file can carry the same
labels, and a malformed one is refused with the file, line and field."""

from __future__ import annotations

import json

import pytest
import yaml
from fb_helpers import answer, make_users, pair_items

from alignflow.feedback import services
from alignflow.store import Store

ANNOTATORS = ("a1", "a2", "a3")
N_ITEMS = 8


def _display(task: dict, canonical: str) -> str:
    """The display choice ("left"/"right"/"tie") that means canonical candidate `canonical` ("a"/"b"/"tie");
    the task is blind, so the side is read off the text (pair_items writes "answer A<k>" / "answer B<k>")."""
    if canonical == "tie":
        return "tie"
    left_is_a = task["candidates"][0]["text"].startswith("answer A")
    return "left" if left_is_a == (canonical == "a") else "right"


def _verdicts(item: int) -> dict[str, str]:
    """Canonical verdicts: A wins overall and on professionalism everywhere; accuracy goes to B on the first
    half; conciseness is a tie everywhere; empathy is not rated on odd items."""
    out = {"overall": "a", "professionalism": "a", "accuracy": "b" if item < N_ITEMS // 2 else "a"}
    out["conciseness"] = "tie"
    out["empathy"] = "a"
    return out


@pytest.fixture
def rated_project(sessions):
    with sessions() as s:
        make_users(s, {a: "annotator" for a in ANNOTATORS})
        services.create_project(s, "dims", "# Guide\nRate every dimension.", overlap=3, gold_rate=0.0)
        services.import_items(s, "dims", pair_items(N_ITEMS), source="items.jsonl")
        for name in ANNOTATORS:
            while (t := services.next_task(s, name, "dims")) is not None:
                k = int(t["prompt"].removeprefix("prompt "))
                v = _verdicts(k)
                dims = {d: _display(t, v[d]) for d in t["schema"]["dimensions"]}
                body = answer(t, _display(t, v["overall"]), dimensions=dims)
                services.submit(s, name, t["assignment_id"], body, f"{name}-item-{k:04d}")


def _export(cli, workspace, *extra) -> tuple[str, dict[str, dict]]:
    out = cli("annotate", "export", "dims", "--as", "pairs", "--method", "majority_vote", *extra).output
    aid = out.split()[1]
    store = Store.open(workspace)
    rows = store.read_dataset(aid).to_pylist()
    store.close()
    return aid, {r["id"]: r for r in rows}


def test_pairs_carry_each_dimensions_verdict_as_p_chosen_better(cli, workspace, rated_project):
    _, pairs = _export(cli, workspace)
    assert len(pairs) == N_ITEMS
    for k in range(N_ITEMS):
        labels = json.loads(pairs[f"i{k}"]["meta"])["labels"]
        assert pairs[f"i{k}"]["chosen"] == f"answer A{k}"  # A won overall
        assert labels["professionalism"] == 1.0 and labels["empathy"] == 1.0
        assert labels["accuracy"] == (0.0 if k < N_ITEMS // 2 else 1.0)
        assert "conciseness" not in labels  # a tie, and the tie rule is drop
    _, both = _export(cli, workspace, "--tie-rule", "both-half")
    assert json.loads(both["i0"]["meta"])["labels"]["conciseness"] == 0.5


def test_export_train_score_round_trip_with_dimension_heads(cli, workspace, rated_project, tmp_path):
    from alignflow.models import make_tiny_model_dir
    from alignflow.models.reward import load_reward_scorer

    aid, _ = _export(cli, workspace)
    model = make_tiny_model_dir(tmp_path / "tiny", vocab_size=400, hidden_size=32, num_layers=1)
    cfg = {
        "stage": "rm",
        "output_dir": str(tmp_path / "rm"),
        "model": {"path": str(model), "dtype": "float32"},
        "heads": "auto",
        "data": {"train": aid, "eval_fraction": 0.0, "max_length": 32},
        "optim": {"lr": 5e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 4, "max_steps": 3},
    }
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    cli("rm", tmp_path / "rm.yaml")
    spec = json.loads((tmp_path / "rm" / "final" / "ensemble.json").read_text())
    assert spec["heads"] == ["overall", "accuracy", "empathy", "professionalism"]
    scorer = load_reward_scorer(tmp_path / "rm" / "final")
    assert scorer.heads == spec["heads"]
    mean, std = scorer.score_heads(["prompt 1", "prompt 2"], ["answer A1", "answer B2"])
    assert mean.shape == std.shape == (2, 4)
    overall, _ = scorer(["prompt 1", "prompt 2"], ["answer A1", "answer B2"])
    assert overall.tolist() == pytest.approx(mean[:, 0].tolist(), abs=1e-6)

    # A named head that no pair labels is refused with the heads that are labelled.
    cfg["heads"] = ["overall", "warmth"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("rm", tmp_path / "bad.yaml", ok=False)
    assert r.exit_code != 0
    assert "'warmth'" in str(r.exception) and "accuracy, empathy, professionalism" in str(r.exception)


def test_pairs_file_labels_are_imported_and_validated(cli, workspace, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"accuracy": 0.0, "tone": 1}})
        + "\n"
    )
    cli("data", "import", good, "--kind", "pairs")
    store = Store.open(workspace)
    (art,) = store.find(kind="pairs")
    (row,) = store.read_dataset(art.id).to_pylist()
    store.close()
    assert json.loads(row["meta"])["labels"] == {"accuracy": 0.0, "tone": 1}
    cases = {
        '"labels": [1]': "field 'labels' must be an object",
        '"labels": {"accuracy": 1.5}': "labels.accuracy",
        '"labels": {"overall": 1}': "labels.overall",
        '"labels": {"a b": 1}': "must be 1-64 letters",
        '"labels": {"accuracy": "yes"}': "labels.accuracy",
    }
    for k, (body, want) in enumerate(cases.items()):
        bad = tmp_path / f"bad{k}.jsonl"
        bad.write_text(
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "b", '
            + body
            + "}\n"
        )
        r = cli("data", "import", bad, "--kind", "pairs", ok=False)
        msg = str(r.exception) + r.output
        assert r.exit_code != 0 and want in msg and f"{bad.name}" in msg and ":2" in msg, msg
