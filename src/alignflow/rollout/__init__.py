"""On-policy rollouts: batched KV-cache sampling, reward sources and experience assembly."""

from alignflow.rollout.experience import (
    ForwardOut,
    RolloutTrees,
    RunningMoments,
    ShapingConfig,
    packable,
    response_forward,
    rollout_trees,
    shape_scores,
    tree_response_forward,
    tree_value_forward,
    value_forward,
)
from alignflow.rollout.generation import Rollout, prompt_position_ids, sample, top_p_filter
from alignflow.rollout.rewards import EnsembleScorer, RewardModelScorer, function_scorer, import_callable

__all__ = [
    "EnsembleScorer",
    "ForwardOut",
    "RewardModelScorer",
    "Rollout",
    "RolloutTrees",
    "RunningMoments",
    "ShapingConfig",
    "function_scorer",
    "import_callable",
    "packable",
    "prompt_position_ids",
    "response_forward",
    "rollout_trees",
    "sample",
    "shape_scores",
    "top_p_filter",
    "tree_response_forward",
    "tree_value_forward",
    "value_forward",
]
