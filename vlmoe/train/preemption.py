"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it stops a job) saves the run and exits.

The handler only records the signal; the training loop checks it once per step on every rank
(one all-reduce), so a signal that reaches any one rank, or the launcher that forwards it, makes
every rank finish the current step, save and commit one checkpoint at it, and exit with
`EXIT_CODE`. Rerunning the same command resumes from that step exactly.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with the work saved; run the same command again


class Preempted(Exception):
    """Training stopped on a signal after committing a checkpoint; the message names the step."""


class SignalFlag:
    """The first preemption signal received while installed (``None`` until one arrives)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum


@contextmanager
def preemption_signals() -> Iterator[SignalFlag]:
    """Record SIGTERM / SIGUSR1 instead of dying on them; the previous handlers come back after."""
    flag = SignalFlag()
    previous = {sig: signal.signal(sig, flag._record) for sig in PREEMPTION_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
