"""Reading Hugging Face safetensors checkpoints one tensor at a time (sharded or not), always on the host."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig


class CheckpointError(ValueError):
    pass


class SafetensorsReader:
    """Maps each tensor name to its file; `get` opens lazily so only one tensor is materialised at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {n: self.dir / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.dir / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{self.dir}: no model.safetensors nor model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                self.files = {n: single for n in f.keys()}

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        with safe_open(self.files[name], "pt", device="cpu") as f:
            return f.get_tensor(name).to(dtype)


def save_hf_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path,
                       shard_bytes: int = 2**30) -> None:
    """Write config.json and bf16 safetensors shards (+ index when more than one shard)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        t = t.detach().to(torch.bfloat16).contiguous()
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in shard}
    total = sum(t.nbytes for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
