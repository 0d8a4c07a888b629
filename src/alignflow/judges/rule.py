"""``rule:MODULE:FN``: a Python rubric as a judge.

``FN(prompt, candidates)`` returns one of: the winner's index (``int``), ``None`` for a tie, a sequence of
per-candidate scores (higher is better; equal top scores are a tie), or a :class:`~alignflow.judges.Verdict`.
A rubric that returns scores can also score a single response, so ``alignflow eval --scorer judge:rule:...``
works with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignflow.judges.base import BaseJudge, JudgeError, Verdict, register_backend


class RuleJudge(BaseJudge):
    def __init__(self, spec: str, fn: Any) -> None:
        self.spec = spec
        self.fn = fn

    def _verdict(self, out: Any, n: int, where: str) -> Verdict:
        if isinstance(out, Verdict):
            return out
        if out is None:
            return Verdict(winner=None, ranking=tuple(range(n)), confidence=0.5)
        if isinstance(out, bool):
            raise JudgeError(
                f"judge {self.spec!r}: {where}: returned a bool; expected an index, None or scores"
            )
        if isinstance(out, int):
            if not 0 <= out < n:
                raise JudgeError(
                    f"judge {self.spec!r}: {where}: winner {out} is not a candidate index (0..{n - 1})"
                )
            return Verdict(winner=out, ranking=(out, *[i for i in range(n) if i != out]))
        if isinstance(out, Sequence) and not isinstance(out, str):
            if len(out) != n:
                raise JudgeError(
                    f"judge {self.spec!r}: {where}: returned {len(out)} scores for {n} candidates"
                )
            try:
                return Verdict.from_scores(out)
            except (JudgeError, TypeError, ValueError) as exc:
                raise JudgeError(f"judge {self.spec!r}: {where}: {exc}") from None
        raise JudgeError(
            f"judge {self.spec!r}: {where}: returned {type(out).__name__}; expected an index, None, scores or a Verdict"
        )

    def judge(self, prompt: str, candidates: Sequence[str]) -> Verdict:
        return self._verdict(self.fn(prompt, list(candidates)), len(candidates), "item")

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]:
        return [self._verdict(self.fn(p, list(c)), len(c), f"item {i}") for i, (p, c) in enumerate(items)]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            v = self._verdict(self.fn(p, [r]), 1, f"response {i}")
            if v.scores is None:
                # A rubric shows whether it scores only when called: one that names a winner compares pairs.
                raise JudgeError(
                    f"judge {self.spec!r}: it compares pairs and cannot score single responses; scoring one "
                    "response needs a rubric that returns scores (or judge:rm:CKPT, or judge:hf:DIR#mode=rubric)"
                )
            out.append(v.scores[0])
        return out


def _build(rest: str, store: Any, device: str, options: dict[str, Any]) -> RuleJudge:
    from alignflow.rollout.rewards import import_callable

    if options:
        raise JudgeError(f"judge 'rule:{rest}': unknown options {sorted(options)}; a rubric takes none")
    if not rest or ":" not in rest:
        raise JudgeError(f"judge 'rule:{rest}': expected rule:MODULE:FN")
    return RuleJudge(f"rule:{rest}", import_callable(rest, f"judge 'rule:{rest}'"))


register_backend("rule", _build)
