"""Which model serves a request: a model by name, or an experiment's arm.

Order for an experiment: its segment rules first (the first rule that matches pins the request to its
model), else a weighted arm. With a user id (the request's `user`, else the `X-User-Id` header) the arm is
sticky: u = the first 8 bytes of sha256("<experiment>\\0<user>") read as an integer / 2**64, a point in [0, 1)
that falls into one arm's share of the cumulative normalised weights, so a user keeps their arm for as long as
the arms and weights stay the same, in every process. Without a user id each request draws a random arm.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from alignflow.serving.config import DeployConfig, Experiment


@dataclass(frozen=True)
class Route:
    model: str  # the deploy.yaml model that serves the request
    arm: str | None  # None when the request named a model directly
    experiment: str | None
    reason: Literal["direct", "segment", "sticky", "random"]


class UnknownModel(LookupError):
    """The request's `model` is neither a model nor an experiment of the config (the gateway's 404)."""


def unit_hash(experiment: str, user: str) -> float:
    """sha256(experiment NUL user) -> [0, 1), uniform, stable across processes and runs."""
    digest = hashlib.sha256(f"{experiment}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_arm(exp: Experiment, u: float) -> int:
    """The index of the arm whose share of the cumulative normalised weights holds `u` in [0, 1)."""
    total = sum(a.weight for a in exp.arms)
    edge = 0.0
    for i, arm in enumerate(exp.arms):
        edge += arm.weight / total
        if u < edge:
            return i
    return len(exp.arms) - 1  # u within rounding of 1.0


def segment_value(field: str, request: Mapping[str, object], tags: Mapping[str, str]) -> str | None:
    """The value a segment rule tests: `tag.<k>`, `metadata.<k>` (the request's metadata map), or a field."""
    prefix, _, key = field.partition(".")
    if prefix == "tag" and key:
        return tags.get(key.lower())  # header names arrive lower-cased
    if prefix == "metadata" and key:
        meta = request.get("metadata")
        value = meta.get(key) if isinstance(meta, Mapping) else None
    else:
        value = request.get(field)
    return None if value is None else str(value)


class Router:
    def __init__(self, cfg: DeployConfig, rng: random.Random | None = None) -> None:
        self.models = {m.name for m in cfg.models}
        self.experiments = {e.name: e for e in cfg.experiments}
        self._rng = rng or random.Random()

    def route(
        self,
        requested: str,
        user: str | None,
        request: Mapping[str, object],
        tags: Mapping[str, str] | None = None,
    ) -> Route:
        if requested in self.models:
            return Route(model=requested, arm=None, experiment=None, reason="direct")
        exp = self.experiments.get(requested)
        if exp is None:
            raise UnknownModel(requested)
        for i, seg in enumerate(exp.segments):
            if seg.matches(segment_value(seg.field, request, tags or {})):
                arm_name = self._arm_of(exp, seg.model, i)
                return Route(model=seg.model, arm=arm_name, experiment=exp.name, reason="segment")
        if user:
            arm = exp.arms[pick_arm(exp, unit_hash(exp.name, user))]
            return Route(model=arm.model, arm=arm.name, experiment=exp.name, reason="sticky")
        arm = exp.arms[pick_arm(exp, self._rng.random())]
        return Route(model=arm.model, arm=arm.name, experiment=exp.name, reason="random")

    @staticmethod
    def _arm_of(exp: Experiment, model: str, segment_index: int) -> str:
        """A pinned request reports the arm serving its model, or `segment-<i>` if no arm does."""
        return next((a.name for a in exp.arms if a.model == model), f"segment-{segment_index}")
