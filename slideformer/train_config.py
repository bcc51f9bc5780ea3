"""The fine-tuning configuration: one dataclass, read from YAML, every key also a command-line flag."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slideformer.dataset import PACKINGS


class ConfigError(ValueError):
    pass


REPORTERS = ("tensorboard", "wandb")  # metrics sinks besides metrics.jsonl


@dataclass
class TrainConfig:
    model: str = ""  # Hugging Face model directory (config.json + safetensors), or a preset (random weights)
    tokenizer: str | None = None  # directory with tokenizer.json (default: the model directory)
    data: list[str] = field(default_factory=list)  # .jsonl / .json / .parquet files or datasets directories
    eval_data: list[str] = field(default_factory=list)  # held-out files; else eval_fraction of the data
    eval_fraction: float = 0.0
    seq: int = 2048
    batch: int = 8  # sequences per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step (accumulated layer by layer, exact)
    pack: bool = True  # pack short samples into full sequences (attention stays within each sample)
    # With pack: let a sample attend to the samples before it in its sequence (cheaper attention, other maths)
    cross_sample_attention: bool = False
    # With pack: 'best_fit' keeps each sample whole in one sequence (the rest padded); 'padding_free' the
    # same into bins of the plan's chunk of sequences, samples crossing them (only a bin's tail padded; our
    # own numerics); 'stream' cuts the concatenated samples every seq tokens (a cut sample's rest runs alone)
    packing: str = "best_fit"
    max_cut_fraction: float = 0.0  # share of rows that pack: false may truncate or drop at seq; more stops the run
    lr: float = 1e-5
    schedule: str = "cosine"  # 'cosine' (to min_lr_ratio * lr) or 'constant', after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = None  # global-norm clipping (the plan's update waits for the norm)
    nonfinite: str = "stop"  # a non-finite loss or gradient norm: 'stop' the run, or 'skip' the step's update
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    output_dir: str = "runs/slideformer"
    seed: int = 0
    plan: str = "auto"  # 'auto' (the planner picks the fastest plan that fits) or a plan JSON
    profile: str = "h100-80gb"  # machine profile the planner scores plans with
    disk_dir: str | None = None  # the disk tier's directory (on a local NVMe), for layers' states
    disk_budget_gb: float | None = None  # GiB of it plan 'auto' may use (default: 90% of its free space)
    device: str = "auto"  # 'auto', 'cuda' or 'cpu'
    # Data-parallel processes, one per GPU (on device 'cpu', CPU processes): each trains batch x accumulation
    # sequences of every step and the host AdamW is sharded between them; under torchrun, its world is used
    gpus: int = 1
    # Where metrics go besides metrics.jsonl: 'tensorboard' (when installed, else off) and 'wandb' (needs wandb)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: bool = False  # continue from output_dir's newest valid checkpoint
    overwrite: bool = False  # start again in an output_dir that holds an earlier run (its files are removed)

    def validate(self, rows_given: bool = False) -> None:
        """Every field's type, range and the relations between fields; all problems in one message.
        `rows_given`: the training rows come from Python (`slideformer.finetune(dataset=...)`), not from `data`."""
        problems = []
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, _typed(getattr(self, f.name), hints[f.name]))
            except ValueError as e:
                problems.append(f"{f.name} {e}")
        if problems:  # ranges below need the types right
            raise ConfigError("invalid training config: " + "; ".join(problems))
        if not self.model:
            problems.append("model is required")
        if not self.data and not rows_given:
            problems.append("data is required (one or more files)")
        if self.data and rows_given:
            problems.append("give data (files) or a dataset, not both")
        unknown = sorted(set(self.report_to) - set(REPORTERS))
        if unknown:
            problems.append(f"report_to takes {list(REPORTERS)}, not {unknown}")
        elif "wandb" in self.report_to and importlib.util.find_spec("wandb") is None:
            problems.append("report_to 'wandb' needs the wandb package: pip install wandb")
        if self.packing not in PACKINGS:
            problems.append(f"packing must be one of {list(PACKINGS)}, not {self.packing!r}")
        elif self.packing == "padding_free" and (not self.pack or self.cross_sample_attention):
            problems.append(
                "packing 'padding_free' keeps samples apart: it needs pack: true and cross_sample_attention: false"
            )
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.nonfinite not in ("stop", "skip"):
            problems.append(f"nonfinite must be 'stop' or 'skip', not {self.nonfinite!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append(f"device must be 'auto', 'cuda' or 'cpu', not {self.device!r}")
        for name, low in (
            ("gpus", 1),
            ("seq", 2),
            ("batch", 1),
            ("accumulation", 1),
            ("epochs", 1),
            ("keep_checkpoints", 1),
            ("warmup_steps", 0),
            ("eval_every", 0),
            ("save_every", 0),
            ("max_steps", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                problems.append(f"{name} must be >= {low}, got {value}")
        for name in ("lr", "max_grad_norm", "disk_budget_gb"):  # a negative lr or clip norm ascends the loss
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0, got {value}")
        for name, low, high in (("eval_fraction", 0, 1), ("adam_beta1", 0, 1), ("adam_beta2", 0, 1)):
            if not low <= getattr(self, name) < high:
                problems.append(f"{name} must be in [{low}, {high}), got {getattr(self, name)}")
        for name in ("min_lr_ratio", "max_cut_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.resume and self.overwrite:
            problems.append("give resume or overwrite, not both")
        if self.eval_data and self.eval_fraction:
            problems.append("give eval_data or eval_fraction, not both")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps {self.warmup_steps} is longer than max_steps {self.max_steps}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    @property
    def sequences_per_step(self) -> int:
        """Per process (GPU); every step trains `gpus` times as many."""
        return self.batch * self.accumulation


# What a resumed run may change: how the run is executed and recorded, not what it computes. max_steps and epochs
# may move the end (the schedule follows the new length), not to before the checkpoint (the run checks that).
RESUMABLE_CHANGES = {
    "resume",
    "overwrite",
    "output_dir",
    "device",
    "plan",
    "profile",
    "disk_dir",
    "disk_budget_gb",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "max_steps",
    "epochs",
    "report_to",
}


# Settings added after checkpoints were first written, at the value that computes what runs before them did
# (packed runs before per-sample attention differ in their tokenized data, which the resume checks too).
ADDED_SETTINGS = {"cross_sample_attention": False, "gpus": 1, "packing": "stream"}
# May change on resume as long as the step's sequences (batch x accumulation x gpus) stay the same: the
# optimizer step is the same maths on any number of processes.
SPLITS_OF_A_STEP = ("accumulation", "gpus")


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings that differ from a checkpoint's and may not ('name: old -> new')."""
    saved = ADDED_SETTINGS | saved
    changes = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in dataclasses.asdict(cfg).items()
        if k not in RESUMABLE_CHANGES and k not in SPLITS_OF_A_STEP and saved.get(k) != v
    ]
    before = saved.get("batch", 0) * saved.get("accumulation", 1) * saved.get("gpus", 1)
    if before != cfg.sequences_per_step * cfg.gpus:
        changes.append(
            f"sequences per step (batch x accumulation x gpus): {before} -> {cfg.sequences_per_step * cfg.gpus}"
        )
    return changes


def _typed(value, hint):
    """`value` as the field's type. Numbers may come as strings: PyYAML reads `3e-3` (no dot) as one."""
    optional = type(None) in typing.get_args(hint)
    kind, many = _flag_type(hint)
    if value is None:
        if optional:
            return None
        raise ValueError("must be set")
    if many:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {kind.__name__}, got {value!r}")
        return [_typed(v, kind) for v in value]
    if kind is bool or isinstance(value, bool):  # bool is an int to Python: never let one stand for the other
        if not isinstance(value, bool) or kind is not bool:
            raise ValueError(f"must be {_NAMES[kind]}, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            raise ValueError(f"must be {_NAMES[kind]}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"must be {_NAMES[kind]}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value!r}")
    return kind(value)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _flag_type(hint) -> tuple[type, bool]:
    """(element type, is list) for a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    if args:
        return _flag_type(args[0])
    return hint, False


def add_flags(ap: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, many = _flag_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(name, type=kind, nargs="+" if many else None, default=None)


def load_config(path: str | None, args: argparse.Namespace | None = None) -> TrainConfig:
    """The YAML file's values, overridden by any flag given, validated."""
    cfg = TrainConfig(**config_values(path, args))
    cfg.validate()
    return cfg


def config_values(path: str | None, args: argparse.Namespace | None = None) -> dict[str, typing.Any]:
    """The YAML file's keys and values (unknown keys refused), overridden by any flag given; not validated."""
    values: dict[str, typing.Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    if args is not None:
        values |= {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None
        }
    return values


EXAMPLE = """\
# slideformer train --config this.yaml   (every key is also a flag: --lr 2e-5, --no-pack, ...)
model: /models/Llama-3.1-8B-Instruct   # HF directory (config.json + safetensors), or a preset: random weights
# tokenizer: /models/Llama-3.1-8B-Instruct   # default: the model directory
data: [chat.jsonl]          # .jsonl/.json/.parquet or datasets dirs: text, messages (chat) or instruction/input/output rows
eval_fraction: 0.02         # held-out share of sequences (or eval_data: [held_out.jsonl])
seq: 2048
batch: 8                    # sequences per micro-batch
accumulation: 1             # micro-batches per optimizer step
pack: true                  # pack short samples into full sequences; attention stays within each sample
cross_sample_attention: false  # true: packed samples also attend to those before them (cheaper, other maths)
packing: best_fit           # with pack: whole samples per sequence; 'padding_free' per chunk of sequences; 'stream' cuts at seq
max_cut_fraction: 0.0       # with pack: false, the share of rows that may be truncated or dropped at seq
lr: 1.0e-5
schedule: cosine            # or constant; after warmup_steps of linear warmup
warmup_steps: 10
min_lr_ratio: 0.1
weight_decay: 0.0
adam_beta1: 0.9
adam_beta2: 0.999
max_grad_norm: null         # e.g. 1.0: exact global-norm clipping (updates wait for the norm: slower)
nonfinite: stop             # a NaN/inf loss or gradient norm stops the run; skip: that step updates nothing
epochs: 1
max_steps: null             # stops earlier than epochs when set
eval_every: 50              # 0: at the end only
save_every: 100             # HF checkpoint + training state; 0: at the end only
keep_checkpoints: 2
output_dir: runs/llama-chat
seed: 0
plan: auto                  # or a plan JSON from `slideformer plan --out`
profile: h100-80gb          # machine profile the planner uses (slideformer calibrate makes one)
disk_dir: null              # e.g. /nvme/slideformer: lets the planner keep layers' states on disk when RAM is short
disk_budget_gb: null        # default: 90% of disk_dir's free space
device: auto
gpus: 1                     # data-parallel GPUs of this host (or run under torchrun); each trains batch x accumulation
report_to: [tensorboard]    # metrics besides metrics.jsonl: tensorboard (when installed), wandb (needs wandb); [] for none
resume: false               # true: continue from output_dir's newest valid checkpoint
overwrite: false            # true: start again in an output_dir that holds an earlier run (removes its files)
"""
