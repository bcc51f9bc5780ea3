"""Model shape: one dataclass for every supported decoder-only family, built from presets or HF config.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # our own numerics (`layers.py`)
GENERIC = "hf"  # any other architecture transformers knows, through its own modules (`hf_decoder.py`)


class ModelConfigError(ValueError):
    """A model name, preset or config.json we cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3
    name: str = "custom"
    # family 'hf': the config.json (as JSON text) and the decoder layer's parameter shapes, read off the
    # architecture's own modules
    hf_config: str | None = None
    hf_layer_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES and not (self.family == GENERIC and self.hf_config):
            raise ModelConfigError(f"unsupported family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    # --- sizes -------------------------------------------------------------------------
    def layer_shape(self) -> tuple[int | str, ...]:
        """What a decoder layer's cost depends on (the key of a profile's layer timings): its widths and whose
        layer it is (`layer_kind`)."""
        return (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.layer_kind,
        )

    @property
    def layer_kind(self) -> str:
        """Whose layer runs: '' for our numerics; an architecture's own, its model_type and its layer's parameter
        count (which tells apart layers of the same widths with other parts, e.g. experts)."""
        if self.family != GENERIC:
            return ""
        assert self.hf_config is not None
        return f"{json.loads(self.hf_config)['model_type']}/{self.layer_params}"

    def layer_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameters of one decoder layer, in Hugging Face names relative to `model.layers.{i}.`."""
        if self.family == GENERIC:
            return dict(self.hf_layer_shapes)
        h, q, kv, ff = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
        }
        if self.qkv_bias:
            shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if self.qk_norm:
            shapes |= {"self_attn.q_norm.weight": (self.head_dim,), "self_attn.k_norm.weight": (self.head_dim,)}
        shapes |= {
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (ff, h),
            "mlp.up_proj.weight": (ff, h),
            "mlp.down_proj.weight": (h, ff),
        }
        return shapes

    def embed_param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}

    def head_param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    @property
    def layer_params(self) -> int:
        return sum(math.prod(s) for s in self.layer_param_shapes().values())

    @property
    def total_params(self) -> int:
        edge = sum(math.prod(s) for s in (self.embed_param_shapes() | self.head_param_shapes()).values())
        return self.num_layers * self.layer_params + edge

    def model_flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token, the convention of our peers' reports: 6·P + 6·L·S·H (causal attention)."""
        return 6.0 * self.total_params + 6.0 * self.num_layers * seq * self.num_heads * self.head_dim

    def with_layers(self, num_layers: int) -> ModelConfig:
        return replace(self, num_layers=num_layers, name=f"{self.name}-{num_layers}l")

    # --- Hugging Face config.json --------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        model_type = str(hf.get("model_type"))
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}.get(model_type)
        if family is None:
            return cls._generic(hf, name)
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ModelConfigError(f"unsupported rope scaling {kind!r}; supported: llama3 or none")
            scaling = {
                k: float(scaling[k])
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            }
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if not isinstance(hf.get(k), int) or hf[k] < 1
        ]
        if missing:
            raise ModelConfigError(f"config.json of {name}: {', '.join(missing)} missing or not a positive integer")
        heads = hf["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            name=name,
        )

    @classmethod
    def _generic(cls, hf: dict[str, Any], name: str) -> ModelConfig:
        """Any other architecture: its shapes read off its own modules (built without weights)."""
        from .hf_decoder import UnsupportedArchitecture, check_structure, skeleton

        model_type = str(hf.get("model_type"))
        try:
            model = skeleton(hf)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelConfigError(
                f"unsupported architecture model_type={model_type!r} (architectures={hf.get('architectures')}): "
                f"transformers cannot build it ({' '.join(str(e).split())[:200]}); our own numerics cover "
                f"{', '.join(FAMILIES)}"
            ) from None
        try:
            shapes = check_structure(model, model_type)
        except UnsupportedArchitecture as e:
            raise ModelConfigError(str(e)) from None
        c: Any = model.config
        heads = c.num_attention_heads
        text = dict(hf)
        return cls(
            family=GENERIC,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6) or 1e-6),
            max_position_embeddings=getattr(c, "max_position_embeddings", 8192),
            tie_word_embeddings=bool(c.tie_word_embeddings),
            name=name,
            hf_config=json.dumps(text, sort_keys=True),
            hf_layer_shapes=tuple(shapes.items()),
        )

    def to_hf(self) -> dict[str, Any]:
        if self.family == GENERIC:
            assert self.hf_config is not None
            generic: dict[str, Any] = json.loads(self.hf_config)
            generic["num_hidden_layers"] = self.num_layers  # a cut model keeps its first layers' kinds
            if isinstance(generic.get("layer_types"), list):
                generic["layer_types"] = generic["layer_types"][: self.num_layers]
            return generic
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM",
        }[self.family]
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
        if self.rope_scaling:
            hf["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        if self.family in ("llama", "mistral"):
            hf["attention_bias"] = self.qkv_bias
        if self.family == "mistral":
            hf["sliding_window"] = None
        return hf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192.0,
}

PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b",
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072,
    ),
    "llama-3.1-70b": ModelConfig(
        name="llama-3.1-70b",
        family="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072,
    ),
    "qwen3-8b": ModelConfig(
        name="qwen3-8b",
        family="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
    ),
    "qwen3-14b": ModelConfig(
        name="qwen3-14b",
        family="qwen3",
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=17408,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
    ),
    "qwen2.5-32b": ModelConfig(
        name="qwen2.5-32b",
        family="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        qkv_bias=True,
    ),
    "mistral-large-123b": ModelConfig(
        name="mistral-large-123b",
        family="mistral",
        vocab_size=32768,
        hidden_size=12288,
        intermediate_size=28672,
        num_layers=88,
        num_heads=96,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
    ),
    # Tiny shapes of each family for tests and the CPU demo.
    "tiny-llama": ModelConfig(
        name="tiny-llama",
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "original_max_position_embeddings": 64.0},
        max_position_embeddings=256,
    ),
    "tiny-qwen2": ModelConfig(
        name="tiny-qwen2",
        family="qwen2",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        qkv_bias=True,
    ),
    "tiny-qwen3": ModelConfig(
        name="tiny-qwen3",
        family="qwen3",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=256,
        qk_norm=True,
    ),
    "tiny-mistral": ModelConfig(
        name="tiny-mistral",
        family="mistral",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=192,
        num_layers=3,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=256,
    ),
}


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """'llama-3.1-8b' or 'llama-3.1-8b:16' (the shape cut to 16 layers)."""
    name, _, layers = spec.partition(":")
    if layers and not layers.isdigit():
        raise ModelConfigError(f"bad layer count in model spec {spec!r}; expected NAME or NAME:LAYERS")
    return name, int(layers) if layers else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return hf


def load_model_config(spec: str) -> ModelConfig:
    """A preset name (optionally ':LAYERS'), a config.json path, or a model directory holding one."""
    name, layers = parse_model_spec(spec)
    path = Path(name)
    if name in PRESETS:
        cfg = PRESETS[name]
    elif path.is_dir() and (path / "config.json").is_file():
        cfg = ModelConfig.from_hf(_read_json(path / "config.json"), name=path.name)
    elif path.is_dir():
        raise ModelConfigError(f"{path}: a model directory needs config.json (a partial download?)")
    elif path.is_file():
        cfg = ModelConfig.from_hf(_read_json(path), name=path.stem)
    else:
        raise ModelConfigError(
            f"unknown model {name!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a config.json or model directory"
        )
    if layers is not None:
        if not 1 <= layers <= cfg.num_layers:
            raise ModelConfigError(f"{name} has {cfg.num_layers} layers; cannot cut to {layers}")
        cfg = cfg.with_layers(layers)
    return cfg
