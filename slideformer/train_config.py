"""The fine-tuning configuration: one dataclass, read from YAML, every key also a command-line flag."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


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
    pack: bool = True  # pack short samples into full sequences
    lr: float = 1e-5
    schedule: str = "cosine"  # 'cosine' (to min_lr_ratio * lr) or 'constant', after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = None  # global-norm clipping (the plan's update waits for the norm)
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
    resume: bool = False  # continue from output_dir's latest checkpoint

    def validate(self) -> None:
        problems = []
        if not self.model:
            problems.append("model is required")
        if not self.data:
            problems.append("data is required (one or more files)")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.seq < 2 or self.batch < 1 or self.accumulation < 1:
            problems.append("seq >= 2, batch >= 1 and accumulation >= 1")
        if not 0 <= self.eval_fraction < 1:
            problems.append("eval_fraction must be in [0, 1)")
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append("device must be 'auto', 'cuda' or 'cpu'")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    @property
    def sequences_per_step(self) -> int:
        return self.batch * self.accumulation


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
    """The YAML file's values, overridden by any flag given."""
    values = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: no such config file")
        values = yaml.safe_load(p.read_text()) or {}
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        for key in ("data", "eval_data"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
    if args is not None:
        values |= {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


EXAMPLE = """\
# slideformer train --config this.yaml   (every key is also a flag: --lr 2e-5, --no-pack, ...)
model: /models/Llama-3.1-8B-Instruct   # HF directory (config.json + safetensors), or a preset: random weights
# tokenizer: /models/Llama-3.1-8B-Instruct   # default: the model directory
data: [chat.jsonl]          # .jsonl/.json/.parquet or datasets dirs: text, messages (chat) or instruction/input/output rows
eval_fraction: 0.02         # held-out share of sequences (or eval_data: [held_out.jsonl])
seq: 2048
batch: 8                    # sequences per micro-batch
accumulation: 1             # micro-batches per optimizer step
pack: true                  # pack short samples into full sequences
lr: 1.0e-5
schedule: cosine            # or constant; after warmup_steps of linear warmup
warmup_steps: 10
min_lr_ratio: 0.1
weight_decay: 0.0
adam_beta1: 0.9
adam_beta2: 0.999
max_grad_norm: null         # e.g. 1.0: exact global-norm clipping (updates wait for the norm: slower)
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
resume: false               # true: continue from output_dir's latest checkpoint
"""
