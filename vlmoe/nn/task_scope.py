"""Which pretraining task (mlm / mim / vlm) the current forward pass serves, for per-task metrics."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

_CURRENT_TASK: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vlmoe_task", default=None)


@contextlib.contextmanager
def task_scope(name: str) -> Iterator[str]:
    """Mark every forward call inside this block as serving task `name` (nests; restored on exit)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    token = _CURRENT_TASK.set(name)
    try:
        yield name
    finally:
        _CURRENT_TASK.reset(token)


def current_task() -> Optional[str]:
    """The innermost task name, or None outside any `task_scope`."""
    return _CURRENT_TASK.get()
