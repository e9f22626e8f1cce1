"""scripts/bench_pretrain.py: a tiny run on 2 ranks prints a row per configuration and a per-phase
breakdown that sums to the profiled step; the breakdown's attribution and the memory plan alone."""
from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace

from conftest import REPO, run

sys.path.insert(0, str(REPO / "scripts"))
import bench_pretrain  # noqa: E402  (scripts/ is not a package)

TINY = ["--dim", "32", "--ffn-dim", "64", "--depth", "2", "--heads", "2", "--image-size", "16", "--patch-size", "8",
        "--text-len", "8", "--min-text-len", "4", "--vocab", "64", "--codebook", "16",
        "--image-batch", "4", "--text-batch", "4", "--pair-batch", "4", "--steps", "2", "--warmup", "1"]
NAMES = ("dense", "sparse E=2 EP=1", "sparse E=2 EP=2", "sparse E=4 EP=2", "soft E=2 EP=2")


def test_tiny_run_has_a_row_per_configuration_and_a_breakdown_summing_to_the_step():
    # not under a launcher: the script launches itself on 2 ranks (its own free port)
    proc = run([sys.executable, str(REPO / "scripts" / "bench_pretrain.py"), *TINY, "--experts", "2:1,2:2,4",
                "--soft", "2", "--profile", "--profile-config", "4:2", "--memory-check", "off"], timeout=120)
    out = proc.stdout
    for name in NAMES:
        row = re.search(rf"^  {re.escape(name)} +\S+ +([\d.]+) +([\d.]+) +(\d+) +([\d.]+) ", out, re.M)
        assert row, f"no row for {name}:\n{out}"
        step_ms, min_ms, tokens_s, ratio = (float(v) for v in row.groups())
        assert all(math.isfinite(v) and v > 0 for v in (step_ms, min_ms, tokens_s, ratio)), row[0]
        assert min_ms <= step_ms
    assert re.search(r"^  dense +\S+ +[\d.]+ +[\d.]+ +\d+ +1\.00 ", out, re.M)

    summed = re.search(r"^  sum of phases +([\d.]+) ms +\(of which the optimizer step ([\d.]+) ms\)$", out, re.M)
    assert summed, out
    total, optimizer = float(summed[1]), float(summed[2])
    step = re.search(r"^  profiled step \(bench\.step\) +([\d.]+) ms +\(perf_counter: ([\d.]+) ms", out, re.M)
    assert step, out
    profiled, wall = float(step[1]), float(step[2])
    assert profiled > 0 and abs(total - profiled) <= 0.1 + 1e-9
    phase_row = r"^  (?:forward|backward|optimizer|metrics|trainer|other)[^\n]*? ([\d.]+) ms +-?[\d.]+ %$"
    rows = re.findall(phase_row, out, re.M)
    assert len(rows) >= len(bench_pretrain.PHASE_ORDER)  # and any phase of a scope it does not know
    assert abs(sum(map(float, rows)) - profiled) <= 0.05 * len(rows) + 0.1
    # the optimizer step by operator kind: the torch optimizer's update is one of its parts
    optimizer_rows = dict(re.findall(r"^  (optimizer: [^\n]*?) +([\d.]+) ms +[\d.]+ %$", out, re.M))
    assert float(optimizer_rows["optimizer: weight update (torch optimizer)"]) > 0, out
    assert abs(sum(map(float, optimizer_rows.values())) - optimizer) <= 0.05 * len(optimizer_rows) + 0.1
    assert abs(wall - profiled) <= 0.05 * wall + 2.0  # the profiler's clock against perf_counter


def _event(name, start, end, parent=None, seq=-1, fwd_thread=0, thread=1):
    return SimpleNamespace(name=name, thread=thread, fwd_thread=fwd_thread, sequence_nr=seq,
                           time_range=SimpleNamespace(start=start, end=end), cpu_parent=parent)


def test_breakdown_gives_each_instant_to_the_innermost_scope_and_backward_nodes_to_their_forward_phase():
    step = _event("bench.step", 0, 100)
    forward = _event("bench.forward", 0, 40, step)
    experts = _event("vlmoe.moe.experts", 10, 20, forward)
    mm = _event("aten::mm", 11, 19, experts, seq=5)
    add = _event("aten::add", 25, 30, forward, seq=6)
    backward = _event("bench.backward", 40, 90, step)
    ev = bench_pretrain._EVALUATE
    mm_back = _event(ev + "MmBackward0", 45, 60, backward, seq=5, fwd_thread=1)
    inner = _event("aten::mm", 46, 59, mm_back)  # a backward node's own ops carry no forward phase
    add_back = _event(ev + "AddBackward0", 60, 70, backward, seq=6, fwd_thread=1)
    accumulate = _event(ev + "torch::autograd::AccumulateGrad", 70, 75, backward)
    optimizer = _event("bench.optimizer", 90, 100, step)
    update = _event("Optimizer.step#AdamW.step", 90, 94, optimizer)
    fused = _event("aten::_fused_adamw_", 90, 94, update)
    cast = _event("aten::to", 94, 96, optimizer)
    cast_copy = _event("aten::_to_copy", 94, 96, cast)  # inside a cast: the cast's, not a copy back
    copy_back = _event("aten::copy_", 96, 97, optimizer)
    unknown = _event("aten::isfinite", 97, 98, optimizer)
    other_thread = _event("aten::mm", 0, 100, thread=2)
    events = [step, forward, experts, mm, add, backward, mm_back, inner, add_back, accumulate, optimizer, update,
              fused, cast, cast_copy, copy_back, unknown, other_thread]
    self_us, steps, saw_moe = bench_pretrain.phase_breakdown(events)
    assert saw_moe and steps == [100]
    assert self_us == {"other (step loop)": 0.0, "forward: rest of model": 30.0, "forward: experts": 10.0,
                       "backward: experts": 15.0, "backward: rest of model": 10.0,
                       "backward: gradient accumulation + DeepSpeed hooks": 5.0,
                       "backward: engine (gradient reduction)": 20.0,
                       "optimizer: weight update (torch optimizer)": 4.0, "optimizer: gradient norm (casts, norms)": 2.0,
                       "optimizer: copy weights back (copy_)": 1.0, "optimizer: other": 3.0}
    assert sum(self_us.values()) == 100


def test_self_times_of_nested_intervals_sum_to_the_outermost():
    markers = [(0, 100, "a"), (10, 30, "b"), (20, 25, "c"), (40, 60, "b"), (100, 150, "a")]
    assert bench_pretrain._self_times(markers) == {"a": 110, "b": 35, "c": 5}


def test_memory_plan_packs_launches_first_fit_and_skips_what_fits_nowhere():
    V = bench_pretrain.Variant
    dense, small, medium, big, huge = V("dense"), V("sparse", 8, 1), V("sparse", 32, 2), V("soft", 8, 2), \
        V("sparse", 128, 2)
    memory = {dense: (1, 2), small: (3, 2), medium: (5, 3), big: (2, 2), huge: (20, 5)}
    groups, notes = bench_pretrain.plan_launches([small, medium, huge, big], memory, budget=10, one_launch=False)
    assert groups == [[small, big], [medium]]  # 1+3+2 + 2 <= 10; medium joins neither, huge fits nowhere
    assert len(notes) == 1 and "sparse E=128 EP=2" in notes[0]
    groups, notes = bench_pretrain.plan_launches([small, medium, big], memory, budget=10, one_launch=True)
    assert groups == [[small, big]] and "sparse E=32 EP=2" in notes[0]
