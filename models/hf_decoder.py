"""Any Hugging Face decoder-only architecture whose decoder is a list of identical layers, through its own
modules: the embedding, each decoder layer, the final norm, the rotary embedding and the attention masks are
the architecture's code (Gemma's scaled embedding and (1 + w) norms, Phi-3's fused projections, OLMo 2's
post-norms, mixture-of-experts layers, sliding-window layers), called with the runtime's tensors through
`torch.func.functional_call`. The modules hold no weights of their own (their parameters live on the meta
device), so a 70B skeleton costs nothing.

Families with our own numerics (`layers.py`: Llama 3.x, Qwen2/2.5, Qwen3, Mistral) take that faster path;
every other `model_type` that transformers knows comes here (`ModelConfig.family == "hf"`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from slideformer.kernels import IGNORE_INDEX

from .loss import head_loss_and_grads

Params = dict[str, torch.Tensor]
LayerKwargs = dict[str, Any]  # what the architecture's model passes each layer: masks, rotary tables, positions


class UnsupportedArchitecture(ValueError):
    """An architecture the generic path cannot run, with why."""


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside keep their parameters on the meta device (no memory, no init work) and their
    buffers (rotary frequencies, embedding scales) real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # one already on meta is kept: tied weights stay one
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    setattr(nn.Module, "register_parameter", on_meta)
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", register)


def hf_config_object(hf: dict[str, Any]):
    from transformers import AutoConfig

    values = dict(hf)
    model_type = values.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        values.pop(key, None)
    return AutoConfig.for_model(model_type, **values)


def skeleton(hf: dict[str, Any]) -> Any:
    """The architecture's CausalLM with its parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    config = hf_config_object(hf)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    return model


def check_structure(model: Any, model_type: str) -> dict[str, tuple[int, ...]]:
    """The layer's parameter shapes (names relative to `model.layers.{i}.`), after checking the model is an
    embedding, identical decoder layers, a final norm and an LM head, as the sliding window streams them."""
    base: Any = getattr(model, "model", None)
    missing = [p for p in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, p)]
    missing += [] if hasattr(model, "lm_head") else ["lm_head"]
    if missing:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not laid out as the sliding window streams a decoder (model.embed_tokens, "
            f"model.layers, model.norm, model.rotary_emb, lm_head; missing: {', '.join(missing)}); encoder-decoder "
            "and multimodal models are not supported"
        )
    shapes = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in base.layers]
    if any(s != shapes[0] for s in shapes):
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has decoder layers of different shapes; the sliding window needs identical layers"
        )
    if any(True for layer in base.layers for b in layer.buffers() if b.numel()):
        raise UnsupportedArchitecture(f"model_type {model_type!r} keeps state in its decoder layers (buffers)")
    edges = {n for n, _ in model.named_parameters() if not n.startswith("model.layers.")}
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if model.config.tie_word_embeddings else {"lm_head.weight"}
    )
    if edges != expected:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has parameters outside its layers beyond the embedding, final norm and LM "
            f"head: {sorted(edges - expected)}"
        )
    return shapes[0]


class _Capture(nn.Module):
    """Stands in for decoder layer `index` while the model's own forward prepares each layer's arguments."""

    def __init__(self, index: int, sink: dict[int, LayerKwargs]) -> None:
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args, "decoder layers take their arguments by keyword"
        self.sink[self.index] = kwargs
        return hidden_states


class HFDecoder:
    """The architecture's modules, weightless, on `device`: embed, layer, head and what each layer is passed."""

    def __init__(self, hf: dict[str, Any], device: torch.device | str) -> None:
        self.model: Any = skeleton(hf)
        for module in self.model.modules():  # buffers to the device; parameters stay on meta
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
        self.base: Any = self.model.model
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def layer_kwargs(self, like: torch.Tensor, positions: torch.Tensor | None) -> list[LayerKwargs]:
        """Per layer, the keyword arguments the model's own forward passes it for hidden states shaped and typed
        like `like` [B, S, H]: its mask (full, sliding-window or per-sample), rotary tables and positions.
        `positions` (packed rows) restart at 0 where a sample starts."""
        sink: dict[int, LayerKwargs] = {}
        layers, norm = self.base.layers, self.base.norm
        self.base.layers = nn.ModuleList(_Capture(i, sink) for i in range(len(layers)))
        self.base.norm = nn.Identity()
        try:
            with torch.no_grad():
                self.base(inputs_embeds=like, position_ids=positions, use_cache=False)
        finally:
            self.base.layers, self.base.norm = layers, norm
        return [{k: v for k, v in sink[i].items() if k not in ("cache", "past_key_values")} for i in range(len(layers))]

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base.embed_tokens, {"weight": weight}, (ids,))

    def embed_grad(self, weight: torch.Tensor, ids: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
        """The embedding weight's gradient (dense, in the weight's dtype) for the output gradient d_out."""
        w = weight.detach().requires_grad_()
        with torch.enable_grad():
            out = self.embed(w, ids)
        (grad,) = torch.autograd.grad(out, [w], d_out)
        return grad

    def layer(self, index: int, params: Params, x: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        out = functional_call(self.base.layers[index], params, (x,), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def layer_backward(
        self,
        index: int,
        params: Params,
        x: torch.Tensor,
        dy: torch.Tensor,
        kwargs: LayerKwargs,
        accumulate: Callable[[str, torch.Tensor], None],
    ) -> torch.Tensor:
        """Recompute layer `index` from x with autograd and back-propagate dy: returns dx and hands every
        weight's gradient to `accumulate` (an expert no token was routed to gets zeros)."""
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            y = self.layer(index, params, x, kwargs)
        grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
        for (name, p), g in zip(params.items(), grads[1:]):
            accumulate(name, g if g is not None else torch.zeros_like(p))
        return grads[0]

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The architecture's final norm with this weight."""
        return functional_call(self.base.norm, {"weight": weight}, (x,))

    def logits(self, norm_w: torch.Tensor, head_w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(x, norm_w), head_w)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

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
        """As `loss.head_loss_and_grads`, through the architecture's own norm (and logit soft-capping),
        a piece of tokens at a time. Without soft-capping the head is norm, linear and cross-entropy as ours:
        `loss.head_loss_and_grads` with this norm (on the GPU its fused kernel, which never holds fp32 logits)."""
        if self.softcap is None:
            return head_loss_and_grads(
                x, labels, norm_w, head_w, 0.0, total_tokens, piece_tokens, grad_norm_w, grad_head_w, self.norm
            )
        flat, lab = x.detach().flatten(0, 1), labels.flatten()
        dx = torch.empty_like(flat)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        nw, hw = norm_w.detach().requires_grad_(), head_w.detach().requires_grad_()
        for start in range(0, flat.shape[0], piece_tokens):
            piece = flat[start : start + piece_tokens].requires_grad_()
            with torch.enable_grad():
                logits = self.logits(nw, hw, piece).float()
                part = (
                    F.cross_entropy(
                        logits, lab[start : start + piece_tokens], ignore_index=IGNORE_INDEX, reduction="sum"
                    )
                    / total_tokens
                )
            g_piece, g_norm, g_head = torch.autograd.grad(part, [piece, nw, hw])
            dx[start : start + piece_tokens] = g_piece
            grad_norm_w += g_norm
            grad_head_w += g_head
            loss += part.detach()
        return loss, dx.view_as(x)

    @torch.no_grad()
    def head_loss_sum(
        self, x: torch.Tensor, labels: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, piece_tokens: int
    ) -> torch.Tensor:
        flat, lab = x.flatten(0, 1), labels.flatten()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, flat.shape[0], piece_tokens):
            logits = self.logits(norm_w, head_w, flat[start : start + piece_tokens]).float()
            total += F.cross_entropy(
                logits, lab[start : start + piece_tokens], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return total


@lru_cache(maxsize=8)
def decoder_for(hf_json: str, device: str) -> HFDecoder:
    """One weightless skeleton per architecture config and device."""
    return HFDecoder(json.loads(hf_json), device)
