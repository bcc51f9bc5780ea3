"""The decoder layer as functions over a dict of parameter tensors.

The runtime calls these on views into its flat weight buffers; the reference `Transformer` module calls
them on its own parameters, so both compute the same maths. Numerics follow Hugging Face's modeling
(fp32 RMSNorm statistics, RoPE tables in fp32 cast to the activation dtype, SDPA causal attention).
"""

from __future__ import annotations

import math
from typing import Callable

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


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
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
    factor, low, high, old = (
        s["factor"],
        s["low_freq_factor"],
        s["high_freq_factor"],
        s["original_max_position_embeddings"],
    )
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, blended, scaled)


def rope_tables(
    cfg: ModelConfig, seq: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
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
    # GQA inside SDPA: k and v are never repeated per query head
    o = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=cfg.num_heads != cfg.num_kv_heads
    )
    return F.linear(o.transpose(1, 2).reshape(b, s, cfg.num_heads * d), p["self_attn.o_proj.weight"])


def gated_activation(p: Params, x: torch.Tensor) -> torch.Tensor:
    """silu(gate_proj(x)) * up_proj(x): the MLP's wide intermediate, before down_proj."""
    gate = F.linear(x, p["mlp.gate_proj.weight"])
    up = F.linear(x, p["mlp.up_proj.weight"])
    if kernels.active(x):
        from slideformer.kernels.swiglu import swiglu

        return swiglu(gate, up)
    return F.silu(gate) * up


def mlp(p: Params, x: torch.Tensor) -> torch.Tensor:
    return F.linear(gated_activation(p, x), p["mlp.down_proj.weight"])


def attention_block(
    p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after attention, and its post-attention norm (the MLP's input)."""
    attn = attention(p, rms_norm(x, p["input_layernorm.weight"], cfg.rms_norm_eps), cos, sin, cfg)
    return add_rms_norm(x, attn, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)


def decoder_layer(p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    h, normed = attention_block(p, x, cos, sin, cfg)
    return h + mlp(p, normed)


MLP_WEIGHTS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
Accumulate = Callable[[str, torch.Tensor], None]


def decoder_layer_backward(
    p: Params,
    x: torch.Tensor,
    dy: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    tile_tokens: int,
    accumulate: Accumulate,
) -> torch.Tensor:
    """Recompute one layer from its input x and back-propagate dy: returns dx and hands every weight's
    gradient to `accumulate(name, grad)` (the MLP's once per token tile, to be summed).

    The same maths as autograd through `decoder_layer`, arranged for memory and work: the attention block is
    recomputed with autograd, while the MLP runs tile by tile (`tile_tokens` tokens; 0 = all at once), so its
    wide intermediates exist for one tile only, and its output is never computed (backward needs only its
    input's and weights' gradients: down_proj's forward matmul is skipped).
    """
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        h, normed = attention_block(p, x, cos, sin, cfg)
    hidden = normed.shape[-1]
    flat_in, flat_dy = normed.detach().view(-1, hidden), dy.reshape(-1, hidden)
    d_normed = torch.empty_like(flat_in)
    tokens = flat_in.shape[0]
    step = tile_tokens or tokens
    gate_up = [p[MLP_WEIGHTS[0]], p[MLP_WEIGHTS[1]]]
    down = p[MLP_WEIGHTS[2]]
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        xi = flat_in[rows].requires_grad_()
        with torch.enable_grad():
            act = gated_activation(p, xi)
        dyi = flat_dy[rows]
        accumulate(MLP_WEIGHTS[2], dyi.t() @ act.detach())
        dx_i, dg, du = torch.autograd.grad(act, [xi, *gate_up], dyi @ down)
        d_normed[rows] = dx_i
        accumulate(MLP_WEIGHTS[0], dg)
        accumulate(MLP_WEIGHTS[1], du)
        del act, dx_i, dg, du
    rest = [name for name in p if name not in MLP_WEIGHTS]
    grads = torch.autograd.grad([h, normed], [x, *(p[n] for n in rest)], [dy, d_normed.view_as(normed)])
    for name, g in zip(rest, grads[1:]):
        accumulate(name, g)
    return grads[0]


def head_logits(norm_weight: torch.Tensor, head_weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_weight, eps), head_weight)
