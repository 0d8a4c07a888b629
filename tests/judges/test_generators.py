"""Generators (hf:, fn:, openai:) through load_generator, and the openai: one through `data synthesize`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignflow.judges.generators import GeneratorError, load_generator

PROMPTS = ["customer: where is my order a123?\nagent:", "customer: i forgot my password.\nagent:"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.domains import support
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(
        tmp_path_factory.mktemp("gen-tiny"), texts=support.corpus(300, 0), vocab_size=300, hidden_size=32
    )


def upper(prompts: list[str]) -> list[str]:
    return [p.upper() for p in prompts]


def one_short(prompts: list[str]) -> list[str]:
    return [p for p in prompts[1:]]


def not_text(prompts: list[str]) -> list[object]:
    return [len(p) for p in prompts]


def test_hf_generator_formats_prompts_as_alignflow_generate_does(tiny: Path) -> None:
    """Plain prompts are sampled exactly as `alignflow generate` samples a dataset's `prompt` rows; with
    chat=true they go through the chat template as `messages` rows do (greedy, so seeds do not matter)."""
    from alignflow.data.prompts import Prompt
    from alignflow.models import load_policy, load_tokenizer
    from alignflow.rollout.generations import Sampling, sample_texts

    gen = load_generator(f"hf:{tiny}")
    out = gen.generate(PROMPTS, max_new_tokens=12, temperature=0.0, seed=3)
    tok = load_tokenizer(tiny, padding_side="left")
    model = load_policy(tiny, dtype="float32")
    ref = sample_texts(model, tok, [Prompt(p) for p in PROMPTS], Sampling(temperature=0.0, max_new_tokens=12))
    assert out == [c[0] for c in ref]

    chat = load_generator(f"hf:{tiny}#chat=true,batch_size=1")
    templated = [
        Prompt(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            templated=True,
        )
        for p in PROMPTS
    ]
    ref_chat = sample_texts(model, tok, templated, Sampling(temperature=0.0, max_new_tokens=12))
    assert chat.generate(PROMPTS, max_new_tokens=12, temperature=0.0, seed=0) == [c[0] for c in ref_chat]
    # sampling is seeded: the same seed gives the same texts
    a = gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=5)
    assert a == gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=5)


def test_hf_generator_resolves_artifacts_and_records_the_model(tiny: Path, store) -> None:  # noqa: ANN001
    from alignflow.judges.generators import generator_artifact

    aid = store.put_directory(tiny, kind="model", name="tiny-critic")
    gen = load_generator("hf:tiny-critic", store)
    assert gen.artifact_id == aid and generator_artifact(store, gen) == aid
    assert len(gen.generate(PROMPTS[:1], max_new_tokens=4, temperature=1.0, seed=0)) == 1
    fn = load_generator(f"fn:{__name__}:upper", store)
    rec = generator_artifact(store, fn)
    assert store.get(rec).kind == "generator-spec"
    assert json.loads(store.path(rec).read_text())["spec"] == f"fn:{__name__}:upper"
    assert generator_artifact(store, fn) == rec  # the same spec is the same record


def test_fn_generator_and_spec_errors(tiny: Path) -> None:
    gen = load_generator(f"fn:{__name__}:upper")
    assert gen.generate(["ab", "c"], max_new_tokens=1, temperature=0.0, seed=0) == ["AB", "C"]
    with pytest.raises(GeneratorError, match=r"one_short'?: returned 1 texts for 2 prompts"):
        load_generator(f"fn:{__name__}:one_short").generate(
            ["a", "b"], max_new_tokens=1, temperature=0, seed=0
        )
    with pytest.raises(GeneratorError, match="item 0: returned int"):
        load_generator(f"fn:{__name__}:not_text").generate(["a"], max_new_tokens=1, temperature=0, seed=0)
    with pytest.raises(GeneratorError, match=r"expected one of fn:\.\.\., hf:\.\.\., openai:\.\.\."):
        load_generator("rule:x:y")
    with pytest.raises(GeneratorError, match=r"unknown options \['colour'\]"):
        load_generator(f"hf:{tiny}#colour=red")
    with pytest.raises(GeneratorError, match="chat='maybe' must be true or false"):
        load_generator(f"hf:{tiny}#chat=maybe")
    with pytest.raises(GeneratorError, match="not a model folder"):
        load_generator("hf:/no/such/dir")
    with pytest.raises(GeneratorError, match="expected openai:MODEL@BASE_URL"):
        load_generator("openai:gpt")
    from alignflow.errors import ConfigError

    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_generator(f"fn:{__name__}:nope")


def _writer(messages: list[dict]) -> str:
    """A fake generator model: a new support task derived from the request's first example."""
    text = messages[-1]["content"]
    first = text.split("Task 1:", 1)[1].split("\n", 1)[0].strip()
    return f" Describe, step by step, what an agent should say when: {first}\nTask 9: {first}"


def test_openai_generator_through_data_synthesize(
    tmp_path: Path, sqlite_workspace, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """openai:MODEL@URL against the fake OpenAI server: one request per generator call, carrying the token
    cap and temperature; the replies' copies of a seed are filtered; a re-run is answered from the cache."""
    from typer.testing import CliRunner

    from alignflow.cli.main import app
    from alignflow.judges.testing import FakeOpenAI, serve
    from alignflow.store import Store

    monkeypatch.setenv("GEN_KEY", "sk-test")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in [
                "Reply to a customer whose kettle broke.",
                "Explain the refund policy to a calm customer.",
            ]
        )
    )
    with serve(FakeOpenAI(policy=_writer, models=("writer",))) as fake:
        spec = f"openai:writer@{fake.base_url}#api_key=${{ENV:GEN_KEY}}"
        args = [
            "data",
            "synthesize",
            "--method",
            "self-instruct",
            "--seed-prompts",
            seeds,
            "--generator",
            spec,
        ]
        args += ["--requests", "3", "--k", "2", "--max-new-tokens", "40", "--temperature", "0.5", "--json"]
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output + repr(res.exception)
        report = json.loads(res.stdout)
        assert fake.requests == 3
        body = fake.bodies[0]
        assert body["max_tokens"] == 40 and body["temperature"] == 0.5 and body["model"] == "writer"
        assert report["candidates"] == 6 and report["dropped"]["exact_dup_seed"] == 3
        assert report["kept"] + sum(report["dropped"].values()) == report["candidates"]
        rows = Store.open().read_dataset(report["output"]).to_pylist()
        assert all(r["prompt"].startswith("Describe, step by step") for r in rows)
        assert len({r["prompt"] for r in rows}) == len(rows) == report["kept"] >= 1
        again = CliRunner().invoke(app, [str(a) for a in args])
        assert again.exit_code == 0 and fake.requests == 3  # the reply cache answered every request
        assert json.loads(again.stdout)["output"] == report["output"]
