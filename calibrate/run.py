"""Measure this machine into a Profile (what `slideformer calibrate` runs)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
import os
from pathlib import Path
import platform
from typing import Any, Callable

import torch

from slideformer.models.config import ModelConfig

from . import measure
from slideformer.schedule.profile import Profile

MiB = 2**20


@dataclass(frozen=True)
class TimedPieces:
    """The runtime's own pieces that calibrate times, so that it measures the code that runs: handed in by the
    application (`slideformer calibrate`), since calibrate and the runtime sit side by side on the schedule
    layer and never import each other."""

    disk_tier: Callable[..., Any]  # runtime.disk.DiskTier


def measure_beside_update(prof: Profile, unit: int, copies: measure.BackgroundCopies, nbytes: int) -> None:
    """Into `prof`, the rates of the CPU update and PCIe sharing the host's memory: the update of `unit`
    parameters (plain and one-pass with the cast) under `copies`, and host-to-GPU copies of `nbytes` beside it
    (alone and with copies out). Needs `prof.h2d`."""
    assert prof.h2d is not None, "the link is measured first"
    prof.cpu_adamw_busy_params_per_s = measure.cpu_adamw_rate_under_copies(unit, copies, prof.h2d.bandwidth)
    prof.cpu_adamw_cast_busy_params_per_s = measure.cpu_adamw_rate_under_copies(
        unit, copies, prof.h2d.bandwidth, cast=True
    )
    prof.h2d_beside_update_bandwidth, prof.h2d_beside_update_duplex_bandwidth = measure.h2d_beside_update_bandwidths(
        nbytes, measure.BackgroundAdamW(unit)
    )


def calibrate(
    pieces: TimedPieces,
    models: list[ModelConfig],
    seqs: list[int],
    sequences_per_chunk: list[int],
    disk_dir: str | None,
    quick: bool = False,
    name: str | None = None,
    loss_chunk_tokens: int = 4096,
    max_chunk_tokens: int | None = None,
) -> Profile:
    """Everything the simulator reads. `quick` uses small sizes (tests, CPU smoke runs): its numbers are rough.
    `max_chunk_tokens` caps the chunks timed at each sequence length (one sequence is always timed), so long
    sequences can be calibrated in the same call as short ones."""
    cuda = torch.cuda.is_available()
    scale = 1 if not quick else 1 / 64
    cores = os.cpu_count() or 1
    threads = sorted(
        {1, 2, 4, 8, 16, 32, torch.get_num_threads()} & set(range(1, cores + 1)) | {torch.get_num_threads()}
    )
    if disk_dir is not None:  # created like the train recipe's, before anything is measured
        Path(disk_dir).mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.cuda.init()
    prof = Profile(
        name=name or (torch.cuda.get_device_name().lower().replace(" ", "-") if cuda else platform.node() or "cpu"),
        source="measured",
        device=torch.cuda.get_device_name() if cuda else f"CPU only ({platform.processor() or platform.machine()})",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        notes="quick (small sizes, rough numbers)" if quick else "",
        host_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        host_cores=cores,
        host_memcpy_bandwidth=measure.host_memcpy_bandwidth(int(1024 * MiB * scale)),
        host_cast_bandwidth=measure.host_cast_bandwidth(int(1024 * MiB * scale)),
        cpu_adamw_threads=threads,
        cpu_adamw_params_per_s=measure.cpu_adamw_rates(int(64 * MiB * scale), threads),
        cpu_adamw_cast_params_per_s=measure.cpu_adamw_cast_rate(int(64 * MiB * scale)),
        runtime_threads=torch.get_num_threads(),
        process_baseline_bytes=measure.resident_bytes(),
    )
    if disk_dir is not None:
        prof.disk = measure.disk_rates(pieces.disk_tier, disk_dir, int(2048 * MiB * scale))
    if cuda:
        prof.gpu_memory_bytes = torch.cuda.get_device_properties(0).total_memory
        prof.gpu_bf16_flops = measure.gpu_gemm_flops(8192 if not quick else 1024)
        prof.gpu_memory_bandwidth = measure.gpu_memory_bandwidth(int(1024 * MiB * scale))
        prof.gpu_adamw_params_per_s = measure.gpu_adamw_rate(int(256 * MiB * scale))
        sizes = [int(s * MiB * scale) or 4096 for s in (1, 8, 64, 256)]
        prof.h2d = measure.pcie_link("h2d", sizes)
        prof.d2h = measure.pcie_link("d2h", sizes)
        prof.duplex_bandwidth = measure.duplex_bandwidth(int(256 * MiB * scale))
        unit = min(max((m.layer_params for m in models), default=64 * MiB), 256 * MiB)
        unit = int(unit * scale)
        copies = measure.BackgroundCopies(int(256 * MiB * scale))
        measure_beside_update(prof, unit, copies, int(256 * MiB * scale))
        if models:
            prof.compute_slowdown_under_copies = measure.compute_slowdown_under_copies(
                models[0], seqs[0], max(sequences_per_chunk), copies, prof.h2d.bandwidth
            )
    device = "cuda" if cuda else "cpu"
    for cfg in models:
        for seq in seqs:
            sequences = [
                n for n in sequences_per_chunk if n == 1 or max_chunk_tokens is None or n * seq <= max_chunk_tokens
            ]
            prof.layers += measure.layer_timings(cfg, seq, sequences, device)
            prof.heads += measure.head_timings(cfg, [n * seq for n in sequences], loss_chunk_tokens, device)
        if cuda:
            prof.issue_s = max(prof.issue_s, measure.issue_time(cfg, seqs[0]))
    return prof
