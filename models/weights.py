"""Reading Hugging Face checkpoints one tensor at a time (safetensors, sharded or not, or pytorch_model.bin
through torch's safe loading), always on the host, and checking them against the model's config."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig


class CheckpointError(ValueError):
    pass


def _weight_map(model_dir: Path, index_name: str) -> dict[str, Path]:
    """name -> file of a sharded checkpoint's index, every shard present."""
    try:
        names = json.loads((model_dir / index_name).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{model_dir / index_name}: not a valid index ({e})") from None
    files = {n: model_dir / f for n, f in names.items()}
    missing = sorted({f.name for f in files.values() if not f.is_file()})
    if missing:
        raise CheckpointError(
            f"{model_dir}: shards {missing} named in {index_name} are missing (a partial "
            "download?): download them again"
        )
    return files


class SafetensorsReader:
    """Maps each tensor name to its file; `get` opens lazily so only one tensor is materialised at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = _weight_map(self.dir, index.name)
        else:
            single = self.dir / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{self.dir}: no model.safetensors nor model.safetensors.index.json")
            self.files = {n: single for n in self._open(single).keys()}

    def _open(self, path: Path):
        try:
            return safe_open(path, "pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        with self._open(self.files[name]) as f:
            return f.get_tensor(name).to(dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no data read)."""
        out: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self.files.values())):
            with self._open(path) as f:
                out |= {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if self.files.get(n) == path}
        return out


class TorchBinReader:
    """pytorch_model.bin (sharded or not), memory-mapped through torch.load(weights_only=True): plain tensors
    only, no code runs. Shards are opened one at a time, as tensors are asked for."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "pytorch_model.bin.index.json"
        self.files = (
            _weight_map(self.dir, index.name)
            if index.is_file()
            else {n: self.dir / "pytorch_model.bin" for n in self._load(self.dir / "pytorch_model.bin")}
        )
        self.cached: tuple[Path, dict[str, torch.Tensor]] | None = None

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:  # torch refusing the file
            raise CheckpointError(
                f"{path}: torch's safe loading refuses it ({' '.join(str(e).split())[:200]}); "
                "convert the model to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors; convert the model to safetensors")
        return state

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        if self.cached is None or self.cached[0] != path:
            self.cached = (path, self._load(path))
        return self.cached[1]

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        return self._state(self.files[name])[name].to(dtype, copy=True)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            n: tuple(t.shape)
            for path in sorted(set(self.files.values()))
            for n, t in self._state(path).items()
            if self.files.get(n) == path
        }


def open_weights(model_dir: str | Path) -> SafetensorsReader | TorchBinReader:
    """The model directory's weights: safetensors, else pytorch_model.bin; refused when there are none."""
    d = Path(model_dir)
    if any(d.glob("*.safetensors")) or (d / "model.safetensors.index.json").is_file():
        return SafetensorsReader(d)
    if (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        return TorchBinReader(d)
    raise CheckpointError(
        f"{d}: no weights (model.safetensors, its shards, or pytorch_model.bin; a partial "
        "download?); download them, or give a preset name for random weights"
    )


_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")  # a buffer older checkpoints saved, recomputed from the config


def check_weights(reader: SafetensorsReader | TorchBinReader, cfg: ModelConfig) -> None:
    """Every tensor the config needs present with its shape, and no tensor the config does not describe
    (e.g. q_proj biases under a config without attention_bias would be dropped silently)."""
    expected = cfg.embed_param_shapes() | cfg.head_param_shapes()
    for i in range(cfg.num_layers):
        expected |= {f"model.layers.{i}.{k}": s for k, s in cfg.layer_param_shapes().items()}
    found = reader.shapes()
    missing = [n for n in expected if n not in found]
    wrong = [f"{n} {list(found[n])} (config: {list(s)})" for n, s in expected.items() if n in found and found[n] != s]

    def described(name: str) -> bool:  # layers past a cut (NAME:LAYERS) and a tied head's copy are fine
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        return bool(
            _IGNORED.match(name)
            or (layer and int(layer.group(1)) >= cfg.num_layers)
            or (name == "lm_head.weight" and cfg.tie_word_embeddings)
        )

    extra = [n for n in found if n not in expected and not described(n)]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensors missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    if wrong:
        problems.append(
            f"{len(wrong)} with another shape than config.json's ({'; '.join(wrong[:3])}"
            f"{'; ...' if len(wrong) > 3 else ''})"
        )
    if extra:
        problems.append(
            f"{len(extra)} tensors config.json does not describe ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''})"
        )
    if problems:
        raise CheckpointError(
            f"{reader.dir}: the weights do not match config.json: {'; '.join(problems)}; "
            "use the config.json that came with these weights"
        )


def save_hf_checkpoint(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path, shard_bytes: int = 2**30
) -> None:
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
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in shard}
    total = sum(t.nbytes for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
