"""Aux losses against hand-computed values (VL-MoE A.3 / vmoe semantics, population std)."""
import math
from statistics import NormalDist

import pytest
import torch

from vlmoe.moe import losses


def test_importance_loss_hand_case():
    gates = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # summed gates [1.5, 0.5]: mean 1, population var 0.25
    assert losses.importance_loss(gates).item() == pytest.approx(0.25)
    assert losses.importance_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-12)


def _load_by_hand(logits, noisy, k, sigma):
    cdf = NormalDist().cdf
    p = []
    for row, noisy_row in zip(logits, noisy):
        threshold = sorted(noisy_row, reverse=True)[k - 1]
        p.append([1.0 - cdf((threshold - value) / sigma) for value in row])
    p_mean = [sum(col) / len(col) for col in zip(*p)]
    mean = sum(p_mean) / len(p_mean)
    var = sum((x - mean) ** 2 for x in p_mean) / len(p_mean)
    return var / mean ** 2


def test_load_loss_hand_case_top1():
    logits = [[1.0, 0.0], [0.0, 0.0]]
    noisy = [[1.1, 0.2], [-0.1, 0.3]]
    got = losses.load_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(noisy, dtype=torch.float64), 1, 0.5)
    # p = 1 - Phi([[0.2, 2.2], [0.6, 0.6]]) -> p_mean [0.347495, 0.144075]
    assert got.item() == pytest.approx(0.171254, rel=1e-4)
    assert got.item() == pytest.approx(_load_by_hand(logits, noisy, 1, 0.5), rel=1e-9)


def test_load_loss_top2_uses_second_largest_noisy_logit():
    logits = [[0.3, -0.2, 0.9], [0.1, 0.5, -0.4], [0.0, 0.2, 0.1]]
    noisy = [[0.35, -0.1, 0.8], [0.2, 0.45, -0.5], [-0.05, 0.3, 0.12]]
    got = losses.load_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(noisy, dtype=torch.float64), 2, 1 / 3)
    assert got.item() == pytest.approx(_load_by_hand(logits, noisy, 2, 1 / 3), rel=1e-9)


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        losses.load_loss(torch.zeros(2, 2), torch.zeros(2, 2), 1, 0.0)


def test_vloss_is_mean_of_importance_and_load():
    torch.manual_seed(0)
    logits = torch.randn(16, 4, dtype=torch.float64)
    noisy = logits + 0.25 * torch.randn_like(logits)
    gates = logits.softmax(-1)
    expected = 0.5 * (losses.importance_loss(gates) + losses.load_loss(logits, noisy, 1, 0.25))
    assert losses.vloss(gates, logits, noisy, 1, 0.25).item() == pytest.approx(expected.item())


def test_switch_loss_hand_case():
    gates = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    # f = [0.75, 0.25], P = [0.6, 0.4]: 2 * (0.45 + 0.1)
    assert losses.switch_loss(gates, gates.argmax(-1)).item() == pytest.approx(1.1)
    assert losses.switch_loss(torch.full((4, 4), 0.25), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])).item() \
        == pytest.approx(1.0)


def test_z_loss_hand_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2 and ln 4
    assert losses.z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2)


def test_importance_gradient_pushes_towards_balance():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    losses.importance_loss(logits.softmax(-1)).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1] < 0).all()


def test_unknown_aux_loss_name():
    tensors = losses.RouterTensors(torch.zeros(2, 2), torch.zeros(2, 2), torch.full((2, 2), 0.5),
                                   torch.zeros(2, 1, dtype=torch.long), 1, 0.5)
    with pytest.raises(ValueError, match="unknown aux loss 'balance'"):
        losses.aux_loss_terms(("balance",), tensors)
    terms = losses.aux_loss_terms(("importance", "switch"), tensors, z_loss_weight=0.1)
    assert set(terms) == {"importance", "switch", "z"}
    total = losses.weighted_aux_loss(terms, 0.01, 0.1)
    expected = 0.01 * (terms["importance"] + terms["switch"]) + 0.1 * terms["z"]
    assert total.item() == pytest.approx(expected.item())
