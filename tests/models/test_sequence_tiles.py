"""A layer along its sequence in tiles (`seq_tile_tokens`): the same outputs and gradients as the whole-sequence
layer, for causal rows and packed rows, for every family's attention (GQA, q/k norms, biases)."""

import pytest
import torch

from slideformer.models import PRESETS
from slideformer.models.layers import (
    decoder_layer,
    decoder_layer_backward,
    decoder_layer_backward_in_tiles,
    decoder_layer_in_tiles,
    token_positions,
)
from slideformer.models.model import init_tensor

PACKED = [[5, 9, 2], [3, 7, 6]]  # two rows of 16 tokens, samples by length


def layer_inputs(family: str, device: str, packed: bool, dtype=torch.float64):
    cfg = PRESETS[family]
    g = torch.Generator().manual_seed(7)
    params = {n: init_tensor(n, s, g).to(device, dtype) for n, s in cfg.layer_param_shapes().items()}
    params = {n: t.add(0.1 * torch.randn(t.shape, generator=g).to(t)) if "norm" in n else t for n, t in params.items()}
    params = {n: t.requires_grad_() for n, t in params.items()}  # leaves, as the runtime's weight views are
    x = torch.randn(2, 16, cfg.hidden_size, generator=g).to(device, dtype)
    dy = torch.randn(2, 16, cfg.hidden_size, generator=g).to(device, dtype)
    positions = torch.tensor([[i for n in row for i in range(n)] for row in PACKED]) if packed else None
    return cfg, params, x, dy, token_positions(cfg, positions, 16, device, dtype)


def gradients(backward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    acc: dict[str, torch.Tensor] = {}

    def accumulate(name, g):
        acc[name] = acc[name] + g if name in acc else g.clone()

    return backward(accumulate), acc


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("seq_tile", [3, 5, 16])
def test_tiles_along_the_sequence_compute_the_whole_layer(family, packed, seq_tile):
    cfg, p, x, dy, pos = layer_inputs(family, "cpu", packed)
    whole = decoder_layer(p, x, pos.cos, pos.sin, cfg, pos.spans)
    tiled = decoder_layer_in_tiles(p, x, pos.cos, pos.sin, cfg, seq_tile, pos.spans)
    torch.testing.assert_close(tiled, whole, rtol=1e-10, atol=1e-10)

    dx, grads = gradients(lambda acc: decoder_layer_backward(p, x, dy, pos.cos, pos.sin, cfg, 0, acc, pos.spans))
    dx_t, grads_t = gradients(
        lambda acc: decoder_layer_backward_in_tiles(p, x, dy, pos.cos, pos.sin, cfg, 4, seq_tile, acc, pos.spans)
    )
    torch.testing.assert_close(dx_t, dx, rtol=1e-10, atol=1e-10)
    assert grads_t.keys() == grads.keys() == p.keys()
    for name in p:
        torch.testing.assert_close(grads_t[name], grads[name], rtol=1e-10, atol=1e-10, msg=name)


def test_tiles_in_bf16_stay_as_close_to_fp64_as_the_whole_sequence():
    """The partial key gradients are summed in fp32 in another order: no farther from exact than the whole
    sequence's bf16 backward, within a small slack."""
    cfg, p, x, dy, pos = layer_inputs("tiny-llama", "cpu", False)
    exact, _ = gradients(lambda acc: decoder_layer_backward(p, x, dy, pos.cos, pos.sin, cfg, 0, acc))
    bf = [t.bfloat16() for t in (x, dy)]
    pb = {n: t.detach().bfloat16().requires_grad_() for n, t in p.items()}
    cos, sin = pos.cos.bfloat16(), pos.sin.bfloat16()
    whole, _ = gradients(lambda acc: decoder_layer_backward(pb, *bf, cos, sin, cfg, 0, acc))
    tiled, _ = gradients(lambda acc: decoder_layer_backward_in_tiles(pb, *bf, cos, sin, cfg, 0, 4, acc))
    err = lambda t: ((t.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(tiled) <= 1.25 * err(whole) + 1e-3
