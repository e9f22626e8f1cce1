"""Run-directory metrics: metrics.jsonl (one JSON object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class MetricsLog:
    """Writes on rank 0 only (``enabled``); a resumed run first drops records past its step.

    Dropping them keeps metrics.jsonl the record of one run: the steps a crashed run logged
    after its last checkpoint are logged again, with the same values, by the resumed run.
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.resumed_time_s = 0.0  # "time_s" of the last record kept: the clock of a resumed run goes on from it
        if not enabled:
            return
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    continue
                if record.get("step", math.inf) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self.resumed_time_s = record.get("time_s", self.resumed_time_s)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one record ``{"step": step, **values}`` and mirror it to TensorBoard."""
        if not self.enabled:
            return
        # JSON has no NaN or Inf: a non-finite value is written as null
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike, key: Optional[str] = None) -> list[dict]:
    """All records of a run's metrics.jsonl, optionally only those that have ``key``."""
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if key is None or key in r]
