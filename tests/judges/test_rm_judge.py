"""``rm:CHECKPOINT`` judges on tiny encoder reward models: the verdict follows the rewards, the confidence is
the Bradley–Terry probability σ(|r_a − r_b|), and an ensemble's spread is its members' disagreement about the
margin (checked against each member scored on its own)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alignflow.judges import JudgeError, judge_pairs, load_judge
from alignflow.models import make_tiny_encoder_dir
from alignflow.models.reward import load_reward_scorer, write_ensemble

PAIRS = [
    ("How do I reset my password?", "Click 'forgot password' on the login page.", "No."),
    ("What is 2 + 2?", "4", "It is four, because two and two make four."),
    ("Say hi.", "hi there friend", "hello"),
    ("Name a colour.", "blue", "I would rather not answer that question."),
]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ensemble(root: Path, members: list[Path]) -> Path:
    root.mkdir(parents=True)
    names = []
    for i, m in enumerate(members):
        shutil.copytree(m, root / f"member-{i}")
        names.append(f"member-{i}")
    write_ensemble(root, names, backbone="encoder", max_length=48, max_prompt_length=24, eval_metrics={})
    return root


@pytest.fixture(scope="module")
def rms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rms")
    m0, m1 = make_tiny_encoder_dir(root / "m0", seed=0), make_tiny_encoder_dir(root / "m1", seed=1)
    return {
        "plain": m0,
        "ens": _ensemble(root / "ens", [m0, m1]),
        "only0": _ensemble(root / "only0", [m0]),
        "only1": _ensemble(root / "only1", [m1]),
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_a_single_reward_model_judges_by_reward_with_bradley_terry_confidence(rms) -> None:
    judge = load_judge(f"rm:{rms['plain']}")
    verdicts = judge.judge_many([(p, (a, b)) for p, a, b in PAIRS])
    mean, _ = load_reward_scorer(rms["plain"])(
        [p for p, _, _ in PAIRS] * 2, [a for _, a, _ in PAIRS] + [b for *_, b in PAIRS]
    )
    ra, rb = mean[: len(PAIRS)].tolist(), mean[len(PAIRS) :].tolist()
    assert (
        len({round(x - y, 6) for x, y in zip(ra, rb, strict=True)}) > 1
    )  # the rewards differ, so the test can fail
    for v, a, b in zip(verdicts, ra, rb, strict=True):
        assert v.winner == (0 if a > b else 1)
        assert v.scores == pytest.approx((a, b), abs=1e-5)
        assert v.confidence == pytest.approx(_sigmoid(abs(a - b)), abs=1e-6)
        assert v.spread is None  # one model, no disagreement to report
    # a reward model has no position bias: both orders always agree
    assert all(pv.consistent for pv in judge_pairs(judge, PAIRS))
    assert judge.pointwise and judge.score(["q"], ["a"]) == pytest.approx(
        load_reward_scorer(rms["plain"])(["q"], ["a"])[0].tolist(), abs=1e-6
    )


def test_an_ensembles_spread_is_the_std_of_its_members_margins(rms) -> None:
    judge = load_judge(f"rm:{rms['ens']}")
    members = [load_judge(f"rm:{rms[k]}") for k in ("only0", "only1")]
    items = [(p, (a, b)) for p, a, b in PAIRS]
    verdicts = judge.judge_many(items)
    per_member = [[v.scores for v in m.judge_many(items)] for m in members]  # each member on its own
    for i, v in enumerate(verdicts):
        a = np.mean([pm[i][0] for pm in per_member])
        b = np.mean([pm[i][1] for pm in per_member])
        assert v.scores == pytest.approx((a, b), abs=1e-5)
        assert v.confidence == pytest.approx(_sigmoid(abs(a - b)), abs=1e-5)
        w = v.winner
        margins = [pm[i][w] - pm[i][1 - w] for pm in per_member]
        assert v.spread == pytest.approx(float(np.std(margins)), abs=1e-5)
    assert max(v.spread for v in verdicts) > 0
    # three candidates: Plackett–Luce probability that the winner is best
    v3 = judge.judge(*PAIRS[0][:1], [PAIRS[0][1], PAIRS[0][2], "maybe"])
    s = np.array(v3.scores)
    assert v3.confidence == pytest.approx(float(np.exp(s).max() / np.exp(s).sum()), abs=1e-6)


def test_a_checkpoint_artifact_resolves_through_the_store_and_errors_are_clear(rms, store) -> None:
    aid = store.put_directory(rms["ens"], kind="checkpoint", name="tiny-rm")
    judge = load_judge("rm:tiny-rm", store)
    assert judge.artifact_id == aid and judge.judge(*PAIRS[1][:1], PAIRS[1][1:]).winner in (0, 1)
    with pytest.raises(JudgeError, match=r"unknown option\(s\) \['temperature'\]"):
        load_judge(f"rm:{rms['plain']}#temperature=2")
    with pytest.raises(JudgeError, match="option batch_size='x': expected a whole number"):
        load_judge(f"rm:{rms['plain']}#batch_size=x")
    with pytest.raises(JudgeError, match="is not a model folder"):
        load_judge("rm:/no/such/folder")
    with pytest.raises(JudgeError, match="item 0: no candidates"):
        load_judge(f"rm:{rms['plain']}").judge_many([("q", ())])
