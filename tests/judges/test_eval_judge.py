"""`alignflow eval --scorer judge:SPEC` through the console entry point on two tiny policies: reward-model,
rubric-mode LM and OpenAI-compatible judges score responses, their records link to the judge's model, and
a judge that only compares pairs is a clear error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from alignflow.store import Store

SECRET = "sk-eval-0a1b2c3d4e5f60718293"
PROMPTS = [
    {"id": f"p{i}", "prompt": f"What did the model {w} write? "} for i, w in enumerate(["a", "b", "c"])
]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny Llama policies (one tokenizer, seeds 0 and 7) and a tiny encoder reward model."""
    from transformers import AutoTokenizer

    from alignflow.models import make_tiny_encoder_dir, make_tiny_model_dir
    from alignflow.models.tiny import tiny_llama

    root = tmp_path_factory.mktemp("models")
    a = make_tiny_model_dir(root / "policy-a", vocab_size=400, hidden_size=32, max_position_embeddings=1024)
    b = root / "policy-b"
    shutil.copytree(a, b)
    tok = AutoTokenizer.from_pretrained(a)
    tiny_llama(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=1024, seed=7,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ).save_pretrained(str(b))  # fmt: skip
    return {"a": a, "b": b, "rm": make_tiny_encoder_dir(root / "rm")}


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, sqlite_workspace, tmp_path: Path):  # noqa: ANN201
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    def invoke(*args: Any) -> tuple[int, str, str, Path]:
        from alignflow.cli.main import main

        out_dir = tmp_path / f"ev{len(list(tmp_path.glob('ev*')))}"
        argv = ["alignflow", "eval", *map(str, args), "--prompts", str(prompts), "--temperature", "0"]
        monkeypatch.setattr(sys, "argv", [*argv, "--max-new-tokens", "4", "--out", str(out_dir)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        code = exit_info.value.code
        captured = capsys.readouterr()
        return (
            (0 if code is None else code if isinstance(code, int) else 1),
            captured.out,
            captured.err,
            out_dir,
        )

    return invoke


@pytest.fixture
def store(sqlite_workspace):  # noqa: ANN201
    s = Store.open(sqlite_workspace)
    yield s
    s.close()


def _parents(store: Store, artifact: str) -> dict[str, str]:
    graph = store.lineage(artifact, max_depth=1)
    return {role: parent for parent, child, role in graph.edges if child == artifact}


def _record(store: Store, summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    aid = _parents(store, summary["artifact"])["scorer"]
    return aid, json.loads(store.path(aid).read_text())


def test_a_reward_model_judge_scores_both_policies_with_lineage_to_the_checkpoint(run, store, models) -> None:
    from alignflow.models.reward import load_reward_scorer

    code, out, err, ev = run(models["a"], models["b"], "--scorer", f"judge:rm:{models['rm']}")
    assert code == 0, out + err
    summary = json.loads((ev / "summary.json").read_text())
    assert len(summary["results"]) == 2
    aid, record = _record(store, summary)
    assert (
        record["scorer"] == "judge" and record["spec"] == f"rm:{models['rm']}" and record["backend"] == "rm"
    )
    rm_aid = store.lookup_directory(models["rm"].resolve())
    assert record["checkpoint"] == rm_aid and _parents(store, aid) == {"judge_model": rm_aid}
    # every stored score is the reward model's, scored directly
    rows = [json.loads(line) for line in (ev / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS)
    mean, _ = load_reward_scorer(models["rm"])([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(mean.tolist(), abs=1e-5)


def test_a_rubric_mode_lm_judge_scores_in_one_to_ten(run, store, models, tmp_path: Path) -> None:
    mine = tmp_path / "rate.txt"
    mine.write_text("Q: {prompt}\nA: {response}\nScore out of 10:\n")
    code, out, err, ev = run(
        models["a"], models["b"], "--scorer", f"judge:hf:{models['b']}#mode=rubric,template={mine}"
    )
    assert code == 0, out + err
    summary = json.loads((ev / "summary.json").read_text())
    for result in summary["results"]:
        assert 1.0 <= result["score"]["lo"] <= result["score"]["mean"] <= result["score"]["hi"] <= 10.0
    _, record = _record(store, summary)
    assert record["backend"] == "hf" and record["mode"] == "rubric" and record["template"] == str(mine)
    assert record["options"] == {"mode": "rubric", "template": str(mine)}


@pytest.mark.parametrize(
    "spec",
    ["judge:rule:alignflow.judges.rubrics:first", "judge:hf:{a}"],
)
def test_a_judge_that_compares_pairs_is_a_clear_error(run, models, spec: str) -> None:
    code, out, err, _ = run(models["a"], "--scorer", spec.format(a=models["a"]))
    text = " ".join((out + err).split())
    assert code == 2 and "Traceback" not in text, text
    assert "compares pairs and cannot score single responses" in text
    assert "judge:rm:CKPT" in text and "mode=rubric" in text


def test_an_unknown_judge_backend_lists_the_installed_ones(run, models) -> None:
    code, out, err, _ = run(models["a"], "--scorer", "judge:gpt-x")
    assert code == 2 and "unknown judge backend 'gpt-x'; installed: hf, openai, rm, rule" in out + err


def test_an_openai_rubric_judge_through_the_cli_never_stores_the_key(
    run, store, models, monkeypatch: pytest.MonkeyPatch, sqlite_workspace
) -> None:
    from alignflow.judges.testing import FakeOpenAI, serve

    monkeypatch.setenv("EVAL_JUDGE_KEY", SECRET)
    with serve(
        FakeOpenAI(api_key=SECRET, policy=lambda messages: str(1 + len(messages[-1]["content"]) % 10))
    ) as fake:
        spec = f"judge:openai:judge@{fake.base_url}#mode=rubric,api_key=${{ENV:EVAL_JUDGE_KEY}}"
        code, out, err, ev = run(models["a"], "--scorer", spec)
        assert code == 0, out + err
        sent = fake.requests
        assert sent == len(PROMPTS)
        code, out2, err2, _ = run(models["a"], "--scorer", spec)  # the re-run is answered from the cache
        assert code == 0 and fake.requests == sent
    summary = json.loads((ev / "summary.json").read_text())
    _, record = _record(store, summary)
    assert record["backend"] == "openai" and record["options"]["api_key"] == "${ENV:EVAL_JUDGE_KEY}"
    cache = Path(sqlite_workspace.home) / "judge-cache"
    assert any(cache.rglob("*.json"))
    files = [p for p in Path(sqlite_workspace.home).rglob("*") if p.is_file()] + [
        p for p in ev.rglob("*") if p.is_file()
    ]
    for text in [out, err, out2, err2, *(p.read_bytes().decode("utf-8", "replace") for p in files)]:
        assert SECRET not in text
    # a literal key in the spec is refused, and the error does not repeat it
    code, out, err, _ = run(
        models["a"], "--scorer", f"judge:openai:judge@http://127.0.0.1:9/v1#api_key={SECRET}"
    )
    assert code == 2 and "must be an ${ENV:NAME} reference" in " ".join((out + err).split())
    assert SECRET not in out + err and "api_key=***" in out + err
