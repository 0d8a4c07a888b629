"""Rule-based rewards with a known optimum, for tests, examples and smoke runs (`reward.fn: ...`).

Each takes ``(prompts, responses)`` and returns one float per response, the signature of ``reward.fn``.
"""

from __future__ import annotations


def digit_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of non-space characters of the response that are digits (0 for an empty response).

    Optimum 1.0: answer only in digits. A randomly initialised tiny model scores a few percent.
    """
    out = []
    for r in responses:
        chars = [c for c in r if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """``1 / (1 + n_words)``: shorter responses score higher; the empty response (EOS at once) scores 1."""
    return [1.0 / (1.0 + len(r.split())) for r in responses]


def lowercase_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are ASCII lowercase letters (0 for an empty response).

    Dense and quickly learnable: a random tiny model scores roughly a third (its BPE merges are mostly
    lowercase words, its single-byte tokens mostly not), the optimum is 1.0.
    """
    return [sum("a" <= c <= "z" for c in r) / len(r) if r else 0.0 for r in responses]
