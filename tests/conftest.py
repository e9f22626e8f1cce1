"""Shared fixtures: a small prepared dataset and real multi-rank launches."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# small and fast, same code path as the quick start
TEST_OVERRIDES = [
    "data.image_batch=8", "data.text_batch=8", "data.pair_batch=8", "data.eval_batches=2",
    "train.warmup_steps=3", "train.log_every=1", "train.shm_comm=false", "train.progress_bar=false",
    "train.dist_timeout_s=120",
]


def pytest_configure(config):
    # `pytest -m gpu` (scripts/gpu_check.sh) selects the CUDA tests; they skip without CUDA
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); run with -m gpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def deepspeed_cmd(num_ranks: int, *args: str) -> list[str]:
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [sys.executable, launcher, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
            "--module", "vlmoe", *args]


def torchrun_cmd(num_ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks),
            "--master_port", str(free_port()), "-m", "vlmoe", *args]


def run(cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch to completion (killed at ``timeout``); output kept for assertions."""
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def rank_pid(run_dir: Path, local_rank: int) -> int:
    """The pid of the training process of ``local_rank`` in the job writing ``run_dir``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run_dir={run_dir}".encode() in argv and f"--local_rank={local_rank}".encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no rank {local_rank} process for {run_dir}")


def wait_for_commit(run_dir: Path, tag: str, proc: subprocess.Popen, timeout: float) -> None:
    pointer = run_dir / "checkpoints" / "last_good"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pointer.exists() and pointer.read_text().strip() >= tag:
            return
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    raise AssertionError(f"{tag} was not committed within {timeout}s")



@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """The five real sources, a few hundred records each, prepared once per session."""
    from vlmoe.data.prepare import DEFAULT_SOURCES, SourceSpec, prepare

    out = tmp_path_factory.mktemp("data") / "small"
    sources = [SourceSpec(name=s.name, path=s.path, max_items=300) for s in DEFAULT_SOURCES]
    prepare(str(out), sources, val_fraction=0.1, seed=0, text_vocab_size=600, image_size=32, patch_size=8,
            codebook_size=64, tokenizer_fit_images=400)
    return out


# every downstream task's embedded data, at most this many examples per source and split: few
# images keep the image tasks fast; NLI learns word relations, which takes more pairs
TASK_CAP = 160
TASK_CAPS = {"nli": 3000}


@pytest.fixture(scope="session")
def task_data(prepared_data) -> Path:
    """Each task's embedded data built once into the prepared data dir (the runs find it there)."""
    from vlmoe.data import task_data as builder
    from vlmoe.tasks import TASK_NAMES, get_task

    for name in TASK_NAMES:
        spec = builder.DataSpec(entries=(), max_items_per_source=TASK_CAPS.get(name, TASK_CAP), val_fraction=0.1)
        builder.build(builder.data_dir_for(prepared_data, name, spec), name, get_task(name).records, spec,
                      verbose=False)
    return prepared_data


@pytest.fixture(scope="session")
def base_run(task_data, tmp_path_factory) -> Path:
    """A dense pretraining under ZeRO-3 on 2 ranks, the base every fine-tune starts from: long enough
    (150 steps, ~50 s) for its [T_CLS] states to tell texts apart, which the text tasks need."""
    run_dir = tmp_path_factory.mktemp("base") / "pretrain"
    run(deepspeed_cmd(2, "pretrain", "pretrain_tiny", f"data.dir={task_data}", f"run_dir={run_dir}",
                      "train.steps=150", "train.save_every=75", "train.eval_every=150", "train.zero_stage=3",
                      *[o for o in TEST_OVERRIDES if not o.startswith("train.log_every")], "train.log_every=25",
                      "train.warmup_steps=10"), timeout=600)
    return run_dir


def finetune_args(task: str, data: Path, base: Path, run_dir: Path, *extra: str) -> list[str]:
    """A small fine-tune of ``task`` on the shared data and base (ZeRO-3, SMoLA omni by default)."""
    return ["finetune", f"finetune_tiny_{task}", f"data.dir={data}", f"finetune.base_run={base}", f"run_dir={run_dir}",
            f"finetune.max_items_per_source={TASK_CAPS.get(task, TASK_CAP)}", "finetune.val_fraction=0.1",
            "finetune.smola.num_experts=4",
            "data.batch_size=16", "data.eval_max_examples=96", "train.warmup_steps=2", "train.log_every=1",
            "train.shm_comm=false", "train.progress_bar=false", "train.dist_timeout_s=120", *extra]
