"""Measurements behind a profile. Each function measures one thing and returns plain numbers.

Timings take the median of several repeats after a warm-up; GPU work is timed with CUDA events.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slideformer.kernels import host_adamw
from slideformer.models.config import GENERIC, ModelConfig
from slideformer.models.layers import AttentionStats, attention_stats_views
from slideformer.schedule.plan import SEQ_TILES, STAGING_BUFFERS
from slideformer.models.loss import head_loss_and_grads
from slideformer.models.numerics import numerics_for

from slideformer.schedule.graph import attention_stats_bytes
from slideformer.schedule.memory import DISK_ALIGN, padded

from slideformer.schedule.profile import Disk, HeadTiming, LayerTiming, Link


def median_time(fn: Callable[[], object], repeats: int = 5, cuda: bool = False) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- host ------------------------------------------------------------------------------------
def host_memcpy_bandwidth(nbytes: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return nbytes / median_time(lambda: dst.copy_(src))


def host_cast_bandwidth(nbytes: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty(src.shape, dtype=torch.bfloat16)
    return nbytes / median_time(lambda: dst.copy_(src))


def host_update(numel: int, cast: bool) -> Callable[[], None]:
    """One CPU update of `numel` fp32 parameters as the runtime runs it: torch's fused AdamW, or (`cast`) the
    one-pass AdamW + bf16 cast of units keeping bf16 weights in RAM."""
    grad = torch.full((numel,), 1e-3)
    if cast:
        param, exp_avg, exp_avg_sq = (torch.zeros(numel) for _ in range(3))
        weights = torch.empty(numel, dtype=torch.bfloat16)
        host_adamw.prepare()
        return lambda: host_adamw.adamw_and_cast(
            param, grad, exp_avg, exp_avg_sq, weights, 1, 1e-5, 0.9, 0.999, 1e-8, 0.0
        )
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = grad
    return torch.optim.AdamW([param], lr=1e-5, fused=True).step


def cpu_adamw_rates(numel: int, thread_counts: list[int]) -> list[float]:
    """Parameters/s of torch's fused AdamW on fp32 master weights and states, per intra-op thread count."""
    step = host_update(numel, cast=False)
    saved = torch.get_num_threads()
    rates = []
    try:
        for t in thread_counts:
            torch.set_num_threads(t)
            rates.append(numel / median_time(step, repeats=3))
    finally:
        torch.set_num_threads(saved)
    return rates


def cpu_adamw_cast_rate(numel: int) -> float:
    """Parameters/s of the one-pass AdamW + bf16 cast at the runtime's thread count."""
    return numel / median_time(host_update(numel, cast=True), repeats=3)


def disk_rates(disk_tier: Callable[..., Any], directory: str | Path, nbytes: int, io: str = "auto") -> Disk:
    """Write then read files of two sizes through the disk tier itself (`disk_tier`: the runtime's `DiskTier`,
    with its pieces, threads, checksums and I/O path: kvikio when installed, else POSIX with O_DIRECT), fitting
    time = latency + bytes / bandwidth per direction: layers' states move in large files, activations in small
    ones."""
    sizes = [max(nbytes // 16, 4 * DISK_ALIGN), nbytes]
    buf = torch.empty(padded(nbytes) + DISK_ALIGN, dtype=torch.uint8)
    buf = buf[-buf.data_ptr() % DISK_ALIGN :][: padded(nbytes)].fill_(0x5A)
    times: dict[str, list[float]] = {"read": [], "write": []}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".slideformer-calibrate-") as d:
        tier = disk_tier(d, {f"calibrate{n}": n for n in sizes}, io)
        try:
            for n in sizes:
                times["write"].append(median_time(lambda: tier.write(f"calibrate{n}", buf), repeats=2))
                times["read"].append(median_time(lambda: tier.read(f"calibrate{n}", buf), repeats=2))
        finally:
            tier.close()
    fits = {}
    for direction, (small_s, large_s) in times.items():
        bandwidth = (sizes[1] - sizes[0]) / max(large_s - small_s, 1e-9)
        fits[direction] = (bandwidth, max(small_s - sizes[0] / bandwidth, 0.0))
    return Disk(str(directory), tier.method, fits["read"][0], fits["write"][0], fits["read"][1], fits["write"][1])


# --- PCIe and GPU --------------------------------------------------------------------------------
def pcie_link(direction: str, sizes: list[int]) -> Link:
    """Fit time = latency + bytes / bandwidth over pinned copies of several sizes."""
    times = []
    for n in sizes:
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        copy = (
            (lambda: dev.copy_(host, non_blocking=True))
            if direction == "h2d"
            else (lambda: host.copy_(dev, non_blocking=True))
        )
        times.append(median_time(copy, cuda=True))
    slope, intercept = np.polyfit(np.array(sizes, dtype=float), np.array(times), 1)
    return Link(bandwidth=float(1 / slope), latency_s=float(max(intercept, 0.0)))


def duplex_bandwidth(nbytes: int) -> float:
    """Bytes/s moved when H2D and D2H copies run at the same time on two streams."""
    h_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> None:
        with torch.cuda.stream(s1):
            d_dst.copy_(h_src, non_blocking=True)
        with torch.cuda.stream(s2):
            h_dst.copy_(d_src, non_blocking=True)
        torch.cuda.synchronize()

    return 2 * nbytes / median_time(both)


class BackgroundAdamW:
    """Keeps the CPU's fused AdamW busy (a thread stepping `numel` parameters, as the runtime's CPU worker does)
    for as long as the `with` block runs."""

    def __init__(self, numel: int) -> None:
        self.update = host_update(numel, cast=False)
        self.update()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self.stop.is_set():
            self.update()

    def __enter__(self) -> BackgroundAdamW:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join()


def h2d_beside_update_bandwidths(nbytes: int, beside: BackgroundAdamW) -> tuple[float, float]:
    """Host-to-GPU bytes/s while the CPU's AdamW runs (`beside`): alone, and with a GPU-to-host copy running the
    whole time on another stream. The host's memory serves the update and both copies: in traced steps on the
    H200 host the loads moved 40-45 GB/s beside the update and 32-35 with the gradients going out too, against
    55 alone (bench/results/h200-2026-12-02-leaseB-fidelity-1024x8.json), while the copies out kept their rate."""
    h_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h_dst = torch.empty(2 * nbytes, dtype=torch.uint8, pin_memory=True)
    d_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d_src = torch.empty(2 * nbytes, dtype=torch.uint8, device="cuda")
    h2d, d2h = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d_seconds(duplex: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if duplex:  # twice the bytes out, so that the copy out outlasts the one in
            with torch.cuda.stream(d2h):
                h_dst.copy_(d_src, non_blocking=True)
        with torch.cuda.stream(h2d):
            start.record()
            d_dst.copy_(h_src, non_blocking=True)
            end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    h2d_seconds(True)  # warm-up
    with beside:
        time.sleep(0.2)  # the update's first step under way
        alone, duplex = (statistics.median(h2d_seconds(d) for _ in range(5)) for d in (False, True))
    return nbytes / alone, nbytes / duplex


class BackgroundCopies:
    """Keeps both PCIe directions busy (pinned copies on two side streams) while a measurement runs."""

    def __init__(self, nbytes: int = 256 * 2**20) -> None:
        self.h = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.d = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
        self.streams = (torch.cuda.Stream(), torch.cuda.Stream())
        self.nbytes = nbytes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        self.sleep_cycles_per_s = 10**7 / (start.elapsed_time(end) / 1e3)

    def queue(self, seconds: float, bandwidth: float, duty: float = 1.0) -> None:
        """Copies for about `seconds`, each direction busy a `duty` share of the time (idle gaps between)."""
        copy_s = self.nbytes / bandwidth
        gap = int(copy_s * (1 / duty - 1) * self.sleep_cycles_per_s)
        for _ in range(max(1, int(seconds / (copy_s / duty)))):
            for stream, (src, dst) in zip(self.streams, ((self.h[0], self.d[0]), (self.d[1], self.h[1]))):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                    if gap:
                        torch.cuda._sleep(gap)

    def drain(self) -> None:
        torch.cuda.synchronize()


def cpu_adamw_rate_under_copies(
    numel: int, copies: BackgroundCopies, link_bandwidth: float, duty: float = 1 / 3, cast: bool = False
) -> float:
    """The CPU update (`host_update`) while DMA competes for host memory as during the runtime's backward,
    where weight loads and gradient copies keep each PCIe direction about a third busy (one layer's 4
    bytes/param each way against its recompute + backward)."""
    step = host_update(numel, cast)
    step()
    copies.queue(seconds=numel / 1e9 * 6, bandwidth=link_bandwidth, duty=duty)
    t = time.perf_counter()
    for _ in range(3):
        step()
    rate = 3 * numel / (time.perf_counter() - t)
    copies.drain()
    return rate


def staged_load_bandwidth(
    weight_stream: Callable[..., Any],
    cfg: ModelConfig,
    seq: int,
    sequences: int,
    piece_bytes: int,
    buffers: int = STAGING_BUFFERS,
    cast_priority: bool = True,
) -> float:
    """The runtime's weight load (`weight_stream`: the runtime's `WeightStream`, fp32 pinned -> staging ring ->
    bf16 cast) of one layer while the compute stream runs that layer's recompute + backward, as in the
    runtime's backward."""
    numel = cfg.layer_params
    master = torch.ones(numel, dtype=torch.float32, pin_memory=True)
    dst = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    stream = weight_stream([torch.empty(piece_bytes // 4, device="cuda") for _ in range(buffers)], cast_priority)
    layer = _Layer(cfg, "cuda")
    x = torch.randn(sequences, seq, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    times = []
    for _ in range(4):
        layer.recompute_backward(x, x)
        with torch.cuda.stream(side):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            stream.load(master, dst)
            end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return numel * 4 / statistics.median(times[1:])


def compute_slowdown_under_copies(
    cfg: ModelConfig, seq: int, sequences: int, copies: BackgroundCopies, link_bandwidth: float
) -> float:
    """Layer recompute+backward time with both PCIe directions busy, over its time without."""
    layer = _Layer(cfg, "cuda")
    x = torch.randn(sequences, seq, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn_like(x)

    def bwd() -> None:
        xi = x.detach().requires_grad_()
        torch.autograd.grad(layer.forward(xi), [xi, *layer.params.values()], dy)

    alone = median_time(bwd, cuda=True)
    copies.queue(seconds=alone * 8, bandwidth=link_bandwidth)
    busy = median_time(bwd, cuda=True)
    copies.drain()
    return busy / alone


def gpu_gemm_flops(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / median_time(lambda: a @ b, repeats=10, cuda=True)


def gpu_memory_bandwidth(nbytes: int) -> float:
    """Bytes read plus written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), cuda=True)


def gpu_adamw_rate(numel: int) -> float:
    param = torch.nn.Parameter(torch.zeros(numel, device="cuda"))
    param.grad = torch.full_like(param, 1e-3)
    opt = torch.optim.AdamW([param], lr=1e-5, fused=True)
    return numel / median_time(opt.step, cuda=True)


# --- the model's own kernels ------------------------------------------------------------------------
def peak_extra_bytes(fn: Callable[[], None]) -> int:
    """GPU bytes `fn` allocates at its peak beyond what was allocated before it ran."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def kept_bytes(layer: _Layer, x: torch.Tensor) -> int:
    """GPU bytes a layer's forward with autograd holds (its saved tensors and output) until backward."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    xi = x.detach().requires_grad_()
    y = layer.forward(xi)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del y, xi
    return held


class _Layer:
    """One decoder layer of `cfg` as the runtime runs it (our numerics, or the architecture's own modules), on
    random bf16 weights."""

    def __init__(self, cfg: ModelConfig, device: str) -> None:
        self.cfg = cfg
        self.numerics, self.params = numerics_for(cfg, torch.device(device)), _layer_weights(cfg, device)
        self.where: dict[tuple[int, ...], object] = {}  # rotary tables and masks, by input shape

    def _positions(self, x: torch.Tensor) -> object:
        if tuple(x.shape) not in self.where:
            self.where[tuple(x.shape)] = self.numerics.positions(None, x)
        return self.where[tuple(x.shape)]

    def forward(self, x: torch.Tensor, seq_tile: int = 0) -> torch.Tensor:
        return self.numerics.layer(0, self.params, x, self._positions(x), seq_tile)

    def recompute_backward(
        self, x: torch.Tensor, dy: torch.Tensor, seq_tile: int = 0, saved: AttentionStats | None = None
    ) -> torch.Tensor:
        """As the runtime's offload and recompute policies run it (`saved`: from a saved attention)."""
        pos = self._positions(x)
        return self.numerics.layer_backward(0, self.params, x, dy, pos, 0, lambda name, g: None, seq_tile, saved)

    def saved_attention(self, x: torch.Tensor) -> AttentionStats:
        """What the forward of a layer under `Plan.saved_attention` leaves for its backward."""
        n, seq = x.shape[:2]
        buffer = torch.empty(
            attention_stats_bytes(self.cfg, n * seq, x.element_size()), dtype=torch.uint8, device=x.device
        )
        stats = attention_stats_views(buffer, n, seq, self.cfg, x.dtype)
        with torch.no_grad():
            self.numerics.layer(0, self.params, x, self._positions(x), 0, stats)
        return stats


def _layer_weights(cfg: ModelConfig, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return {
        name: (torch.randn(shape, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
        for name, shape in cfg.layer_param_shapes().items()
    }


def layer_timings(cfg: ModelConfig, seq: int, sequences: list[int], device: str) -> list[LayerTiming]:
    """Forward, recompute+backward and kept-graph backward of one decoder layer per chunk size."""
    cuda = device == "cuda"
    layer = _Layer(cfg, device)
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    out = []
    for n in sequences:
        x = torch.randn(n, seq, cfg.hidden_size, dtype=torch.bfloat16, device=device)
        dy = torch.randn_like(x)

        def fwd() -> None:
            with torch.no_grad():
                layer.forward(x)

        def recompute_bwd() -> None:
            layer.recompute_backward(x, dy)

        def kept_bwd() -> None:
            xi = x.detach().requires_grad_()
            y = layer.forward(xi)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.autograd.grad(y, [xi, *layer.params.values()], dy)
            if cuda:
                torch.cuda.synchronize()
            kept.append(time.perf_counter() - start)

        kept: list[float] = []
        for _ in range(4):
            kept_bwd()
        saved_s = 0.0
        if cfg.family != GENERIC:  # the backward of a layer whose forward saved its attention
            stats = layer.saved_attention(x)
            saved_s = median_time(lambda: layer.recompute_backward(x, dy, saved=stats), cuda=cuda)
            del stats
        out.append(
            LayerTiming(
                *widths,
                seq,
                n * seq,
                median_time(fwd, cuda=cuda),
                median_time(recompute_bwd, cuda=cuda),
                statistics.median(kept[1:]),
                kept_bytes(layer, x) if cuda else 0,
                layer=cfg.layer_kind,
                fwd_workspace_bytes=peak_extra_bytes(fwd) if cuda else 0,
                bwd_workspace_bytes=peak_extra_bytes(recompute_bwd) if cuda else 0,
                bwd_saved_attention_s=saved_s,
            )
        )
    if cfg.family != GENERIC:  # one sequence in each sequence tile the planner may choose
        x = torch.randn(1, seq, cfg.hidden_size, dtype=torch.bfloat16, device=device)
        dy = torch.randn_like(x)
        for tile in (t for t in SEQ_TILES if t < seq):
            with torch.no_grad():
                fwd_s = median_time(lambda: layer.forward(x, tile), repeats=3, cuda=cuda)
            bwd_s = median_time(lambda: layer.recompute_backward(x, dy, tile), repeats=3, cuda=cuda)
            out.append(LayerTiming(*widths, seq, seq, fwd_s, bwd_s, 0.0, seq_tile=tile, layer=cfg.layer_kind))
    return out


def head_timings(cfg: ModelConfig, token_counts: list[int], loss_chunk_tokens: int, device: str) -> list[HeadTiming]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.02).to(device, torch.bfloat16)
    norm_w = torch.ones(cfg.hidden_size, dtype=torch.bfloat16, device=device)
    g_w = torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=torch.float32, device=device)
    g_norm = torch.zeros(cfg.hidden_size, dtype=torch.float32, device=device)
    out = []
    for tokens in token_counts:
        h = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, device=device)
        labels = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)

        def run() -> None:
            head_loss_and_grads(h, labels, norm_w, w, cfg.rms_norm_eps, tokens, loss_chunk_tokens, g_norm, g_w)

        cuda = device == "cuda"
        out.append(
            HeadTiming(
                cfg.hidden_size,
                cfg.vocab_size,
                tokens,
                median_time(run, cuda=cuda),
                peak_extra_bytes(run) if cuda else 0,
            )
        )
    return out


def issue_time(cfg: ModelConfig, seq: int) -> float:
    """Host seconds to launch one layer forward while the GPU is busy (the executor's per-op overhead)."""
    layer = _Layer(cfg, "cuda")
    x = torch.randn(1, seq, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    big = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.forward(x)
        for _ in range(20):  # keep the GPU busy so launches do not wait on it
            big @ big
        t = time.perf_counter()
        for _ in range(5):
            layer.forward(x)
        spent = (time.perf_counter() - t) / 5
    torch.cuda.synchronize()
    return spent
