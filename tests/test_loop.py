"""The whole loop on a tiny model, only through the CLI and the HTTP API (issue 12's acceptance test):

`generate` -> `annotate create-project` -> `import-items --artifact` -> three annotator accounts answer through a
real `alignflow serve` (httpx, token auth) -> `annotate export --as pairs` -> `rm` on the exported artifact id ->
`ppo` on the prompts with that reward model -> `eval` of the PPO policy against the starting one -> `lineage
--format json` of the final policy reaches the individual annotations, every annotator and the guideline version.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from alignflow.cli.main import main
from alignflow.feedback import loadgen

pytestmark = pytest.mark.slow

PASSWORD = "correct-horse-battery"
ANNOTATORS = ("ann1", "ann2", "ann3")
PROMPTS = [{"id": f"q{i}", "prompt": f"Write a note about item number {i}. "} for i in range(10)]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on 2 shared cores
    yield
    torch.set_num_threads(old)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, sqlite_workspace):  # noqa: ANN201
    monkeypatch.setenv("ALIGNFLOW_PASSWORD", PASSWORD)
    monkeypatch.setenv("COLUMNS", "400")  # ids and paths on one line

    def invoke(*args: Any) -> str:
        """`alignflow ARGS` as the console script runs it; returns stdout, fails on a non-zero exit."""
        monkeypatch.setattr(sys, "argv", ["alignflow", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        assert exit_info.value.code in (0, None), out.out + out.err
        return out.out

    return invoke


def _annotate(url: str, token: str, project: str, who: int) -> int:
    """One annotator through the API until the queue is empty: prefers the longer reply (a tie on equal
    lengths), the third annotator sometimes disagrees. Returns how many answers were accepted."""
    done = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        while (r := client.post(f"/api/v1/projects/{project}/next")).status_code == 200:
            task = r.json()
            lengths = [len(c["text"]) for c in task["candidates"]]
            choice = "tie" if lengths[0] == lengths[1] else "left" if lengths[0] > lengths[1] else "right"
            if who == 2 and done % 3 == 0:
                choice = {"left": "right", "right": "left", "tie": "left"}[choice]
            answer = {
                "schema_version": task["schema_version"],
                "choice": choice,
                "strength": None if choice == "tie" else 2,
                "dimensions": {d: choice for d in task["schema"]["dimensions"]},
                "rationale": "the longer reply says more about the item",
                "duration_s": 2.0,
            }
            body = {"client_id": uuid.uuid4().hex, "answer": answer}
            s = client.post(f"/api/v1/assignments/{task['assignment_id']}/submit", json=body)
            assert s.status_code in (200, 201), s.text
            done += 1
        assert r.status_code == 204, r.text
    return done


def test_the_whole_loop_through_cli_and_api(run, sqlite_workspace, tmp_path: Path):
    from alignflow.models import make_tiny_model_dir

    t0 = time.perf_counter()
    policy = make_tiny_model_dir(tmp_path / "policy", vocab_size=400, hidden_size=64, num_layers=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    # 1. candidates from the policy
    out = run(
        "generate", policy, "--prompts", prompts, "--n", "2", "--max-new-tokens", "12", "--name", "gens"
    )
    assert "generated 20 candidates for 10 prompts" in out
    # 2. a project, and the generations as its items
    guideline = tmp_path / "guide.md"
    guideline.write_text("# Pick the better reply\nPrefer the reply that says more.\n")
    run("annotate", "create-project", "loop", "--guideline", guideline, "--overlap", "3", "--gold-rate", "0")
    assert "imported" in run("annotate", "import-items", "loop", "--artifact", "gens")
    # 3. three annotator accounts answer through the HTTP API
    tokens = {}
    for name in ANNOTATORS:
        run("users", "add", name, "--role", "annotator")
        tokens[name] = run("users", "token", name, "--scope", "annotate").strip().splitlines()[-1]
    server = loadgen.ServerProcess(sqlite_workspace.home, sqlite_workspace.db_url)
    server.start()
    try:
        answered = [_annotate(server.url, tokens[n], "loop", k) for k, n in enumerate(ANNOTATORS)]
    finally:
        server.stop()
    n_items = answered[0]
    assert answered == [n_items] * 3 and n_items >= 8  # overlap 3: everyone answers every item
    # 4. trainable pairs with lineage
    out = run("annotate", "export", "loop", "--as", "pairs", "--tie-rule", "both-half")
    pairs_id = out.split()[1]
    assert out.startswith("pairs ")
    # 5. a reward model on the artifact id
    rm_dir = tmp_path / "rm"
    rm_cfg = {
        "stage": "rm",
        "output_dir": str(rm_dir),
        "model": {"path": str(policy), "dtype": "float32"},
        "data": {"train": pairs_id, "eval_fraction": 0.0, "max_length": 64},
        "optim": {"lr": 2e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 4, "max_steps": 4},
    }
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_cfg))
    run("rm", tmp_path / "rm.yaml")
    # 6. PPO on the prompts, scored by that reward model
    ppo_cfg = {
        "stage": "ppo",
        "output_dir": str(tmp_path / "ppo"),
        "model": {"path": str(policy), "dtype": "float32"},
        "data": {"train": str(prompts), "kind": "prompts"},
        "rollout": {"batch_size": 4, "num_generations": 1, "max_new_tokens": 8},
        "reward": {"models": [str(rm_dir / "final")]},
        "ppo": {"epochs": 1, "minibatch_size": 4},
        "train": {"seed": 0, "steps": 2},
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(ppo_cfg))
    out = run("ppo", tmp_path / "ppo.yaml")
    final = json.loads(out)["checkpoint"]  # `alignflow ppo` prints its result as JSON
    # 7. evaluation of the PPO policy against the starting one
    run(
        "eval", tmp_path / "ppo" / "final", policy, "--prompts", prompts, "--scorer", f"rm:{rm_dir / 'final'}",
        "--baseline", policy, "--temperature", "0", "--max-new-tokens", "8", "--out", tmp_path / "eval",
    )  # fmt: skip
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["results"]
    # 8. the final policy's lineage reaches the individual annotations and the guideline version
    graph = json.loads(run("lineage", final, "--format", "json"))
    nodes = graph["nodes"]  # id -> artifact
    kinds = {n["kind"] for n in nodes.values()}
    assert {
        "checkpoint",
        "pairs",
        "annotations",
        "guideline",
        "annotator",
        "aggregation",
        "generations",
    } <= kinds
    annotations = [n for n in nodes.values() if n["kind"] == "annotations"]
    assert len(annotations) == 1
    assert sorted(n["name"] for n in nodes.values() if n["kind"] == "annotator") == [
        f"annotator:{a}" for a in ANNOTATORS
    ]
    (guide,) = [n for n in nodes.values() if n["kind"] == "guideline"]
    assert guide["name"] == "loop@v1"
    from alignflow.store import Store

    store = Store.open(sqlite_workspace)
    rows = store.read_dataset(next(k for k, n in nodes.items() if n["kind"] == "annotations")).to_pylist()
    store.close()
    assert len(rows) == 3 * n_items and {r["annotator_id"] for r in rows} == set(ANNOTATORS)
    assert all(r["guideline_version"] == 1 for r in rows)
    print(f"whole loop: {time.perf_counter() - t0:.1f} s")
