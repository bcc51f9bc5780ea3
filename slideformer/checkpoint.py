"""Checkpoints: a Hugging Face model directory plus the exact training state, written atomically.

    output_dir/checkpoints/step-000100/   config.json, model*.safetensors (bf16), tokenizer files,
                                          training_state.safetensors (fp32 masters, AdamW states),
                                          trainer_state.json (step, data position, RNG, config)
    output_dir/checkpoints/LATEST         the name of the newest complete checkpoint

A checkpoint is built in `step-N.tmp` and renamed into place, then LATEST is replaced: a run killed at
any moment leaves the previous checkpoint intact and LATEST pointing at a complete one.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from slideformer.models.config import ModelConfig
from slideformer.models.weights import save_hf_checkpoint
from slideformer.runtime.disk import DeferredTensor

STATE_FILE = "training_state.safetensors"
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor | DeferredTensor]]) -> None:
    """The safetensors format written tensor by tensor, in order, without copying (views of one buffer are
    fine); deferred tensors are loaded only when their turn comes."""
    items = list(tensors)
    header, offset = {}, 0
    for name, t in items:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in items:
            t = (t.load() if isinstance(t, DeferredTensor) else t).detach().contiguous()
            f.write(t.view(torch.uint8).reshape(-1).numpy().data if t.nbytes else b"")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, model_cfg: ModelConfig, engine, tokenizer_files: list[Path],
                    trainer_state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(model_cfg, engine.hf_state(torch.bfloat16), tmp)  # the model files are bf16
    for f in tokenizer_files:
        shutil.copy2(f, tmp / f.name)
    write_safetensors(tmp / STATE_FILE, engine.training_state().items())
    state = trainer_state | {"rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = root / "LATEST.tmp"
    latest.write_text(final.name)
    os.replace(latest, root / "LATEST")
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[: max(len(done) - keep, 0)]:
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "LATEST"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, engine) -> dict:
    """Restore the engine's training state; returns trainer_state.json (RNG restored too)."""
    with safe_open(path / STATE_FILE, "pt", device="cpu") as f:
        engine.load_training_state(f.get_tensor, set(f.keys()))
    state = json.loads((path / "trainer_state.json").read_text())
    rng = torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return state
