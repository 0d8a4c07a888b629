"""The CLI (`users`, `annotate`) and the export with lineage, through the real Typer app."""

from __future__ import annotations

import json
import random

import pytest
import typer
from fb_helpers import answer, pair_items
from typer.testing import CliRunner

from alignflow.cli import annotate as annotate_cli
from alignflow.cli import serve as serve_cli
from alignflow.cli import users as users_cli
from alignflow.cli.main import app
from alignflow.errors import AlignflowError
from alignflow.feedback import services
from alignflow.store import Store


def test_every_command_has_help():
    for sub in (annotate_cli.app, users_cli.app):
        cmd = typer.main.get_command(sub)
        for name, c in cmd.commands.items():
            assert c.help, name
            for param in c.params:
                assert getattr(param, "help", None), f"{name} --{param.name}"
    import inspect

    assert serve_cli.serve.__doc__
    for pname, param in inspect.signature(serve_cli.serve).parameters.items():
        assert param.default.help, pname


def test_cli_users_and_project(cli, tmp_path, sessions):
    cli("users", "add", "boss", "--role", "admin")
    cli("users", "add", "ann", "--role", "annotator", "--pod", "p1")
    assert "ann" in cli("users", "list").output
    tok = cli("users", "token", "ann", "--scope", "read").output.strip().splitlines()[-1]
    assert tok.startswith("af_")
    cli("users", "disable", "ann")
    assert "yes" in cli("users", "list").output
    bad = cli("users", "add", "x", "--role", "wizard", ok=False)
    assert bad.exit_code != 0
    guide = tmp_path / "guide.md"
    guide.write_text("# Guide\nPrefer helpful answers.")
    schema = tmp_path / "schema.yaml"
    schema.write_text("kind: pairwise\ndimensions: [accuracy, empathy]\nrationale_min_chars: 5\n")
    cli(
        "annotate",
        "create-project",
        "demo",
        "--guideline",
        str(guide),
        "--schema",
        str(schema),
        "--overlap",
        "2",
    )
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(r) for r in pair_items(3)) + "\n")
    cli("annotate", "import-items", "demo", str(items))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(pair_items(1, "q")[0]) + "\n{not json\n")
    r = cli("annotate", "import-items", "demo", str(broken), ok=False)
    # main() prints AlignflowError as one line; the runner calls the app directly and keeps the exception.
    assert isinstance(r.exception, AlignflowError) and "broken.jsonl:2: invalid JSON" in str(r.exception)
    assert '"items": 3' in cli("annotate", "status", "demo").output
    with sessions() as s:
        assert services.schema_spec(s, services.get_project(s, "demo")).dimensions == ["accuracy", "empathy"]


def test_export_links_preferences_to_every_judgment(cli, tmp_path, sessions, workspace):
    with sessions() as s:
        from fb_helpers import make_users

        make_users(s, {"a1": "annotator", "a2": "annotator", "a3": ("annotator", "pod2"), "rev": "reviewer"})
        services.create_project(s, "exp", "# Guide v1", overlap=3, gold_rate=1.0, qa_rate=1.0)
        services.import_items(s, "exp", pair_items(4, gold=1), source="items.jsonl")
        rng = random.Random(0)
        for name, choice in (("a1", "left"), ("a2", "left"), ("a3", "right")):
            while (t := services.next_task(s, name, "exp", rng=rng)) is not None:
                services.submit(
                    s, name, t["assignment_id"], answer(t, choice), f"{name}-{t['assignment_id']}"
                )
        rt = services.next_task(s, "rev", "exp")
        services.submit(s, "rev", rt["assignment_id"], {"review_action": "accept"}, "rev-00000001")
        n_judgments = len(services.load_judgments(s, "exp").query("dimension == 'overall'"))
    out = cli("annotate", "export", "exp", "--method", "majority_vote").output
    assert "pairs" in out
    store = Store.open(workspace)
    pref = store.find(kind="preferences")[0]
    table = store.read_dataset(pref.id).to_pylist()
    assert len(table) == 4  # regular items only; the gold item is excluded
    for row in table:
        assert row["n_votes"] == 3 and len(row["votes"]) == 3
        assert {v["annotator_id"] for v in row["votes"]} == {"a1", "a2", "a3"}
        assert row["label"] in ("A", "B", "tie") and row["chosen"] != row["rejected"]
        assert json.loads(row["dimension_labels"]).keys() == {
            "accuracy",
            "professionalism",
            "conciseness",
            "empathy",
        }
    graph = store.lineage(pref.id, "up")
    roles = {(store.get(p).kind, r) for p, c, r in graph.edges if c == pref.id}
    assert {
        ("annotations", "annotations"),
        ("annotation_project", "project"),
        ("guideline", "guideline"),
    } <= roles
    ann_id = next(p for p, c, r in graph.edges if r == "annotations")
    ann = store.read_dataset(ann_id).to_pylist()
    # Every individual judgment (3 annotators x 5 items incl. gold) plus the review is in the annotations artifact.
    assert len([a for a in ann if a["kind"] == "annotate"]) == n_judgments == 15
    assert len([a for a in ann if a["kind"] == "review"]) == 1
    assert {a["annotator_id"] for a in ann} == {"a1", "a2", "a3", "rev"}
    assert all(a["guideline_version"] == 1 and a["schema_version"] == 1 for a in ann)
    assert store.get(ann_id).meta["annotators"] == ["a1", "a2", "a3", "rev"]
    store.close()
    # Exporting again with nothing new gives the same content-addressed artifacts.
    assert pref.id in cli("annotate", "export", "exp", "--method", "majority_vote").output


def test_serve_refuses_several_workers_on_sqlite(tmp_path):
    r = CliRunner().invoke(
        app, ["serve", "--workers", "2", "--home", str(tmp_path), "--db-url", f"sqlite:///{tmp_path}/x.db"]
    )
    assert isinstance(r.exception, AlignflowError) and "needs PostgreSQL" in str(r.exception)


def test_ranking_project_answers_and_export(sessions, workspace):
    from fb_helpers import make_users

    with sessions() as s:
        make_users(s, {"r1": "annotator", "r2": "annotator", "r3": "annotator"})
        spec = {"kind": "ranking", "max_candidates": 3, "dimensions": [], "rationale_min_chars": 0}
        services.create_project(s, "rank", "# Rank them", spec, overlap=3, gold_rate=0.0, qa_rate=0.0)
        cands = [{"id": c, "text": f"answer {c}"} for c in ("x", "y", "z")]
        services.import_items(s, "rank", [{"id": "q1", "prompt": "rank these", "candidates": cands}])
        with pytest.raises(services.Invalid, match="candidates"):
            services.import_items(
                s, "rank", [{"id": "q2", "prompt": "p", "candidates": [*cands, {"text": "w"}]}]
            )
        for name in ("r1", "r2", "r3"):
            t = services.next_task(s, name, "rank")
            by_text = {c["text"]: c["position"] for c in t["candidates"]}
            want = (
                ["answer y", "answer x", "answer z"] if name != "r3" else ["answer x", "answer y", "answer z"]
            )
            with pytest.raises(services.Invalid, match="permutation"):
                services.submit(
                    s, name, t["assignment_id"], {"schema_version": 1, "ranking": [0, 0, 1]}, f"{name}-bad-1"
                )
            body = {"schema_version": 1, "ranking": [by_text[w] for w in want]}
            services.submit(s, name, t["assignment_id"], body, f"{name}-client-1")
        df = services.load_judgments(s, "rank")
        assert sorted(map(tuple, df.label)) == [("x", "y", "z"), ("y", "x", "z"), ("y", "x", "z")]
    store = Store.open(workspace)
    from alignflow.feedback.export import export_project

    with sessions() as s:
        out = export_project(s, store, "rank")
    row = store.read_dataset(out["preferences"]).to_pylist()[0]
    # Borda: y scores 2+2+1 = 5, x 1+1+2 = 4, z 0 -> chosen y, rejected z.
    assert (row["chosen_id"], row["rejected_id"], row["method"]) == ("y", "z", "borda")
    assert json.loads(row["label"]) == ["y", "x", "z"]
    store.close()
