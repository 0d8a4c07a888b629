"""AI judges: one interface (``judge(prompt, candidates) -> Verdict``) over rubric, reward-model, local-LM and
OpenAI-compatible backends, with both-order position-bias control. See :mod:`alignflow.judges.base`."""

from alignflow.judges.base import (
    BaseJudge,
    Judge,
    JudgeError,
    PairVerdict,
    Verdict,
    backends,
    combine_orders,
    judge_pairs,
    load_judge,
    register_backend,
    split_spec,
)

__all__ = [
    "BaseJudge",
    "Judge",
    "JudgeError",
    "PairVerdict",
    "Verdict",
    "backends",
    "combine_orders",
    "judge_pairs",
    "load_judge",
    "register_backend",
    "split_spec",
]
