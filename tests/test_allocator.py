"""The allocator choice: the plan for each setting, and the re-executed process it gives."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO
from vlmoe import allocator
from vlmoe.allocator import AllocatorError, find_tcmalloc, plan_allocator

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@pytest.mark.parametrize("environ, library, gpu, platform, expected", [
    ({}, LIB, False, "linux", LIB),  # auto on a CPU machine
    ({"VLMOE_ALLOCATOR": "auto"}, LIB, True, "linux", None),  # auto leaves GPU machines alone
    ({"VLMOE_ALLOCATOR": "tcmalloc"}, LIB, True, "linux", LIB),  # ... unless asked
    ({"VLMOE_ALLOCATOR": " System "}, LIB, False, "linux", None),
    ({}, None, False, "linux", None),  # not installed: the run goes on, on the system malloc
    ({}, LIB, False, "darwin", None),
    ({"LD_PRELOAD": LIB}, LIB, False, "linux", None),  # already preloaded: no second exec
    ({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, LIB, False, "linux", None),  # the user's allocator stands
    ({"LD_PRELOAD": "/opt/lib/libfoo.so"}, LIB, False, "linux", LIB),  # another library is no allocator
])
def test_plan(environ, library, gpu, platform, expected):
    assert plan_allocator(environ, library, gpu, platform).library == expected


@pytest.mark.parametrize("environ, library, platform, message", [
    ({"VLMOE_ALLOCATOR": "jemalloc"}, LIB, "linux", "VLMOE_ALLOCATOR='jemalloc': expected one of auto, tcmalloc, system"),
    ({"VLMOE_ALLOCATOR": "tcmalloc"}, None, "linux", "no tcmalloc library is installed"),
    ({"VLMOE_ALLOCATOR": "tcmalloc"}, LIB, "darwin", "Linux only, not darwin"),
])
def test_plan_refuses_what_it_cannot_do(environ, library, platform, message):
    with pytest.raises(AllocatorError, match=message):
        plan_allocator(environ, library, False, platform)


def test_find_prefers_the_minimal_build(tmp_path):
    assert find_tcmalloc([str(tmp_path)]) is None
    (tmp_path / "libtcmalloc.so.4").touch()
    assert find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").touch()
    assert find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc_minimal.so.4")


PROBE = ("import os, sys; from vlmoe.allocator import active_allocator, use_tcmalloc; before = os.getpid(); "
         "use_tcmalloc(); print((before, os.getpid(), sys.argv[1:], sys.flags.dont_write_bytecode, active_allocator()))")


def _probe(**env: str) -> tuple:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VLMOE_ALLOCATOR")}
    proc = subprocess.run([sys.executable, "-B", "-c", PROBE, "a", "b c"], cwd=REPO, env={**environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout)


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (scripts/setup_env.sh installs it)")
def test_the_process_runs_again_on_tcmalloc_with_its_arguments_and_flags():
    before, after, args, no_bytecode, allocator = _probe(VLMOE_ALLOCATOR="tcmalloc")
    assert before == after  # exec: a launcher that started the process still owns it
    assert args == ["a", "b c"] and no_bytecode
    assert allocator == "tcmalloc"
    assert _probe(VLMOE_ALLOCATOR="system")[4] == "system malloc"


def test_a_bad_choice_is_a_clear_error_from_the_command():
    proc = subprocess.run([sys.executable, "-m", "vlmoe", "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "VLMOE_ALLOCATOR": "fast"}, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vlmoe: error: VLMOE_ALLOCATOR='fast': expected one of auto, tcmalloc, system"


def test_importing_a_benchmark_runs_nothing_again():
    # only a benchmark run as a script re-executes: an import (pytest collecting its tests) must not,
    # or the importing process restarts with its output captured away
    code = ("import os, sys; sys.path.insert(0, 'scripts'); import bench_moe, bench_pretrain, bench_smola; "
            "print(repr(os.environ.get('LD_PRELOAD', '')))")
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**environ, "VLMOE_ALLOCATOR": "tcmalloc" if find_tcmalloc() else "auto"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "''"


def test_the_command_line_without_orig_argv_is_read_from_proc(monkeypatch):
    started = list(sys.orig_argv)
    monkeypatch.delattr(sys, "orig_argv")  # Python 3.9 has none
    assert allocator._command_line() == started
