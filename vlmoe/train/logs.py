"""What a run prints: a header naming the run, each library warning once, and a closing summary.

Libraries warn per call site and per rank: DeepSpeed's deprecated collectives alone printed the
same FutureWarning eight times on two ranks of a fine-tune, burying the progress bar and the
errors. Here every warning is shown once per run (by category and text), on one line, written
above rank 0's progress bar; the known library warnings (``KNOWN_LIBRARY_WARNINGS``: nothing a
user can act on) are shown by rank 0 only.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional, TextIO

# (category, start of the message): warnings from inside libraries, the same on every rank
KNOWN_LIBRARY_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),  # DeepSpeed's collectives (torch 2.13)
    (FutureWarning, r"torch\.distributed\._\w+ is a private function"),  # the same, older torch
    (UserWarning, r"TypedStorage is deprecated"),
)

_shown: set[tuple[str, str]] = set()


def _show_once(message: Warning | str, category: type[Warning], filename: str, lineno: int,
               file: Optional[TextIO] = None, line: Optional[str] = None) -> None:
    key = (category.__name__, str(message))
    if key in _shown:
        return
    _shown.add(key)
    from tqdm import tqdm

    tqdm.write(f"warning: {category.__name__}: {message}", file=file or sys.stderr)


def show_warnings_once(is_main: bool) -> None:
    """Install the once-per-run display; ranks other than the main one drop the known library warnings."""
    for category, pattern in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("always" if is_main else "ignore", message=pattern, category=category)
    warnings.showwarning = _show_once


def run_header(command: str, run_dir: str, origin: str, world_size: int, zero_stage: int, ep_size: int,
               precision: str, start_step: int, steps: int, allocator: str) -> str:
    """One line naming what runs, where, and how (printed by rank 0 before the first step)."""
    span = f"steps {start_step} -> {steps}" if start_step else f"{steps} steps"
    source = f" ({origin})" if origin else ""
    return (f"{command}{source} -> {run_dir}: world size {world_size}, ZeRO stage {zero_stage}, EP size {ep_size}, "
            f"precision {precision}, {span}, {allocator}")


def run_summary(start_step: int, steps: int, seconds: float, tokens: float) -> str:
    """The closing line: the steps this invocation trained, its wall-clock and its throughput
    (tokens of all ranks per second)."""
    rate = tokens / seconds if seconds > 0 else 0.0
    return f"done: step {steps} ({steps - start_step} steps in {seconds:.1f} s, {rate:,.0f} tokens/s)"
