"""Small rubrics for ``rule:`` judges: baselines and test fixtures, not good judges.

``longer``: prefers the longer response (the length bias a reward model is prone to; a baseline every judge
should beat). ``first``: always prefers the first candidate shown — a deliberately position-biased judge, for
checking that the position-bias controls catch one.
"""

from __future__ import annotations

from collections.abc import Sequence


def longer(prompt: str, candidates: Sequence[str]) -> list[float]:
    return [float(len(c.split())) for c in candidates]


def first(prompt: str, candidates: Sequence[str]) -> int:
    return 0
