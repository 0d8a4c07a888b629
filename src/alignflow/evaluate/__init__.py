"""Evaluation: bootstrap CIs and win rates, reward-model accuracy and calibration, reward-hacking detection,
and the self-contained HTML report. Pure NumPy except `report` (matplotlib, imported only when used)."""

from alignflow.evaluate.hacking import detect_reward_hacking
from alignflow.evaluate.reward import (
    bt_probability,
    calibration,
    gold_agreement,
    preference_accuracy,
    preference_metrics,
)
from alignflow.evaluate.stats import bootstrap_mean_ci, paired_diff_ci, win_rate

__all__ = [
    "bootstrap_mean_ci",
    "bt_probability",
    "calibration",
    "detect_reward_hacking",
    "gold_agreement",
    "paired_diff_ci",
    "preference_accuracy",
    "preference_metrics",
    "win_rate",
]
