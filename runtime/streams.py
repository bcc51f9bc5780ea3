"""Compute, host-to-device, device-to-host and streamed-optimizer streams, and their completion handles.

On a CPU device every op completes when issued, so the same executor runs unchanged in CI.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from typing import Iterator, Union

import torch

from slideformer.schedule.op import Resource

Handle = Union[torch.cuda.Event, Future, None]


class Streams:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.by_resource = {
                Resource.GPU: torch.cuda.current_stream(device),
                Resource.H2D: torch.cuda.Stream(device),
                Resource.D2H: torch.cuda.Stream(device),
                Resource.OPT: torch.cuda.Stream(device),
            }

    @contextmanager
    def on(self, resource: Resource) -> Iterator[None]:
        with torch.cuda.stream(self.by_resource[resource]) if self.cuda else nullcontext():
            yield

    def record(self, resource: Resource) -> Handle:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.by_resource[resource])
        return ev

    def wait(self, resource: Resource, handle: Handle) -> None:
        """Make `resource`'s later work wait for `handle` (blocking the issuing thread for host futures)."""
        if isinstance(handle, Future):
            handle.result()
        elif handle is not None and self.cuda:
            self.by_resource[resource].wait_event(handle)

    def barrier(self) -> None:
        """Copy streams wait for all compute issued so far (used between steps)."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.by_resource[Resource.GPU])
            for r in (Resource.H2D, Resource.D2H):
                self.by_resource[r].wait_event(ev)


def host_wait(handle: Handle) -> None:
    """Block the calling host thread until `handle` completes."""
    if isinstance(handle, Future):
        handle.result()
    elif handle is not None:
        handle.synchronize()
