"""`alignflow data synthesize` (self-instruct and evol): duplicates of the seeds and of each other are
filtered with counts, the result is a prompts dataset with lineage to the seeds and the generator, and a
tiny local model runs it end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from alignflow.data.curation.common import normalize_text

SEEDS = [
    "Write a reply to a customer whose kettle arrived broken and who wants a refund.",
    "Explain to a calm customer how long the warranty on the blender lasts.",
    "Tell an upset customer that order a512 is delayed and when it will arrive.",
    "Help a customer who forgot the password to their account log in again.",
]
NEW = "Draft a short apology to a customer whose headphones were sent to the wrong address."


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def seeds_file(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p}) + "\n" for i, p in enumerate(SEEDS)))
    return path


@pytest.fixture
def cli(sqlite_workspace):  # noqa: ANN001, ANN201
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def copycat(requests: list[str]) -> list[str]:
    """A self-instruct generator that mostly restates: per request, the first example verbatim, the first
    example with a word added (a near-duplicate), one new task, the new task again with other punctuation
    and case, and a fragment."""
    out = []
    for req in requests:
        first = re.search(r"Task 1: (.*)", req).group(1)
        out.append(f" {first}\nTask 6: {first} please\nTask 7: {NEW}\nTask 8: {NEW.upper()}!!\nTask 9: ok")
    return out


def evolver(requests: list[str]) -> list[str]:
    """An evol generator: 'constraints' returns the seed unchanged, 'deepen' echoes the template's marker,
    the others add a real constraint."""
    out = []
    for req in requests:
        given = req.split("#The Given Prompt#:\n", 1)[1].split("\n#Rewritten Prompt#", 1)[0]
        if "Add one more constraint" in req:
            out.append(given)
        elif "increase the depth" in req:
            out.append(f"#Rewritten Prompt#: {given}")
        else:
            out.append(
                f"{given} Answer in exactly three sentences, quote the order number, and offer a discount."
            )
    return out


def test_self_instruct_filters_copies_of_seeds_and_of_each_other(cli, seeds_file: Path) -> None:  # noqa: ANN001
    from alignflow.store import Store

    res = cli(
        "data", "synthesize", "--method", "self-instruct", "--seed-prompts", seeds_file,
        "--generator", f"fn:{__name__}:copycat", "--requests", "5", "--k", "3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = res.stdout
    # per request: verbatim seed, near seed, NEW, NEW restated, "ok" -> 25 candidates
    assert "5 requests -> 25 candidates" in out and "kept 1" in out
    counts = dict(re.findall(r"(\w+) (\d+)", out.split("dropped:", 1)[1].split(";", 1)[0]))
    counts = {k: int(v) for k, v in counts.items()}
    assert counts["too_short"] == counts["exact_dup_seed"] == 5
    # NEW is kept once: its 4 repeats and 5 restatements are exact duplicates; the reworded seeds are
    # near-duplicates of a seed (or exact copies of an earlier rewording when a request led with the same seed)
    assert counts["near_dup_seed"] >= 1 and counts["near_dup_seed"] + counts["exact_dup_other"] == 5 + 9
    assert sum(counts.values()) == 24
    aid = re.search(r"prompts -> ([0-9a-f]{64})", out).group(1)
    store = Store.open()
    rows = store.read_dataset(aid).to_pylist()
    assert [r["prompt"] for r in rows] == [NEW]
    meta = json.loads(rows[0]["meta"])
    assert (
        meta["synth"] == "self-instruct"
        and len(meta["seeds"]) == 3
        and set(meta["seeds"]) <= {"s0", "s1", "s2", "s3"}
    )
    info = store.get(aid)
    assert info.kind == "prompts" and info.meta["counts"]["kept"] == 1
    edges = {e["role"]: e["parent"] for e in store.lineage(aid).as_dict()["edges"] if e["child"] == aid}
    assert set(edges) == {"seeds", "generator"}
    assert store.read_dataset(edges["seeds"]).column("prompt").to_pylist() == SEEDS
    assert store.get(edges["generator"]).kind == "generator-spec"
    store.close()
    # --near 0 keeps near-duplicates (exact matching only): the reworded seed copies are then kept
    res = cli(
        "data", "synthesize", "--method", "self-instruct", "--seed-prompts", seeds_file,
        "--generator", f"fn:{__name__}:copycat", "--requests", "5", "--k", "3", "--near", "0", "--json",
    )  # fmt: skip
    r = json.loads(res.stdout)
    assert r["dropped"]["near_dup_seed"] == r["dropped"]["near_dup_other"] == 0 and r["kept"] > 1


def test_evol_filters_unchanged_and_template_copies(cli, seeds_file: Path) -> None:  # noqa: ANN001
    from alignflow.store import Store

    res = cli(
        "data", "synthesize", "--method", "evol", "--seed-prompts", seeds_file,
        "--generator", f"fn:{__name__}:evolver", "--requests", "12", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["candidates"] == 12 and r["kept"] + sum(r["dropped"].values()) == 12
    store = Store.open()
    rows = store.read_dataset(r["output"]).to_pylist()
    ops = [json.loads(x["meta"])["operation"] for x in rows]
    assert set(ops) <= {"concretize", "reasoning"} and len(rows) == r["kept"] >= 1
    assert r["dropped"]["exact_dup_seed"] >= 1 and r["dropped"]["template_copy"] >= 1
    seeds_norm = {normalize_text(s) for s in SEEDS}
    assert not any(normalize_text(x["prompt"]) in seeds_norm for x in rows)
    assert all(x["prompt"].endswith("offer a discount.") for x in rows)
    assert len({x["prompt"] for x in rows}) == len(rows)
    store.close()


def test_bad_method_and_empty_result(cli, seeds_file: Path) -> None:  # noqa: ANN001
    from alignflow.errors import ConfigError

    res = cli(
        "data", "synthesize", "--method", "magic", "--seed-prompts", seeds_file,
        "--generator", f"fn:{__name__}:copycat",
    )  # fmt: skip
    assert isinstance(res.exception, ConfigError) and "self-instruct, evol" in str(res.exception)
    res = cli(
        "data", "synthesize", "--method", "evol", "--seed-prompts", seeds_file,
        "--generator", f"fn:{__name__}:copycat_evol_identity", "--requests", "4",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "exact_dup_seed 4" in res.stdout and "nothing kept; no dataset written" in res.stdout


def copycat_evol_identity(requests: list[str]) -> list[str]:
    return [r.split("#The Given Prompt#:\n", 1)[1].split("\n#Rewritten Prompt#", 1)[0] for r in requests]


@pytest.mark.parametrize("method", ["self-instruct", "evol"])
def test_tiny_local_model_runs_end_to_end(cli, seeds_file: Path, tmp_path: Path, method: str) -> None:  # noqa: ANN001
    from alignflow.models import make_tiny_model_dir

    model = make_tiny_model_dir(
        tmp_path / "tiny", texts=SEEDS * 20, vocab_size=300, hidden_size=32, num_layers=1
    )
    res = cli(
        "data", "synthesize", "--method", method, "--seed-prompts", seeds_file, "--generator", f"hf:{model}",
        "--requests", "4", "--max-new-tokens", "24", "--min-chars", "3", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["requests"] == 4 and r["candidates"] >= 4 and r["generator"] == f"hf:{model}"
    assert r["kept"] + sum(r["dropped"].values()) == r["candidates"]
