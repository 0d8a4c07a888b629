"""On-policy rollouts: batched KV-cache sampling, forwards over rollout rows, experience, reward sources."""

from alignflow.rollout.experience import (
    AdvantageSpec,
    Experience,
    RunningMoments,
    ShapingConfig,
    explained_variance,
    make_experience,
    shape_scores,
)
from alignflow.rollout.forward import (
    Forwarder,
    ForwardOut,
    RolloutRows,
    RolloutTrees,
    packable,
    response_forward,
    rollout_trees,
    tree_response_forward,
    tree_value_forward,
    value_forward,
)
from alignflow.rollout.generation import Rollout, prompt_position_ids, sample, top_p_filter
from alignflow.rollout.rewards import EnsembleScorer, RewardModelScorer, function_scorer, import_callable

__all__ = [
    "AdvantageSpec",
    "EnsembleScorer",
    "Experience",
    "ForwardOut",
    "Forwarder",
    "RewardModelScorer",
    "Rollout",
    "RolloutRows",
    "RolloutTrees",
    "RunningMoments",
    "ShapingConfig",
    "explained_variance",
    "function_scorer",
    "import_callable",
    "make_experience",
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
