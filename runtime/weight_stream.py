"""fp32 master weights in pinned host memory -> bf16 weights on the GPU, in pieces through a staging ring.

Each piece is copied over PCIe into one of the staging ring's fp32 buffers (`STAGING_BUFFERS` in the plan) on the copy stream and cast into
its destination on a high-priority cast stream. With one buffer on one stream (the earlier design) every
copy waited for the cast before it, and a cast queued behind a layer's GEMMs waited for free SMs, so the
link idled beside compute; the ring lets copies run ahead of late casts, and the priority lets each cast
take the next free SMs instead of waiting behind queued compute blocks.
"""

from __future__ import annotations

import torch


class WeightStream:
    def __init__(self, ring: list[torch.Tensor], cast_priority: bool = True) -> None:
        """`ring`: the staging buffers (fp32, on the GPU, `STAGING_BUFFERS` of one piece each in the runtime)."""
        self.ring = ring
        device = ring[0].device
        # Lower numbers are higher priorities; torch maps an out-of-range value to the highest the device has.
        self.cast_stream = torch.cuda.Stream(device, priority=-100 if cast_priority else 0)
        self.freed: list[torch.cuda.Event | None] = [None] * len(ring)  # each buffer's last cast
        self.next = 0

    def load(self, master: torch.Tensor, dst: torch.Tensor) -> None:
        """Issue the copy of `master` (pinned fp32) into `dst` (GPU, bf16) on the current stream; on return the
        current stream waits for the last cast, so an event recorded on it marks the load complete."""
        copy_stream = torch.cuda.current_stream(dst.device)
        step = self.ring[0].numel()
        for start in range(0, master.numel(), step):
            piece = master[start : start + step]
            k = self.next
            self.next = (k + 1) % len(self.ring)
            stage = self.ring[k][: piece.numel()]
            freed = self.freed[k]
            if freed is not None:
                copy_stream.wait_event(freed)
            stage.copy_(piece, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
            self.cast_stream.wait_event(copied)
            with torch.cuda.stream(self.cast_stream):
                dst[start : start + piece.numel()].copy_(stage)
                cast = self.freed[k] = torch.cuda.Event()
                cast.record(self.cast_stream)
        last = self.freed[(self.next - 1) % len(self.ring)]
        if last is not None:
            copy_stream.wait_event(last)
