"""Each Triton kernel against the PyTorch reference on fresh random inputs, forward and gradients, at the
tolerance of bf16 (on CPU through TRITON_INTERPRET=1, set in conftest; on the GPU natively)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from slideformer import kernels
from slideformer.models.config import PRESETS
from slideformer.models.layers import add_rms_norm, apply_rope, rms_norm, rope_at, rope_tables

pytest.importorskip("triton")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within bf16 precision of the fp32 reference: 2% of each value plus 1% of the largest (sums of many
    bf16 products lose absolute, not relative, precision)."""
    got, want = got.float(), want.float()
    bound = 2e-2 * want.abs() + 1e-2 * want.abs().max()
    worst = ((got - want).abs() - bound).max()
    assert worst <= 0, (
        f"off by {worst.item():.3g} beyond the bf16 bound (largest |value| {want.abs().max().item():.3g})"
    )


def run(fn, *inputs, use, fp32=False):
    """Output and input gradients of fn; fp32=True: the reference, on the same values upcast to fp32."""
    leaves = [(t.float() if fp32 else t).detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with kernels.use(use, on_cpu=use):
        out = fn(*leaves)
    d_out = (
        torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, torch.bfloat16).to(out.dtype)
    )
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], d_out)
    return out, grads


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 7, 4, 128), (1, 3, 4096), (2, 2, 1000)])
def test_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device(), torch.bfloat16)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device(), torch.bfloat16)
    ref_out, ref_grads = run(lambda a, b: rms_norm(a, b, 1e-5), x, w, use=False, fp32=True)
    out, grads = run(lambda a, b: rms_norm(a, b, 1e-5), x, w, use=True)
    close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        close(got, want)


@pytest.mark.parametrize("shape", [(3, 5, 64), (1, 3, 4096), (2, 2, 1000)])
def test_rms_norm_with_residual_add(shape):
    """Both outputs (the sum and its norm) and the gradients, with the sum's own gradient added in."""
    g = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(shape, generator=g).to(device(), torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device(), torch.bfloat16)

    def both(a, d, b):
        return torch.stack(add_rms_norm(a, d, b, 1e-5))

    ref_out, ref_grads = run(both, x, delta, w, use=False, fp32=True)
    out, grads = run(both, x, delta, w, use=True)
    close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        close(got, want)


@pytest.mark.parametrize("shape", [(2, 3, 176), (5, 1000), (1, 7, 14336)])
def test_swiglu(shape):
    from slideformer.kernels.swiglu import swiglu

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(shape, generator=g).to(device(), torch.bfloat16) for _ in range(2))
    ref_out, ref_grads = run(lambda a, b: F.silu(a) * b, gate, up, use=False, fp32=True)
    out, grads = run(swiglu, gate, up, use=True)
    close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        close(got, want)


@pytest.mark.parametrize("b, heads, seq, d", [(2, 4, 16, 16), (1, 3, 33, 128), (1, 2, 7, 64)])
def test_rope_with_llama3_scaling(b, heads, seq, d):
    cfg = replace(PRESETS["llama-3.1-8b"], head_dim=d)
    cos, sin = rope_tables(cfg, seq, device(), torch.bfloat16)
    x = torch.randn(b, heads, seq, d, generator=torch.Generator().manual_seed(0)).to(device(), torch.bfloat16)
    ref_out, (ref_grad,) = run(lambda a: apply_rope(a, cos.float(), sin.float()), x, use=False, fp32=True)
    out, (grad,) = run(lambda a: apply_rope(a, cos, sin), x, use=True)
    close(out, ref_out)
    close(grad, ref_grad)


def test_rope_with_each_tokens_own_position():
    """Packed rows: [B, S, D] tables, each token at its position in its sample."""
    cfg = replace(PRESETS["llama-3.1-8b"], head_dim=32)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 0, 1, 2, 3, 4, 5, 6]])
    cos, sin = rope_at(cfg, positions, device(), torch.bfloat16)
    x = torch.randn(2, 3, 9, 32, generator=torch.Generator().manual_seed(0)).to(device(), torch.bfloat16)
    ref_out, (ref_grad,) = run(lambda a: apply_rope(a, cos.float(), sin.float()), x, use=False, fp32=True)
    out, (grad,) = run(lambda a: apply_rope(a, cos, sin), x, use=True)
    close(out, ref_out)
    close(grad, ref_grad)
    table_cos, _ = rope_tables(cfg, 7, device(), torch.bfloat16)
    assert torch.equal(cos[1, 0], table_cos[5]) and torch.equal(cos[1, 2], table_cos[0])


def test_rope_reads_the_projection_layout_and_writes_its_gradient_back_in_it():
    """q as the attention makes it: the projection's [B, S, heads, D] output, transposed. No copy either way:
    the output is [B, heads, S, D] contiguous, the gradient has the projection's layout."""
    cfg = replace(PRESETS["llama-3.1-8b"], head_dim=64)
    cos, sin = rope_tables(cfg, 9, device(), torch.bfloat16)
    projected = torch.randn(2, 9, 3, 64, generator=torch.Generator().manual_seed(0)).to(device(), torch.bfloat16)
    ref_out, (ref_grad,) = run(
        lambda a: apply_rope(a.transpose(1, 2), cos.float(), sin.float()), projected, use=False, fp32=True
    )
    leaf = projected.detach().clone().requires_grad_()
    with kernels.use(True, on_cpu=True):
        out = apply_rope(leaf.transpose(1, 2), cos, sin)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, torch.bfloat16)
    (grad,) = torch.autograd.grad(out, [leaf], d_out)
    assert out.is_contiguous() and grad.is_contiguous()
    close(out, ref_out)
    close(grad, ref_grad)


@pytest.mark.parametrize("tokens, hidden, vocab, piece", [(9, 32, 1000, 4), (6, 64, 128256, 4), (5, 16, 151936, 8)])
def test_linear_cross_entropy_with_ignored_tokens(tokens, hidden, vocab, piece):
    from slideformer.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device(), torch.bfloat16)
    w = (0.05 * torch.randn(vocab, hidden, generator=g)).to(device(), torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device())
    labels[1] = IGNORE_INDEX
    total = int((labels != IGNORE_INDEX).sum())
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    ref = F.cross_entropy((xr @ wr.t()).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / total
    ref_dx, ref_dw = torch.autograd.grad(ref, [xr, wr])
    grad_w = torch.zeros(vocab, hidden, dtype=torch.float32, device=device())
    with kernels.use(True, on_cpu=True):
        loss, dx = linear_cross_entropy(x, w, labels, 1.0 / total, piece, grad_w)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-2, atol=1e-3)
    close(dx, ref_dx)
    close(grad_w, ref_dw)


def test_training_with_kernels_is_as_close_to_fp32_as_eager_bf16():
    """The kernels round once in fp32 where eager bf16 rounds every op, so a run with them differs from the
    eager bf16 loop by bf16 noise (AdamW turns rounding differences in tiny gradients into full steps). The
    claim that matters: they are no farther from the fp32 trajectory than eager bf16 itself is."""
    from slideformer.models import RandomWeights
    from slideformer.schedule.plan import uniform_plan
    from slideformer.runtime import AdamWConfig, Engine
    from tests.reference import assert_no_farther_from_fp32_than_eager, batches

    cfg = replace(PRESETS["tiny-llama"], num_layers=2)
    data = [(ids[:, :16], labels[:, :16]) for ids, labels in batches(cfg.vocab_size)]
    src, optim = RandomWeights(cfg, seed=3), AdamWConfig(lr=1e-3, weight_decay=0.01)
    with kernels.use(True, on_cpu=True):
        engine = Engine(cfg, uniform_plan("tiny-llama", 2, 4, 16, chunk=2, device=device()), src, optim)
        losses = [engine.train_step(ids, labels).loss for ids, labels in data]
        ours = engine.hf_state()
        engine.close()
    assert_no_farther_from_fp32_than_eager(cfg, src, data, optim, 2, device(), None, losses, ours)
