"""The step's executor: walks the operation graph in issue order, the twin of the simulator's replay loop
(`simulator.simulate`): each op goes to its resource, a CUDA stream (gpu, h2d, d2h, opt) or a worker thread
(cpu: the AdamW; disk: the tier), after waiting for its dependencies on other resources and, for a load, for
the previous step's update of its unit. A GPU op's handle is a CUDA event, a host op's a Future. On a CPU
device every op completes when issued, so the same walk runs in CI.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import networkx as nx
import torch

from slideformer.schedule.graph import op_of, ops
from slideformer.schedule.op import HOST_RESOURCES, OpKind, Resource

from .streams import Handle, Streams, host_wait
from .trace import OpTrace


class GraphExecutor:
    def __init__(self, graph: nx.DiGraph, bodies: dict[OpKind, Callable[..., object]], device: torch.device) -> None:
        self.graph, self.bodies = graph, bodies
        self.ops = ops(graph)
        self.streams = Streams(device)
        self.host_workers = {
            Resource.CPU: ThreadPoolExecutor(max_workers=1, thread_name_prefix="slideformer-adamw"),
            Resource.DISK: ThreadPoolExecutor(max_workers=1, thread_name_prefix="slideformer-tier"),
        }
        self.trace: OpTrace | None = None
        self.after_previous_step: dict[str, str] = graph.graph["after_previous_step"]
        self.write_backs = [op.name for op in self.ops if op.kind == OpKind.DISK_WRITE]
        self.previous_updates: dict[str, Handle] = {}  # the last step's update ops' completion
        self.pending_disk: dict[object, Future] = {}  # write-backs nothing in the step waits on

    def run_step(self, lr: float) -> dict[str, Handle]:
        """Issue every op of one step; returns each op's completion handle."""
        for write in self.pending_disk.values():  # a failed write-back of the last step stops the run here
            if write.done():
                write.result()
        self.streams.barrier()
        done: dict[str, Handle] = {}
        for op in self.ops:
            name, resource, kind = op.name, op.resource, op.kind
            args: dict[str, object] = dict(op.arguments())
            if kind == OpKind.UPDATE:
                args["norm"] = done.get("norm")  # this step's (grad_norm, clip coefficient), after_norm only
            if kind in (OpKind.UPDATE, OpKind.STATE_UPDATE):
                args["lr"] = lr
            on_host = resource in HOST_RESOURCES
            previous = self.previous_updates.get(self.after_previous_step.get(name, ""))
            if previous is not None:  # a load waits for the previous step's update of its unit
                self.streams.wait(resource, previous)
            for pred in self.graph.predecessors(name):
                if op_of(self.graph, pred).resource != resource and not on_host:
                    self.streams.wait(resource, done[pred])
            if on_host:  # the CPU optimizer or the disk worker, each serving its ops in order
                preds = [done[p] for p in self.graph.predecessors(name)]
                step = self.trace.step if self.trace else 0
                done[name] = self.host_workers[resource].submit(
                    self._run_host_op, name, step, resource, kind, args, preds
                )
                continue
            with self.streams.on(resource):
                trace = self.trace
                start = trace.mark() if trace else None
                self.bodies[kind](**args)
                if trace and start is not None:
                    trace.add(name, trace.step, resource, kind, start, trace.mark())
                done[name] = self.streams.record(resource)
        self.previous_updates = {op: done[op] for op in self.graph.graph["updates"].values()}
        self.pending_disk = {op: h for op in self.write_backs if isinstance(h := done[op], Future)}
        return done

    def _run_host_op(self, name: str, step: int, resource: Resource, kind: OpKind, args: dict, preds: list[Handle]):
        for h in preds:
            host_wait(h)
        trace = self.trace
        start = trace.host_mark() if trace else None
        out = self.bodies[kind](**args)
        if trace and start is not None:
            trace.add(name, step, resource, kind, start, trace.host_mark())
        return out

    def wait_disk_write(self, key: object) -> None:
        """Wait for the write-back queued under `key` (by `submit_disk_write`), if any."""
        if key in self.pending_disk:
            self.pending_disk.pop(key).result()

    def submit_disk_write(self, key: object, write: Callable[[], None]) -> None:
        """Queue a write-back outside the graph (initial and restored disk states) on the disk worker."""
        self.wait_disk_write(key)
        self.pending_disk[key] = self.host_workers[Resource.DISK].submit(write)

    def wait_all(self) -> None:
        """Wait for every pending update and disk write-back."""
        for h in [*self.previous_updates.values(), *self.pending_disk.values()]:
            host_wait(h)
        self.pending_disk = {}

    def forget_previous_step(self) -> None:
        """Loads stop waiting on the last step's updates (their state was replaced whole)."""
        self.previous_updates = {}

    def close(self) -> None:
        for worker in self.host_workers.values():
            worker.shutdown()
