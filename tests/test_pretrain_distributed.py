"""Pretraining on 2 real ranks (gloo): launchers agree, loss falls, kill -9 and torn saves resume exactly, ZeRO-3."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (REPO, TEST_OVERRIDES, deepspeed_cmd, free_port, launch_env, rank_pid, run, torchrun_cmd,
                      wait_for_commit)
from vlmoe.allocator import find_tcmalloc, plan_allocator
from vlmoe.train.checkpoint import committed_tag, tag_for
from vlmoe.train.metrics import read_metrics

STEPS = 16
LOSS_KEYS = ("loss", "mlm", "mim", "vlm")


def pretrain_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "pretrain_tiny", f"data.dir={data}", f"run_dir={run_dir}", f"train.steps={STEPS}",
            "train.save_every=4", "train.eval_every=8", *TEST_OVERRIDES, *extra]


def losses(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(run_dir, "loss")}


@pytest.fixture(scope="module")
def reference(prepared_data, tmp_path_factory) -> Path:
    """One uninterrupted run through the deepspeed launcher: the numbers the others must match."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run(deepspeed_cmd(2, *pretrain_args(prepared_data, run_dir)), timeout=600)
    (run_dir.parent / "launch.log").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_the_log_names_the_run_and_shows_each_warning_once(reference):
    lines = (reference.parent / "launch.log").read_text().splitlines()
    header = [line for line in lines if line.startswith("pretrain (pretrain_tiny ")]
    # the ranks run on tcmalloc wherever it is installed (vlmoe/allocator.py; scripts/setup_env.sh installs it)
    plan = plan_allocator(launch_env(), find_tcmalloc(), os.path.exists("/dev/nvidiactl"))
    allocator = "tcmalloc" if plan.library or "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
    assert len(header) == 1 and header[0].endswith(f"-> {reference}: world size 2, ZeRO stage 1, EP size 1, "
                                                   f"precision fp32, {STEPS} steps, {allocator}"), header
    summary = [line for line in lines if line.startswith("done: ")]
    assert len(summary) == 1 and re.fullmatch(rf"done: step {STEPS} \({STEPS} steps in [\d.]+ s, [\d,]+ tokens/s\)",
                                              summary[0]), summary
    warned = [line for line in lines if "Warning" in line]
    assert len(warned) == len(set(warned)), warned  # DeepSpeed's deprecated collectives: once, not per rank and call
    assert all(line.startswith("warning: ") for line in warned if "FutureWarning" in line), warned


def test_run_directory_and_falling_losses(reference):
    records = read_metrics(reference, "loss")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "mlm", "mim", "vlm", "vlm_text", "vlm_image", "lr", "tokens_per_s"):
        assert all(key in r for r in records), key
    for key in ("mlm", "mim", "vlm"):
        first = sum(r[key] for r in records[:4]) / 4
        last = sum(r[key] for r in records[-4:]) / 4
        assert last < 0.95 * first, f"{key} did not fall: {first:.3f} -> {last:.3f}"
    val = read_metrics(reference, "val/loss")
    assert [r["step"] for r in val] == [8, 16] and all(r["val/mlm"] > 0 for r in val)
    assert (reference / "config.yaml").exists()
    assert any((reference / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = reference / "checkpoints"
    assert committed_tag(ckpts) == tag_for(STEPS)
    val_loss = {r["step"]: r["val/loss"] for r in val}
    best = committed_tag(ckpts, "best")
    assert best == tag_for(min(val_loss, key=val_loss.get))  # the lowest validation loss
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == sorted({tag_for(12), tag_for(16), best})  # keep=2 + best
    # the whole model, exported with its tokenizers after each commit: the base of fine-tuning and eval
    import json
    assert json.loads((reference / "model" / "model_config.json").read_text())["step"] == STEPS
    assert {p.name for p in (reference / "model").iterdir()} == {
        "model_config.json", "model.safetensors", "text_tokenizer.model", "visual_tokenizer.safetensors"}


def test_vlmoe_eval_reproduces_the_logged_validation(reference):
    # on the run's 2 ranks (each rank's masks depend on its rank, so the same world size sees the same batches)
    proc = run(deepspeed_cmd(2, "eval", str(reference)), timeout=600)
    assert "written to" in proc.stdout and "mlm_acc" in proc.stdout and "val/mlm" not in proc.stdout
    import json
    results = json.loads((reference / "eval" / "results.json").read_text())
    logged = read_metrics(reference, "val/loss")[-1]
    assert results["step"] == STEPS and results["checkpoint"] == tag_for(STEPS) and results["num_batches"] == 4
    for key in ("loss", "mlm", "mim", "vlm", "mlm_acc"):
        assert results[key] == pytest.approx(logged[f"val/{key}"], rel=1e-6), key


def test_torchrun_matches_deepspeed_launcher(prepared_data, reference, tmp_path):
    run_dir = tmp_path / "torchrun"
    run(torchrun_cmd(2, *pretrain_args(prepared_data, run_dir)), timeout=600)
    assert losses(run_dir) == losses(reference)


def test_two_nodes_through_a_hostfile(prepared_data, reference, tmp_path):
    """Two 'nodes' of one rank each on this machine: deepspeed --hostfile --no_ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir, port = tmp_path / "multinode", str(free_port())
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    procs = [subprocess.Popen([os.sys.executable, launcher, "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                               "--module", "vlmoe", *pretrain_args(prepared_data, run_dir)],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert losses(run_dir) == losses(reference)


def test_kill9_then_torn_save_resume_identically(prepared_data, reference, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = deepspeed_cmd(2, *pretrain_args(prepared_data, run_dir))
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_commit(run_dir, tag_for(8), job, timeout=400)
        os.kill(rank_pid(run_dir, 1), signal.SIGKILL)
        output = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            job.kill()
    # one dead rank ends the whole job, and the launcher says which rank died
    assert job.returncode != 0
    assert "exit" in output.lower() and ("-9" in output or "Killed" in output or "SIGKILL" in output), output[-3000:]
    ckpts = run_dir / "checkpoints"
    good = committed_tag(ckpts)
    good_step = int(good.split("_")[1])
    assert 8 <= good_step < STEPS

    # A torn save after it: shards of one rank missing, DeepSpeed's own `latest` naming it.
    torn = ckpts / tag_for(good_step + 4)
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(ckpts / good, torn)
    for f in torn.glob("*zero_pp_rank_1_*"):
        f.unlink()
    (torn / ".rank1.done").unlink()
    (ckpts / "latest").write_text(torn.name)

    proc = run(cmd, timeout=600)
    assert f"resuming from {ckpts / good} at step {good_step}" in proc.stdout
    assert losses(run_dir) == losses(reference)  # every step, bitwise
    assert committed_tag(ckpts) == tag_for(STEPS)


def test_hung_peer_fails_within_the_configured_timeout(prepared_data, tmp_path):
    """A stopped (not dead) rank: the others give up after train.dist_timeout_s, not 30 min."""
    run_dir = tmp_path / "hung"
    cmd = deepspeed_cmd(2, *pretrain_args(prepared_data, run_dir, "train.dist_timeout_s=15"))
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        wait_for_commit(run_dir, tag_for(4), job, timeout=400)
        stopped = rank_pid(run_dir, 1)
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        output = job.communicate(timeout=180)[0]
        waited = time.monotonic() - start
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert waited < 120, f"job hung {waited:.0f}s with a 15s timeout"
    assert "timeout" in output.lower() or "timed out" in output.lower(), output[-3000:]


def test_bf16_zero2_accumulation_trains_and_resumes(prepared_data, tmp_path):
    """bf16 on ZeRO-2 with 2 micro-batches per step: finite falling loss; a longer rerun resumes."""
    run_dir = tmp_path / "bf16"
    args = pretrain_args(prepared_data, run_dir, "train.precision=bf16", "train.zero_stage=2", "train.grad_accum=2")
    run(deepspeed_cmd(2, *[a.replace(f"train.steps={STEPS}", "train.steps=6") for a in args]), timeout=600)
    first = losses(run_dir)
    assert sorted(first) == list(range(1, 7)) and first[6][0] < first[1][0]
    proc = run(deepspeed_cmd(2, *[a.replace(f"train.steps={STEPS}", "train.steps=8") for a in args]), timeout=600)
    assert "at step 6" in proc.stdout
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_zero3_pretraining_resumes_exactly_and_sparse_zero3_is_refused(prepared_data, tmp_path):
    """ZeRO-3 pretraining (built partitioned) resumed from the middle reproduces the losses; a
    trainable sparse model under ZeRO-3 is refused before training, with the reason."""
    run_dir = tmp_path / "zero3"
    args = deepspeed_cmd(2, "pretrain", "pretrain_tiny", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                         "train.zero_stage=3", "train.steps=4", "train.save_every=2", "train.keep_checkpoints=2",
                         "train.eval_every=100", *TEST_OVERRIDES)
    run(args, timeout=600)
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(run_dir, "loss")}
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    (run_dir / "checkpoints" / "last_good").write_text(tag_for(2) + "\n")  # rewind to step 2
    shutil.rmtree(run_dir / "checkpoints" / tag_for(4))
    proc = run(args, timeout=600)
    assert "at step 2" in proc.stdout
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir, "loss")} == uninterrupted

    proc = run(deepspeed_cmd(1, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}",
                             f"run_dir={tmp_path / 'sparse'}", "train.zero_stage=3", "moe.ep_size=1", *TEST_OVERRIDES),
               timeout=300, check=False)
    assert proc.returncode != 0 and "sparse VL-MoE pretraining cannot run under ZeRO-3" in proc.stdout + proc.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_loss_that_overflows_stops_the_run_and_keeps_last_good(prepared_data, tmp_path, policy):
    """lr 1e30: step 1 is finite, its update makes every later loss NaN/Inf. Both policies end the
    job on both ranks with the step named; no checkpoint of the blown-up weights is committed."""
    import json

    run_dir = tmp_path / policy
    extra = ["train.lr=1e30", "train.warmup_steps=0", "train.save_every=1", f"train.on_nonfinite={policy}",
             "train.max_nonfinite_skips=2"]
    proc = run(deepspeed_cmd(2, *pretrain_args(prepared_data, run_dir), *extra), timeout=300, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    if policy == "stop":
        assert "vlmoe: stopped: step 2: non-finite loss" in output and "train.on_nonfinite=stop" in output
        skipped = []
    else:  # steps 2 and 3 skipped and counted, the third non-finite step stops it
        assert "step 2: non-finite loss" in output and "its update skipped (1 of at most 2)" in output
        assert "vlmoe: stopped: step 4: non-finite loss" in output and "train.max_nonfinite_skips=2" in output
        skipped = [2, 3]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no bare NaN
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert [(r["step"], r["nonfinite_skips"]) for r in records if "nonfinite_skips" in r] == \
        list(zip(skipped, range(1, len(skipped) + 1)))
    # skipped steps left the weights as step 1 made them: finite, saved at steps 2 and 3 with the count
    last = 1 + len(skipped)
    ckpts = run_dir / "checkpoints"
    assert committed_tag(ckpts) == tag_for(last)
    state = json.loads((ckpts / tag_for(last) / "trainer_state.json").read_text())
    assert state["step"] == last and state["nonfinite_skips"] == len(skipped)


def test_sigterm_on_one_rank_saves_the_step_and_the_rerun_resumes_identically(prepared_data, reference, tmp_path):
    """SLURM's preemption signal reaching one rank: both finish the step, commit it, exit 75; the
    same command resumes from that step with the uninterrupted run's losses, bitwise."""
    run_dir = tmp_path / "preempted"
    cmd = deepspeed_cmd(2, *pretrain_args(prepared_data, run_dir))
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_commit(run_dir, tag_for(4), job, timeout=400)
        os.kill(rank_pid(run_dir, 1), signal.SIGTERM)
        output = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            job.kill()
    match = re.search(r"vlmoe: preempted: step (\d+): SIGTERM; checkpoint (step_\d+) committed", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert 4 <= step < STEPS and "exits with return code = 75" in output
    ckpts = run_dir / "checkpoints"
    assert committed_tag(ckpts) == match.group(2) == tag_for(step)

    proc = run(cmd, timeout=600)
    assert f"resuming from {ckpts / tag_for(step)} at step {step}" in proc.stdout
    assert losses(run_dir) == losses(reference)  # every step, bitwise
