"""``openai:MODEL@BASE_URL`` judges against the fake OpenAI-compatible server (``alignflow.judges.testing``),
always through the official ``openai`` client: verdicts, the reply cache, retries, timeouts, malformed
replies, the budget, the concurrency limit, and the API key never leaking."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from alignflow.judges import JudgeError, judge_pairs, load_judge, templates
from alignflow.judges.testing import FakeOpenAI, longer_wins, pairwise_policy, serve

SECRET = "sk-test-9f8e7d6c5b4a39281706"
PAIRS = [(f"question {i}", "short answer", "a much longer answer " * (1 + i % 3)) for i in range(5)] + [
    (f"question {i}", "a much longer answer here", "short") for i in range(5, 8)
]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)


def make_judge(fake: FakeOpenAI, cache: Path | None, **options: object):  # noqa: ANN201
    opts = {"api_key": "${ENV:JUDGE_TEST_KEY}", "cache_dir": str(cache) if cache else "none"} | options
    tail = ",".join(f"{k}={v}" for k, v in opts.items())
    return load_judge(f"openai:judge@{fake.base_url}#{tail}")


def test_verdicts_both_orders_and_a_rerun_from_the_cache_sends_nothing(tmp_path: Path) -> None:
    with serve(FakeOpenAI(api_key=SECRET, logprob=0.8)) as fake:
        judge = make_judge(fake, tmp_path / "cache")
        out = judge_pairs(judge, PAIRS)
        assert fake.requests == 2 * len(PAIRS)  # each pair asked in both orders
        assert [v.label for v in out] == ["B"] * 5 + ["A"] * 3
        assert all(v.consistent for v in out)
        # confidence from the first token's top_logprobs: 0.8 for the answer, (1 - 0.8) / 12 for "B"/"A"
        rest = 0.2 / 12
        assert out[0].confidence == pytest.approx(0.8 / (0.8 + rest))
        assert out[0].forward.scores == pytest.approx((math.log(rest), math.log(0.8)))
        # a re-run (a new judge, as a new process would build) answers everything from the cache
        again = make_judge(fake, tmp_path / "cache")
        assert [v.label for v in judge_pairs(again, PAIRS)] == [v.label for v in out]
        assert fake.requests == 2 * len(PAIRS)
        assert again.endpoint.stats == {"requests_sent": 0, "attempts": 0, "cache_hits": 16, "retries": 0}
        # the template is part of the key: another template is another request
        tpl = tmp_path / "mine.txt"
        tpl.write_text(Path(templates.__file__).with_name("pairwise.txt").read_text() + "Be brief.\n")
        judge_pairs(make_judge(fake, tmp_path / "cache", template=tpl), PAIRS[:1])
        assert fake.requests == 2 * len(PAIRS) + 2


def test_without_logprobs_the_text_decides_and_confidence_is_none(tmp_path: Path) -> None:
    with serve(FakeOpenAI(policy=pairwise_policy(lambda p, a, b: "tie" if "3" in p else "B"))) as fake:
        judge = make_judge(fake, None, logprobs="false")
        out = judge_pairs(judge, PAIRS[:4], orders="given")
        assert [v.label for v in out] == ["B", "B", "B", "tie"]
        assert out[0].confidence is None and out[3].confidence == 0.5
        assert "logprobs" not in fake.bodies[0] and fake.bodies[0]["temperature"] == 0


def test_429s_and_500s_are_retried_with_backoff(tmp_path: Path) -> None:
    with serve(FakeOpenAI(fail_first=2, fail_status=429)) as fake:
        judge = make_judge(fake, None, max_retries=3)
        assert judge.judge("q", ["one", "one two"]).winner == 1
        assert fake.requests == 3
        assert judge.endpoint.stats["retries"] == 2
    with serve(FakeOpenAI(fail_first=1, fail_status=500)) as fake:
        assert make_judge(fake, None).judge("q", ["one two", "one"]).winner == 0
        assert fake.requests == 2
    with serve(FakeOpenAI(fail_first=10, fail_status=429)) as fake:
        with pytest.raises(JudgeError, match=r"item 0: HTTP 429 after 2 attempts: Rate limit"):
            make_judge(fake, None, max_retries=1).judge("q", ["a", "b"])
        assert fake.requests == 2


def test_timeouts_are_retried_then_a_clear_error(tmp_path: Path) -> None:
    with serve(FakeOpenAI(delay=2.0, delay_first=1)) as fake:  # only the first attempt is slow
        assert make_judge(fake, None, timeout=0.3, max_retries=1).judge("q", ["a b", "a"]).winner == 0
        assert fake.requests == 2
    with serve(FakeOpenAI(delay=2.0)) as fake:
        with pytest.raises(JudgeError, match=r"item 0: timed out after 0.3 s on each of 2 attempts"):
            make_judge(fake, None, timeout=0.3, max_retries=1).judge("q", ["a", "b"])
        assert fake.requests == 2


def test_a_malformed_reply_is_an_error_naming_the_item_and_good_replies_are_kept(tmp_path: Path) -> None:
    rule = {"bad": True}

    def flaky(prompt: str, a: str, b: str) -> str:
        return (
            "Well, it depends on the user"
            if rule["bad"] and prompt == "question 2"
            else longer_wins(prompt, a, b)
        )

    with serve(FakeOpenAI(policy=pairwise_policy(flaky))) as fake:
        judge = make_judge(fake, tmp_path / "cache")
        with pytest.raises(
            JudgeError, match=r"item 2: expected a reply starting with 'A', 'B' or 'tie', got 'Well"
        ):
            judge_pairs(judge, PAIRS[:4], orders="given")
        assert fake.requests == 4
        rule["bad"] = False  # the server is fixed: only the rejected item is asked again
        assert [v.label for v in judge_pairs(judge, PAIRS[:4], orders="given")] == ["B"] * 4
        assert fake.requests == 5
    for kind, named in (("empty_choices", "malformed reply: no choices"), ("not_json", "item 0")):
        with serve(FakeOpenAI(malformed=kind)) as fake:
            with pytest.raises(JudgeError, match=named):
                make_judge(fake, None, max_retries=0).judge("q", ["a", "b"])


def test_the_budget_counts_sent_requests_and_cached_items_cost_nothing(tmp_path: Path) -> None:
    with serve() as fake:
        with pytest.raises(JudgeError) as info:
            judge_pairs(make_judge(fake, tmp_path / "c", budget=3), PAIRS[:2])
        msg = str(info.value)
        assert "request budget of 3 exceeded: 0 sent so far, 4 more needed" in msg
        assert "cached items cost nothing" in msg
        assert fake.requests == 0  # refused before sending anything
        judge = make_judge(fake, tmp_path / "c", budget=5)
        judge_pairs(judge, PAIRS[:2])
        assert fake.requests == 4
        with pytest.raises(JudgeError, match="4 sent so far, 2 more needed"):
            judge_pairs(judge, PAIRS[2:3])
        judge_pairs(make_judge(fake, tmp_path / "c", budget=0), PAIRS[:2])  # all cached: free
        assert fake.requests == 4


def test_the_concurrency_limit_bounds_requests_in_flight(tmp_path: Path) -> None:
    pairs = [(f"q{i}", "a", "a b") for i in range(12)]
    for limit in (1, 4):
        with serve(FakeOpenAI(delay=0.05)) as fake:
            judge_pairs(make_judge(fake, None, concurrency=limit), pairs, orders="given")
            assert fake.requests == 12
            assert fake.max_in_flight <= limit
            if limit > 1:
                assert fake.max_in_flight > 1


def test_rubric_mode_scores_single_responses(tmp_path: Path) -> None:
    def rate(messages: list[dict]) -> str:
        return "8" if "good" in messages[-1]["content"] else "3/10"

    with serve(FakeOpenAI(policy=rate)) as fake:
        judge = make_judge(fake, None, mode="rubric")
        assert judge.pointwise
        assert judge.score(["q", "q"], ["a good one", "meh"]) == [8.0, 3.0]
        v = judge.judge("q", ["meh", "good", "meh"])
        assert v.winner == 1 and v.scores == (3.0, 8.0, 3.0)
    assert not make_judge(FakeOpenAI(base_url="http://127.0.0.1:1/v1"), None).pointwise


def test_the_api_key_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-0123456789abcdef")
    with serve(FakeOpenAI(api_key=SECRET)) as fake:
        judge = make_judge(fake, tmp_path / "cache")
        judge_pairs(judge, PAIRS[:2])
        # the server echoes a wrong key in its 401 message (worse than OpenAI, which masks it)
        with pytest.raises(JudgeError) as info:
            make_judge(fake, None, api_key="${ENV:WRONG_KEY}").judge("q", ["a", "b"])
        assert "authentication failed (401)" in str(info.value) and "${ENV:WRONG_KEY}" in str(info.value)
        assert "sk-wrong" not in str(info.value) and "***" in str(info.value)
        with pytest.raises(JudgeError, match="environment variable NO_SUCH_KEY is not set"):
            make_judge(fake, None, api_key="${ENV:NO_SUCH_KEY}")
        with pytest.raises(JudgeError, match=r"must be an \$\{ENV:NAME\} reference") as literal:
            make_judge(fake, None, api_key=SECRET)
        assert SECRET not in str(literal.value)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(JudgeError, match="OPENAI_API_KEY is not set"):  # the default reference
            load_judge(f"openai:judge@{fake.base_url}")
        seen = [repr(judge), repr(judge.endpoint), judge.spec, str(judge.endpoint.stats)]
    out, err = capfd.readouterr()
    stored = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert stored  # the cache was written
    for text in (caplog.text, out, err, stored, *seen):
        assert SECRET not in text and "sk-wrong" not in text


def test_bad_specs_and_options_are_clear_errors() -> None:
    with pytest.raises(JudgeError, match=r"expected openai:MODEL@BASE_URL"):
        load_judge("openai:gpt-4o-mini")
    with pytest.raises(JudgeError, match=r"unknown option\(s\) \['tempature'\]"):
        load_judge("openai:m@http://x/v1#tempature=0")
    with pytest.raises(JudgeError, match=r"option timeout='soon': expected a float"):
        load_judge("openai:m@http://x/v1#timeout=soon,api_key=${ENV:JUDGE_TEST_KEY}")
    with pytest.raises(JudgeError, match=r"concurrency must be ≥ 1"):
        load_judge("openai:m@http://x/v1#concurrency=0,api_key=${ENV:JUDGE_TEST_KEY}")


def test_a_corrupt_cache_entry_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    import json

    with serve() as fake:
        judge_pairs(make_judge(fake, tmp_path / "c"), PAIRS[:2], orders="given")
        entries = sorted((tmp_path / "c").rglob("*.json"))
        assert len(entries) == 2 and fake.requests == 2
        entries[0].write_text('{"content": "A", "top_lo')  # a torn write
        judge_pairs(make_judge(fake, tmp_path / "c"), PAIRS[:2], orders="given")
        assert fake.requests == 3  # only the corrupt entry was asked again
        assert json.loads(entries[0].read_text())["content"] in ("A", "B")
