"""Downstream tasks, one file each: data builder, head, loss and metrics.

    from vlmoe.tasks import get_task
    task = get_task("vqa")

Each task: its embedded data (real, or constructed and said so), head and main metric:
    image_classification  Fashion-MNIST / Noto emoji groups; mean of patches, LayerNorm, linear; accuracy
    vqa                   easy-VQA + emoji / Tux Paint questions; [T_CLS] pooler, MLP, BCE; VQA accuracy
    retrieval             Noto emoji and Tux Paint captions; dual encoders (ITC) + matching (ITM); r_mean
    nlvr2                 constructed from easy-VQA attributes; two passes' [T_CLS], MLP; accuracy
    nli                   constructed from WordNet relations (text only); [T_CLS] pooler, linear; accuracy
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmoe.tasks.base import DownstreamTask

# the registry: each name is a module of this package defining TASK (imported on first use,
# so that checking a config does not import torch)
TASK_NAMES = ("image_classification", "vqa", "retrieval", "nlvr2", "nli")


def get_task(name: str) -> "DownstreamTask":
    """The task called ``name``; an unknown name is a ValueError listing the tasks."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"vlmoe.tasks.{name}").TASK
