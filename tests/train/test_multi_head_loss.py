"""The multi-head Bradley-Terry loss by hand, its masking, and parity with the single-head loss per head."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.train.losses import bradley_terry_loss, multi_head_bradley_terry_sums


def _bce(delta: float, p: float) -> float:
    sig = 1.0 / (1.0 + math.exp(-delta))
    return -(p * math.log(sig) + (1 - p) * math.log(1 - sig))


def test_sums_by_hand_on_a_small_batch() -> None:
    chosen = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, -1.0]])
    rejected = torch.tensor([[0.0, 1.0], [0.5, 0.0], [1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.8, 1.0], [0.5, 0.3]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    got = multi_head_bradley_terry_sums(chosen, rejected, targets, mask)
    # head 0: pairs 0 and 1 (deltas 1 and 0); head 1: pairs 0 and 2 (deltas -1 and -1)
    want0 = _bce(1.0, 1.0) + _bce(0.0, 0.8)
    want1 = _bce(-1.0, 0.0) + _bce(-1.0, 0.3)
    assert got.tolist() == pytest.approx([want0, want1], abs=1e-6)


def test_masked_labels_give_no_loss_and_no_gradient() -> None:
    chosen = torch.tensor([[0.3, 5.0], [1.0, -2.0]], requires_grad=True)
    rejected = torch.zeros(2, 2)
    targets = torch.tensor([[1.0, 0.9], [0.0, 0.1]])
    mask = torch.tensor([[True, False], [True, False]])  # head 1 unlabelled everywhere
    sums = multi_head_bradley_terry_sums(chosen, rejected, targets, mask)
    assert sums[1] == 0
    sums.sum().backward()
    assert torch.all(chosen.grad[:, 1] == 0) and torch.all(chosen.grad[:, 0] != 0)


def test_each_head_matches_the_single_head_soft_loss_on_its_labelled_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    targets = torch.rand(16, 3, generator=g)
    mask = torch.rand(16, 3, generator=g) > 0.4
    sums = multi_head_bradley_terry_sums(chosen, rejected, targets, mask)
    for h in range(3):
        m = mask[:, h]
        ref = bradley_terry_loss(chosen[m, h], rejected[m, h], soft_labels=targets[m, h])
        assert float(sums[h]) / int(m.sum()) == pytest.approx(float(ref), abs=1e-6)


def test_shapes_and_targets_are_checked() -> None:
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"must all be \(B, H\)"):
        multi_head_bradley_terry_sums(z, torch.zeros(2, 3), z, z.bool())
    with pytest.raises(ValueError, match="targets must lie"):
        multi_head_bradley_terry_sums(z, z, torch.full((2, 2), 1.5), torch.ones(2, 2, dtype=torch.bool))


def test_dpo_soft_label_loss_by_hand_and_as_cdpo() -> None:
    from alignflow.train.losses import dpo_sigmoid_loss, dpo_soft_label_loss

    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5
    # h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]; logits = beta h = [1, -0.5]
    p = torch.tensor([0.9, 0.3])
    loss, _, _ = dpo_soft_label_loss(pc, pr, rc, rr, p, beta=beta)
    want = (_bce(1.0, 0.9) + _bce(-0.5, 0.3)) / 2
    assert float(loss) == pytest.approx(want, abs=1e-6)
    # A constant soft label 1 - eps is cDPO with label_smoothing eps (itself parity-tested against TRL).
    soft, c1, r1 = dpo_soft_label_loss(pc, pr, rc, rr, torch.full((2,), 0.8), beta=beta)
    cdpo, c2, r2 = dpo_sigmoid_loss(pc, pr, rc, rr, beta, 0.2)
    assert float(soft) == pytest.approx(float(cdpo), abs=1e-7)
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    with pytest.raises(ValueError, match="soft_labels must lie"):
        dpo_soft_label_loss(pc, pr, rc, rr, torch.tensor([1.2, 0.5]))
