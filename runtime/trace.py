"""Per-op timing of a running engine, to lay a measured step beside the simulator's prediction.

GPU-side ops are bracketed by CUDA events on their own stream; CPU ops by the worker's clock. Both are
expressed in seconds since one synchronised origin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class _Mark:
    event: torch.cuda.Event | None
    host: float


class OpTrace:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
        self.origin = self.mark()
        self.records: list[tuple[str, int, str, str, _Mark, _Mark]] = []
        self.step_ends: list[float] = []
        self.step = 0

    def mark(self) -> _Mark:
        """A point in time on the current stream (GPU) or now (host)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return _Mark(ev, time.perf_counter())
        return _Mark(None, time.perf_counter())

    def host_mark(self) -> _Mark:
        return _Mark(None, time.perf_counter())

    def add(self, name: str, step: int, resource: str, kind: str, start: _Mark, end: _Mark) -> None:
        self.records.append((name, step, resource, kind, start, end))

    def end_step(self) -> None:
        self.step_ends.append(time.perf_counter() - self.origin.host)
        self.step += 1

    def _seconds(self, m: _Mark) -> float:
        if m.event is not None and self.origin.event is not None:
            return self.origin.event.elapsed_time(m.event) / 1e3
        return m.host - self.origin.host

    def spans(self) -> list[dict]:
        """Every traced op as {name, step, resource, kind, start, end} (after the GPU has finished them)."""
        if self.cuda:
            torch.cuda.synchronize()
        return [
            {"name": n, "step": s, "resource": r, "kind": k, "start": self._seconds(a), "end": self._seconds(b)}
            for n, s, r, k, a, b in self.records
        ]
