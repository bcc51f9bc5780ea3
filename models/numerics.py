"""The model's maths as the step's ops call it: our own numerics for the families we cover (fused kernels, the
tiled layer backward, the fused loss), or any other Hugging Face architecture's own modules (`HFDecoder`).
`numerics_for` picks by the model config's family."""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import torch

from .config import GENERIC, ModelConfig
from .layers import (
    AttentionStats,
    TokenPositions,
    decoder_layer,
    decoder_layer_backward,
    decoder_layer_backward_in_tiles,
    decoder_layer_in_tiles,
    token_positions,
)
from .loss import head_loss_and_grads, head_loss_sum

Params = dict[str, torch.Tensor]
Accumulate = Callable[[str, torch.Tensor], None]


def rows_chained(positions: torch.Tensor) -> bool:
    """A chunk's rows [B, S] carry samples across their boundaries (padding-free bins): a row after the first
    starts inside a sample, at a position other than 0."""
    return bool((positions[1:, 0] != 0).any())


class OneRow(NamedTuple):
    """The positions of a chunk computed as one row of all its tokens."""

    positions: TokenPositions


def _one_row(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H] as [1, B * S, H] (a view: a chunk's rows are contiguous)."""
    return t.view(1, -1, t.shape[-1])


def _one_row_stats(stats: AttentionStats | None) -> AttentionStats | None:
    """The same buffers seen as one row: `out` [1, heads, B * S, D] over its [B, S, heads, D] layout, `lse`
    [1, heads, B * S] (written and read only as this one row); the same `meta` list."""
    if stats is None:
        return None
    b, heads, s, d = stats.out.shape
    out = stats.out.transpose(1, 2).view(1, b * s, heads, d).transpose(1, 2)
    return AttentionStats(out, stats.lse.view(1, heads, b * s), stats.meta)


class NativeNumerics:
    """Llama 3.x, Qwen2/2.5, Qwen3 and Mistral through `models/layers.py` (tested against transformers)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    def positions(self, positions: torch.Tensor | None, like: torch.Tensor) -> Any:
        """What every layer needs to know of where the tokens of hidden states shaped like `like` sit. A chunk
        whose samples run on from one row into the next (`rows_chained`) is computed as one row of its tokens."""
        if positions is not None and rows_chained(positions):
            return OneRow(
                token_positions(
                    self.cfg, positions.reshape(1, -1), like.shape[0] * like.shape[1], like.device, like.dtype
                )
            )
        return token_positions(self.cfg, positions, like.shape[1], like.device, like.dtype)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(weight.view(self.cfg.vocab_size, -1), 0, ids.flatten(), out=out.view(-1, out.shape[-1]))

    def embed_backward(self, weight: torch.Tensor, ids: torch.Tensor, d_out: torch.Tensor, grad: torch.Tensor) -> None:
        """Adds the embedding weight's gradient into the fp32 `grad`."""
        grad.view(self.cfg.vocab_size, -1).index_add_(0, ids.flatten(), d_out.flatten(0, 1).float())

    def layer(
        self,
        index: int,
        params: Params,
        x: torch.Tensor,
        pos: Any,
        seq_tile: int = 0,
        stats: AttentionStats | None = None,
    ) -> torch.Tensor:
        """The layer's output; `seq_tile` tokens of each row at a time (0: the whole sequence; no gradients);
        with `stats` (whole sequences), its attention output and log-sum-exp are left there for the backward."""
        if isinstance(pos, OneRow):
            return self.layer(index, params, _one_row(x), pos.positions, seq_tile, _one_row_stats(stats)).view_as(x)
        if seq_tile:
            assert stats is None, "saved attention is for whole sequences (the plan check refuses tiles with it)"
            return decoder_layer_in_tiles(params, x, pos.cos, pos.sin, self.cfg, seq_tile, pos.spans)
        return decoder_layer(params, x, pos.cos, pos.sin, self.cfg, pos.spans, stats)

    def layer_backward(
        self,
        index: int,
        params: Params,
        x: torch.Tensor,
        dy: torch.Tensor,
        pos: Any,
        tile: int,
        accumulate: Accumulate,
        seq_tile: int = 0,
        saved: AttentionStats | None = None,
    ) -> torch.Tensor:
        """`saved`: the forward's attention output and log-sum-exp (whole sequences), so attention is not run
        again."""
        if isinstance(pos, OneRow):
            one = (_one_row(x), _one_row(dy), pos.positions, tile, accumulate, seq_tile, _one_row_stats(saved))
            return self.layer_backward(index, params, *one).view_as(x)
        if seq_tile:
            assert saved is None, "saved attention is for whole sequences (the plan check refuses tiles with it)"
            return decoder_layer_backward_in_tiles(
                params, x, dy, pos.cos, pos.sin, self.cfg, tile, seq_tile, accumulate, pos.spans
            )
        return decoder_layer_backward(params, x, dy, pos.cos, pos.sin, self.cfg, tile, accumulate, pos.spans, saved)

    def head_loss_and_grads(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        norm_w: torch.Tensor,
        head_w: torch.Tensor,
        total_tokens: int,
        piece_tokens: int,
        grad_norm_w: torch.Tensor,
        grad_head_w: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return head_loss_and_grads(
            x, labels, norm_w, head_w, self.cfg.rms_norm_eps, total_tokens, piece_tokens, grad_norm_w, grad_head_w
        )

    def head_loss_sum(
        self, x: torch.Tensor, labels: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, piece_tokens: int
    ) -> torch.Tensor:
        return head_loss_sum(x, labels, norm_w, head_w, self.cfg.rms_norm_eps, piece_tokens)


class HFNumerics:
    """Any other architecture transformers knows, through its own modules (`models/hf_decoder.py`): its
    embedding, each decoder layer (recomputed with autograd in backward), final norm, rotary embedding and
    masks. The embedding's gradient is taken densely in the weights' dtype."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        from .hf_decoder import decoder_for

        assert cfg.hf_config is not None, "a generic model config carries its config.json"
        self.cfg, self.decoder = cfg, decoder_for(json.dumps(cfg.to_hf(), sort_keys=True), str(device))
        # the head's loss, with and without gradients, is the architecture's own norm and head as they are
        self.head_loss_and_grads = self.decoder.head_loss_and_grads
        self.head_loss_sum = self.decoder.head_loss_sum

    def positions(self, positions: torch.Tensor | None, like: torch.Tensor) -> Any:
        if positions is not None and rows_chained(positions):
            raise ValueError(
                "padding-free bins (samples crossing rows) run on our own numerics only: the generic path's masks "
                "would span a whole chunk; use packing: best_fit"
            )
        return self.decoder.layer_kwargs(torch.zeros_like(like), positions)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.decoder.embed(weight.view(self.cfg.vocab_size, -1), ids))

    def embed_backward(self, weight: torch.Tensor, ids: torch.Tensor, d_out: torch.Tensor, grad: torch.Tensor) -> None:
        grad.view(self.cfg.vocab_size, -1).add_(
            self.decoder.embed_grad(weight.view(self.cfg.vocab_size, -1), ids, d_out)
        )

    def layer(
        self,
        index: int,
        params: Params,
        x: torch.Tensor,
        pos: Any,
        seq_tile: int = 0,
        stats: AttentionStats | None = None,
    ) -> torch.Tensor:
        assert not seq_tile and stats is None, (
            "sequence tiles and saved attention are our own numerics' (the plan check refuses them here)"
        )
        return self.decoder.layer(index, params, x, pos[index])

    def layer_backward(
        self,
        index: int,
        params: Params,
        x: torch.Tensor,
        dy: torch.Tensor,
        pos: Any,
        tile: int,
        accumulate: Accumulate,
        seq_tile: int = 0,
        saved: AttentionStats | None = None,
    ) -> torch.Tensor:
        assert not seq_tile and saved is None, (
            "sequence tiles and saved attention are our own numerics' (the plan check refuses them here)"
        )
        return self.decoder.layer_backward(index, params, x, dy, pos[index], accumulate)


def numerics_for(cfg: ModelConfig, device: torch.device) -> NativeNumerics | HFNumerics:
    return HFNumerics(cfg, device) if cfg.family == GENERIC else NativeNumerics(cfg)
