"""`alignflow rm-eval`: the statistics by hand, the reference test sets, and the command on a tiny reward model.

The tiny reward model is a 2-layer BERT (hidden 16) with the packaged MiniLM tokenizer, trained for two steps by
`alignflow rm` (so its folder has `ensemble.json`: mean pooling, the whole response kept, a fitted temperature).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from alignflow.models import make_tiny_encoder_dir

REPO = Path(__file__).resolve().parents[2]
LLMBAR_FIXTURE = REPO / "tests" / "quality" / "fixtures" / "llmbar_natural_60.json"


# ---------------------------------------------------------------------------------------------------------------------
# statistics by hand


def test_wilson_interval_by_hand() -> None:
    from alignflow.evaluate.rm_eval import wilson_interval

    # 8 of 10: p = 0.8, z^2 = 3.8415; centre = (0.8 + 0.19207) / 1.38415, half = 1.96 sqrt(0.0256037) / 1.38415
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(
        0.0
    )
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_fit_temperature_recovers_the_hand_derived_scale() -> None:
    from alignflow.evaluate.rm_eval import fit_temperature

    # Gaps +2, +2, +2, -2: the NLL is minimal where sigmoid(2 / T) = 3/4, i.e. T = 2 / ln 3.
    assert fit_temperature([2.0, 2.0, 2.0, -2.0]) == pytest.approx(2 / math.log(3), rel=1e-4)
    # An overconfident model (gaps x10) gets T x10; all-zero gaps carry no scale.
    assert fit_temperature([20.0, 20.0, 20.0, -20.0]) == pytest.approx(20 / math.log(3), rel=1e-4)
    assert fit_temperature([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([1.0, float("nan")])


def test_summarize_counts_ties_and_rewardbench_sections_by_hand() -> None:
    from alignflow.evaluate.rm_eval import rewardbench_scores, summarize

    chosen = np.array([1.0, 0.5, 0.0, 3.0, 1.0, 2.0])
    rejected = np.array([0.0, 0.5, 1.0, 1.0, 0.0, 0.0])  # gaps 1, 0 (tie), -1, 2, 1, 2
    subsets = ["mt-bench-hard", "mt-bench-hard", "llmbar-natural", "llmbar-natural", "mine", "mine"]
    s = summarize(chosen, rejected, subsets)
    assert s["overall"] | {} == s["overall"] and s["overall"]["n"] == 6 and s["overall"]["ties"] == 1
    assert s["overall"]["accuracy"] == pytest.approx(4.5 / 6)
    by = {r["name"]: r for r in s["subsets"]}
    assert by["mt-bench-hard"]["accuracy"] == 0.75 and by["mt-bench-hard"]["ties"] == 1
    assert by["llmbar-natural"]["accuracy"] == 0.5 and by["mine"]["accuracy"] == 1.0
    # Chat Hard = (37 * 0.75 + 100 * 0.5) / 137 (RewardBench's counts); "mine" is its own group; score = mean.
    chat_hard = (37 * 0.75 + 100 * 0.5) / 137
    assert s["rewardbench"]["sections"] == pytest.approx({"Chat Hard": chat_hard, "other": 1.0})
    assert s["rewardbench"]["score"] == pytest.approx((chat_hard + 1.0) / 2)
    # math-prm is weighted 984 against 164 per code subset, as RewardBench does.
    rb = rewardbench_scores({"math-prm": 1.0, "hep-go": 0.0}, {"math-prm": 447, "hep-go": 164})
    assert rb["sections"]["Reasoning"] == pytest.approx(984 / (984 + 164))
    assert sum(s["margin_histogram"]["counts"]) == 6 and s["ece"] >= 0
    assert sum(b["count"] for b in s["reliability"]) == 6


def test_reference_pairs_llmbar_and_pandalm(tmp_path: Path) -> None:
    from alignflow.errors import DataFormatError
    from alignflow.evaluate.rm_eval import reference_pairs

    rows = reference_pairs("llmbar", LLMBAR_FIXTURE)
    raw = json.loads(LLMBAR_FIXTURE.read_text())
    assert len(rows) == len(raw) == 60
    for row, rec in zip(rows, raw, strict=True):
        assert row["chosen"] == rec[f"output_{rec['label']}"] and row["prompt"] == rec["input"]
        assert row["subset"] == "llmbar-natural"
    panda = tmp_path / "panda.json"
    base = {"instruction": "Fix it.", "input": "teh cat", "response1": "the cat", "response2": "teh cat"}
    panda.write_text(
        json.dumps(
            [
                {**base, "idx": 1, "annotator1": 1, "annotator2": 1, "annotator3": 2, "cmp_key": "a_b"},
                {**base, "idx": 2, "annotator1": 0, "annotator2": 0, "annotator3": 1, "cmp_key": "a_b"},
                {**base, "idx": 3, "annotator1": 0, "annotator2": 1, "annotator3": 2, "cmp_key": "a_b"},
                {**base, "idx": 4, "annotator1": 2, "annotator2": 2, "annotator3": 2, "cmp_key": "c_d"},
                {**base, "idx": 5, "response2": True, "annotator1": 1, "annotator2": 1, "annotator3": 1},
            ]
        )
    )
    rows = reference_pairs("pandalm", panda)
    # Left out: a tie majority, no majority, a response that is not text (PandaLM has JSON booleans).
    assert [r["id"] for r in rows] == ["pandalm-1", "pandalm-4"]
    assert rows[0]["chosen"] == "the cat" and rows[1]["chosen"] == "teh cat"
    assert rows[0]["prompt"] == "Fix it.\n\nteh cat" and rows[1]["subset"] == "c_d"
    with pytest.raises(DataFormatError, match="unknown reference"):
        reference_pairs("nope", panda)


# ---------------------------------------------------------------------------------------------------------------------
# the command on a tiny reward model


def _pair_rows(n: int) -> list[dict[str, str]]:
    good = ["a polite safe reply", "a careful helpful answer", "a kind refusal with a reason"]
    bad = ["a rude harmful reply", "a careless dangerous answer", "an insult and nothing else"]
    return [
        {
            "id": f"p{i}",
            "prompt": f"Human: question number {i} about request {i % 7}?\n\nAssistant:",
            "chosen": f" {good[i % 3]} {i}",
            "rejected": f" {bad[i % 3]} {i}",
        }
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`alignflow rm` on the tiny encoder, two steps: an rm folder with ensemble.json and a fitted temperature."""
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    root = tmp_path_factory.mktemp("tiny-rm")
    model = make_tiny_encoder_dir(root / "bert")
    data = _jsonl(root / "pairs.jsonl", _pair_rows(64))
    cfg = {
        "stage": "rm",
        "output_dir": str(root / "run"),
        "model": {"path": str(model), "dtype": "float32", "backbone": "encoder"},
        "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 48},
        "temperature": {"fraction": 0.25},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 8, "max_steps": 2},
    }
    (root / "rm.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: its own workspace, nothing left in os.environ
        mp.setenv("ALIGNFLOW_HOME", str(root / "ws"))
        mp.delenv("ALIGNFLOW_DB_URL", raising=False)
        res = CliRunner().invoke(app, ["rm", str(root / "rm.yaml")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    spec = json.loads((root / "run" / "final" / "ensemble.json").read_text())
    assert spec["pooling"] == "mean" and spec["keep_completion"] is True and spec["temperature"] > 0
    return root / "run" / "final"


def _rm_eval(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    return CliRunner().invoke(app, ["rm-eval", *[str(a) for a in args]])


def test_rm_eval_rewardbench_rows_with_subsets(tiny_rm: Path, sqlite_workspace, tmp_path: Path) -> None:
    from alignflow.evaluate.rm_eval import rewardbench_scores, subset_result
    from alignflow.models.reward import load_reward_scorer
    from alignflow.store import Store

    rows = _pair_rows(12)
    for i, r in enumerate(rows):
        r["subset"] = ["llmbar-natural", "refusals-dangerous", "my-own"][i % 3]
    pairs = _jsonl(tmp_path / "rb.jsonl", rows)
    res = _rm_eval(tiny_rm, "--pairs", pairs, "--subset-field", "subset", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "llmbar-natural" in res.output and "RewardBench score" in res.output

    ev = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    # Scores are the checkpoint scorer's (temperature-scaled); statistics recomputed from them by hand.
    scorer = load_reward_scorer(tiny_rm)
    c = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])[0].numpy()
    rj = scorer([r["prompt"] for r in rows], [r["rejected"] for r in rows])[0].numpy()
    got = {s["id"]: (s["chosen"], s["rejected"], s["subset"]) for s in ev["scores"]}
    for i, r in enumerate(rows):
        assert got[r["id"]][:2] == pytest.approx((c[i], rj[i]), abs=1e-5) and got[r["id"]][2] == r["subset"]
    gap = c - rj
    by = {s["name"]: s for s in ev["subsets"]}
    for name in ("llmbar-natural", "refusals-dangerous", "my-own"):
        idx = [i for i, r in enumerate(rows) if r["subset"] == name]
        assert by[name]["n"] == 4 and by[name]["accuracy"] == subset_result(name, gap[idx]).accuracy
    want = rewardbench_scores({k: v["accuracy"] for k, v in by.items()}, {k: v["n"] for k, v in by.items()})
    assert ev["rewardbench"]["sections"] == pytest.approx(want["sections"])
    assert set(want["sections"]) == {"Chat Hard", "Safety", "other"}
    assert ev["rewardbench"]["score"] == pytest.approx(want["score"])
    assert ev["temperature"] == scorer.temperature != 1.0
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("<svg") == 2 and "Reliability diagram" in html and "my-own" in html

    store = Store.open(sqlite_workspace)
    try:
        info = store.get(ev["checkpoint_id"])
        found = [a for a in store.lineage(ev["dataset_id"], direction="down").nodes.values()]
        evals = [a for a in found if a.kind == "rm_evaluation"]
        assert len(evals) == 1 and evals[0].meta["accuracy"] == ev["overall"]["accuracy"]
        graph = store.lineage(evals[0].id, direction="up", max_depth=1)
        roles = {(p, role) for p, child, role in graph.edges if child == evals[0].id}
        assert roles == {(info.id, "checkpoint"), (ev["dataset_id"], "pairs")}
    finally:
        store.close()


def test_rm_eval_hh_transcripts_and_trl_pairs_agree_and_ties_count(
    tiny_rm: Path, sqlite_workspace, tmp_path: Path
) -> None:
    rows = _pair_rows(10)
    # Two responses identical in their first 40 tokens: at --max-length 24 the response is cut to the same
    # tokens on both sides (kept from the start), so the reward model must tie on that pair.
    shared = " ".join(f"word{k}" for k in range(40))
    rows.append(
        {
            "id": "tie",
            "prompt": "Human: same?\n\nAssistant:",
            "chosen": f" {shared} yes",
            "rejected": f" {shared} no",
        }
    )
    trl = _jsonl(tmp_path / "trl.jsonl", rows)
    hh = _jsonl(
        tmp_path / "hh.jsonl",
        [
            {"id": r["id"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in rows
        ],
    )
    a = _rm_eval(tiny_rm, "--pairs", trl, "--out", tmp_path / "a", "--max-length", "24")
    b = _rm_eval(tiny_rm, "--pairs", hh, "--out", tmp_path / "b", "--max-length", "24")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output + repr(a.exception) + repr(b.exception)
    ea = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    eb = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert "subsets" not in ea and "rewardbench" not in ea and ea["max_length"] == 24
    assert ea["overall"]["n"] == eb["overall"]["n"] == 11
    assert ea["overall"]["ties"] >= 1 and ea["overall"]["ties"] == eb["overall"]["ties"]
    tie = next(s for s in ea["scores"] if s["id"] == "tie")
    assert tie["chosen"] == tie["rejected"]
    # HH transcripts split at the last "\n\nAssistant:" give the same pairs up to the reply's leading space,
    # which the tokenizer ignores: identical scores.
    sa = {s["id"]: (s["chosen"], s["rejected"]) for s in ea["scores"]}
    sb = {s["id"]: (s["chosen"], s["rejected"]) for s in eb["scores"]}
    assert sa.keys() == sb.keys() and all(sa[k] == pytest.approx(sb[k], abs=1e-5) for k in sa)
    assert ea["overall"]["accuracy"] == eb["overall"]["accuracy"]


def test_rm_eval_bad_files_are_clean_errors(tiny_rm: Path, sqlite_workspace, tmp_path: Path) -> None:
    from alignflow.errors import AlignflowError

    rows = _pair_rows(3)
    for r in rows:
        r["subset"] = "s"
    del rows[1]["subset"]
    no_subset = _jsonl(tmp_path / "nosub.jsonl", rows)
    res = _rm_eval(tiny_rm, "--pairs", no_subset, "--subset-field", "subset", "--out", tmp_path / "o")
    assert isinstance(res.exception, AlignflowError)
    assert f"{no_subset}:2: field 'subset': missing" in str(res.exception)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_pair_rows(1)[0]) + "\n" + '{"prompt": "q", "rejected": "b"}\n')
    res = _rm_eval(tiny_rm, "--pairs", broken, "--out", tmp_path / "o")
    assert isinstance(res.exception, AlignflowError) and f"{broken}:2: field 'chosen'" in str(res.exception)

    (tmp_path / "empty").mkdir()
    res = _rm_eval(
        tmp_path / "empty", "--pairs", _jsonl(tmp_path / "ok.jsonl", _pair_rows(2)), "--out", tmp_path / "o"
    )
    assert isinstance(res.exception, AlignflowError)  # not a reward-model folder

    # Through the real entry point: exit 2 and one line, no traceback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignflow.cli.main",
            "rm-eval",
            str(tiny_rm),
            "--pairs",
            str(broken),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"{broken}:2: field 'chosen'" in proc.stderr
