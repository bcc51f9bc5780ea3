"""Checkpoints: a Hugging Face model directory plus the exact training state, written atomically and checksummed.

    output_dir/checkpoints/step-000100/   config.json, model*.safetensors (bf16), tokenizer files,
                                          training_state.safetensors (fp32 masters, AdamW states),
                                          trainer_state.json (step, data position, RNG, config),
                                          manifest.json (size and CRC32 of every other file; written last)
    output_dir/checkpoints/LATEST         the name of the newest checkpoint (a convenience for people and tools)

A checkpoint is built in `step-N.tmp` and renamed into place; older ones are deleted only after that, so a run
killed at any moment leaves at least one complete checkpoint. Resuming takes the newest checkpoint whose files
all match its manifest, whatever LATEST says, and names any newer one it skipped.
"""

from __future__ import annotations

import base64
import errno
import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from slideformer.models.config import ModelConfig
from slideformer.models.weights import CheckpointError, save_hf_checkpoint
from slideformer.schedule.memory import GiB
from slideformer.runtime.disk import DeferredTensor

STATE_FILE = "training_state.safetensors"
MANIFEST = "manifest.json"
PIECE = 16 * 2**20  # bytes checksummed at a time
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor | DeferredTensor]]) -> int:
    """The safetensors format written tensor by tensor, in order, without copying (views of one buffer are
    fine); deferred tensors are loaded only when their turn comes. Returns the file's CRC32 (the largest file of
    a checkpoint is not read back for its manifest)."""
    items = list(tensors)
    header, offset = {}, 0
    for name, t in items:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        head = struct.pack("<Q", len(blob)) + blob
        f.write(head)
        crc = zlib.crc32(head)
        for _, t in items:
            t = (t.load() if isinstance(t, DeferredTensor) else t).detach().contiguous()
            data = t.view(torch.uint8).reshape(-1).numpy().data if t.nbytes else b""
            f.write(data)
            crc = zlib.crc32(data, crc)
        f.flush()
        os.fsync(f.fileno())
    return crc


def checkpoint_bytes(model_cfg: ModelConfig, tokenizer_files: list[Path]) -> int:
    """What one checkpoint takes on disk: bf16 weights, the fp32 training state (masters and both AdamW states,
    counted from the shapes: no rank's state is gathered for it), the tokenizer files."""
    units = model_cfg.num_layers + 2  # each with a step count
    state = 12 * model_cfg.total_params + 4 * units
    return 2 * model_cfg.total_params + state + sum(f.stat().st_size for f in tokenizer_files)


def check_free_space(root: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"{what} needs {need / GiB:.3g} GiB in {root}, only {free / GiB:.3g} GiB free; free "
            "space there, lower keep_checkpoints or choose another output_dir"
        )


def save_checkpoint(
    root: Path, step: int, model_cfg: ModelConfig, engine, tokenizer_files: list[Path], trainer_state: dict, keep: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    need = checkpoint_bytes(model_cfg, tokenizer_files)
    check_free_space(root, need, f"checkpoint {final.name}")
    try:
        save_hf_checkpoint(model_cfg, engine.hf_state(torch.bfloat16), tmp)  # the model files are bf16
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        crc = write_safetensors(tmp / STATE_FILE, engine.training_state().items())
        state = trainer_state | {"rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp, step, {STATE_FILE: crc})
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports the OS error in its message only ("... Os { code: 28, kind: StorageFull ...")
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in str(e):
            raise CheckpointError(
                f"checkpoint step-{step:06d}: the disk filled up in {root} (it needs "
                f"{need / GiB:.3g} GiB); free space there or lower keep_checkpoints"
            ) from None
        raise
    if final.exists():  # a damaged copy of this step, skipped by the resume: the new one is whole, swap it in
        old = root / f"step-{step:06d}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    latest = root / "LATEST.tmp"
    latest.write_text(final.name)
    os.replace(latest, root / "LATEST")
    done = [p for p in checkpoints(root) if p != final]
    for old in done[: max(len(done) + 1 - keep, 0)]:
        shutil.rmtree(old)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories (complete or not) under root, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while piece := f.read(PIECE):
            crc = zlib.crc32(piece, crc)
    return crc


def write_manifest(path: Path, step: int, crcs: dict[str, int]) -> None:
    """manifest.json: every file's size and CRC32 (taken from `crcs` where given, else read back)."""
    files = {
        f.name: {"bytes": f.stat().st_size, "crc32": crcs[f.name] if f.name in crcs else _crc32(f)}
        for f in sorted(path.iterdir())
        if f.is_file()
    }
    with (path / MANIFEST).open("w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file matches its manifest."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an older version)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, record in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != record["bytes"]:
            return f"{name} is truncated or overwritten ({f.stat().st_size} bytes, expected {record['bytes']})"
        if _crc32(f) != record["crc32"]:
            return f"{name} fails its checksum (corrupt)"
    return None


def newest_valid_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a line for each newer one that did not."""
    skipped: list[str] = []
    for path in reversed(checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(path: Path, engine) -> dict:
    """Restore the engine's training state; returns trainer_state.json (RNG restored too)."""
    with safe_open(path / STATE_FILE, "pt", device="cpu") as f:
        engine.load_training_state(f.get_tensor, set(f.keys()))
    state = read_trainer_state(path)
    rng = torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return state
