"""`alignflow constitution run` end to end: tiny local policy and critic, a rule critic, the judge option,
lineage to the constitution's version, training on the outputs with `alignflow sft` and `alignflow dpo`, and
clean errors for bad constitution files."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from alignflow.domains import support

REPO = Path(__file__).resolve().parents[2]
CONSTITUTION = REPO / "examples" / "constitution.yaml"
_EXCHANGE = re.compile(r"(customer: .*?\nagent:)", re.DOTALL)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(
        tmp_path_factory.mktemp("const-tiny"), texts=support.corpus(300, 0), vocab_size=300, hidden_size=32
    )


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in support.prompts(6, seed=3)))
    return path


@pytest.fixture
def cli(sqlite_workspace):  # noqa: ANN001, ANN201
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


# --- deterministic stand-ins for models (fn: generators) -------------------------------------------


def vague_agent(prompts: list[str]) -> list[str]:
    """A policy that never answers the question."""
    return [" hey. i will look into it. our team works every day of the week." for _ in prompts]


def rule_critic(requests: list[str]) -> list[str]:
    """A critic that knows the support domain: its critique names the gold dimensions the reply misses, and
    its revision is the domain's all-good reply to the customer's message."""
    out = []
    for req in requests:
        prompt = _EXCHANGE.search(req).group(1)
        if req.rstrip().endswith("Critique:"):
            reply = req.split(prompt, 1)[1].split("\n", 1)[0]
            low = [k for k, v in support.gold_scores(prompt, reply).items() if v < 1.0]
            out.append(" the reply falls short on " + ", ".join(low or ["nothing"]) + ".")
            continue
        slots = support.parse_prompt(prompt)
        ticket = support.Ticket(
            str(slots["intent"]),
            slots["oid"] or "a100",
            slots["product"] or "kettle",
            "may",
            3,
            bool(slots["upset"]),
        )
        out.append(
            " " + support.write_response(ticket, dict.fromkeys(support.DIMENSIONS, True), random.Random(0))
        )
    return out


def _cfg(tmp_path: Path, stage: str, model: Path, data: str, **extra: object) -> Path:
    cfg = {
        "stage": stage,
        "output_dir": str(tmp_path / f"{stage}-run"),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": data, "eval_fraction": 0.0, "max_length": 96},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 2, "max_steps": 2},
        **extra,
    }
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_policy_as_its_own_critic_then_sft_and_dpo_train_on_the_outputs(
    cli, tiny: Path, prompts_file: Path, tmp_path: Path
) -> None:  # noqa: ANN001
    """The acceptance path: a tiny local model is policy and critic; its SFT and pair artifacts train with
    `alignflow sft` and `alignflow dpo` (taken by artifact id in data.train)."""
    from alignflow.store import Store

    res = cli(
        "constitution", "run", "--policy", tiny, "--prompts", prompts_file, "--constitution", CONSTITUTION,
        "--critic", f"hf:{tiny}", "--rounds", "2", "--max-new-tokens", "12", "--critic-temperature", "1.0",
        "--min-chars", "2", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["prompts"] == 6 and r["revision_steps"] == 12 and r["rounds"] == 2
    assert r["revisions_taken"] + sum(r["revisions_refused"].values()) == 12
    assert sum(v["steps"] for v in r["by_principle"].values()) == 12
    # A randomly initialised model writes random tokens; sampled, they differ from its first answer
    assert r["examples_changed"] >= 1 and r["sft"] and r["pairs"]
    store = Store.open()
    sft = store.read_dataset(r["sft"]).to_pylist()
    pairs = store.read_dataset(r["pairs"]).to_pylist()
    assert len(sft) == len(pairs) == r["examples_changed"]
    # a random model's "revisions" are unrelated texts, not edits, and the report says so
    assert r["mean_overlap_taken"] < 0.2
    assert all(p["chosen"].strip() != p["rejected"].strip() for p in pairs)
    assert {s["prompt"] for s in sft} <= {
        json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()
    }
    store.close()

    res = cli("sft", _cfg(tmp_path, "sft", tiny, r["sft"]))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert [m["step"] for m in _metrics(tmp_path / "sft-run") if "loss" in m][-1] == 2
    res = cli("dpo", _cfg(tmp_path, "dpo", tiny, r["pairs"]))
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = [m["loss"] for m in _metrics(tmp_path / "dpo-run") if "loss" in m and m["step"] > 0]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1


def test_rule_critic_revisions_improve_gold_utility_and_lineage_reaches_the_constitution(
    cli, prompts_file: Path
) -> None:  # noqa: ANN001
    from alignflow.store import Store

    res = cli(
        "constitution", "run", "--policy", f"fn:{__name__}:vague_agent", "--prompts", prompts_file,
        "--constitution", CONSTITUTION, "--critic", f"fn:{__name__}:rule_critic", "--json",
        "--score", "alignflow.domains.support:gold_utility_batch",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["examples_changed"] == r["revisions_taken"] == 6 and r["share_changed"] == 1.0
    assert r["score"]["improved"] == 6 and r["score"]["mean_final"] > r["score"]["mean_original"] + 0.3
    store = Store.open()
    pairs = store.read_dataset(r["pairs"]).to_pylist()
    gain = [
        support.gold_utility(p["prompt"], p["chosen"]) - support.gold_utility(p["prompt"], p["rejected"])
        for p in pairs
    ]
    assert min(gain) > 0.3, gain
    step = r["examples"][0]["steps"][0]
    assert step["critique"].startswith(" the reply falls short on accuracy")
    assert step["principle"] in {"accurate", "professional", "concise", "empathetic"}

    sha = hashlib.sha256(CONSTITUTION.read_bytes()).hexdigest()
    res = cli("lineage", r["pairs"], "--format", "json")
    assert res.exit_code == 0, res.output
    graph = json.loads(res.stdout)
    roles = {e["role"]: e["parent"] for e in graph["edges"] if e["child"] == r["pairs"]}
    assert {"constitution", "policy", "critic", "prompts"} <= set(roles)
    const = graph["nodes"][roles["constitution"]]
    assert const["id"] == sha and const["kind"] == "constitution"
    assert const["meta"]["version"] == "1" and const["meta"]["sha256"] == sha
    assert graph["nodes"][roles["critic"]]["kind"] == "generator-spec"
    tree = cli("lineage", r["sft"])
    assert f"constitution support [{sha[:12]}]" in tree.stdout
    # the markdown report is stored next to the JSON one and says what happened
    md = next(a for a in store.find(kind="report") if a.name.endswith("-report.md"))
    text = store.path(md.id).read_text()
    assert "examples whose final text differs from the original: 6 (100.0%)" in text
    assert "The loop raised the reference score" in text and "were degenerate" not in text
    store.close()


def test_judge_decides_each_pair_in_both_orders(cli, prompts_file: Path) -> None:  # noqa: ANN001
    """`--judge`: a position-independent rubric (`longer`: the gold revision is always longer than the vague
    agent's reply) prefers every revision; a position-biased one (`first`) disagrees with itself across the
    two orders, so every pair is dropped."""
    base = [
        "constitution", "run", "--policy", f"fn:{__name__}:vague_agent", "--prompts", prompts_file,
        "--constitution", CONSTITUTION, "--critic", f"fn:{__name__}:rule_critic", "--json",
    ]  # fmt: skip
    res = cli(*base, "--judge", "rule:alignflow.judges.rubrics:longer")
    assert res.exit_code == 0, res.output + repr(res.exception)
    j = json.loads(res.stdout)["judge"]
    assert j == {"revision_preferred": 6, "original_preferred": 0, "tie_or_inconsistent": 0}
    res = cli(*base, "--judge", "rule:alignflow.judges.rubrics:first")
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["judge"] == {"revision_preferred": 0, "original_preferred": 0, "tie_or_inconsistent": 6}
    assert r["pairs"] is None and r["sft"]  # revisions still make SFT data; no pair survived the judge


GOOD_PRINCIPLE = {
    "name": "p",
    "critique": "{prompt}{response} Critique:",
    "revision": "{response} {critique} Rev:",
}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"principles": [GOOD_PRINCIPLE]}, r"bad.yaml: field 'name': must be a non-empty string"),
        ({"name": "x", "principles": []}, r":2: field 'principles': must be a non-empty list"),
        ({"name": "x", "principles": [GOOD_PRINCIPLE], "colour": 1}, r"field 'colour': unknown field"),
        (
            {"name": "x", "principles": [GOOD_PRINCIPLE, {"name": "q", "critique": "{response}"}]},
            r"field 'principles\[1\].revision': must be a non-empty prompt template",
        ),
        (
            {"name": "x", "principles": [{**GOOD_PRINCIPLE, "critique": "{respons} Critique:"}]},
            r"field 'principles\[0\].critique': unknown placeholder\(s\) \{respons\}",
        ),
        (
            {"name": "x", "principles": [{**GOOD_PRINCIPLE, "revision": "{response} Rev:"}]},
            r"field 'principles\[0\].revision': must contain \{critique\}",
        ),
        (
            {"name": "x", "principles": [GOOD_PRINCIPLE, GOOD_PRINCIPLE]},
            r"field 'principles\[1\].name': duplicate principle name 'p'",
        ),
        ({"name": "x", "principles": ["be nice"]}, r"field 'principles\[0\]': must be a mapping"),
    ],
)
def test_bad_constitution_files_are_clean_errors(
    cli, tmp_path: Path, prompts_file: Path, doc: dict, expected: str
) -> None:  # noqa: ANN001
    from alignflow.synth import ConstitutionError

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = cli(
        "constitution", "run", "--policy", f"fn:{__name__}:vague_agent", "--prompts", prompts_file,
        "--constitution", bad,
    )  # fmt: skip
    assert isinstance(res.exception, ConstitutionError), repr(res.exception)
    msg = str(res.exception)
    assert msg.startswith(str(bad)), msg
    assert re.search(expected, msg), msg


def test_unreadable_and_invalid_yaml_constitutions(cli, tmp_path: Path, prompts_file: Path) -> None:  # noqa: ANN001
    from alignflow.synth import ConstitutionError

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nprinciples:\n  - name: [unclosed\n")
    for path, expected in (
        (broken, rf"^{re.escape(str(broken))}:\d+: invalid YAML"),
        (tmp_path / "nope.yaml", "cannot read"),
    ):
        res = cli(
            "constitution", "run", "--policy", f"fn:{__name__}:vague_agent", "--prompts", prompts_file,
            "--constitution", path,
        )  # fmt: skip
        assert isinstance(res.exception, ConstitutionError) and re.search(expected, str(res.exception)), repr(
            res.exception
        )
    # the shipped constitution is valid and declares the demo's four principles
    from alignflow.synth import load_constitution

    c = load_constitution(CONSTITUTION)
    assert [p.name for p in c.principles] == ["accurate", "professional", "concise", "empathetic"]
    assert c.sha256 == hashlib.sha256(CONSTITUTION.read_bytes()).hexdigest() and c.version == "1"
