"""Combining reward heads, and Lagrange multipliers for constrained RLHF.

Moskovitz et al. 2023, "Confronting Reward Model Overoptimization with Constrained RLHF": instead of one fixed
weighting of several reward models (here: the heads of one reward model, or the keys of a reward function),
maximise the weighted objective subject to ``E[r_i] >= threshold_i`` for each constrained head ``i``. Its
Lagrangian ``L(pi, lambda) = E[sum_h w_h r_h] + sum_i lambda_i (E[r_i] - threshold_i)`` is maximised over the
policy and minimised over ``lambda >= 0``. For the policy the thresholds are constants, so its reward is

    r = sum_h w_h r_h + sum_i lambda_i r_i

(:func:`combine_heads` divides it by the total weight), and between policy updates each multiplier takes a
projected gradient step on ``L`` (:class:`LagrangeMultipliers`): ``lambda_i`` grows while constraint ``i`` is
violated and shrinks toward 0 once it holds, so a constrained head weighs more exactly while the policy trades
it away.

Shapes: ``B`` responses, ``H`` heads. Everything here is pure: no models, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

REFERENCE = "reference"
_CONSTRAINT_RE = re.compile(r"^\s*>=\s*(?P<rhs>\S+)\s*$")


def parse_constraint(spec: str) -> float | None:
    """``">= reference"`` → ``None`` (the threshold is measured on the reference policy); ``">= 0.5"`` → 0.5.

    Raises ValueError naming the accepted forms for anything else (``"<= 1"``, ``">= lots"``, ``"nan"``).
    """
    m = _CONSTRAINT_RE.match(spec)
    if m is not None:
        rhs = m.group("rhs")
        if rhs == REFERENCE:
            return None
        try:
            value = float(rhs)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
    raise ValueError(f"expected '>= reference' or '>= <number>', got {spec!r}")


def combine_heads(
    scores: Tensor, heads: Sequence[str], weights: Mapping[str, float], multipliers: Mapping[str, float]
) -> Tensor:
    """The Lagrangian reward of constrained RLHF, normalised by its total weight.

    ``r = (sum_h w_h r_h + sum_i lambda_i r_i) / (sum_h w_h + sum_i lambda_i)``

    The numerator is the policy's reward in Moskovitz et al. (2023)'s Lagrangian. The division by the total
    weight is ours (we could not confirm a normalised variant in the paper): it makes the reward a convex
    combination of the heads, so it keeps the heads' scale while the multipliers move, and reward shaping,
    clipping and the KL coefficient mean the same at every step. A head may appear in both mappings; a head
    in neither does not count.

    Args:
        scores: ``(B, H)`` per-head rewards, columns in the order of ``heads``.
        heads: the ``H`` head names.
        weights: ``{head: w_h >= 0}``, at least one positive.
        multipliers: ``{head: lambda_i >= 0}``, one per constrained head.

    Returns:
        ``(B,)`` combined reward, the dtype of ``scores``.
    """
    if scores.dim() != 2 or scores.shape[1] != len(heads):
        raise ValueError(
            f"scores must be (B, {len(heads)}) for heads {list(heads)}, got {tuple(scores.shape)}"
        )
    coef = torch.zeros(len(heads), dtype=torch.float64)
    for name, values in (("weights", weights), ("multipliers", multipliers)):
        for head, value in values.items():
            if head not in heads:
                raise ValueError(f"{name}: unknown head {head!r}; heads are {list(heads)}")
            if not value >= 0:
                raise ValueError(f"{name}[{head!r}] must be >= 0, got {value!r}")
            coef[list(heads).index(head)] += float(value)
    total = float(coef.sum())
    if not total > 0:
        raise ValueError(f"the weights and multipliers sum to {total}; at least one weight must be positive")
    return scores @ (coef / total).to(scores.dtype)  # (B, H) @ (H,) -> (B,)


class LagrangeMultipliers:
    """One multiplier per constraint ``E[r_i] >= threshold_i``, updated by projected gradient steps on the dual.

    ``lambda_i <- clip(lambda_i - lr * (mean r_i - threshold_i), 0, max_value)``

    (``mean r_i - threshold_i`` is ``dL / dlambda_i``; the multipliers minimise the Lagrangian, the policy
    maximises it.)
    ``mean r_i`` is the batch mean of head ``i``'s raw reward under the current policy: the multiplier rises
    by ``lr`` per unit of violation while the mean is below the threshold, and falls toward 0 by ``lr`` per
    unit of slack once it is above. The cap keeps a constraint the policy cannot meet from swamping the
    objective. Values are Python floats, so ``state_dict`` survives a JSON round trip exactly.

    Args:
        thresholds: ``{head: threshold_i}``.
        lr: dual step size (> 0).
        init: every multiplier's initial value, in ``[0, max_value]``.
        max_value: the cap (> 0).
    """

    def __init__(
        self, thresholds: Mapping[str, float], lr: float, init: float = 0.0, max_value: float = 10.0
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not max_value > 0:
            raise ValueError(f"max_value must be > 0, got {max_value!r}")
        if not 0 <= init <= max_value:
            raise ValueError(f"init must be in [0, max_value={max_value}], got {init!r}")
        for head, value in thresholds.items():
            if not math.isfinite(value):
                raise ValueError(f"threshold for {head!r} must be finite, got {value!r}")
        self.thresholds = {h: float(t) for h, t in thresholds.items()}
        self.lr, self.max_value = float(lr), float(max_value)
        self._values = {h: float(init) for h in self.thresholds}

    @property
    def values(self) -> dict[str, float]:
        """``{head: lambda_i}``, a copy."""
        return dict(self._values)

    def update(self, head_means: Mapping[str, float]) -> dict[str, float]:
        """One dual step from this batch's mean raw reward per constrained head; returns the new values."""
        missing = sorted(set(self.thresholds) - set(head_means))
        if missing:
            raise ValueError(f"no batch mean for constrained head(s) {missing}")
        for head, threshold in self.thresholds.items():
            violation = threshold - float(head_means[head])  # > 0 while the constraint is violated
            self._values[head] = min(max(self._values[head] + self.lr * violation, 0.0), self.max_value)
        return self.values

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "values": dict(self._values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore thresholds and values; the constrained heads must be the ones this object was built with."""
        if set(state["thresholds"]) != set(self.thresholds) or set(state["values"]) != set(self.thresholds):
            saved, configured = sorted(state["thresholds"]), sorted(self.thresholds)
            raise ValueError(f"saved constraints on {saved} but configured on {configured}")
        self.thresholds = {h: float(t) for h, t in state["thresholds"].items()}
        self._values = {h: float(v) for h, v in state["values"].items()}


__all__ = ["REFERENCE", "LagrangeMultipliers", "combine_heads", "parse_constraint"]
