"""Scorers for evaluating policies, chosen by a spec string's prefix: ``rm:CKPT``, ``gold:MODULE:FN``,
``judge:SPEC``.

A :class:`Scorer` maps ``(prompts, responses)`` to one finite float per response, higher is better:

- ``rm:CKPT``: a reward model or ensemble (a folder, or a checkpoint artifact of ``alignflow rm``), through
  :func:`alignflow.models.reward.load_reward_scorer`; an ensemble scores with its members' mean. The score is
  the ``overall`` head; a multi-head checkpoint also gives every head's score (:meth:`LoadedScorer.by_head`,
  names in :attr:`LoadedScorer.heads`).
- ``gold:MODULE:FN``: ``FN(prompts, responses) -> list[float]`` imported from ``MODULE`` (a programmatic
  gold scorer, e.g. the demo's ``alignflow.domains.support:gold_utility_batch``).
- ``judge:SPEC``: an AI judge that scores one response on its own, built by
  :func:`alignflow.judges.load_judge` (``judge:rm:CKPT``, ``judge:hf:DIR#mode=rubric``,
  ``judge:openai:MODEL@URL#mode=rubric``, ``judge:rule:MODULE:FN`` with a score-returning rubric); a judge
  that only compares pairs is a clear error. Plug-ins registered with :func:`register_judge` under a
  prefix take precedence.

:func:`load_scorer` also returns the artifact the scores come from, so an evaluation's lineage reaches the
reward model, or a ``scorer`` record of the gold function (its spec and the SHA-256 of its source file).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from alignflow.errors import AlignflowError, ConfigError
from alignflow.rollout.generations import resolve_model_folder
from alignflow.rollout.rewards import import_callable
from alignflow.store import Store


@runtime_checkable
class Scorer(Protocol):
    """``scorer(prompts, responses)`` → one score per response (higher is better)."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


# (prompts, responses) -> (N, H) scores, one column per head
HeadScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class LoadedScorer:
    """A scorer with its spec (as given) and the artifact id that lineage edges point at.

    ``heads``: a multi-head reward model's head names (``overall`` first, the head ``score`` returns) and
    ``score_heads`` every head's scores; ``()`` and None for any other scorer.
    """

    spec: str
    score: Scorer
    artifact_id: str
    heads: tuple[str, ...] = ()
    score_heads: HeadScorer | None = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Scores as floats, checked: one per response, all finite (errors name the spec)."""
        if not responses:
            return []
        values = [float(v) for v in self.score(list(prompts), list(responses))]
        if len(values) != len(responses):
            raise ScorerError(
                f"--scorer {self.spec!r}: returned {len(values)} scores for {len(responses)} responses"
            )
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise ScorerError(
                f"--scorer {self.spec!r}: score {bad} is {values[bad]}; expected finite numbers"
            )
        return values

    def by_head(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Every head's scores, float64 ``(N, H)`` (columns as :attr:`heads`; column 0 is what ``self(...)``
        returns), checked: one row per response, all finite."""
        if self.score_heads is None:
            raise ScorerError(f"--scorer {self.spec!r}: not a multi-head reward model")
        if not responses:
            return np.zeros((0, len(self.heads)))
        values = np.asarray(self.score_heads(list(prompts), list(responses)), dtype=np.float64)
        if values.shape != (len(responses), len(self.heads)):
            raise ScorerError(
                f"--scorer {self.spec!r}: returned scores of shape {values.shape} for {len(responses)} "
                f"responses and {len(self.heads)} heads"
            )
        bad = np.argwhere(~np.isfinite(values))
        if bad.size:
            i, h = bad[0]
            raise ScorerError(
                f"--scorer {self.spec!r}: head {self.heads[h]!r} score {i} is {values[i, h]}; expected finite"
            )
        return values


class ScorerError(AlignflowError):
    """A scorer spec cannot be loaded, or a scorer returned something other than one finite score each."""


# (the spec after "judge:", the store, the device) -> (scorer, artifact id for lineage)
JudgeFactory = Callable[[str, Store, str], tuple[Scorer, str]]
_JUDGES: dict[str, JudgeFactory] = {}


def register_judge(prefix: str, factory: JudgeFactory) -> None:
    """Install a judge backend: ``judge:<prefix>[:rest]`` specs are built by ``factory(spec, store, device)``,
    where ``spec`` is everything after ``judge:``."""
    if not prefix or ":" in prefix:
        raise ValueError(f"judge backend prefix must be a non-empty name without ':', got {prefix!r}")
    _JUDGES[prefix] = factory


def judge_backends() -> list[str]:
    """Prefixes of the installed judge backends."""
    return sorted(_JUDGES)


def _rm(rest: str, spec: str, store: Store, device: str) -> LoadedScorer:
    from alignflow.models.reward import load_reward_scorer

    if not rest:
        raise ScorerError(
            f"--scorer {spec!r}: expected rm:CKPT (a reward-model folder or checkpoint artifact)"
        )
    path, aid, _ = resolve_model_folder(store, rest, f"--scorer {spec!r}:")
    reward = load_reward_scorer(path, device=device)

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        mean, _std = reward(prompts, responses)
        return mean.tolist()

    if len(reward.heads) < 2:
        return LoadedScorer(spec=spec, score=score, artifact_id=aid)

    def score_heads(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        mean, _std = reward.score_heads(prompts, responses)  # (N, H)
        return mean.double().numpy()

    return LoadedScorer(spec, score, aid, tuple(reward.heads), score_heads)


def _gold(rest: str, spec: str, store: Store) -> tuple[Scorer, str]:
    fn = import_callable(rest, f"--scorer {spec!r}")
    record = {"scorer": "gold", "spec": rest}
    try:
        source = Path(inspect.getfile(fn))
        record |= {"source": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    except (TypeError, OSError):  # a builtin or C function has no source file to fingerprint
        pass
    return fn, store.put_json(record, kind="scorer", name=f"gold:{rest}")


def _judge(rest: str, spec: str, store: Store, device: str) -> tuple[Scorer, str]:
    """``judge:SPEC``: a plug-in registered with :func:`register_judge` under SPEC's prefix, else the judge
    :func:`alignflow.judges.load_judge` builds (``rm:``, ``hf:``, ``openai:``, ``rule:``). Only a judge that
    scores one response on its own (``judge.pointwise``: a reward model, a rubric-mode LM) can be a scorer.
    The ``scorer`` record holds the spec, its ``#`` options and the judge's own description, and links to the
    judge's model artifact. An ``api_key`` option must be an ``${ENV:...}`` reference (a literal key is
    refused), and errors show the spec with any literal key replaced by ``***``."""
    from alignflow.judges import JudgeError, backends, load_judge, split_spec

    spec = re.sub(r"(api_key=)(?!\$\{ENV:)[^,]*", r"\1***", spec)
    backend = rest.split(":", 1)[0]
    if backend in _JUDGES:
        return _JUDGES[backend](rest, store, device)
    if backend not in backends():
        raise ScorerError(
            f"--scorer {spec!r}: unknown judge backend {backend!r}; installed: "
            f"{', '.join(sorted({*judge_backends(), *backends()}))}"
        )
    try:
        judge = load_judge(rest, store, device)
    except JudgeError as exc:
        raise ScorerError(f"--scorer {spec!r}: {exc}") from None
    if not getattr(judge, "pointwise", False):
        raise ScorerError(
            f"--scorer {spec!r}: judge {judge.spec!r} compares pairs and cannot score single responses; "
            "use a judge that scores one response (judge:rm:CKPT, or judge:hf:DIR#mode=rubric)"
        )
    base, options = split_spec(rest)
    describe = getattr(judge, "describe", None)
    record = {
        "scorer": "judge",
        "spec": base,
        "options": options,
        **(describe() if callable(describe) else {}),
    }
    model_aid = getattr(judge, "artifact_id", None)
    parents = [(model_aid, "judge_model")] if model_aid else []
    aid = store.put_json(record, kind="scorer", name=f"judge:{base}", parents=parents)

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        try:
            return judge.score(prompts, responses)  # type: ignore[attr-defined]
        except JudgeError as exc:
            raise ScorerError(f"--scorer {spec!r}: {exc}") from None

    return score, aid


def load_scorer(spec: str, store: Store, device: str = "cpu") -> LoadedScorer:
    """Build the scorer a spec names (see the module docstring); errors name the spec and what was expected."""
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in ("rm", "gold", "judge"):
        raise ConfigError(f"--scorer {spec!r}: expected rm:CKPT, gold:MODULE:FN or judge:SPEC")
    if prefix == "rm":
        return _rm(rest, spec, store, device)
    if prefix == "gold":
        score, aid = _gold(rest, spec, store)
    else:
        score, aid = _judge(rest, spec, store, device)
    return LoadedScorer(spec=spec, score=score, artifact_id=aid)


__all__ = [
    "HeadScorer",
    "JudgeFactory",
    "LoadedScorer",
    "Scorer",
    "ScorerError",
    "judge_backends",
    "load_scorer",
    "register_judge",
]
