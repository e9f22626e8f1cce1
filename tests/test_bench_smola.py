"""scripts/bench_smola.py: a tiny run prints a row per variant and where the largest block's forward
goes, operator by operator."""
from __future__ import annotations

import re
import sys

from conftest import REPO, run


def test_tiny_run_prints_each_variant_and_the_largest_blocks_operators():
    proc = run([sys.executable, str(REPO / "scripts" / "bench_smola.py"), "--batch", "2", "--tokens", "16",
                "--dim", "32", "--experts", "2", "4", "--reps", "2", "--threads", "1", "--skip-e2e"], timeout=120)
    out = proc.stdout
    for name in ("frozen", "smola E=2", "lora r=8", "smola E=4", "lora r=16"):
        assert re.search(rf"^{re.escape(name)} +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$", out, re.M), out
    assert "where the smola E=4 forward goes" in out
    ops = re.findall(r"^  (aten::\S+|SoftRouting) +([\d.]+) ms", out, re.M)
    total = float(re.search(r"^  all operators +([\d.]+) ms$", out, re.M)[1])
    names = [name for name, _ in ops]
    assert "aten::addmm" in names and "SoftRouting" in names, out  # the frozen linear and the routing
    assert 0 < sum(float(ms) for _, ms in ops) <= total + 0.01 * len(ops)
    assert re.search(r"^  aten::addmm +[\d.]+ ms +\d+ GFLOP/s", out, re.M), out
