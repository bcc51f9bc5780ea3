"""The decoder layer as functions over a dict of parameter tensors.

The runtime calls these on views into its flat weight buffers; the reference `Transformer` module calls
them on its own parameters, so both compute the same maths. Numerics follow Hugging Face's modeling
(fp32 RMSNorm statistics, RoPE tables in fp32 cast to the activation dtype, SDPA causal attention).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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


def rope_at(
    cfg: ModelConfig, positions: torch.Tensor, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, S, head_dim] for each token's position (`positions` [B, S]): the rows of the
    tables above, as Hugging Face computes them from position_ids."""
    cos, sin = rope_tables(cfg, int(positions.max()) + 1, device, dtype)
    index = positions.to(device)
    return cos[index], sin[index]


# Per row of a packed batch, the [start, end) token ranges of its samples: attention stays inside each.
Spans = list[list[tuple[int, int]]]


def sample_spans(positions: torch.Tensor) -> Spans:
    """The samples of each row of `positions` [B, S]: a sample starts where its position is 0."""
    out = []
    for row in positions.tolist():
        starts = [0] + [t for t in range(1, len(row)) if row[t] == 0]
        out.append(list(zip(starts, [*starts[1:], len(row)])))
    return out


class TokenPositions(NamedTuple):
    """What a layer needs to know of where its tokens sit: rotary tables and, for packed rows, their samples."""

    cos: torch.Tensor
    sin: torch.Tensor
    spans: Spans | None


def token_positions(
    cfg: ModelConfig, positions: torch.Tensor | None, seq: int, device: torch.device | str, dtype: torch.dtype
) -> TokenPositions:
    """Rows at positions 0..seq-1, causal over each whole row (`positions` None), or packed rows: each token at
    its position in its sample (`positions` [B, seq]), attention within each sample."""
    if positions is None:
        return TokenPositions(*rope_tables(cfg, seq, device, dtype), None)
    return TokenPositions(*rope_at(cfg, positions, device, dtype), sample_spans(positions))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos, sin: [S, D] (every row at positions 0..S-1) or [B, S, D] (each token's own)."""
    if kernels.active(x):
        from slideformer.kernels.rope import rope

        return rope(x, cos, sin)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans | None) -> torch.Tensor:
    """Causal SDPA over [B, heads, S, D]; with `spans`, separately within each sample of each row (exact, and
    memory linear in S: no mask is built). GQA inside SDPA: k and v are never repeated per query head. Packed
    rows on a GPU take one variable-length flash call for the whole chunk where the kernel applies."""
    if spans is None:
        gqa, scale = q.shape[1] != k.shape[1], q.shape[-1] ** -0.5
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if varlen_applies(q):
        return varlen_attention(q, k, v, spans)
    return per_sample_attention(q, k, v, spans)


def varlen_applies(q: torch.Tensor) -> bool:
    """Flash attention's variable-length kernel takes it: a CUDA half-precision tensor, head_dim a multiple of 8
    up to 256."""
    d = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d <= 256 and d % 8 == 0


_CU_SEQLENS: dict[tuple, torch.Tensor] = {}  # per chunk's spans, so no layer waits on a host copy


def _cu_seqlens(spans: Spans, seq: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The samples' start offsets in the flattened [B * S] tokens, and the longest sample."""
    key = (tuple(map(tuple, spans)), seq, device)
    if key not in _CU_SEQLENS:
        if len(_CU_SEQLENS) > 64:  # one entry per chunk of a step is what is used; drop the older steps'
            _CU_SEQLENS.clear()
        starts = [b * seq + s for b, row in enumerate(spans) for s, _ in row] + [len(spans) * seq]
        pinned = torch.tensor(starts, dtype=torch.int32).pin_memory()
        _CU_SEQLENS[key] = pinned.to(device, non_blocking=True)
    longest = max(e - s for row in spans for s, e in row)
    return _CU_SEQLENS[key], longest


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Causal attention within each sample of packed rows in one flash call over the chunk's tokens: q, k, v
    [B, heads, S, D] flatten to [B * S, heads, D]; each sample is one of the kernel's sequences (GQA native)."""
    b, heads, s, d = q.shape
    cu, longest = _cu_seqlens(spans, s, q.device)
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]
    out = torch.ops.aten._flash_attention_forward(*flat, cu, cu, longest, longest, 0.0, True, False, scale=d**-0.5)[0]
    return out.view(b, s, heads, d).transpose(1, 2)


def per_sample_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Causal SDPA once per sample of each row (any device and dtype)."""
    gqa, scale = q.shape[1] != k.shape[1], q.shape[-1] ** -0.5
    rows = []
    for b, row in enumerate(spans):
        qb, kb, vb = (t[b : b + 1] for t in (q, k, v))
        rows.append(
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        qb[:, :, s:e], kb[:, :, s:e], vb[:, :, s:e], is_causal=True, scale=scale, enable_gqa=gqa
                    )
                    for s, e in row
                ],
                dim=2,
            )
        )
    return torch.cat(rows)


# --- Saved attention: the forward's attention output and log-sum-exp, so backward need not recompute them -----


class AttentionStats(NamedTuple):
    """Where a layer's forward leaves its attention output and log-sum-exp for its backward: `out` [B, heads, S,
    head_dim] laid out as [B, S, heads, head_dim] (the queries' layout, so the out-projection reads it as it is),
    `lse` [B, heads, S] in fp32; and the attention kernel's other outputs, which its backward takes back (`meta`,
    filled by the forward: small tensors and ints)."""

    out: torch.Tensor
    lse: torch.Tensor
    meta: list


def attention_stats_views(
    buffer: torch.Tensor, batch: int, seq: int, cfg: ModelConfig, dtype: torch.dtype
) -> AttentionStats:
    """`AttentionStats` over a flat byte buffer (`schedule.graph.attention_stats_bytes` long)."""
    heads, d = cfg.num_heads, cfg.head_dim
    n_out = batch * seq * heads * d * torch.finfo(dtype).bits // 8
    out = buffer[:n_out].view(dtype).view(batch, seq, heads, d).transpose(1, 2)
    lse = buffer[n_out : n_out + 4 * batch * heads * seq].view(torch.float32).view(batch, heads, seq)
    return AttentionStats(out, lse, [])


_FLASH, _CUDNN = 1, 3  # torch.nn.attention.SDPBackend's values, as torch._fused_sdp_choice returns them


def _sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The kernel SDPA itself picks for causal attention over these tensors, so the saved path runs the same one."""
    gqa = q.shape[1] != k.shape[1]
    return torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=q.shape[-1] ** -0.5, enable_gqa=gqa)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Causal attention as SDPA computes it, through the same kernel, also returning its log-sum-exp and the
    kernel's other outputs (what its backward takes)."""
    scale, backend = q.shape[-1] ** -0.5, _sdpa_backend(q, k, v)
    aten = torch.ops.aten
    if backend == _FLASH and not q.is_cuda:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse, [backend]
    if backend == _FLASH:
        out, lse, *meta = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    elif backend == _CUDNN:
        out, lse, *meta = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    else:
        raise RuntimeError(
            f"saved attention runs where SDPA picks flash or cuDNN attention; here it picked backend {backend}: "
            "set the plan's saved_attention to 0"
        )
    return out, lse, [backend, *meta]


def _attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    meta: list,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of causal attention from its saved output and log-sum-exp: the backward autograd runs for the
    kernel `_attention_with_lse` ran (`meta`), with the same arguments."""
    scale, (backend, *rest) = q.shape[-1] ** -0.5, meta
    aten = torch.ops.aten
    if backend == _FLASH and not q.is_cuda:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, True, scale=scale)
    cum_q, cum_k, max_q, max_k, seed, offset, _ = rest  # what flash and cuDNN return beside out and lse
    if backend == _FLASH:
        return aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    return aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale
    )


def _pieces(spans: Spans | None, batch: int, seq: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each stretch attention runs over on its own: whole rows, or each row's samples."""
    if spans is None:
        return [(-1, 0, seq)]
    return [(b, s, e) for b, row in enumerate(spans) for s, e in row]


def _piece(t: torch.Tensor, row: int, s: int, e: int) -> torch.Tensor:
    """A piece's tokens of [B, heads, S, ...] (every row when `row` is -1); lse [B, heads, S] too."""
    rows = slice(None) if row < 0 else slice(row, row + 1)
    return t[rows, :, s:e]


def causal_attention_saving(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans | None, into: AttentionStats
) -> torch.Tensor:
    """`causal_attention` that also leaves its output and log-sum-exp in `into` (and returns `into.out`)."""
    into.meta.clear()
    for row, s, e in _pieces(spans, q.shape[0], q.shape[2]):
        out, lse, meta = _attention_with_lse(*(_piece(t, row, s, e) for t in (q, k, v)))
        _piece(into.out, row, s, e).copy_(out)
        _piece(into.lse, row, s, e).copy_(lse.reshape(_piece(into.lse, row, s, e).shape))
        into.meta.append((meta, _Layout.of(out), _Layout.of(lse)))
    return into.out


class _Layout(NamedTuple):
    """A kernel output's shape and strides: its backward gets the saved copy back laid out as it wrote it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @staticmethod
    def of(t: torch.Tensor) -> "_Layout":
        return _Layout(tuple(t.shape), t.stride())

    def restore(self, saved: torch.Tensor) -> torch.Tensor:
        if tuple(saved.shape) == self.shape and saved.stride() == self.stride:
            return saved
        t = torch.empty_strided(self.shape, self.stride, dtype=saved.dtype, device=saved.device)
        return t.copy_(saved.reshape(self.shape))


class _SavedAttention(torch.autograd.Function):
    """Causal attention whose output the forward saved: returns it, and back-propagates through the kernel that
    computed it, from its log-sum-exp (no attention forward is run again)."""

    @staticmethod
    def forward(ctx, q, k, v, saved, spans):  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.saved, ctx.spans = saved, spans
        return saved.out.detach()

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        pieces = list(zip(_pieces(ctx.spans, q.shape[0], q.shape[2]), ctx.saved.meta))
        if ctx.spans is None:  # one piece, the whole tensors: its gradients as they come
            return *_piece_backward(do, q, k, v, ctx.saved, *pieces[0]), None, None
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for where, kernel in pieces:
            for g, d in zip(grads, _piece_backward(do, q, k, v, ctx.saved, where, kernel)):
                _piece(g, *where).copy_(d)
        return *grads, None, None


def _piece_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: AttentionStats,
    where: tuple[int, int, int],
    kernel: tuple[list, _Layout, _Layout],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one piece (`_pieces`) from its saved output and log-sum-exp, laid out as its kernel wrote
    them."""
    meta, out_layout, lse_layout = kernel
    out, lse = out_layout.restore(_piece(saved.out, *where)), lse_layout.restore(_piece(saved.lse, *where))
    do, q, k, v = (_piece(t, *where) for t in (do, q, k, v))
    return _attention_backward(do, q, k, v, out, lse, meta)


def _projections(
    p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the normed hidden states x [B, S, hidden], as [B, heads, S, head_dim], q and k rotated."""
    b, s, _ = x.shape
    d = cfg.head_dim
    q = F.linear(x, p["self_attn.q_proj.weight"], p.get("self_attn.q_proj.bias")).view(b, s, cfg.num_heads, d)
    k = F.linear(x, p["self_attn.k_proj.weight"], p.get("self_attn.k_proj.bias")).view(b, s, cfg.num_kv_heads, d)
    v = F.linear(x, p["self_attn.v_proj.weight"], p.get("self_attn.v_proj.bias")).view(b, s, cfg.num_kv_heads, d)
    if cfg.qk_norm:
        q = rms_norm(q, p["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _out_projection(p: Params, o: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    b, _, s, d = o.shape
    return F.linear(o.transpose(1, 2).reshape(b, s, cfg.num_heads * d), p["self_attn.o_proj.weight"])


def attention(
    p: Params,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    spans: Spans | None = None,
    stats: AttentionStats | None = None,
    saved: bool = False,
) -> torch.Tensor:
    """With `stats`: the forward leaves its attention output and log-sum-exp there (`saved` False) or, in
    backward, they are read from there instead of being computed again (`saved` True)."""
    q, k, v = _projections(p, x, cos, sin, cfg)
    if stats is None:
        o = causal_attention(q, k, v, spans)
    elif saved:
        o = _SavedAttention.apply(q, k, v, stats, spans)
    else:
        o = causal_attention_saving(q, k, v, spans, stats)
    return _out_projection(p, o, cfg)


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
    p: Params,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    spans: Spans | None = None,
    stats: AttentionStats | None = None,
    saved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after attention, and its post-attention norm (the MLP's input)."""
    normed = rms_norm(x, p["input_layernorm.weight"], cfg.rms_norm_eps)
    attn = attention(p, normed, cos, sin, cfg, spans, stats, saved)
    return add_rms_norm(x, attn, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)


def decoder_layer(
    p: Params,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    spans: Spans | None = None,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """One layer; cos and sin as `apply_rope` takes them, `spans` the samples of packed rows (None: causal over
    each whole row); with `stats`, its attention output and log-sum-exp are left there for the backward."""
    h, normed = attention_block(p, x, cos, sin, cfg, spans, stats)
    return h + mlp(p, normed)


MLP_WEIGHTS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
Accumulate = Callable[[str, torch.Tensor], None]


def _mlp_backward(
    p: Params, normed: torch.Tensor, dy: torch.Tensor, tile_tokens: int, accumulate: Accumulate
) -> torch.Tensor:
    """The MLP's backward from its input `normed` and its output's gradient `dy` (both [tokens, hidden]), tile by
    tile (`tile_tokens`; 0 = all at once), without computing its output: returns the input's gradient and hands
    the weights' gradients to `accumulate` once per tile."""
    d_normed = torch.empty_like(normed)
    tokens = normed.shape[0]
    step = tile_tokens or tokens
    gate_up = [p[MLP_WEIGHTS[0]], p[MLP_WEIGHTS[1]]]
    down = p[MLP_WEIGHTS[2]]
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        xi = normed[rows].requires_grad_()
        with torch.enable_grad():
            act = gated_activation(p, xi)
        dyi = dy[rows]
        accumulate(MLP_WEIGHTS[2], dyi.t() @ act.detach())
        dx_i, dg, du = torch.autograd.grad(act, [xi, *gate_up], dyi @ down)
        d_normed[rows] = dx_i
        accumulate(MLP_WEIGHTS[0], dg)
        accumulate(MLP_WEIGHTS[1], du)
        del act, dx_i, dg, du
    return d_normed


def decoder_layer_backward(
    p: Params,
    x: torch.Tensor,
    dy: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    tile_tokens: int,
    accumulate: Accumulate,
    spans: Spans | None = None,
    saved: AttentionStats | None = None,
) -> torch.Tensor:
    """Recompute one layer from its input x and back-propagate dy: returns dx and hands every weight's
    gradient to `accumulate(name, grad)` (the MLP's once per token tile, to be summed).

    The same maths as autograd through `decoder_layer`, arranged for memory and work: the attention block is
    recomputed with autograd, while the MLP runs tile by tile (`tile_tokens` tokens; 0 = all at once), so its
    wide intermediates exist for one tile only, and its output is never computed (backward needs only its
    input's and weights' gradients: down_proj's forward matmul is skipped). With `saved` (the forward's
    attention output and log-sum-exp) the attention itself is not run again: its backward starts from them.
    """
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        h, normed = attention_block(p, x, cos, sin, cfg, spans, saved, saved is not None)
    hidden = normed.shape[-1]
    d_normed = _mlp_backward(p, normed.detach().view(-1, hidden), dy.reshape(-1, hidden), tile_tokens, accumulate)
    rest = [name for name in p if name not in MLP_WEIGHTS]
    grads = torch.autograd.grad([h, normed], [x, *(p[n] for n in rest)], [dy, d_normed.view_as(normed)])
    for name, g in zip(rest, grads[1:]):
        accumulate(name, g)
    return grads[0]


# --- Sequence tiles: a layer along its sequence, so that only k and v exist for the whole sequence ----------


def _tile_tables(cos: torch.Tensor, sin: torch.Tensor, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of tokens a..z-1 of every row ([S, D] tables) or of each row ([B, S, D])."""
    if cos.dim() == 2:
        return cos[a:z], sin[a:z]
    return cos[:, a:z].contiguous(), sin[:, a:z].contiguous()


def _suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of queries that are the last q.shape[2] of the keys' tokens (lower-right aligned)."""
    gqa, scale = q.shape[1] != k.shape[1], q.shape[-1] ** -0.5
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        # Flash attention's causal mask is lower-right aligned when there are fewer queries than keys, and it
        # takes GQA's k and v as they are (SDPA's lower-right mask would route GQA elsewhere).
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _tile_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, spans: Spans | None
) -> torch.Tensor:
    """Causal attention of the queries of tokens start..start+T of each row over `keys`/`values`, which hold
    tokens 0..start+T; with `spans`, within each sample."""
    if spans is None:
        return _suffix_attention(q, keys, values)
    end = start + q.shape[2]
    rows = []
    for b, row in enumerate(spans):
        pieces = []
        for s, e in row:
            a, z = max(s, start), min(e, end)
            if a < z:
                qb, kb, vb = q[b : b + 1, :, a - start : z - start], keys[b : b + 1, :, s:z], values[b : b + 1, :, s:z]
                pieces.append(_suffix_attention(qb, kb, vb))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows)


def _tiles(seq: int, seq_tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + seq_tile, seq)) for a in range(0, seq, seq_tile)]


def decoder_layer_in_tiles(
    p: Params,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    seq_tile: int,
    spans: Spans | None = None,
) -> torch.Tensor:
    """`decoder_layer` without gradients, `seq_tile` tokens of each row at a time in sequence order: each tile's
    keys and values join those of the tiles before it, its queries attend to all of them (the same maths; the
    whole sequence's intermediates never exist, only its k and v)."""
    b, s, _ = x.shape
    out = torch.empty_like(x)
    keys = x.new_empty(b, cfg.num_kv_heads, s, cfg.head_dim)
    values = torch.empty_like(keys)
    for a, z in _tiles(s, seq_tile):
        c, sn = _tile_tables(cos, sin, a, z)
        q, keys[:, :, a:z], values[:, :, a:z] = _projections(
            p, rms_norm(x[:, a:z], p["input_layernorm.weight"], cfg.rms_norm_eps), c, sn, cfg
        )
        o = _tile_attention(q, keys[:, :, :z], values[:, :, :z], a, spans)
        h, normed = add_rms_norm(
            x[:, a:z], _out_projection(p, o, cfg), p["post_attention_layernorm.weight"], cfg.rms_norm_eps
        )
        out[:, a:z] = h + mlp(p, normed)
    return out


def decoder_layer_backward_in_tiles(
    p: Params,
    x: torch.Tensor,
    dy: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cfg: ModelConfig,
    tile_tokens: int,
    seq_tile: int,
    accumulate: Accumulate,
    spans: Spans | None = None,
) -> torch.Tensor:
    """`decoder_layer_backward` along the sequence, `seq_tile` tokens of each row at a time, last tile first.

    The layer's k and v are recomputed for the whole sequence first; then each tile recomputes its own block
    with autograd, its queries attending to the earlier tiles' keys (leaves here) and its own, and back-
    propagates. A tile's keys and values also receive the gradients the later tiles sent them, summed in fp32
    (`d_keys`, `d_values`), so when it is reached their gradient is whole. The same maths as the whole-sequence
    backward (the partial key gradients are summed in another order); GPU memory per token of the sequence is
    its k, v, their fp32 gradients and dx, the rest exists for one tile."""
    x, eps = x.detach(), cfg.rms_norm_eps
    b, s, hidden = x.shape
    tiles = _tiles(s, seq_tile)
    keys = x.new_empty(b, cfg.num_kv_heads, s, cfg.head_dim)
    values = torch.empty_like(keys)
    with torch.no_grad():
        for a, z in tiles:
            _, keys[:, :, a:z], values[:, :, a:z] = _projections(
                p, rms_norm(x[:, a:z], p["input_layernorm.weight"], eps), *_tile_tables(cos, sin, a, z), cfg
            )
    summed = torch.promote_types(keys.dtype, torch.float32)  # the later tiles' key gradients, summed in fp32
    d_keys, d_values = torch.zeros_like(keys, dtype=summed), torch.zeros_like(values, dtype=summed)
    dx = torch.empty_like(x)
    rest = [name for name in p if name not in MLP_WEIGHTS]
    for a, z in reversed(tiles):
        xt = x[:, a:z].detach().requires_grad_()
        earlier = [t[:, :, :a].detach().requires_grad_() for t in (keys, values)] if a else []
        with torch.enable_grad():
            q, k, v = _projections(
                p, rms_norm(xt, p["input_layernorm.weight"], eps), *_tile_tables(cos, sin, a, z), cfg
            )
            all_k, all_v = (torch.cat((e, t), dim=2) for e, t in zip(earlier, (k, v))) if a else (k, v)
            o = _tile_attention(q, all_k, all_v, a, spans)
            h, normed = add_rms_norm(xt, _out_projection(p, o, cfg), p["post_attention_layernorm.weight"], eps)
        dyt = dy[:, a:z]
        d_normed = _mlp_backward(
            p, normed.detach().reshape(-1, hidden), dyt.reshape(-1, hidden), tile_tokens, accumulate
        )
        outputs, output_grads = [h, normed], [dyt, d_normed.view_as(normed)]
        if z < s:  # the later tiles' gradients of this tile's keys and values
            outputs += [k, v]
            output_grads += [d_keys[:, :, a:z].to(k.dtype), d_values[:, :, a:z].to(v.dtype)]
        grads = torch.autograd.grad(outputs, [xt, *(p[n] for n in rest), *earlier], output_grads)
        dx[:, a:z] = grads[0]
        for name, g in zip(rest, grads[1 : 1 + len(rest)]):
            accumulate(name, g)
        if a:
            d_keys[:, :, :a] += grads[-2]
            d_values[:, :, :a] += grads[-1]
        del grads, outputs, output_grads, q, k, v, o, h, normed, d_normed, earlier
    return dx


def head_logits(norm_weight: torch.Tensor, head_weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_weight, eps), head_weight)
