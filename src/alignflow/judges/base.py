"""The judge interface: ``judge(prompt, candidates) -> Verdict``, position-bias control, and spec loading.

A judge compares candidate responses to one prompt. Backends (one module each, chosen by a spec's prefix):

- ``rule:MODULE:FN`` — a Python rubric (:mod:`alignflow.judges.rule`);
- ``rm:CHECKPOINT`` — a reward model or ensemble (:mod:`alignflow.judges.rm`);
- ``hf:MODEL_DIR`` — a local causal LM, verdict-token log-probabilities or a 1–10 rubric score
  (:mod:`alignflow.judges.hf`);
- ``openai:MODEL@BASE_URL`` — an OpenAI-compatible endpoint through the official client
  (:mod:`alignflow.judges.openai`).

Backend options follow ``#`` as ``key=value`` pairs: ``hf:models/judge#mode=rubric,template=my.txt``
(:func:`split_spec`).

LLM judges prefer whichever answer is shown first (Zheng et al. 2023, "Judging LLM-as-a-judge", §3.4), so
:func:`judge_pairs` asks every pair in both orders: agreeing verdicts stand, disagreeing ones become ties or
are dropped (``on_inconsistent``), and each :class:`PairVerdict` says which happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from alignflow.errors import AlignflowError


class JudgeError(AlignflowError):
    """A judge spec cannot be loaded, or a judge returned something that is not a verdict (the message names
    the spec and the item)."""


@dataclass(frozen=True)
class Verdict:
    """One judgment of ``n`` candidates for one prompt.

    ``winner``: index of the best candidate, or None for a tie / no preference.
    ``ranking``: candidate indices, best first (a tie between two: ``(0, 1)``).
    ``scores``: per-candidate scores, higher is better, when the backend has them (rubric score, reward,
      verdict-token log-probability); None otherwise.
    ``confidence``: the judge's probability that ``winner`` is better than the rest, in [0.5, 1] for a pair;
      0.5 for a tie; None when the backend gives no confidence.
    ``dimensions``: per-dimension winners (``{"accuracy": 0, "tone": None}``), when asked for.
    ``rationale``: the judge's explanation, when it gives one.
    ``spread``: disagreement among ensemble members (std of the Bradley–Terry margin), when there is one.
    """

    winner: int | None
    ranking: tuple[int, ...]
    scores: tuple[float, ...] | None = None
    confidence: float | None = None
    dimensions: dict[str, int | None] = field(default_factory=dict)
    rationale: str | None = None
    spread: float | None = None

    @classmethod
    def from_scores(
        cls, scores: Sequence[float], *, tie_tol: float = 0.0, confidence: float | None = None, **kw: Any
    ) -> Verdict:
        """Winner and ranking from per-candidate scores; a top-two gap ≤ ``tie_tol`` is a tie."""
        vals = [float(s) for s in scores]
        if not vals or any(not math.isfinite(v) for v in vals):
            raise JudgeError(f"scores must be finite numbers, one per candidate; got {list(scores)!r}")
        ranking = tuple(sorted(range(len(vals)), key=lambda i: (-vals[i], i)))
        tie = len(vals) > 1 and vals[ranking[0]] - vals[ranking[1]] <= tie_tol
        return cls(
            winner=None if tie else ranking[0],
            ranking=ranking,
            scores=tuple(vals),
            confidence=0.5 if tie and confidence is None else confidence,
            **kw,
        )


@runtime_checkable
class Judge(Protocol):
    """What every backend provides. ``spec`` is the string it was built from (secrets never included)."""

    spec: str

    def judge(self, prompt: str, candidates: Sequence[str]) -> Verdict: ...

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]: ...


class BaseJudge:
    """Loops :meth:`judge` for :meth:`judge_many`; backends that batch override ``judge_many``.

    A backend that can score one response on its own (a reward model, a rubric score) also overrides
    :meth:`score`, which is what ``alignflow eval --scorer judge:SPEC`` calls.
    """

    spec: str = ""

    def judge(self, prompt: str, candidates: Sequence[str]) -> Verdict:
        return self.judge_many([(prompt, candidates)])[0]

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]:
        return [self.judge(p, c) for p, c in items]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise JudgeError(f"judge {self.spec!r} compares responses; it cannot score one response on its own")

    @property
    def pointwise(self) -> bool:
        return type(self).score is not BaseJudge.score


OnInconsistent = Literal["tie", "drop"]
Orders = Literal["both", "given"]


@dataclass(frozen=True)
class PairVerdict:
    """A pair judged in the given order and, with ``orders="both"``, reversed.

    ``winner`` is 0 (``a``), 1 (``b``), None (tie), in the given order; ``dropped`` is True when the two
    orders disagreed and ``on_inconsistent="drop"`` (``winner`` is then None and the pair carries no label).
    ``consistent``: the two orders named the same winner (None when only one order was asked).
    ``confidence``: the mean of the two orders' confidences in ``winner`` (0.5 for a tie).
    """

    winner: int | None
    confidence: float | None
    consistent: bool | None
    dropped: bool
    forward: Verdict
    reverse: Verdict | None

    @property
    def label(self) -> str | None:
        """The platform's pairwise label: ``"A"``, ``"B"``, ``"tie"``, or None when dropped."""
        if self.dropped:
            return None
        return {0: "A", 1: "B", None: "tie"}[self.winner]


def _confidence_for(v: Verdict, winner: int | None) -> float | None:
    if v.confidence is None:
        return None
    if winner is None:
        return 0.5
    return v.confidence if v.winner == winner else 1.0 - v.confidence


def combine_orders(
    forward: Verdict, reverse: Verdict | None, on_inconsistent: OnInconsistent = "tie"
) -> PairVerdict:
    """One pair verdict from the ``(a, b)`` verdict and the ``(b, a)`` verdict (whose indices are flipped
    back here): agreement stands; disagreement is a tie or a drop."""
    if on_inconsistent not in ("tie", "drop"):
        raise JudgeError(f"on_inconsistent must be 'tie' or 'drop', got {on_inconsistent!r}")
    if reverse is None:
        return PairVerdict(
            forward.winner, _confidence_for(forward, forward.winner), None, False, forward, None
        )
    back = None if reverse.winner is None else 1 - reverse.winner
    flipped = replace(reverse, winner=back)
    if back == forward.winner:
        confs = [c for c in (_confidence_for(forward, back), _confidence_for(flipped, back)) if c is not None]
        conf = sum(confs) / len(confs) if confs else None
        return PairVerdict(back, conf, True, False, forward, reverse)
    dropped = on_inconsistent == "drop"
    return PairVerdict(None, 0.5, False, dropped, forward, reverse)


def judge_pairs(
    judge: Judge,
    pairs: Sequence[tuple[str, str, str]],
    orders: Orders = "both",
    on_inconsistent: OnInconsistent = "tie",
) -> list[PairVerdict]:
    """Judge ``(prompt, a, b)`` triples; with ``orders="both"`` each is also judged as ``(prompt, b, a)``
    in the same batch, and the two verdicts are combined by :func:`combine_orders`."""
    if orders not in ("both", "given"):
        raise JudgeError(f"orders must be 'both' or 'given', got {orders!r}")
    items: list[tuple[str, Sequence[str]]] = [(p, (a, b)) for p, a, b in pairs]
    if orders == "both":
        items += [(p, (b, a)) for p, a, b in pairs]
    verdicts = judge.judge_many(items)
    if len(verdicts) != len(items):
        raise JudgeError(f"judge {judge.spec!r} returned {len(verdicts)} verdicts for {len(items)} items")
    n = len(pairs)
    for i, v in enumerate(verdicts):
        if not isinstance(v, Verdict) or (v.winner is not None and v.winner not in (0, 1)):
            raise JudgeError(
                f"judge {judge.spec!r}: item {i % n}: expected a verdict on 2 candidates, got {v!r}"
            )
    return [
        combine_orders(verdicts[i], verdicts[n + i] if orders == "both" else None, on_inconsistent)
        for i in range(n)
    ]


# prefix -> factory(rest_of_spec, store, device, options) -> Judge
JudgeBackend = Callable[[str, Any, str, dict[str, Any]], Judge]
_BACKENDS: dict[str, JudgeBackend] = {}


def register_backend(prefix: str, factory: JudgeBackend) -> None:
    """Install a judge backend under ``prefix`` (``rule``, ``rm``, ``hf``, ``openai``, or a plug-in's)."""
    if not prefix or ":" in prefix:
        raise ValueError(f"judge backend prefix must be a non-empty name without ':', got {prefix!r}")
    _BACKENDS[prefix] = factory


def backends() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def _load_builtin() -> None:
    # Imported on first use so that `import alignflow.judges` pulls in neither torch nor openai.
    import importlib

    for mod in ("rule", "rm", "hf", "openai"):
        try:
            importlib.import_module(f"alignflow.judges.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"alignflow.judges.{mod}":
                raise


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"hf:DIR#mode=rubric,template=t.txt"`` → ``("hf:DIR", {"mode": "rubric", "template": "t.txt"})``.

    Options after ``#`` are ``key=value`` pairs separated by commas; values stay strings (each backend
    converts and checks its own). ``#`` never occurs in a base URL's path, so it cannot be confused with one.
    """
    base, sep, tail = spec.partition("#")
    options: dict[str, str] = {}
    if sep:
        for part in tail.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise JudgeError(f"judge {base!r}: option {part!r} after '#' is not key=value")
            options[key.strip()] = value.strip()
    return base, options


def load_judge(spec: str, store: Any = None, device: str = "cpu", **options: Any) -> Judge:
    """Build the judge a spec names. Options come from the spec's ``#key=value,...`` tail and from
    ``options`` (which win); they are backend settings (template, timeout, cache dir, ...), and an option a
    backend does not know is an error naming it."""
    spec, from_spec = split_spec(spec)
    options = from_spec | options
    prefix, sep, rest = spec.partition(":")
    _load_builtin()
    if not sep or prefix not in _BACKENDS:
        raise JudgeError(
            f"judge {spec!r}: expected one of {', '.join(p + ':...' for p in sorted(_BACKENDS))}"
        )
    return _BACKENDS[prefix](rest, store, device, dict(options))
