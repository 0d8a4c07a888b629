"""`data import --kind prompts`, `alignflow generate`, `alignflow eval` and `ppo` on prompt-only data, through the
real console entry point (`alignflow.cli.main.main`, so library errors exit 2 as they do for users) on a tiny
Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from alignflow.store import Store

from .conftest import alignflow, two_policies

MT_BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mt-bench" / "question.jsonl"
GOLD = "gold:alignflow.rollout.toy:lowercase_fraction"
PROMPTS = [
    {"id": "p0", "prompt": "What did the model write? "},
    {"id": "p1", "prompt": "What did a user write? "},
    {"id": "p2", "messages": [{"role": "user", "content": "What did my friend write?"}]},
    {
        "id": "p3",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote?"}],
    },
    {"id": "p4", "prompt": "What did the robot write? ", "completion": "kept in meta"},
    {"id": "p5", "prompt": "What did our team write? "},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny policies (different weights, one tokenizer) and a reward-model folder built from the first."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    a, b = two_policies(root, hidden_size=64, num_layers=2)
    tok = AutoTokenizer.from_pretrained(a)
    rm = root / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(a, num_labels=1).save_pretrained(str(rm))
    tok.save_pretrained(str(rm))
    return {"a": a, "b": b, "rm": rm}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, sqlite_workspace):  # noqa: ANN201
    def invoke(*args: Any, ok: bool = True) -> tuple[int, str, str]:
        code, out, err = alignflow(monkeypatch, capsys, *args)
        if ok:
            assert code == 0, out + err
        return code, out, err

    return invoke


@pytest.fixture
def store(sqlite_workspace):  # noqa: ANN201
    s = Store.open(sqlite_workspace)
    yield s
    s.close()


def parents(store: Store, artifact: str) -> set[tuple[str, str]]:
    graph = store.lineage(artifact, max_depth=1)
    return {(parent, role) for parent, child, role in graph.edges if child == artifact}


def test_help_documents_every_option(run):
    import inspect

    from alignflow.cli import eval as eval_cli
    from alignflow.cli import generate

    for command, fn in (("generate", generate.generate), ("eval", eval_cli.eval_)):
        _, out, _ = run(command, "--help")
        assert "--prompts" in out and "--max-new-tokens" in out and fn.__doc__
        for p in inspect.signature(fn).parameters.values():
            assert p.default.help, f"{command}: {p.name} has no help text"


# ------------------------------------------------------------------------------------------------ prompts kind


def test_prompts_kind_imports_trl_prompt_only_rows(run, store, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    _, out, _ = run("data", "import", path, "--kind", "prompts")
    (art,) = store.find(kind="prompts")
    rows = {r["id"]: r for r in store.read_dataset(art.id).to_pylist()}
    assert rows["p0"]["prompt"] == "What did the model write? " and rows["p0"]["messages"] is None
    assert rows["p2"]["prompt"] is None and rows["p2"]["messages"][-1]["role"] == "user"
    assert [m["role"] for m in rows["p3"]["messages"]] == ["system", "user"]  # TRL's conversational form
    assert json.loads(rows["p4"]["meta"]) == {"completion": "kept in meta"}
    # The SFT kind still refuses the same file: prompt-only rows have no completion to learn.
    code, _, err = run("data", "import", path, "--kind", "sft", ok=False)
    assert code == 2 and f"{path}:1: field 'completion': missing field 'completion'" in err


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages",
         "the last message must be the user's"),
        ({"prompt": [{"role": "assistant", "content": "a"}]}, "prompt", "the last message must be the user's"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content", "the last (user) message is empty"),
        ({"prompt": "   "}, "prompt", "field 'prompt' is empty"),
        ({"prompt": 3}, "prompt", "must be a string, got int"),
        ({"prompt": "q", "messages": [{"role": "user", "content": "q"}]}, "messages", "not both"),
        ({"completion": "a"}, "prompt", "missing field 'prompt'"),
        ({"turns": "q"}, "turns", "must be a non-empty list of strings"),
        ({"turns": [7, "x"]}, "turns[0]", "must be a string, got int"),
        ({"turns": [""]}, "turns[0]", "the first turn (the prompt) is empty"),
        ({"question_id": True, "turns": ["q"]}, "question_id", "field 'question_id' must be a string or an integer"),
        ({"messages": [{"role": "robot", "content": "q"}]}, "messages[0].role", "unknown role 'robot'"),
    ],
)  # fmt: skip
def test_prompts_kind_errors_name_file_line_and_field(run, store, tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    code, _, err = run("data", "import", path, "--kind", "prompts", ok=False)
    assert code == 2 and "Traceback" not in err
    assert f"{path}:2: field '{field}': " in err and problem in err, err
    assert store.find() == []


def test_mt_bench_questions_are_a_prompt_suite(run, store, models, tmp_path):
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} is absent")
    run("data", "import", MT_BENCH, "--kind", "prompts", "--name", "mt-bench")
    rows = store.read_dataset("mt-bench").to_pylist()
    source = [json.loads(x) for x in MT_BENCH.read_text().splitlines() if x.strip()]
    assert len(rows) == len(source) == 80
    for row, q in zip(rows, source, strict=True):
        assert row["id"] == str(q["question_id"])
        assert row["messages"] == [{"role": "user", "content": q["turns"][0]}]  # the first turn only
        assert json.loads(row["meta"])["category"] == q["category"]
    run(
        "eval", models["a"], "--prompts", "mt-bench", "--scorer", GOLD, "--temperature", "0",
        "--max-prompts", "4", "--max-new-tokens", "6", "--out", tmp_path / "ev",
    )  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["prompts"]["ids"] == ["81", "82", "83", "84"]


# ------------------------------------------------------------------------------------------------ generate


def test_generate_writes_a_generations_dataset_annotate_imports(run, store, models, tmp_path):
    from alignflow.data.prompts import Prompt
    from alignflow.models import load_tokenizer
    from alignflow.rollout.candidates import generate_candidates

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    # Seed 2: the random tiny model sometimes samples its NUL byte token, which the annotation platform
    # refuses (`import-items` names the row); with this seed none of the 12 candidates holds one.
    args = ("generate", models["a"], "--prompts", prompts, "--n", "2", "--seed", "2", "--max-new-tokens", "8")
    _, out, _ = run(*args, "--name", "gens")
    info = store.get("gens")
    assert info.kind == "generations" and info.meta["sampling"]["n"] == 2 and info.meta["num_prompts"] == 6
    table = store.read_dataset(info.id)
    rows = table.to_pylist()
    assert len(rows) == 12 and [r["prompt_id"] for r in rows[:4]] == ["p0", "p0", "p1", "p1"]
    assert {r["model_version"] for r in rows} == {info.meta["policy"]}
    assert json.loads(rows[0]["sampling"]) == {
        "max_new_tokens": 8, "n": 2, "seed": 2, "temperature": 1.0, "top_p": 1.0
    }  # fmt: skip
    # The responses are the rollout sampler's for the same prompts and seed; messages rows are chat-templated.
    tok = load_tokenizer(models["a"], padding_side="left")
    by_id = {r["prompt_id"]: r for r in rows if r["candidate"] == 0}
    assert by_id["p2"]["templated"] and by_id["p2"]["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": "What did my friend write?"}], tokenize=False, add_generation_prompt=True
    )
    expected = generate_candidates(
        models["a"], None, [Prompt(r["prompt"], r["templated"]) for r in by_id.values()],
        n=2, max_new_tokens=8, seed=2,
    )  # fmt: skip
    assert [r["response"] for r in rows] == [t for pair in expected for t in pair]
    # Lineage: the policy (stored once as a model) and the prompt set.
    prompts_id = store.find(kind="prompts")[0].id
    assert parents(store, info.id) == {(info.meta["policy"], "policy"), (prompts_id, "prompts")}
    # The same command gives the same dataset (content-addressed, seeded).
    run(*args, "--name", "gens")
    assert store.resolve("gens") == info.id and len(store.find(kind="generations")) == 1

    guideline = tmp_path / "guide.md"
    guideline.write_text("# Pick the better reply\n")
    run("annotate", "create-project", "loop", "--guideline", guideline)
    _, out, _ = run("annotate", "import-items", "loop", "--artifact", "gens")
    assert "imported 6 items into loop" in out
    from alignflow.feedback.services import items_from_generation

    items = items_from_generation(table)
    assert [i["id"] for i in items] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert [c["text"] for c in items[0]["candidates"]] == [rows[0]["response"], rows[1]["response"]]
    assert items[0]["candidates"][0]["version"] == info.meta["policy"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["generate", "{nowhere}", "--prompts", "{prompts}"], "POLICY '"),
        (["generate", "{model}", "--prompts", "{nowhere}.jsonl"], "--prompts '"),
        (["generate", "{model}", "--prompts", "{bad_prompts}"], "field 'prompt'"),
        (["generate", "{model}", "--prompts", "{model}/config.json"], "config.json:1: invalid JSON"),
        (["generate", "{model}", "--prompts", "{prompts}", "--n", "0"], "'--n'"),
        (["generate", "{model}", "--prompts", "{prompts}", "--top-p", "0"], "'--top-p'"),
        (["generate", "{model}", "--prompts", "{prompts}", "--temperature", "-1"], "'--temperature'"),
        (["generate", "{prompts}", "--prompts", "{prompts}"], "POLICY '"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", "nope"], "--scorer 'nope'"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", "rm:{nowhere}"], "--scorer 'rm:"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", "gold:no_such_module:f"], "--scorer 'gold:"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", "gold:alignflow.rollout.toy:nope"], "no attribute"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", GOLD, "--baseline", "{nowhere}"], "--baseline '"),
        (["eval", "{model}", "{model}", "--prompts", "{prompts}", "--scorer", GOLD], "given twice"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", GOLD, "--temperature", "1",
          "--temperature", "1"], "--temperature: a temperature is given twice"),
        (["eval", "{model}", "--prompts", "{prompts}", "--scorer", GOLD, "--samples-per-prompt", "0"],
         "'--samples-per-prompt'"),
    ],
)  # fmt: skip
def test_bad_arguments_are_clean_errors_naming_the_argument(run, store, models, tmp_path, args, named):
    files = {
        "model": str(models["a"]),
        "nowhere": str(tmp_path / "nowhere"),
        "prompts": str(write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])),
        "bad_prompts": str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}])),
    }
    code, out, err = run(*(a.format(**files) for a in args), ok=False)
    assert code == 2 and "Traceback" not in err, err
    assert named in " ".join((out + err).split()), out + err
    assert store.find(kind="generations") == [] and store.find(kind="evaluation") == []


def test_judge_scorers_name_the_installed_backends_and_take_plugins(run, store, models, tmp_path):
    from alignflow.rollout import scorers

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    code, _, err = run("eval", models["a"], "--prompts", prompts, "--scorer", "judge:gpt-x", ok=False)
    assert (
        code == 2
        and "--scorer 'judge:gpt-x': unknown judge backend 'gpt-x'; installed: hf, openai, rm, rule" in err
    )
    # A backend registered under a prefix builds the scorer for its specs; its artifact is the lineage parent.
    record = store.put_json({"judge": "constant"}, kind="scorer", name="constant-judge")
    seen: list[str] = []

    def factory(spec: str, _store: Store, _device: str) -> tuple[scorers.Scorer, str]:
        seen.append(spec)
        return (lambda prompts, responses: [0.5] * len(responses)), record

    scorers.register_judge("const", factory)
    try:
        code, _, err = run("eval", models["a"], "--prompts", prompts, "--scorer", "judge:other", ok=False)
        assert code == 2 and "unknown judge backend 'other'; installed: const, hf, openai, rm, rule" in err
        run(
            "eval", models["a"], "--prompts", prompts, "--scorer", "judge:const:v1", "--temperature", "0",
            "--max-new-tokens", "4", "--out", tmp_path / "ev",
        )  # fmt: skip
    finally:
        scorers._JUDGES.pop("const")
    assert seen == ["const:v1"]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["results"][0]["score"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert (record, "scorer") in parents(store, summary["artifact"])


# ------------------------------------------------------------------------------------------------ eval


def test_eval_compares_policies_with_cis_and_stores_the_evaluation(run, store, models, tmp_path):
    from alignflow.evaluate import stats
    from alignflow.rollout.toy import lowercase_fraction

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out_dir = tmp_path / "eval"
    _, out, _ = run(
        "eval", models["b"], "--baseline", models["a"], "--prompts", prompts, "--scorer", GOLD,
        "--temperature", "0", "--temperature", "1", "--samples-per-prompt", "3", "--max-new-tokens", "8",
        "--seed", "1", "--out", out_dir,
    )  # fmt: skip
    assert "policy-b" in out and "evaluation artifact:" in out  # the table (its width follows the terminal)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["baseline"] == "policy-a" and summary["confidence"] == 0.95
    got = {(r["policy"], r["temperature"]): r for r in summary["results"]}
    assert set(got) == {("policy-a", 0.0), ("policy-a", 1.0), ("policy-b", 0.0), ("policy-b", 1.0)}
    assert got["policy-a", 0.0]["samples_per_prompt"] == 1 and got["policy-a", 1.0]["samples_per_prompt"] == 3
    responses = [json.loads(x) for x in (out_dir / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2 * 6 * (1 + 3)
    for (policy, t), r in got.items():
        mine = [x for x in responses if x["policy"] == policy and x["temperature"] == t]
        # Scores are the gold function's on the stored responses; per prompt, the mean of its samples.
        assert [x["score"] for x in mine] == lowercase_fraction(
            [x["prompt"] for x in mine], [x["response"] for x in mine]
        )
        per_prompt = [
            sum(x["score"] for x in mine if x["prompt_id"] == pid) / r["samples_per_prompt"]
            for pid in summary["prompts"]["ids"]
        ]
        assert r["per_prompt_score"] == pytest.approx(per_prompt)
        s = r["score"]
        assert s["lo"] <= s["mean"] <= s["hi"] and s["mean"] == pytest.approx(sum(per_prompt) / 6)
        assert r["length"]["max"] == max(len(x["response"]) for x in mine)
        if policy == "policy-b":
            base = got["policy-a", t]["per_prompt_score"]
            assert r["vs_baseline"]["win_rate"] == dict(
                zip(("rate", "lo", "hi"), stats.win_rate(r["per_prompt_score"], base, seed=1), strict=True)
            )
            d = r["vs_baseline"]["diff"]
            assert d["lo"] <= d["mean"] <= d["hi"]
            assert d["mean"] == pytest.approx(sum(per_prompt) / 6 - sum(base) / 6)
        else:
            assert "vs_baseline" not in r
    # The evaluation artifact is the summary, with lineage to both policies, the prompts and the scorer.
    (art,) = store.find(kind="evaluation")
    assert art.id == summary["artifact"]
    stored = json.loads(store.path(art.id).read_text())
    assert stored["results"] == summary["results"]
    edges = parents(store, art.id)
    ids = {name: p["artifact"] for name, p in summary["policies"].items()}
    prompts_id = store.find(kind="prompts")[0].id
    assert {(ids["policy-a"], "policy"), (ids["policy-b"], "policy"), (ids["policy-a"], "baseline")} <= edges
    assert (prompts_id, "prompts") in edges and (summary["scorer"]["artifact"], "scorer") in edges
    page = (out_dir / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Win rate against policy-a" in page
    assert "<script" not in page and "Example responses" in page


def test_eval_with_a_reward_model_scorer(run, store, models, tmp_path):
    from alignflow.models.reward import load_reward_scorer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    run(
        "eval", models["a"], "--prompts", prompts, "--scorer", f"rm:{models['rm']}", "--temperature", "0",
        "--max-new-tokens", "6", "--out", tmp_path / "ev",
    )  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    responses = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    mean, _ = load_reward_scorer(models["rm"])(
        [r["prompt"] for r in responses], [r["response"] for r in responses]
    )
    assert [r["score"] for r in responses] == pytest.approx(mean.tolist(), abs=1e-5)
    rm_id = store.lookup_directory(models["rm"])
    assert rm_id == summary["scorer"]["artifact"] and (rm_id, "scorer") in parents(store, summary["artifact"])


# ------------------------------------------------------------------------------------------------ ppo


def test_ppo_trains_on_prompt_only_data_as_on_the_same_sft_prompts(run, models, tmp_path):
    """`data.kind: prompts` reads TRL prompt-only rows; the same prompts given as SFT rows train identically."""
    sft = [
        {"id": "s0", "prompt": "What did the model write? ", "completion": "The model wrote a poem."},
        {"id": "s1", "messages": [{"role": "user", "content": "What did she write?"},
                                  {"role": "assistant", "content": "She wrote an email."}]},
        {"id": "s2", "prompt": "What did our team write? ", "completion": "Our team wrote the recipe."},
        {"id": "s3", "prompt": "What did a user write? ", "completion": "A user wrote two answers."},
    ]  # fmt: skip
    only = [
        {"id": "s0", "prompt": "What did the model write? "},
        {"id": "s1", "messages": [{"role": "user", "content": "What did she write?"}]},
        {"id": "s2", "prompt": "What did our team write? "},
        {"id": "s3", "prompt": "What did a user write? "},
    ]
    metrics = {}
    for kind, rows in (("sft", sft), ("prompts", only)):
        cfg = {
            "stage": "ppo",
            "output_dir": str(tmp_path / kind),
            "model": {"path": str(models["a"]), "dtype": "float32"},
            "data": {"train": str(write_jsonl(tmp_path / f"{kind}.jsonl", rows)), "kind": kind},
            "rollout": {"batch_size": 4, "num_generations": 1, "max_new_tokens": 8},
            "reward": {"fn": "alignflow.rollout.toy:lowercase_fraction"},
            "ppo": {"epochs": 1, "minibatch_size": 4},
            "train": {"seed": 0, "steps": 2},
        }
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run("ppo", path)
        metrics[kind] = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward/raw_mean", "loss/policy", "kl/seq_sum_mean", "response/len_mean")
    assert len(metrics["prompts"]) == 2
    assert [[m[k] for k in keys] for m in metrics["prompts"]] == [
        [m[k] for k in keys] for m in metrics["sft"]
    ]


def test_generations_table_is_parquet_readable_with_the_documented_columns(run, store, models, tmp_path):
    from alignflow.rollout.generations import GENERATIONS_SCHEMA

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    run(
        "generate",
        models["a"],
        "--prompts",
        prompts,
        "--n",
        "3",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    )
    (info,) = store.find(kind="generations")
    table = pq.read_table(store.path(info.id))
    assert table.schema.equals(GENERATIONS_SCHEMA)
    rows = table.to_pylist()
    # Greedy: the three candidates of a prompt are the same completion.
    assert len({r["response"] for r in rows if r["prompt_id"] == "p0"}) == 1
