"""Run a plan here, one job at a time: skip what is done, resume what was interrupted, record failures.

A training job is done when its final step is committed (``checkpoints/last_good``); one that
stopped earlier is launched again and the trainer resumes it from its checkpoint. An eval or
accounting job is done when its output exists and ``STUDY_DIR/status.json`` says it ran with
the same arguments (or, for jobs run elsewhere and not in the status, when the output is newer
than the run's last checkpoint). A failing job is recorded (exit code, the error line, its log) and the jobs
that depend on it are marked blocked; the rest of the grid goes on. Logs: ``STUDY_DIR/logs/``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from vlmoe.study.plan import TRAIN_KINDS, Job, Plan
from vlmoe.train import checkpoint
from vlmoe.train.run_dir import differing_keys

STATUS_FILE = "status.json"
OUTPUTS = {"eval": Path("eval") / "results.json", "account": Path("accounting.json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(job: Job, launcher: str, port: Optional[int] = None) -> list[str]:
    """The local command line of a job: its launcher on ``job.ranks`` processes for training."""
    if job.kind not in TRAIN_KINDS:
        return [sys.executable, "-m", job.module, *job.args]
    port = port or free_port()
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(job.ranks),
                "--master_port", str(port), "-m", job.module, *job.args]
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    return [sys.executable, deepspeed, "--num_gpus", str(job.ranks), "--master_port", str(port),
            "--module", job.module, *job.args]


def final_step_committed(job: Job) -> bool:
    root = job.run_dir / "checkpoints"
    try:
        tag = checkpoint.committed_tag(root)
    except checkpoint.CheckpointError:
        return False
    if tag is None:
        return False
    state = json.loads((root / tag / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
    return state["step"] >= job.steps


def config_change(job: Job) -> Optional[str]:
    """For a training job whose run directory holds another config: the keys that differ."""
    written = job.run_dir / "config.yaml"
    if job.kind not in TRAIN_KINDS or not written.is_file():
        return None
    old = yaml.safe_load(written.read_text(encoding="utf-8"))
    new = yaml.safe_load(Path(job.args[1]).read_text(encoding="utf-8"))
    changed = list(differing_keys(old, new, one_sided=True))
    return ", ".join(changed) if changed else None


class Status:
    """STUDY_DIR/status.json: per job, its state, exit code, error, log and wall-clock."""

    def __init__(self, study_dir: Path) -> None:
        self.path = study_dir / STATUS_FILE
        self.jobs: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def record(self, job: Job, **values) -> None:
        entry = self.jobs.setdefault(job.name, {})
        entry.update(values, kind=job.kind, run_dir=str(job.run_dir), fingerprint=job.fingerprint)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.jobs, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def is_done(self, job: Job) -> bool:
        if job.kind in TRAIN_KINDS:
            return final_step_committed(job)
        output, entry = job.run_dir / OUTPUTS[job.kind], self.jobs.get(job.name)
        if not output.is_file():
            return False
        if entry is None:  # run elsewhere (the emitted SLURM arrays): done if written after the training
            pointer = job.run_dir / "checkpoints" / checkpoint.POINTER
            return pointer.is_file() and output.stat().st_mtime >= pointer.stat().st_mtime
        return entry.get("state") == "done" and entry.get("fingerprint") == job.fingerprint


def error_line(log: Path) -> str:
    """The most telling line of a failed launch's log: a vlmoe error, else the last exception."""
    lines = [l.strip() for l in log.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    for marker in ("vlmoe: error:", "Error:", "Error"):
        hits = [l for l in lines if marker in l]
        if hits:
            return hits[-1][:500]
    return lines[-1][:500] if lines else "(empty log)"


def _launch_env(ranks: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # one rank per core unless the user chose: torch would otherwise start a thread per core in every rank
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return env


def _stop_study(signum, frame) -> None:
    # SIGTERM (scancel, kill): stop the running launch and the study; a rerun resumes both
    raise SystemExit(128 + signum)


def run_job(job: Job, launcher: str, log: Path) -> int:
    """Launch one job with its output appended to ``log``; SIGTERM to the study stops it too."""
    cmd = launch_command(job, launcher)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_launch_env(job.ranks))
        previous = signal.signal(signal.SIGTERM, _stop_study)
        try:
            return proc.wait()
        except BaseException:  # stopped or interrupted: the launch must not outlive the study
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_plan(plan: Plan, study_dir: Path, launcher: str, log=print) -> Status:
    """Every job of ``plan`` in order; returns the final status (failed jobs included)."""
    status = Status(study_dir)
    failed: set[str] = set()
    for job in plan.jobs:
        blocked = [d for d in job.depends if d in failed]
        if blocked:
            failed.add(job.name)
            status.record(job, state="blocked", error=f"depends on failed {blocked[0]}")
            log(f"[study] blocked  {job.name} (depends on failed {blocked[0]})")
            continue
        changed = config_change(job)
        if changed:
            failed.add(job.name)
            status.record(job, state="failed", error=f"{job.run_dir} holds a run with another config ({changed}); "
                                                      "remove it or rename the cell")
            log(f"[study] failed   {job.name}: its run directory holds another config ({changed})")
            continue
        if status.is_done(job):
            if status.jobs.get(job.name, {}).get("state") != "done":  # finished elsewhere, or before a kill
                status.record(job, state="done", error=None)
            log(f"[study] done     {job.name}")
            continue
        log_path = study_dir / "logs" / (job.name.replace("/", "__") + ".log")
        resumed = job.kind in TRAIN_KINDS and (job.run_dir / "checkpoints" / checkpoint.POINTER).exists()
        log(f"[study] {'resume ' if resumed else 'run    '}  {job.name}  (log: {log_path})")
        start = time.perf_counter()
        code = run_job(job, launcher, log_path)
        wall = status.jobs.get(job.name, {}).get("wall_s", 0.0) + time.perf_counter() - start
        if code == 0 and status_ok(job):
            status.record(job, state="done", returncode=0, wall_s=wall, log=str(log_path), error=None)
            continue
        failed.add(job.name)
        error = error_line(log_path) if code else "exited 0 without its final checkpoint"
        status.record(job, state="failed", returncode=code, wall_s=wall, log=str(log_path), error=error)
        log(f"[study] failed   {job.name} (exit {code}): {error}\n         log: {log_path}")
    return status


def status_ok(job: Job) -> bool:
    """A launch that exited 0 produced what it should have."""
    if job.kind in TRAIN_KINDS:
        return final_step_committed(job)
    return (job.run_dir / OUTPUTS[job.kind]).is_file()
