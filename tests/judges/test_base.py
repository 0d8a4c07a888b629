"""The judge interface: verdicts from scores, both-order combination, rubric judges through load_judge."""

from __future__ import annotations

import pytest

from alignflow.judges import JudgeError, Verdict, combine_orders, judge_pairs, load_judge


def test_verdict_from_scores_ranks_and_ties() -> None:
    v = Verdict.from_scores([1.0, 3.0, 2.0])
    assert (v.winner, v.ranking) == (1, (1, 2, 0))
    tie = Verdict.from_scores([2.0, 2.0])
    assert tie.winner is None and tie.confidence == 0.5
    with pytest.raises(JudgeError, match="finite"):
        Verdict.from_scores([float("nan"), 1.0])


def test_orders_agreeing_stand_and_disagreeing_become_ties_or_drops() -> None:
    fwd = Verdict(winner=0, ranking=(0, 1), confidence=0.8)
    rev_agree = Verdict(winner=1, ranking=(1, 0), confidence=0.6)  # (b, a): b's index 1 is a
    rev_disagree = Verdict(winner=0, ranking=(0, 1), confidence=0.9)
    ok = combine_orders(fwd, rev_agree)
    assert (ok.winner, ok.consistent, ok.dropped, ok.label) == (0, True, False, "A")
    assert ok.confidence == pytest.approx(0.7)
    tie = combine_orders(fwd, rev_disagree, "tie")
    assert (tie.winner, tie.consistent, tie.label) == (None, False, "tie")
    drop = combine_orders(fwd, rev_disagree, "drop")
    assert drop.dropped and drop.label is None


def test_longer_rubric_is_order_consistent_and_first_is_not() -> None:
    pairs = [("q", "short", "a much longer answer"), ("q", "a long long answer here", "brief")]
    longer = judge_pairs(load_judge("rule:alignflow.judges.rubrics:longer"), pairs)
    assert [p.label for p in longer] == ["B", "A"] and all(p.consistent for p in longer)
    first = judge_pairs(load_judge("rule:alignflow.judges.rubrics:first"), pairs)
    assert [p.label for p in first] == ["tie", "tie"] and not any(p.consistent for p in first)
    given = judge_pairs(load_judge("rule:alignflow.judges.rubrics:first"), pairs, orders="given")
    assert [p.label for p in given] == ["A", "A"] and given[0].consistent is None


def test_bad_specs_and_bad_rubric_output_are_clear_errors() -> None:
    with pytest.raises(JudgeError, match="expected one of"):
        load_judge("nope:x")
    with pytest.raises(JudgeError, match="unknown options"):
        load_judge("rule:alignflow.judges.rubrics:longer", template="x")
    j = load_judge("rule:builtins:len")  # len(prompt, candidates) -> TypeError is the rubric's own bug
    with pytest.raises(TypeError):
        j.judge("q", ["a", "b"])
    bad = load_judge("rule:alignflow.judges.rubrics:first")
    with pytest.raises(JudgeError, match="returns scores"):
        bad.score(["q"], ["a"])
    assert load_judge("rule:alignflow.judges.rubrics:longer").score(["q"], ["a b c"]) == [3.0]


def test_spec_options_after_hash() -> None:
    from alignflow.judges import split_spec

    assert split_spec("hf:DIR#mode=rubric, template=t.txt") == (
        "hf:DIR",
        {"mode": "rubric", "template": "t.txt"},
    )
    assert split_spec("openai:m@http://h:1/v1") == ("openai:m@http://h:1/v1", {})
    with pytest.raises(JudgeError, match="not key=value"):
        split_spec("rule:a:b#oops")
    with pytest.raises(JudgeError, match="unknown options"):
        load_judge("rule:alignflow.judges.rubrics:longer#x=1")


def test_agreement_with_humans_matches_sklearn_and_hand_counts() -> None:
    from sklearn.metrics import cohen_kappa_score

    from alignflow.quality.judges import judge_human_agreement

    judge = ["A", "B", "A", "tie", None, "B", "A", "A"]
    human = ["A", "B", "B", "A", "A", "B", "A", "B"]
    r = judge_human_agreement(judge, human, consistent=[True, True, True, False, False, True, True, True])
    # 7 scored: right on 0,1,5,6 (4), wrong on 2,7, tie on 3 -> (4 + 0.5) / 7
    assert r["n"] == 7 and r["dropped"] == 1
    assert r["accuracy"] == pytest.approx(4.5 / 7)
    kept = [i for i, x in enumerate(judge) if x is not None]
    assert r["kappa"] == pytest.approx(cohen_kappa_score([judge[i] for i in kept], [human[i] for i in kept]))
    assert r["kappa_ci"][0] <= r["kappa"] <= r["kappa_ci"][1]
    assert r["order_consistency"] == pytest.approx(6 / 8) and r["tie_rate"] == pytest.approx(1 / 7)


def test_bootstrap_kappa_equals_cohen_kappa_on_each_resample() -> None:
    import numpy as np

    from alignflow.quality.agreement import cohen_kappa
    from alignflow.quality.judges import bootstrap_kappa
    from alignflow.quality.schema import Undefined

    rng = np.random.default_rng(1)
    a = rng.choice(["A", "B", "tie"], 23, p=[0.5, 0.4, 0.1])
    b = np.where(rng.random(23) < 0.7, a, rng.choice(["A", "B"], 23))
    draws = np.random.default_rng(5)
    loop = [cohen_kappa(list(a[i]), list(b[i])) for i in (draws.integers(0, 23, 23) for _ in range(300))]
    want = [float(v) for v in loop if not isinstance(v, Undefined)]
    np.testing.assert_allclose(bootstrap_kappa(a, b, 300, seed=5), want, rtol=0, atol=1e-12)
    # A resample of one shared category has no kappa: left out, as cohen_kappa's Undefined is.
    same = np.array(["A", "A", "B"])
    got = bootstrap_kappa(same, same, 200, seed=0)
    idx = np.random.default_rng(0).integers(0, 3, (200, 3))
    assert len(got) == int((~(same[idx] == same[idx][:, :1]).all(axis=1)).sum()) < 200
