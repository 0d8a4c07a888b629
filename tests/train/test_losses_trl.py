"""Parity of alignflow.train.losses with TRL 1.16's own implementations, float64, random inputs, several shapes.

TRL 1.16 keeps most losses inside trainer methods rather than standalone functions, so those methods are
called on lightweight instances (``object.__new__(Trainer)`` with the attributes the method reads set by
hand) and a stand-in model that returns pre-drawn per-token log-probs. The arithmetic exercised is TRL's own
code, unmodified.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignflow.train.losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    simpo_loss,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo")
trl_cpo = pytest.importorskip("trl.experimental.cpo")
trl_utils = pytest.importorskip("trl.trainer.utils")

TOL = 1e-6
SEEDS = [11, 12, 13]
SHAPES = [(1, 4), (3, 7), (8, 16)]  # (pairs, tokens)


class _Accelerator:
    """Single-process stand-in: gathers are identities."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


class _FakeLM:
    """Returns pre-drawn outputs keyed by the identity of the ``input_ids`` tensor it is called with."""

    training = False

    def __init__(self, table: dict[int, SimpleNamespace]):
        self.table = table

    def __call__(self, input_ids=None, **kwargs):
        return self.table[input_ids.data_ptr()]


def _lm_outputs(per_token_logps: torch.Tensor) -> SimpleNamespace:
    n, t = per_token_logps.shape
    return SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros(n, t, dtype=per_token_logps.dtype),
        mean_logits=torch.zeros(n, t, dtype=per_token_logps.dtype),
        is_top1=torch.zeros(n, t, dtype=torch.bool),
        logits=per_token_logps,
    )


def _random_pair_batch(seed: int, pairs: int, tokens: int):
    """Token ids, completion masks of random lengths (>= 1) and per-token log-probs for a [chosen; rejected] batch."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.randint(0, 50, (n, tokens), generator=g)
    prompt_len = torch.randint(1, max(2, tokens // 2), (n,), generator=g)
    positions = torch.arange(tokens).expand(n, tokens)
    completion_mask = (positions >= prompt_len.unsqueeze(1)).long()
    per_token = -3 * torch.rand(n, tokens - 1, generator=g, dtype=torch.float64) * completion_mask[:, 1:]
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * tokens
    return ids, completion_mask, per_token, ref


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, ids, completion_mask, per_token, ref):
    pairs = ids.shape[0] // 2
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.model = _FakeLM({ids.data_ptr(): _lm_outputs(per_token)})
    trainer.accelerator = _Accelerator()
    trainer.aux_loss_enabled = False
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False
    trainer._total_train_tokens = 0
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    loss = trainer._compute_loss(trainer.model, inputs, False)
    metrics = trainer._metrics["eval"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_family_matches_trl(seed, shape, loss_type, label_smoothing):
    ids, completion_mask, per_token, ref = _random_pair_batch(seed, *shape)
    beta = 0.1 + 0.05 * (seed % 3)
    want_loss, want_rc, want_rr = _trl_dpo(
        loss_type, beta, label_smoothing, ids, completion_mask, per_token, ref
    )

    pairs = shape[0]
    logps = per_token.sum(dim=1)
    lengths = completion_mask.sum(dim=1)  # TRL's IPO divides by the unshifted completion-mask count
    loss, rc, rr = dpo_loss(
        loss_type,
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:pairs] if loss_type == "ipo" else None,
        rejected_lengths=lengths[pairs:] if loss_type == "ipo" else None,
    )
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want_loss.item()) <= TOL
    assert abs(rc.mean().item() - want_rc) <= TOL
    assert abs(rr.mean().item() - want_rr) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pairs", [1, 5, 32])
@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(seed, pairs, center, with_margin):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2 * pairs, 1, generator=g, dtype=torch.float64) * 2
    ids = torch.zeros(2 * pairs, 3, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    margin = torch.rand(pairs, generator=g, dtype=torch.float64) if with_margin else None
    if margin is not None:
        inputs["margin"] = margin

    trainer = object.__new__(trl_reward.RewardTrainer)
    trainer.model = _FakeLM({ids.data_ptr(): SimpleNamespace(logits=scores)})
    trainer.args = SimpleNamespace(center_rewards_coefficient=center)
    trainer.accelerator = _Accelerator()
    trainer._total_train_tokens = 0
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    want = trainer.compute_loss(trainer.model, inputs)

    got = bradley_terry_loss(scores[:pairs], scores[pairs:], margin=margin, center_coef=center or 0.0)
    assert abs(got.item() - want.item()) <= TOL


def _mean_logps(seed: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Per-token mean log-probs of real completions: negative, mostly in (-4, 0), a few very close to 0.
    x = -4 * torch.rand(2 * pairs, generator=g, dtype=torch.float64) ** 2 - 1e-4
    return x[:pairs], x[pairs:]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pairs", [1, 6, 40])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(seed, pairs, label_smoothing):
    chosen, rejected = _mean_logps(seed, pairs)
    trainer = object.__new__(trl_cpo.CPOTrainer)
    trainer.alpha = 0.0
    trainer.loss_type = "simpo"
    trainer.beta = 2.0
    trainer.simpo_gamma = 0.7
    trainer.label_smoothing = label_smoothing
    trainer.accelerator = _Accelerator()
    want_losses, want_rc, want_rr = trainer.cpo_loss(chosen, rejected)

    loss, rc, rr = simpo_loss(chosen, rejected, beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    assert abs(loss.item() - want_losses.mean().item()) <= TOL
    torch.testing.assert_close(rc, want_rc, atol=TOL, rtol=0)
    torch.testing.assert_close(rr, want_rr, atol=TOL, rtol=0)
    via_dispatch = dpo_loss("simpo", chosen, rejected, beta=2.0, gamma=0.7, label_smoothing=label_smoothing)[
        0
    ]
    assert via_dispatch.item() == loss.item()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pairs", [1, 6, 40])
def test_orpo_matches_trl(seed, pairs):
    chosen, rejected = _mean_logps(seed, pairs)
    nll = torch.tensor(1.7, dtype=torch.float64)
    trainer = object.__new__(trl_orpo.ORPOTrainer)
    trainer.beta = 0.25
    trainer.accelerator = _Accelerator()
    losses, want_rc, want_rr, _, _ = trainer.odds_ratio_loss(chosen, rejected)
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
    want = nll - losses.mean()

    loss, rc, rr = dpo_loss("orpo", chosen, rejected, beta=0.25, chosen_nll=nll)
    # TRL casts the log-probs to float32 inside odds_ratio_loss, so its value carries float32 rounding.
    assert abs(loss.item() - want.item()) <= TOL
    torch.testing.assert_close(rc, want_rc.double(), atol=TOL, rtol=0)
    torch.testing.assert_close(rr, want_rr.double(), atol=TOL, rtol=0)
    # and our own float64 value is closer to an exact float64 evaluation of eq. 7 than TRL's float32 one
    exact = (
        nll
        - 0.25
        * torch.nn.functional.logsigmoid(
            (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        ).mean()
    )
    assert abs(loss.item() - exact.item()) <= 1e-12


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 9, 33), (3, 17, 300)])
def test_entropy_matches_trl(seed, shape):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    want = trl_utils.entropy_from_logits(logits)
    got = entropy_from_logits(logits, chunk_rows=7)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
