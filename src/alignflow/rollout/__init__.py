"""On-policy rollouts: batched KV-cache sampling, reward sources and experience assembly."""

from alignflow.rollout.experience import (
    ForwardOut,
    RunningMoments,
    ShapingConfig,
    response_forward,
    shape_scores,
    value_forward,
)
from alignflow.rollout.generation import Rollout, prompt_position_ids, sample, top_p_filter
from alignflow.rollout.rewards import EnsembleScorer, RewardModelScorer, function_scorer, import_callable

__all__ = [
    "EnsembleScorer",
    "ForwardOut",
    "RewardModelScorer",
    "Rollout",
    "RunningMoments",
    "ShapingConfig",
    "function_scorer",
    "import_callable",
    "prompt_position_ids",
    "response_forward",
    "sample",
    "shape_scores",
    "top_p_filter",
    "value_forward",
]
