"""The decoder layer as functions over a dict of parameter tensors.

The runtime calls these on views into its flat weight buffers; the reference `Transformer` module calls
them on its own parameters, so both compute the same maths. Numerics follow Hugging Face's modeling
(fp32 RMSNorm statistics, RoPE tables in fp32 cast to the activation dtype, SDPA causal attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slideformer import kernels

from .config import ModelConfig

Params = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernels.active(x):
        from slideformer.kernels.rms_norm import rms_norm as fused
        return fused(x, weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + delta and its RMSNorm (one fused pass under the kernels)."""
    if kernels.active(x):
        from slideformer.kernels.rms_norm import add_rms_norm as fused
        return fused(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, seq: int, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq, head_dim] for positions 0..seq-1."""
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inverse_frequencies(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos, sin: [S, D]."""
    if kernels.active(x):
        from slideformer.kernels.rope import rope
        return rope(x, cos, sin)
    return x * cos + _rotate_half(x) * sin


def attention(p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    b, s, _ = x.shape
    d = cfg.head_dim
    q = F.linear(x, p["self_attn.q_proj.weight"], p.get("self_attn.q_proj.bias")).view(b, s, cfg.num_heads, d)
    k = F.linear(x, p["self_attn.k_proj.weight"], p.get("self_attn.k_proj.bias")).view(b, s, cfg.num_kv_heads, d)
    v = F.linear(x, p["self_attn.v_proj.weight"], p.get("self_attn.v_proj.bias")).view(b, s, cfg.num_kv_heads, d)
    if cfg.qk_norm:
        q = rms_norm(q, p["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5)
    return F.linear(o.transpose(1, 2).reshape(b, s, cfg.num_heads * d), p["self_attn.o_proj.weight"])


def mlp(p: Params, x: torch.Tensor) -> torch.Tensor:
    gate = F.linear(x, p["mlp.gate_proj.weight"])
    up = F.linear(x, p["mlp.up_proj.weight"])
    if kernels.active(x):
        from slideformer.kernels.swiglu import swiglu
        return F.linear(swiglu(gate, up), p["mlp.down_proj.weight"])
    return F.linear(F.silu(gate) * up, p["mlp.down_proj.weight"])


def decoder_layer(p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    attn = attention(p, rms_norm(x, p["input_layernorm.weight"], cfg.rms_norm_eps), cos, sin, cfg)
    x, normed = add_rms_norm(x, attn, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + mlp(p, normed)


def head_logits(norm_weight: torch.Tensor, head_weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_weight, eps), head_weight)
