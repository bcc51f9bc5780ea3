"""A layer whose forward saved its attention output and log-sum-exp (`Plan.saved_attention`): its backward runs
from them through the kernel that computed them, so it gives the recomputing backward's gradients without
running attention again, for causal rows and packed rows and every family's attention."""

import pytest
import torch

from slideformer.models import layers
from slideformer.models.layers import attention_stats_views, decoder_layer, decoder_layer_backward
from slideformer.schedule.graph import attention_stats_bytes
from tests.models.test_sequence_tiles import gradients, layer_inputs

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def saved_stats(cfg, params, x, pos):
    n, seq = x.shape[:2]
    buffer = torch.zeros(attention_stats_bytes(cfg, n * seq, x.element_size()), dtype=torch.uint8, device=x.device)
    stats = attention_stats_views(buffer, n, seq, cfg, x.dtype)
    with torch.no_grad():
        y = decoder_layer(params, x, pos.cos, pos.sin, cfg, pos.spans, stats)
    return y, stats


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_backward_from_saved_attention_gives_the_recomputed_gradients(family, packed, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg, params, x, dy, pos = layer_inputs(family, device, packed, dtype)
    with torch.no_grad():
        plain = decoder_layer(params, x, pos.cos, pos.sin, cfg, pos.spans)
    y, stats = saved_stats(cfg, params, x, pos)
    assert torch.equal(y, plain)  # saving changes nothing in the forward
    run = lambda saved: (
        lambda acc: decoder_layer_backward(  # noqa: E731
            params, x, dy, pos.cos, pos.sin, cfg, 0, acc, pos.spans, saved
        )
    )
    dx, grads = gradients(run(None))
    dx_saved, grads_saved = gradients(run(stats))
    # the same kernels on the same inputs (the output's layout aside): equal on the CPU, to rounding on the GPU
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_saved, dx, **tol)
    for name in grads:
        torch.testing.assert_close(grads_saved[name], grads[name], **tol)


def test_the_backward_runs_no_attention_and_reads_the_saved_statistics(monkeypatch):
    cfg, params, x, dy, pos = layer_inputs("tiny-llama", "cpu", False, torch.float32)
    _, stats = saved_stats(cfg, params, x, pos)

    def no_attention(*args, **kwargs):
        raise AssertionError("attention ran again in the backward")

    monkeypatch.setattr(layers, "causal_attention", no_attention)
    monkeypatch.setattr(layers, "_attention_with_lse", no_attention)
    dx, _ = gradients(lambda acc: decoder_layer_backward(params, x, dy, pos.cos, pos.sin, cfg, 0, acc, None, stats))
    stats.lse.add_(1.0)  # wrong statistics give other gradients: the backward reads them
    dx_wrong, _ = gradients(
        lambda acc: decoder_layer_backward(params, x, dy, pos.cos, pos.sin, cfg, 0, acc, None, stats)
    )
    assert not torch.allclose(dx, dx_wrong)
