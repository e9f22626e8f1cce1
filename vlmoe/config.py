"""Run configuration: YAML files plus dotted ``key=value`` overrides, strictly checked.

Every key is a field of a dataclass below, so a mistyped key is an error that names it
(with the closest valid key) instead of a silently ignored setting. Every value is checked
when the config is loaded, before any work (``validate``): its type, its range (``RULES``)
and the checks that need more than one key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from smola.config import LoRAConfig, SMoLAConfig
from vlmoe.moe.config import MoEConfig


class UsageError(ValueError):
    """Bad input from the user (config, data, checkpoint path): reported without a traceback."""


class ConfigError(UsageError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    """Where the prepared datasets live and how each step samples them."""

    dir: str = "data/default"
    # per-rank micro-batch size of each subset; 0 leaves that objective out
    image_batch: int = 16
    text_batch: int = 16
    pair_batch: int = 16
    # pretraining: validation micro-batches per rank at each evaluation; 0 = no evaluation
    eval_batches: int = 4
    # fine-tuning: examples per rank in a micro-batch (and in an evaluation batch)
    batch_size: int = 32
    # fine-tuning: validation examples evaluated at each evaluation, the first ones of the
    # (hash-ordered) split; None = all (the paper: 1,024)
    eval_max_examples: Optional[int] = None
    # DataLoader processes per rank that prefetch batches (0: load in the training process)
    num_workers: int = 0


@dataclass
class PrepareConfig:
    """Inputs of ``vlmoe prepare``: which sources, and the tokenizers fitted on them."""

    # names from vlmoe.data.prepare (fashion_mnist, tuxpaint_stamps, noto_emoji, wordnet,
    # shakespeare) or user data written "jsonl:PATH", "image_folder:PATH", "text_files:PATH"
    sources: list = field(default_factory=lambda: ["fashion_mnist", "tuxpaint_stamps", "noto_emoji", "wordnet", "shakespeare"])
    max_items_per_source: Optional[int] = None
    val_fraction: float = 0.05
    text_vocab_size: int = 2000
    codebook_size: int = 256
    tokenizer_fit_images: int = 2000
    # texts and captions the text tokenizer is fitted on (a deterministic sample where there are more)
    tokenizer_fit_texts: int = 1_000_000
    # stored images' long side; null: 8/7 of the model's image_size (256 for 224)
    max_image_side: Optional[int] = None
    # processes that read, decode and encode the sources; null: the cores available
    num_workers: Optional[int] = None
    # records per unit of work: a unit is written at once, kept when done, redone when interrupted
    records_per_unit: int = 10_000
    # "kmeans" (fitted on the training images, the offline stand-in for BEiT v2's VQ-KD) or
    # "python:package.module:factory": a tokenizer of your own (vlmoe/data/visual_tokenizer.py),
    # whose codebook_size and patch_size replace prepare.codebook_size and the k-means fit
    visual_tokenizer: str = "kmeans"


@dataclass
class PretrainConfig:
    """Masked data modeling (BEiT-3): mask rates of the three objectives."""

    mlm_prob: float = 0.15
    mim_ratio: float = 0.4
    vlm_text_prob: float = 0.5
    vlm_image_ratio: float = 0.4


@dataclass
class FinetuneConfig:
    """``vlmoe finetune``: a task on a frozen or trainable base, by method.

    ``task``: a name from vlmoe.tasks. ``data``: the task's embedded data sets by name, or a
    user's ``jsonl:PATH`` / ``image_folder:PATH``; empty = the task's default. The task's data
    is built once under ``data.dir``/tasks (at most ``max_items_per_source`` examples per source
    and split, sampled by hash; records without a split go to validation by a hash of their image with
    ``val_fraction``). ``max_answers`` caps the VQA answer vocabulary (most frequent first).
    The base is a vlmoe pretraining run (``base_run``: its exported ``model/``) or a Hugging
    Face model (``hf_model``: a local model directory, or a config.json for a randomly
    initialised model; image classification only).
    ``method``: smola | lora | full; ``smola`` / ``lora`` hold that adapter's settings
    (smola.SMoLAConfig / smola.LoRAConfig, resolved and checked at load). ``generalist``: a SMoLA fine-tuning run
    whose adapter is loaded first, so that ``method: lora`` trains a per-task specialist on top
    of it (Omni-SMoLA 4.3.4). On a sparse base the routers and experts stay frozen;
    ``moe_router_noise`` / ``moe_aux_loss`` keep the base's router noise and add its balancing
    losses (whose gradient then reaches the adapters), both off by default.
    """

    task: str = "image_classification"
    data: list = field(default_factory=list)
    max_items_per_source: Optional[int] = None
    val_fraction: float = 0.1
    max_answers: Optional[int] = None
    moe_router_noise: bool = False
    moe_aux_loss: bool = False
    base_run: Optional[str] = None
    hf_model: Optional[str] = None
    method: str = "smola"
    smola: SMoLAConfig = field(default_factory=SMoLAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    generalist: Optional[str] = None


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpoint cadence."""

    steps: int = 300
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # gradient norm clipping; 0 = none
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 1
    log_every: int = 10
    eval_every: int = 100
    # evaluate before the first step (logged at step 0 with the task's trivial baseline)
    eval_at_start: bool = False
    save_every: int = 100
    keep_checkpoints: int = 2
    dist_timeout_s: int = 600
    # DeepSpeed's shared-memory allreduce on CPU: faster, but a 1-2 minute build on first use
    shm_comm: bool = True
    progress_bar: bool = True
    # a NaN/Inf loss: "stop" the run (no checkpoint of it, last_good intact) or "skip" that step's
    # update and count it, stopping after max_nonfinite_skips
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10


@dataclass
class EvalConfig:
    """``vlmoe eval RUN_DIR``: which committed checkpoint to evaluate: "last_good", "best" or a
    tag such as "step_00000200"."""

    checkpoint: str = "last_good"


@dataclass
class ModelSection:
    """``preset`` picks tiny | small | base; any other key overrides that preset's field."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    run_dir: str = "runs/pretrain-tiny"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # sparse MoE FFNs (vlmoe.moe.MoEConfig); absent = dense backbone
    moe: Optional[MoEConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # a DeepSpeed JSON file (path, or a name in ds_configs/) merged over the generated
    # settings, then the `deepspeed` mapping merged over both
    ds_config: Optional[str] = None
    deepspeed: dict = field(default_factory=dict)


PRECISIONS = ("fp32", "bf16", "fp16")
FINETUNE_METHODS = ("smola", "lora", "full")
NONFINITE_ACTIONS = ("stop", "skip")
CONFIG_DIR = Path(__file__).parent / "configs"
# model fields that `vlmoe prepare` fixes (prepare.text_vocab_size, prepare.codebook_size)
MODEL_FIELDS_FROM_DATA = ("vocab_size", "codebook_size")


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: finite, from ``lo`` to ``hi`` (either open, or absent).

    ``meaning``: what a special value means, shown in the error (``"0: no evaluation"``).
    A key whose type is Optional also allows null.
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    meaning: str = ""

    def admits(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.lo is None or (value > self.lo if self.lo_open else value >= self.lo))
                and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)))

    def describe(self, integer: bool) -> str:
        if self.lo is not None and self.hi is not None:
            kind = "an integer" if integer else "a number"
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        kind = "an integer" if integer else "a finite number"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo}"
        return f"{kind} {'<' if self.hi_open else '<='} {self.hi}"


NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)  # floats; a positive int is Range(lo=1)
AT_LEAST_1 = Range(lo=1)
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)

# The range of every int and float key (tests/test_config.py checks that none is missing).
RULES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1),
    "data.image_batch": Range(lo=0, meaning="0: leave the image objective out"),
    "data.text_batch": Range(lo=0, meaning="0: leave the text objective out"),
    "data.pair_batch": Range(lo=0, meaning="0: leave the image-text objective out"),
    "data.eval_batches": Range(lo=0, meaning="0: no evaluation"),
    "data.batch_size": AT_LEAST_1,
    "data.eval_max_examples": Range(lo=1, meaning="null: all"),
    "data.num_workers": Range(lo=0, meaning="0: load in the training process"),
    "prepare.max_items_per_source": Range(lo=1, meaning="null: all"),
    "prepare.val_fraction": Range(0, 1, hi_open=True),
    "prepare.text_vocab_size": Range(lo=16),
    "prepare.codebook_size": Range(lo=2),
    "prepare.tokenizer_fit_images": AT_LEAST_1,
    "prepare.tokenizer_fit_texts": AT_LEAST_1,
    "prepare.max_image_side": Range(lo=1, meaning="null: 8/7 of model.image_size"),
    "prepare.num_workers": Range(lo=1, meaning="null: the cores available"),
    "prepare.records_per_unit": AT_LEAST_1,
    "pretrain.mlm_prob": OPEN_UNIT,
    "pretrain.mim_ratio": OPEN_UNIT,
    "pretrain.vlm_text_prob": OPEN_UNIT,
    "pretrain.vlm_image_ratio": OPEN_UNIT,
    "finetune.max_items_per_source": Range(lo=1, meaning="null: all"),
    "finetune.val_fraction": OPEN_UNIT,
    "finetune.max_answers": Range(lo=1, meaning="null: all"),
    "train.steps": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.min_lr": NON_NEGATIVE,  # and <= train.lr
    "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.eps": POSITIVE,
    "train.grad_clip": Range(lo=0, meaning="0: no clipping"),
    "train.zero_stage": Range(0, 3),
    "train.log_every": AT_LEAST_1,
    "train.eval_every": AT_LEAST_1,
    "train.save_every": AT_LEAST_1,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.dist_timeout_s": AT_LEAST_1,
    "train.max_nonfinite_skips": Range(lo=0, meaning="0: stop at the first"),
}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X], or one of several types (str or list)
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(typ)):
            return None
        for inner in options[:-1]:
            try:
                return _coerce(value, inner, key)
            except ConfigError:
                continue
        return _coerce(value, options[-1], key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}': {value} is too large for a float") from None
    expected = origin or typ
    if expected is list and isinstance(value, str):  # one entry of a list: data=jsonl:/x.jsonl
        value = [value]
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-3" as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': expected {getattr(expected, '__name__', expected)}, got {value!r}")
    if expected is list and typing.get_args(typ):  # list[float]: each entry checked too
        (inner,) = typing.get_args(typ)
        return [_coerce(item, inner, f"{key}[{i}]") for i, item in enumerate(value)]
    return value


def _section_type(typ: Any) -> Optional[type]:
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None."""
    options = [a for a in typing.get_args(typ) if a is not type(None)] if typing.get_origin(typ) is typing.Union else [typ]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    """A config section of type ``cls`` from its mapping: every section (the run's own and the
    moe / SMoLA / LoRA settings) goes through this one unknown-key and type check; the
    section's own checks (``__post_init__``) are reported under its name."""
    section = prefix.rstrip(".") or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{section}': expected a mapping, got {data!r}")
    if cls is ModelSection:
        return _model_section(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, names)}")
        typ = hints[key]
        inner = _section_type(typ)
        if inner is not None and value is not None:
            kwargs[key] = _from_dict(inner, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section '{section}': {exc}") from exc


def _model_section(data: dict, prefix: str) -> ModelSection:
    """``preset`` plus overrides, each a ModelConfig field of its type (ranges: ``validate``)."""
    from vlmoe.model.config import ModelConfig

    data = dict(data)
    preset = _coerce(data.pop("preset", "tiny"), str, prefix + "preset")
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, ['preset', *hints])}")
        overrides[key] = _coerce(value, hints[key], prefix + key)
    return ModelSection(preset=preset, overrides=overrides)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "model.depth=2"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def resolve_shipped(name: str, directory: Path, what: str) -> Path:
    """A path to a YAML file, or the name of one shipped in ``directory``; else an error listing them."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = directory / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in directory.glob("*.yaml"))
    raise ConfigError(f"{what} '{name}' not found (shipped: {', '.join(available)})")


def resolve_config_path(name: str) -> Path:
    """A path to a YAML file, or the name of one shipped in vlmoe/configs (``pretrain_tiny``)."""
    return resolve_shipped(name, CONFIG_DIR, "config file")


def load_config(name: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a YAML config (path or shipped name), apply dotted overrides, validate."""
    path = resolve_config_path(name)
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    tree = merge_dicts(tree, parse_overrides(overrides or []))
    cfg = _from_dict(RunConfig, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every value, before any work: the range of each numeric key (``RULES``), the model and
    adapter sections, and the checks that need more than one key."""
    for key, rule in RULES.items():
        _check_range(cfg, key, rule)
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise ConfigError(f"config key 'train.precision': {t.precision!r} is not one of {PRECISIONS}")
    if t.on_nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError(f"config key 'train.on_nonfinite': {t.on_nonfinite!r} is not one of {NONFINITE_ACTIONS}")
    if t.on_nonfinite == "skip" and t.grad_accum != 1:
        # a skipped micro-batch would leave the others' gradients half-accumulated in the engine
        raise ConfigError(f"config key 'train.on_nonfinite': 'skip' needs train.grad_accum=1, got {t.grad_accum}")
    if len(t.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in t.betas):
        raise ConfigError(f"config key 'train.betas' must be two numbers, each in [0, 1), got {t.betas}")
    if t.min_lr > t.lr:
        raise ConfigError(f"config key 'train.min_lr' must be <= train.lr ({t.lr}), got {t.min_lr}")
    spec = cfg.prepare.visual_tokenizer
    if spec != "kmeans" and not re.fullmatch(r"python:[\w.]+:\w+", spec):
        raise ConfigError(f"config key 'prepare.visual_tokenizer' must be 'kmeans' or 'python:package.module:factory', "
                          f"got {spec!r}")
    d = cfg.data
    if d.image_batch + d.text_batch + d.pair_batch == 0:
        raise ConfigError("config keys 'data.image_batch', 'data.text_batch', 'data.pair_batch': at least one must be > 0")
    _check_model(cfg.model)
    for key, section in (("moe", cfg.moe), ("finetune.smola", cfg.finetune.smola), ("finetune.lora", cfg.finetune.lora)):
        _check_finite(section, key)
    f = cfg.finetune
    if f.method not in FINETUNE_METHODS:
        raise ConfigError(f"config key 'finetune.method': {f.method!r} is not one of {FINETUNE_METHODS}")
    if f.base_run is not None and f.hf_model is not None:
        raise ConfigError("config keys 'finetune.base_run' and 'finetune.hf_model': set only one")
    if f.generalist is not None and f.method != "lora":
        raise ConfigError("config key 'finetune.generalist': a specialist on a SMoLA generalist trains method 'lora'")


def _check_range(cfg: RunConfig, key: str, rule: Range) -> None:
    *sections, name = key.split(".")
    owner = cfg
    for section in sections:
        owner = getattr(owner, section)
    value = getattr(owner, name)
    typ = typing.get_type_hints(type(owner))[name]
    optional = typing.get_origin(typ) is typing.Union
    if value is None and optional:
        return
    if not rule.admits(value):
        allowed = rule.describe(integer=int in (typ, *typing.get_args(typ)))
        allowed += " or null" if optional else ""
        allowed += f" ({rule.meaning})" if rule.meaning else ""
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")


def _check_model(model: ModelSection) -> None:
    """The preset and its overrides make a valid ModelConfig (field names and types: ``_model_section``)."""
    from vlmoe.model.config import PRESETS, model_config

    if model.preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset' must be one of {sorted(PRESETS)}, got {model.preset!r}")
    for key, value in model.overrides.items():
        if key in MODEL_FIELDS_FROM_DATA:
            raise ConfigError(f"config key 'model.{key}' is set by the prepared tokenizers "
                              "(prepare.text_vocab_size, prepare.codebook_size); remove it")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key 'model.{key}' must be a finite number, got {value!r}")
    try:
        model_config(model.preset, **model.overrides)
    except (TypeError, ValueError) as exc:
        given = "".join(f", model.{k}={v!r}" for k, v in model.overrides.items())
        raise ConfigError(f"config section 'model' (preset {model.preset!r}{given}): {exc}") from exc


def _check_finite(section: Any, prefix: str) -> None:
    """No NaN or infinity in a section's float fields (its own checks compare, and NaN passes them)."""
    if section is None:
        return
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{prefix}.{f.name}' must be a finite number, got {value!r}")


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data (written to RUN_DIR/config.yaml)."""
    tree = dataclasses.asdict(cfg)
    tree["model"] = {"preset": cfg.model.preset, **cfg.model.overrides}
    return tree


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
