"""``vlmoe prepare | pretrain | finetune CONFIG [key=value ...]``, ``vlmoe eval RUN_DIR [key=value ...]``,
``vlmoe study GRID [key=value ...] [--emit commands|slurm]`` and ``vlmoe report STUDY_DIR``;
``vlmoe prepare CONFIG [...] --shard i/N`` on each of N nodes, then ``--merge`` once.

CONFIG is a YAML path or the name of a shipped config (``vlmoe/configs/*.yaml``); RUN_DIR a
run directory that ``pretrain`` or ``finetune`` wrote. Launch on several ranks with
``deepspeed --num_gpus N --module vlmoe pretrain ...`` or ``torchrun --nproc_per_node N -m vlmoe ...``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

from vlmoe.config import UsageError, load_config
from vlmoe.data.sources import DataError
from vlmoe.train.distributed import leave, shutdown_distributed
from vlmoe.train.nonfinite import EXIT_CODE as NONFINITE_EXIT_CODE, NonFiniteError
from vlmoe.train.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE, Preempted


def _prepare(config: str, overrides: list[str], shard: str = "0/1", merge: bool = False) -> None:
    from vlmoe.data.prepare import Shard, SourceSpec, prepare
    from vlmoe.model.config import model_config

    cfg = load_config(config, overrides)
    p = cfg.prepare
    specs = []
    for entry in p.sources:
        name, _, path = str(entry).partition(":")
        specs.append(SourceSpec(name=name, path=path or None, max_items=p.max_items_per_source))
    preset = model_config(cfg.model.preset, **cfg.model.overrides)
    workers = p.num_workers if p.num_workers is not None else len(os.sched_getaffinity(0))
    prepare(cfg.data.dir, specs, val_fraction=p.val_fraction, seed=cfg.seed, text_vocab_size=p.text_vocab_size,
            image_size=preset.image_size, patch_size=preset.patch_size, codebook_size=p.codebook_size,
            tokenizer_fit_images=p.tokenizer_fit_images, tokenizer_fit_texts=p.tokenizer_fit_texts,
            visual_tokenizer=p.visual_tokenizer, max_image_side=p.max_image_side, num_workers=workers,
            records_per_unit=p.records_per_unit, shard=Shard.parse(shard), merge_only=merge)


def _pretrain(config: str, overrides: list[str]) -> None:
    from vlmoe.train.pretrain import pretrain

    pretrain(load_config(config, overrides), origin=" ".join([config, *overrides]))


def _finetune(config: str, overrides: list[str]) -> None:
    from vlmoe.train.finetune import finetune

    finetune(load_config(config, overrides), origin=" ".join([config, *overrides]))


def _eval(run_dir: str, overrides: list[str]) -> None:
    from vlmoe.train.evaluate import evaluate_run

    evaluate_run(run_dir, overrides)


COMMANDS = {"prepare": _prepare, "pretrain": _pretrain, "finetune": _finetune, "eval": _eval}


def _strip_launcher_args(argv: list[str]) -> list[str]:
    # The deepspeed launcher appends --local_rank=N (the rank also arrives in LOCAL_RANK).
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


STUDY_COMMANDS = ("study", "report")


def main(argv: Optional[list[str]] = None) -> None:
    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STUDY_COMMANDS:  # they launch runs (or read them); their own options
        from vlmoe.study.cli import report_main, study_main

        try:
            sys.exit((study_main if argv[0] == "study" else report_main)(argv[1:]))
        except (UsageError, DataError) as exc:
            sys.exit(f"vlmoe {argv[0]}: error: {exc}")
    parser = argparse.ArgumentParser(prog="vlmoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted([*COMMANDS, *STUDY_COMMANDS]))
    parser.add_argument("config", help="YAML file, or a shipped config name such as pretrain_tiny; for eval: RUN_DIR")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.depth=6")
    parser.add_argument("--shard", default="0/1", help="prepare: write only node i's share of N (i/N, or auto: the "
                        "launcher's rank); then one run with --merge fits the tokenizers")
    parser.add_argument("--merge", action="store_true", help="prepare: after every --shard i/N is done")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.command != "prepare" and (args.shard != "0/1" or args.merge):
            raise UsageError("--shard and --merge are options of `vlmoe prepare`")
        if args.command == "prepare":
            _prepare(args.config, args.overrides, args.shard, args.merge)
        else:
            COMMANDS[args.command](args.config, args.overrides)
        shutdown_distributed()
    except (UsageError, DataError) as exc:  # bad config or data: a message, not a traceback
        leave(2, f"vlmoe: error: {exc}")
    except NonFiniteError as exc:  # the run's committed checkpoint is intact
        leave(NONFINITE_EXIT_CODE, f"vlmoe: stopped: {exc}")
    except Preempted as exc:  # saved: the same command resumes
        leave(PREEMPTED_EXIT_CODE, f"vlmoe: preempted: {exc}")
