"""`annotate import-items --artifact GENERATIONS [--prioritize-by RM --expert-fraction F]` through the CLI:
grouping by prompt, identical candidates dropped, K > 2 split into pairs (or kept whole for a ranking project),
and priorities, tiers, scores and the method stored with each item."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select

from alignflow.feedback import services
from alignflow.feedback.models import Item
from alignflow.quality.uncertainty import METHOD, pair_uncertainty, ranking_uncertainty
from alignflow.rollout.generations import GENERATIONS_SCHEMA
from alignflow.store import Store

CANDIDATES = {
    "p0": ["Sure, here it is.", "No."],
    "p1": ["One.", "Two.", "Three."],  # K = 3
    "p2": ["Same.", "Same.", "Other."],  # a repeat: two distinct candidates left
    "p3": ["Echo.", "Echo."],  # nothing to compare
    "p4": ["a", "b", "c", "d"],
    "p5": ["ok", "bad\x00", "fine"],  # a sampled NUL: that reply is left out, the rest imports
}


@pytest.fixture
def generations(workspace) -> str:
    import pyarrow as pa

    rows = [
        {
            "id": f"{pid}-{k}",
            "prompt_id": pid,
            "prompt": f"Question {pid}?",
            "templated": False,
            "candidate": k,
            "response": text,
            "model": "tiny",
            "model_version": "v1",
            "sampling": json.dumps({"temperature": 1.0, "n": len(texts)}),
        }
        for pid, texts in CANDIDATES.items()
        for k, text in enumerate(texts)
    ]
    store = Store.open(workspace)
    aid = store.put_dataset(
        pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA), kind="generations", name="gens"
    )
    store.close()
    return aid


def _project(cli, tmp_path, name: str, schema: str | None = None) -> None:
    (tmp_path / "guide.md").write_text("# Pick the better reply\n")
    extra = []
    if schema:
        (tmp_path / f"{name}.yaml").write_text(schema)
        extra = ["--schema", tmp_path / f"{name}.yaml"]
    cli("annotate", "create-project", name, "--guideline", tmp_path / "guide.md", *extra)


def _items(sessions, project: str) -> dict[str, Item]:
    with sessions() as s:
        p = services.get_project(s, project)
        items = {it.external_id: it for it in s.scalars(select(Item).where(Item.project_id == p.id))}
        for it in items.values():
            s.expunge(it)
    return items


def test_pairwise_project_splits_k_candidates_into_pairs(cli, sessions, tmp_path, generations):
    _project(cli, tmp_path, "pw")
    out = cli("annotate", "import-items", "pw", "--artifact", "gens").output
    assert "imported 7 items into pw" in out
    assert "left out prompt p5 candidate 1: the reply contains a NUL character" in out
    items = _items(sessions, "pw")
    texts = {k: [c["text"] for c in it.candidates] for k, it in items.items()}
    assert texts == {
        "p0": ["Sure, here it is.", "No."],
        "p1/0": ["One.", "Two."],
        "p1/1": ["Three.", "One."],  # odd K: the last candidate with the first
        "p2": ["Same.", "Other."],  # the repeated reply is dropped; p3 had one distinct reply: no item
        "p4/0": ["a", "b"],
        "p4/1": ["c", "d"],
        "p5": ["ok", "fine"],
    }
    assert all(it.source == generations and it.priority == 0 and it.meta is None for it in items.values())


def test_ranking_project_keeps_every_candidate_and_refuses_too_many(cli, sessions, tmp_path, generations):
    _project(cli, tmp_path, "rk", "kind: ranking\nmax_candidates: 4\ndimensions: []\n")
    cli("annotate", "import-items", "rk", "--artifact", generations)
    items = _items(sessions, "rk")
    assert {k: len(it.candidates) for k, it in items.items()} == {"p0": 2, "p1": 3, "p2": 2, "p4": 4, "p5": 2}
    _project(cli, tmp_path, "rk3", "kind: ranking\nmax_candidates: 3\ndimensions: []\n")
    r = cli("annotate", "import-items", "rk3", "--artifact", generations, ok=False)
    assert r.exit_code != 0 and "'p4' has 4 distinct candidates" in str(r.exception)


def test_prioritize_items_stores_the_uncertainty_figures():
    rows = [
        {"id": f"q{i}", "prompt": f"q{i}", "candidates": [{"text": f"a{i}"}, {"text": f"b{i}"}]}
        for i in range(6)
    ] + [{"id": "r", "prompt": "r", "candidates": [{"text": t} for t in ("x", "y", "z")]}]
    rng = np.random.default_rng(0)
    table = {f"{r['prompt']}|{c['text']}": rng.normal(size=3) for r in rows for c in r["candidates"]}

    def member_rewards(prompts, responses):  # (M=3, N): a fixed reward per (prompt, reply) and member
        return np.stack([table[f"{p}|{t}"] for p, t in zip(prompts, responses, strict=True)], axis=1)

    out = services.prioritize_items(rows, member_rewards, expert_fraction=2 / 7, reward_model="rm-id")
    pair = [table[f"q{i}|a{i}"] for i in range(6)], [table[f"q{i}|b{i}"] for i in range(6)]
    u = pair_uncertainty(np.stack(pair[0], axis=1), np.stack(pair[1], axis=1))
    ur = ranking_uncertainty(np.stack([table[f"r|{t}"] for t in "xyz"], axis=1)[:, None, :])
    prio = np.append(u.priority, ur.priority)
    for i, r in enumerate(out):
        m = r["meta"]["uncertainty"]
        assert m["method"] == METHOD and m["reward_model"] == "rm-id" and m["members"] == 3
        assert m["priority"] == pytest.approx(prio[i]) and r["priority"] == round(1000 * prio[i])
        if i < 6:
            assert m["disagreement"] == pytest.approx(u.disagreement[i]) and m["margin"] == pytest.approx(
                u.margin[i]
            )
    assert out[6]["meta"]["uncertainty"]["pair"] == [int(x) for x in ur.pair[0]]
    top2 = set(np.argsort(-prio)[:2])
    assert {i for i, r in enumerate(out) if r["ambiguous"]} == top2
    assert all(r["meta"]["uncertainty"]["expert"] == r["ambiguous"] for r in out)


def test_cli_prioritize_by_a_reward_model(cli, sessions, tmp_path, generations, workspace):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignflow.models import make_tiny_model_dir
    from alignflow.models.reward import load_reward_scorer

    base = make_tiny_model_dir(tmp_path / "tiny", vocab_size=400, hidden_size=32, num_layers=1)
    rm = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(str(rm))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(rm))
    _project(cli, tmp_path, "act")
    r = cli(
        "annotate",
        "import-items",
        "act",
        "--artifact",
        "gens",
        "--prioritize-by",
        rm,
        "--expert-fraction",
        "0.5",
    )
    assert "imported 7 items into act (4 to the expert tier)" in r.output
    items = _items(sessions, "act")
    scorer = load_reward_scorer(rm)
    ordered = sorted(items.values(), key=lambda it: it.id)  # import order: the batches the import scored
    rewards = scorer(
        [it.prompt for it in ordered for _ in range(2)], [c["text"] for it in ordered for c in it.candidates]
    )[0].numpy()
    for k, it in enumerate(ordered):
        m = it.meta["uncertainty"]
        ra, rb = rewards[2 * k], rewards[2 * k + 1]
        assert m["disagreement"] == 0.0  # one model: no committee
        assert m["margin"] == pytest.approx(abs(1 / (1 + np.exp(rb - ra)) - 0.5), abs=1e-6)
        assert it.priority == round(1000 * m["priority"])
    ranked = sorted(items.values(), key=lambda it: -it.meta["uncertainty"]["priority"])
    assert [it.tier for it in ranked] == ["expert"] * 4 + ["standard"] * 3
    store = Store.open(workspace)
    assert m["reward_model"] == store.lookup_directory(rm.resolve())
    store.close()
    bad = cli("annotate", "import-items", "act", "--artifact", "gens", "--expert-fraction", "0.2", ok=False)
    assert "--expert-fraction needs --prioritize-by" in str(bad.exception)
