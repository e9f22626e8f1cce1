"""route(): top-k, capacity, k-major filling and Batch Priority Routing on hand-computed cases."""
import math

import pytest
import torch

from vlmoe.moe import expert_capacity, route


def logits_of(gates):
    """Logits whose softmax is exactly `gates` (rows sum to 1)."""
    return torch.tensor(gates, dtype=torch.float64).log()


GATES_TOP1 = [[0.7, 0.3], [0.9, 0.1], [0.4, 0.6], [0.8, 0.2]]


def test_top1_token_order_fills_buffers_first_come():
    r = route(logits_of(GATES_TOP1), k=1, capacity=1, batch_priority=False)
    assert r.expert.squeeze(1).tolist() == [0, 0, 1, 0]
    assert r.slot.squeeze(1).tolist() == [0, -1, 0, -1]
    assert torch.allclose(r.weight.squeeze(1), torch.tensor([0.7, 0.9, 0.6, 0.8], dtype=torch.float32))


def test_top1_batch_priority_drops_least_confident():
    r = route(logits_of(GATES_TOP1), k=1, capacity=1, batch_priority=True)
    # priority: t1 (0.9), t3 (0.8), t0 (0.7), t2 (0.6) -> expert 0 keeps t1 only
    assert r.slot.squeeze(1).tolist() == [-1, 0, 0, -1]
    r2 = route(logits_of(GATES_TOP1), k=1, capacity=2, batch_priority=True)
    assert r2.slot.squeeze(1).tolist() == [-1, 0, 0, 1]


GATES_TOP2 = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]


def test_top2_k_major_token_order():
    r = route(logits_of(GATES_TOP2), k=2, capacity=2, batch_priority=False)
    assert r.expert.tolist() == [[0, 1], [0, 1], [2, 1]]
    assert r.slot.tolist() == [[0, 0], [1, 1], [0, -1]]
    # weights are the raw softmax gates, not renormalised over the two choices
    assert torch.allclose(r.weight, torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.7, 0.2]]))


def test_top2_k_major_batch_priority():
    r = route(logits_of(GATES_TOP2), k=2, capacity=2, batch_priority=True)
    # priority t2 (0.7), t1 (0.6), t0 (0.5); second choices only after all first choices
    assert r.slot.tolist() == [[1, -1], [0, 1], [0, 0]]


def test_first_choices_outrank_earlier_second_choices():
    r = route(logits_of([[0.6, 0.4], [0.3, 0.7]]), k=2, capacity=1, batch_priority=False)
    # token-major filling would give t0's second choice expert 1's only slot; k-major gives t1's first
    assert r.expert.tolist() == [[0, 1], [1, 0]]
    assert r.slot.tolist() == [[0, -1], [0, -1]]


def test_batch_priority_ties_keep_token_order():
    r = route(torch.zeros(3, 2), k=1, capacity=2, batch_priority=True)
    assert r.expert.squeeze(1).tolist() == [0, 0, 0]
    assert r.slot.squeeze(1).tolist() == [0, 1, -1]


def test_large_random_case_respects_capacity_and_matches_sequential_reference():
    torch.manual_seed(0)
    logits = torch.randn(200, 8) * 2
    capacity = 20
    r = route(logits, k=2, capacity=capacity, batch_priority=True)
    gates = logits.softmax(-1)
    top = gates.topk(2, dim=-1)
    order = sorted(range(200), key=lambda s: (-top.values[s, 0].item(), s))
    fill = [0] * 8
    expected = [[None, None] for _ in range(200)]
    for choice in range(2):
        for s in order:
            e = top.indices[s, choice].item()
            expected[s][choice] = fill[e] if fill[e] < capacity else -1
            fill[e] += 1
    assert r.slot.tolist() == expected
    kept = r.slot >= 0
    counts = torch.bincount(r.expert[kept], minlength=8)
    assert counts.max().item() <= capacity
    # slots of one expert are distinct
    flat = (r.expert * capacity + r.slot)[kept]
    assert flat.unique().numel() == flat.numel()


def test_expert_capacity_formula():
    assert expert_capacity(8192, 32, 1, 1.05) == math.ceil(1.05 * 8192 / 32) == 269
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(3, 32, 1, 1.0, min_capacity=4) == 4
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(10, 4, 1, 0.0)


def test_route_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k must be in \[1, E=2\]"):
        route(torch.zeros(3, 2), k=3, capacity=1, batch_priority=False)
    with pytest.raises(ValueError, match=r"logits must be \[S, E\]"):
        route(torch.zeros(3), k=1, capacity=1, batch_priority=False)


def test_dispatch_and_combine_place_rows_by_slot():
    from vlmoe.moe.dispatch import ALIGN, combine, dispatch, plan_dispatch

    r = route(logits_of(GATES_TOP2), k=2, capacity=2, batch_priority=False)
    tokens = torch.arange(3, dtype=torch.float32).unsqueeze(1).repeat(1, 4) + 1  # token s is all (s + 1)
    plan = plan_dispatch(r, num_experts=3)
    assert plan.buffer_capacity == ALIGN
    buffers = dispatch(tokens, plan)
    assert buffers.shape == (3, ALIGN, 4)
    # expert 0: t0, t1; expert 1: t0, t1 (t2's second choice dropped); expert 2: t2
    assert buffers[:, :3, 0].tolist() == [[1, 2, 0], [1, 2, 0], [3, 0, 0]]
    assert buffers[:, 3:].abs().sum() == 0
    out = combine(buffers * 10, plan, r.weight)
    assert torch.allclose(out[:, 0], torch.tensor([10 * (0.5 + 0.3), 20 * (0.6 + 0.3), 30 * 0.7]))


def test_merged_routings_stack_each_experts_rows_group_after_group():
    from vlmoe.moe.dispatch import combine, dispatch, merge_routings, plan_dispatch
    from vlmoe.moe.router import Routing

    def routing(expert, slot, capacity):
        expert = torch.tensor(expert).unsqueeze(1)
        return Routing(expert=expert, slot=torch.tensor(slot).unsqueeze(1), weight=torch.ones(expert.shape),
                       gates=torch.ones(expert.shape[0], 2), capacity=capacity)

    # group a: tokens a0..a2 -> experts 0, 1, 0 (capacity 2); group b: b0..b3 -> 0, 0, 0, 1, capacity
    # 2: b2 dropped
    a = routing([0, 1, 0], [0, 0, 1], 2)
    b = routing([0, 0, 0, 1], [0, 1, -1, 0], 2)
    merged = merge_routings([a, b], num_experts=2)
    # expert 0 holds a0, a2 then b0, b1; expert 1 holds a1 then b3
    assert merged.slot.squeeze(1).tolist() == [0, 0, 1, 2, 3, -1, 1]
    assert merged.expert.squeeze(1).tolist() == [0, 1, 0, 0, 0, 0, 1]
    assert merged.capacity == 4 and merge_routings([a], 2) is a
    plan = plan_dispatch(merged, num_experts=2)
    assert plan.rows_used.tolist() == [4, 2]  # the filled rows stay leading
    tokens = torch.arange(1.0, 8.0).unsqueeze(1)  # a0..a2, b0..b3 are 1..7
    buffers = dispatch(tokens, plan)
    assert buffers[0, :4, 0].tolist() == [1, 3, 4, 5] and buffers[1, :2, 0].tolist() == [2, 7]
    assert combine(buffers, plan, merged.weight).squeeze(1).tolist() == [1, 2, 3, 4, 5, 0, 7]


def test_expert_counts_match_bincount_and_weight_the_entries():
    from vlmoe.moe.counts import expert_counts

    expert = torch.tensor([[2, 0], [2, 3]])
    assert expert_counts(expert, 5).tolist() == [1, 0, 2, 1, 0]  # experts 1 and 4 unused: zeros, as minlength
    dropped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert expert_counts(expert, 5, weight=dropped).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert expert_counts(torch.empty(0, dtype=torch.long), 3).tolist() == [0, 0, 0]
