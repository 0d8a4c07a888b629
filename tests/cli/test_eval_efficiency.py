"""`alignflow eval --scorer rm:CKPT`: when the reward model's lineage reaches its training pairs, the summary
JSON and the page carry the annotation-efficiency curve of those pairs; otherwise a note says why not."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from alignflow.cli.main import main
from alignflow.store import Store

TOPICS = [
    "refund",
    "password",
    "delivery",
    "invoice",
    "login",
    "shipping",
    "warranty",
    "upgrade",
    "billing",
    "account",
]
COLUMNS = [
    "n_labels", "accuracy", "gain_per_100_labels", "shuffled_accuracy", "shuffled_sd",
    "shuffled_gain_per_100_labels",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignflow.models import make_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    policy = make_tiny_model_dir(root / "policy", vocab_size=400, hidden_size=32, num_layers=1)
    out = {"policy": policy}
    for seed, name in ((0, "rm"), (1, "rm-unlinked")):  # different weights: a folder is found by its content
        torch.manual_seed(seed)
        AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(
            str(root / name)
        )
        AutoTokenizer.from_pretrained(policy).save_pretrained(str(root / name))
        out[name] = root / name
    return out


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, sqlite_workspace):  # noqa: ANN201
    def invoke(*args: Any) -> str:
        monkeypatch.setattr(sys, "argv", ["alignflow", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        assert exit_info.value.code in (0, None), out.out + out.err
        return out.out

    return invoke


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval(run, tmp_path: Path, policy: Path, scorer: str, name: str) -> tuple[str, dict, str]:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": "Hello? "}])
    out = run(
        "eval", policy, "--prompts", prompts, "--scorer", scorer, "--temperature", "0", "--max-new-tokens", "4",
        "--out", tmp_path / name,
    )  # fmt: skip
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return out, summary, (tmp_path / name / "index.html").read_text()


def test_eval_shows_the_curve_of_the_reward_models_training_pairs(run, models, sqlite_workspace, tmp_path):
    torch.set_num_threads(1)
    pairs = [
        {
            "id": f"q{k}",
            "prompt": f"Customer {k} asks about a {TOPICS[k % 10]} issue.",
            "chosen": f"Sorry about the {TOPICS[k % 10]} problem: here are the steps to fix it.",
            "rejected": f"{TOPICS[k % 10]}? not my problem.",
        }
        for k in range(50)
    ]
    run("data", "import", _write_jsonl(tmp_path / "pairs.jsonl", pairs), "--kind", "pairs")
    store = Store.open(sqlite_workspace)
    (pairs_art,) = store.find(kind="pairs")
    ckpt = store.put_directory(
        models["rm"], kind="checkpoint", name="rm-ckpt", parents=[(pairs_art.id, "dataset")]
    )
    store.close()

    out, summary, page = _eval(run, tmp_path, models["policy"], f"rm:{ckpt}", "ev")
    eff = summary["annotation_efficiency"]
    assert (
        eff["pairs"] == pairs_art.id
        and eff["n_pairs"] == 50
        and "prompt-disjoint 10 of the 50" in eff["heldout"]
    )
    curve = eff["curve"]
    assert len(curve) >= 3 and list(curve[0]) == COLUMNS
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["shuffled_accuracy"] <= 1 for r in curve)
    assert curve[-1]["n_labels"] == 40 and curve[0]["gain_per_100_labels"] is None
    assert "annotation efficiency: held-out RM accuracy" in out
    assert 'id="efficiency"' in page and "shuffled_accuracy" in page

    # A reward-model folder with no stored lineage: a note, in the JSON and on the page.
    _, summary, page = _eval(run, tmp_path, models["policy"], f"rm:{models['rm-unlinked']}", "ev2")
    assert "has no pairs dataset" in summary["annotation_efficiency"]["note"]
    assert "No curve:" in page
