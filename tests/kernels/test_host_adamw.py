"""The one-pass CPU AdamW + bf16 cast (`kernels.host_adamw`) against torch.optim.AdamW(fused=True)."""

import threading
import time

import pytest
import torch

from slideformer.kernels import host_adamw

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1
ULP = 2.0**-23  # fp32's relative rounding step
N = 100_003


def steps_from_torchs_state(exact: bool) -> None:
    """Five steps of torch's AdamW; before each, ours starts from torch's state and takes the same step. Its
    results agree to a few ulps of the terms each is summed from (`exact`: bit for bit), and its bf16 weights
    are its new master rounded."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(N, generator=gen))
    opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    weights = torch.empty(N, dtype=torch.bfloat16)
    for step in range(1, 6):
        grad = torch.randn(N, generator=gen) * 10.0 ** torch.randint(-6, 1, (N,), generator=gen).float()
        prev = opt.state[ref]
        param, exp_avg, exp_avg_sq = (
            ref.detach().clone(),
            *((prev[k].clone() if prev else torch.zeros(N)) for k in ("exp_avg", "exp_avg_sq")),
        )
        host_adamw.adamw_and_cast(param, grad, exp_avg, exp_avg_sq, weights, step, LR, *BETAS, EPS, WD)
        # the size of what each result is a sum of, from torch's inputs and outputs
        exp_avg_terms = (prev["exp_avg"].abs() if prev else 0) + grad.abs()
        terms = {"exp_avg": exp_avg_terms, "exp_avg_sq": (prev["exp_avg_sq"] if prev else 0) + grad * grad}
        ref.grad = grad.clone()
        was = ref.detach().clone()
        opt.step()
        state = opt.state[ref]
        bias1, bias2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
        move = LR / bias1 * exp_avg_terms / ((state["exp_avg_sq"] / bias2).sqrt() + EPS)
        terms["param"] = was.abs() + move
        for name, got, want in (
            ("param", param, ref.detach()),
            ("exp_avg", exp_avg, state["exp_avg"]),
            ("exp_avg_sq", exp_avg_sq, state["exp_avg_sq"]),
        ):
            if exact:
                assert torch.equal(got, want), f"step {step}: {name}"
            else:
                ulps = ((got - want).abs() / terms[name].clamp_min(1e-30)).max().item() / ULP
                assert ulps <= 4, f"step {step}: {name} {ulps:.1f} ulps of its terms from torch's"
        assert torch.equal(weights, param.to(torch.bfloat16))


def test_one_pass_step_is_torchs_adamw_to_within_rounding():
    if not host_adamw.prepare():
        pytest.skip("no C++ compiler for torch.compile here: the two-pass fallback is tested below")
    steps_from_torchs_state(exact=False)


def test_without_a_compiler_the_step_is_torchs_kernel_and_the_cast(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(host_adamw, "_step", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: no_compiler)
    with pytest.warns(UserWarning, match="two passes instead"):
        assert not host_adamw.prepare()
    steps_from_torchs_state(exact=True)


def test_the_one_pass_step_lets_other_python_threads_run():
    """The runtime's issuing thread keeps launching GPU work while the CPU worker updates: the compiled step
    releases the GIL (Inductor's C++ wrapper; its default Python binding held it for the whole step, which
    stalled traced backwards on the H200 by up to 0.22 s), so the longest pause of a Python loop beside an
    update is a small part of the update's time."""
    if not host_adamw.prepare():
        pytest.skip("no C++ compiler for torch.compile here")
    n = 40_000_000
    tensors = [torch.zeros(n) for _ in range(4)] + [torch.empty(n, dtype=torch.bfloat16)]

    def update() -> None:
        host_adamw.adamw_and_cast(*tensors, 1, LR, *BETAS, EPS, WD)

    update()
    done, took = threading.Event(), []

    def worker() -> None:  # as the runtime's CPU worker, on torch's threads
        start = time.perf_counter()
        update()
        took.append(time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=worker)
    last, longest = time.perf_counter(), 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    assert took[0] > 0.02, "the update is too short to tell"
    assert longest < took[0] / 3, f"a {longest * 1e3:.0f} ms pause beside a {took[0] * 1e3:.0f} ms update"


@pytest.mark.parametrize("grad_scale", [None, 0.37])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-passes"])
def test_a_bf16_gradient_steps_as_its_fp32_copy_does(one_pass, grad_scale, monkeypatch):
    """`Plan.bf16_layer_grads` hands the update bf16 gradients: read as fp32 and scaled there, they give the
    step their fp32 copy gives, bit for bit; a scale is the clip coefficient torch's clipping multiplies by."""
    if not one_pass:
        monkeypatch.setattr(host_adamw, "_step", host_adamw._two_passes)
    elif not host_adamw.prepare():
        pytest.skip("no C++ compiler for torch.compile here")
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(N, generator=gen).to(torch.bfloat16)
    start = [torch.randn(N, generator=gen), torch.randn(N, generator=gen), torch.rand(N, generator=gen)]
    results = []
    for g in (grad, grad.float()):
        param, exp_avg, exp_avg_sq = (t.clone() for t in start)
        weights = torch.empty(N, dtype=torch.bfloat16)
        host_adamw.adamw_and_cast(param, g, exp_avg, exp_avg_sq, weights, 3, LR, *BETAS, EPS, WD, grad_scale)
        results.append((param, exp_avg, exp_avg_sq, weights))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    if grad_scale is not None:  # the scale reached the step: unscaled, the moments differ
        param, exp_avg, exp_avg_sq = (t.clone() for t in start)
        host_adamw.adamw_and_cast(
            param, grad, exp_avg, exp_avg_sq, torch.empty(N, dtype=torch.bfloat16), 3, LR, *BETAS, EPS, WD
        )
        assert not torch.equal(exp_avg, results[0][1])
