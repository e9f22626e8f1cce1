"""What a run prints: each warning once, known library warnings on rank 0 only, header and summary."""
import warnings

import pytest

from vlmoe.train import logs


@pytest.fixture
def fresh_display(monkeypatch):
    monkeypatch.setattr(logs, "_shown", set())
    with warnings.catch_warnings():
        warnings.resetwarnings()
        yield


def _deepspeed_collective():
    # as torch's c10d_logger warns on every call of a deprecated collective, from one line
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                  "`torch.distributed.all_gather_single` instead.", FutureWarning)


def test_each_warning_is_shown_once_on_one_line(fresh_display, capsys):
    logs.show_warnings_once(is_main=True)
    for _ in range(5):
        _deepspeed_collective()
        warnings.warn("tutel is not installed", RuntimeWarning)
    warnings.warn("another message", RuntimeWarning)
    assert capsys.readouterr().err.splitlines() == [
        "warning: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated. Please use "
        "`torch.distributed.all_gather_single` instead.",
        "warning: RuntimeWarning: tutel is not installed",
        "warning: RuntimeWarning: another message"]


def test_other_ranks_drop_known_library_warnings_only(fresh_display, capsys):
    logs.show_warnings_once(is_main=False)
    _deepspeed_collective()
    warnings.warn("TypedStorage is deprecated", UserWarning)
    warnings.warn("the base was pretrained with tutel", RuntimeWarning)  # ours: every rank may need to say it
    assert capsys.readouterr().err.splitlines() == ["warning: RuntimeWarning: the base was pretrained with tutel"]


def test_header_and_summary_lines():
    assert logs.run_header("pretrain", "runs/x", "pretrain_tiny train.steps=9", 2, 1, 2, "bf16", 0, 9, "tcmalloc") == (
        "pretrain (pretrain_tiny train.steps=9) -> runs/x: world size 2, ZeRO stage 1, EP size 2, precision bf16, 9 steps, "
        "tcmalloc")
    assert logs.run_header("finetune", "runs/y", "", 4, 3, 1, "fp32", 600, 900, "system malloc").endswith(
        "precision fp32, steps 600 -> 900, system malloc")
    assert logs.run_summary(600, 900, 12.5, 50_000) == "done: step 900 (300 steps in 12.5 s, 4,000 tokens/s)"
