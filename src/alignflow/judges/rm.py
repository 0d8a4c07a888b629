"""``rm:CHECKPOINT``: a reward model or ensemble as a judge.

``CHECKPOINT`` is an ``alignflow rm`` folder, a plain HF sequence-classification folder, or a checkpoint
artifact id/name (with a store). Each candidate gets its reward r (the members' mean, divided by the
checkpoint's fitted temperature, so gaps are calibrated log-odds); the winner has the highest. Under
Bradley–Terry (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1) P(a ≻ b) = σ(r_a − r_b), so a pair's
``confidence`` is σ(|r_a − r_b|); for n candidates it is the Plackett–Luce probability that the winner is
best, softmax(r)[winner], which is the same for n = 2. An ensemble's ``spread`` is the population std over
members of the winner-vs-runner-up margin r_w^k − r_2^k (each member's own margin: members that agree on the
order but not the scale disagree less than their per-response stds suggest). One model: ``spread`` None.

Options: ``batch_size`` (default 16), ``max_length`` (tokens; default what the checkpoint was trained with).
``judge_many`` scores every candidate of every item in one scorer call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignflow.judges.base import BaseJudge, JudgeError, Verdict, register_backend


class RewardModelJudge(BaseJudge):
    def __init__(self, spec: str, scorer: Any, artifact_id: str | None) -> None:
        from alignflow.feedback.services.items import scorer_member_rewards

        self.spec, self.scorer, self.artifact_id = spec, scorer, artifact_id
        self._member_rewards = scorer_member_rewards(scorer)

    def member_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``(M, N)`` float64 rewards, one row per ensemble member (temperature applied)."""
        if not responses:
            return np.zeros((len(self.scorer.members), 0))
        return self._member_rewards(list(prompts), list(responses))

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]:
        for i, (_, cands) in enumerate(items):
            if not cands:
                raise JudgeError(f"judge {self.spec!r}: item {i}: no candidates")
        prompts = [p for p, cands in items for _ in cands]
        responses = [c for _, cands in items for c in cands]
        rewards = self.member_rewards(prompts, responses)  # (M, N)
        out, start = [], 0
        for _, cands in items:
            block = rewards[:, start : start + len(cands)]  # (M, n)
            start += len(cands)
            out.append(self._verdict(block))
        return out

    def _verdict(self, block: np.ndarray) -> Verdict:
        mean = block.mean(0)  # (n,)
        if len(mean) == 1:
            return Verdict.from_scores(mean.tolist(), confidence=1.0)
        order = np.argsort(-mean, kind="stable")
        w, second = int(order[0]), int(order[1])
        z = mean - mean.max()
        confidence = float(np.exp(z[w]) / np.exp(z).sum())  # softmax: σ(|r_a − r_b|) for a pair
        spread = float((block[:, w] - block[:, second]).std()) if block.shape[0] > 1 else None
        v = Verdict.from_scores(mean.tolist(), confidence=confidence, spread=spread)
        if v.winner is None:  # an exact tie: Bradley–Terry says 0.5
            return Verdict(None, v.ranking, v.scores, 0.5, spread=spread)
        return v

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        rewards = self.member_rewards(prompts, responses).mean(0)
        return [float(r) for r in rewards]

    def describe(self) -> dict[str, Any]:
        return {"backend": "rm", "checkpoint": self.artifact_id or self.scorer.path}


def _int_option(options: dict[str, Any], key: str, default: int | None, spec: str) -> int | None:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise JudgeError(f"judge {spec!r}: option {key}={raw!r}: expected a whole number") from None
    if value < 1:
        raise JudgeError(f"judge {spec!r}: option {key}={value}: must be ≥ 1")
    return value


def resolve_folder(rest: str, store: Any, spec: str) -> tuple[Path, str | None]:
    """A model folder and its artifact id from a folder path or (with a store) a checkpoint artifact."""
    if not rest:
        raise JudgeError(f"judge {spec!r}: expected a model folder or checkpoint artifact after the prefix")
    if store is None:
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise JudgeError(
                f"judge {spec!r}: {rest!r} is not a model folder (artifact ids need a workspace)"
            )
        return path.resolve(), None
    from alignflow.rollout.generations import resolve_model_folder

    path, aid, _ = resolve_model_folder(store, rest, f"judge {spec!r}:")
    return path, aid


def _build(rest: str, store: Any, device: str, options: dict[str, Any]) -> RewardModelJudge:
    from alignflow.models.reward import load_reward_scorer

    spec = f"rm:{rest}"
    unknown = sorted(set(options) - {"batch_size", "max_length"})
    if unknown:
        raise JudgeError(f"judge {spec!r}: unknown option(s) {unknown}; known: ['batch_size', 'max_length']")
    path, aid = resolve_folder(rest, store, spec)
    scorer = load_reward_scorer(
        path,
        device=device,
        batch_size=_int_option(options, "batch_size", 16, spec) or 16,
        max_length=_int_option(options, "max_length", None, spec),
    )
    return RewardModelJudge(spec, scorer, aid)


register_backend("rm", _build)
