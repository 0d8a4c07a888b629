"""Synthetic per-head reward functions for the `reward.combine` tests: `fn(prompts, responses) -> {head: [...]}`.

Head `a` is `lowercase_fraction` (about 0.55 for the tiny model at init, learnable), head `b` is
`digit_fraction` (a few percent at init), so `b >= 0.5` is violated and `a >= 0` is satisfied. `CALLS` records the rows of every
call (a test resets it); `SIGTERM_AT_CALL = n` makes the n-th call send this process SIGTERM, which the recipe
turns into a checkpoint at the end of the step (a real graceful stop, in-process).
"""

from __future__ import annotations

import os
import signal

from alignflow.rollout.toy import digit_fraction, lowercase_fraction

CALLS: list[int] = []
SIGTERM_AT_CALL: int | None = None


def ab(prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
    CALLS.append(len(responses))
    if SIGTERM_AT_CALL is not None and len(CALLS) == SIGTERM_AT_CALL:
        os.kill(os.getpid(), signal.SIGTERM)
    return {"a": lowercase_fraction(prompts, responses), "b": digit_fraction(prompts, responses)}
