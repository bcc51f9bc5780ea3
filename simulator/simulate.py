"""Discrete-event replay of the runtime's step graph on a profiled machine, in four phases: flatten the graph
into arrays, replay it, the GPU memory timeline, the last step's critical path.

The replay models the executor (`runtime/executor.py`) as the runtime behaves: one host thread issues ops in
`seq` order; each of the GPU's streams (gpu, h2d, d2h, opt), the single CPU optimizer worker and the
disk-tier worker serves its ops one at a time in that order; an op starts once issued, its resource is free
and its dependencies are done; a copy's bytes move at its own rate, less what the other direction takes of
the duplex limit while both run, and a host-to-GPU copy at most at the rate the profile measured beside the
CPU update while one runs (both draw on the host's memory: on the H200 host the loads ran at 32-45 GB/s
beside the update against 55 alone). A GPU-side op that waits for a host op (a weight load after last step's host
update, a gradient copy into a ring buffer the optimizer still reads) blocks the issuing thread, as a Python
future does. Steps run back to back (the next step's loads wait for this step's updates) and a step ends
when its loss is read. Memory is tracked per tier: the plan's static buffers, kept activations from their
forward to their backward, and each compute op's workspace while it runs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import networkx as nx

from slideformer.schedule.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.schedule.graph import build_step_graph, ops
from slideformer.schedule.op import HOST_RESOURCES, Op, OpKind, Resource
from slideformer.schedule.plan import Plan
from slideformer.schedule.memory import (
    disk_bytes,
    embedding_backward_temporary,
    gpu_bytes,
    kept_backward_workspace,
    head_workspace,
    host_bytes,
    host_bytes_all_ranks,
    kept_graph,
    plan_forward_workspace,
    plan_layer_workspace,
)

from .costs import CostModel, issue_seconds, op_seconds

RESOURCES = tuple(Resource)
PCIE = (Resource.H2D, Resource.D2H)
RESOURCE_NAMES: dict[str, str] = {
    Resource.GPU: "GPU compute",
    Resource.H2D: "PCIe host-to-device",
    Resource.D2H: "PCIe device-to-host",
    Resource.CPU: "CPU optimizer",
    Resource.DISK: "disk tier",
    Resource.OPT: "GPU streamed optimizer",
}


@dataclass
class Span:
    name: str
    step: int
    resource: Resource
    kind: OpKind
    start: float
    end: float


@dataclass
class Simulation:
    plan: Plan
    spans: list[Span]
    step_ends: list[float]  # when each step's train_step returns
    gpu_memory: list[tuple[float, int]]  # (time, bytes allocated) after each change
    host_memory_bytes: int  # every rank's process on the host together
    gpu_static: dict[str, int]  # one GPU's (each rank's)
    host_static: dict[str, int]  # one process's
    tokens_per_step: int  # every rank's
    flops_per_step: float
    disk_bytes: int = 0  # the disk tier's files
    # seconds of ops per step on each resource, and 'pcie_duplex': both copy directions' bytes at the duplex rate
    work_per_step: dict[str, float] = field(default_factory=dict)
    utilisation: dict[Resource, float] = field(default_factory=dict)
    critical: dict[Resource, float] = field(
        default_factory=dict
    )  # seconds of the last step's critical path per resource

    @property
    def step_s(self) -> float:
        """Steady-state step time: the last step, after the pipeline has filled, and never less than any
        resource's work per step (a step can return before its disk write-backs finish; over many steps
        they catch up)."""
        return max(self.step_ends[-1] - self.step_ends[-2], *self.work_per_step.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tflops(self) -> float:
        return self.flops_per_step / self.step_s / 1e12

    @property
    def peak_gpu_bytes(self) -> int:
        return max(b for _, b in self.gpu_memory)

    @property
    def peak_gpu_allocated_bytes(self) -> int:
        """The peak less the runtime overhead the budget reserves outside PyTorch's allocator (the CUDA context,
        kernels' scratch): what `torch.cuda.max_memory_allocated` measures."""
        return self.peak_gpu_bytes - self.gpu_static.get("runtime_overhead", 0)

    @property
    def bottleneck(self) -> Resource:
        """The resource holding the largest share of the last step's critical path."""
        return max(self.critical, key=lambda r: self.critical[r])

    def summary(self) -> dict:
        """What `slideformer simulate --json` prints: step time, rates, busy share per resource, the bottleneck
        and the peaks."""
        return {
            "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops": self.tflops,
            "utilisation": self.utilisation,
            "bottleneck": RESOURCE_NAMES[self.bottleneck],
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "peak_host_bytes": self.host_memory_bytes,
            "peak_disk_bytes": self.disk_bytes,
        }


@dataclass
class _FlatGraph:
    """The step graph as arrays in issue order (the replay loop runs once per op per step)."""

    order: list[str]
    resource: list[Resource]
    kind: list[OpKind]
    preds: list[tuple[int, ...]]
    blocking: list[tuple[int, ...]]  # host-op predecessors a GPU-side op waits on through a future
    after_update: list[int]  # for a load: last step's update of its unit (-1: none)
    seconds: list[float]
    issue_seconds: list[float]
    alloc: list[int]  # GPU bytes an op takes at its start, and gives back at its end
    freed: list[int]
    workspace: list[int]  # GPU bytes an op holds while it runs
    norm: int | None
    pcie_bytes: list[int]  # bytes a copy moves over PCIe (0 for other ops)
    duplex_bandwidth: float | None  # both directions together at most (None: each direction on its own)
    # host-to-GPU bytes/s at most while the CPU updates, with the other direction idle and copying (None: unmeasured)
    h2d_beside_update: tuple[float | None, float | None]


@dataclass
class _Replay:
    spans: list[Span]
    step_ends: list[float]
    mem_events: list[tuple[float, int]]  # (time, +/- bytes)
    cause: dict[tuple[int, int], tuple[int, int] | None]  # the (step, op) whose end let each op start
    final: tuple[int, int] | None  # what the last step's return waited on


def _flatten(g: nx.DiGraph, cfg: ModelConfig, plan: Plan, profile: Profile) -> _FlatGraph:
    """Phase 1: each op's resource, dependencies, duration, launch cost and GPU memory, by issue index."""
    cost = CostModel(profile, cfg, plan.seq)
    records = ops(g)
    order = [o.name for o in records]
    tokens = plan.chunk * plan.seq
    workspace = {
        OpKind.BWD: plan_layer_workspace(cfg, plan, profile),
        OpKind.HEAD: head_workspace(cfg, min(plan.loss_chunk_tokens, tokens), tokens, profile),
        OpKind.EMBED_BWD: embedding_backward_temporary(cfg, plan),
        OpKind.FWD: plan_forward_workspace(cfg, plan, profile),
    }
    index = {n: i for i, n in enumerate(order)}
    res = [o.resource for o in records]
    preds = [tuple(index[p] for p in g.predecessors(n)) for n in order]
    graph = kept_graph(cfg, plan.seq, tokens, profile)  # measured, where the graph's own figure is a formula
    kept_workspace = kept_backward_workspace(cfg, tokens)  # a kept layer's backward: through its graph

    def kept(o: Op, nbytes: int) -> int:
        return graph if nbytes and o.layer is not None and plan.activations[o.layer] == "keep" else nbytes

    return _FlatGraph(
        order=order,
        resource=res,
        kind=[o.kind for o in records],
        preds=preds,
        blocking=[
            tuple(p for p in preds[i] if res[p] in HOST_RESOURCES) if res[i] not in HOST_RESOURCES else ()
            for i in range(len(order))
        ],
        after_update=[
            index[g.graph["after_previous_step"][n]] if n in g.graph["after_previous_step"] else -1 for n in order
        ],
        seconds=[op_seconds(g, n, cost) for n in order],
        issue_seconds=[issue_seconds(g, n, cost) for n in order],
        alloc=[kept(o, o.gpu_alloc) for o in records],
        freed=[kept(o, o.gpu_free) for o in records],
        workspace=[
            kept_workspace
            if o.kind == OpKind.BWD and o.layer is not None and plan.activations[o.layer] == "keep"
            else workspace.get(o.kind, 0)
            for o in records
        ],
        norm=index.get("norm"),
        pcie_bytes=[o.nbytes if o.resource in PCIE else 0 for o in records],
        duplex_bandwidth=profile.duplex_bandwidth,
        h2d_beside_update=(profile.h2d_beside_update_bandwidth, profile.h2d_beside_update_duplex_bandwidth),
    )


class _Busy:
    """A resource's spans so far, as (start, end, rate) pieces in time order: what a copy reads to share a limit
    with them (the other PCIe direction's transfers; the CPU's updates, whose rate is unused)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.rates: list[float] = []

    def add(self, start: float, end: float, rate: float = 0.0) -> None:
        if end > start:
            self.starts.append(start)
            self.ends.append(end)
            self.rates.append(rate)

    def at(self, t: float, k: int) -> tuple[int, float | None, float]:
        """From piece `k` on (none before it ends after t): the piece at t, its rate (None: idle at t) and
        when that changes."""
        while k < len(self.ends) and self.ends[k] <= t:
            k += 1
        if k < len(self.ends) and self.starts[k] <= t:
            return k, self.rates[k], self.ends[k]
        return k, None, self.starts[k] if k < len(self.ends) else math.inf


def _shared_copy_end(
    start: float,
    nbytes: int,
    rate: float,
    own: _Busy,
    other: _Busy,
    duplex: float,
    cpu: _Busy | None = None,
    beside_update: tuple[float | None, float | None] = (None, None),
) -> float:
    """When a copy of `nbytes` at `rate`, starting at `start`, ends while the other direction's transfers
    placed so far take their rates out of the duplex limit and (a host-to-GPU copy, `cpu` given) the CPU's
    updates placed so far cap it at `beside_update` (with the other direction idle, and copying); its pieces
    go into `own`. The copy placed later yields (the replay places ops in issue order), which keeps both
    directions' sum within the limit."""
    t, left = start, float(nbytes)
    k = bisect.bisect_right(other.ends, t)  # the other's first transfer that ends after t
    j = bisect.bisect_right(cpu.ends, t) if cpu is not None else 0
    while True:
        k, other_rate, until = other.at(t, k)
        r = rate
        if cpu is not None:
            j, updating, cpu_until = cpu.at(t, j)
            until = min(until, cpu_until)
            cap = beside_update[other_rate is not None] if updating is not None else None
            r = min(r, cap or r)
        if other_rate is not None:  # the other copies: what it leaves of the limit
            r = max(min(r, duplex - other_rate), 1e-3 * rate)
        if left <= r * (until - t):
            own.add(t, t + left / r, r)
            return t + left / r
        own.add(t, until, r)
        left -= r * (until - t)
        t = until


def _replay(f: _FlatGraph, steps: int) -> _Replay:
    """Phase 2: the executor's walk (`runtime/executor.py`) on modelled time: one issuing thread, each
    resource serving its ops in issue order, a GPU-side op that waits on a host future blocking the issuer,
    steps back to back."""
    n = len(f.order)
    issuer, issuer_cause = 0.0, None
    free = dict.fromkeys(RESOURCES, 0.0)
    last_on: dict[Resource, tuple[int, int] | None] = dict.fromkeys(RESOURCES)
    out = _Replay([], [], [], {}, None)
    ends: list[list[float]] = []
    links = {Resource.H2D: _Busy(), Resource.D2H: _Busy()}
    cpu = _Busy()
    duplex = f.duplex_bandwidth or math.inf
    contended = any(f.h2d_beside_update)
    for step in range(steps):
        for r in (Resource.H2D, Resource.D2H):  # the step's barrier: copy streams wait for compute issued so far
            free[r] = max(free[r], free[Resource.GPU])
        end = [0.0] * n
        for i in range(n):
            r = f.resource[i]
            start, why = free[r], last_on[r]
            for p in f.preds[i]:
                if end[p] > start:
                    start, why = end[p], (step, p)
            u = f.after_update[i]
            if u >= 0 and step:  # this step's load waits for last step's update of the unit
                t = ends[-1][u]
                if f.resource[u] == Resource.CPU and t > issuer:  # waiting on a future blocks the issuing thread
                    issuer, issuer_cause = t, (step - 1, u)
                if t > start:
                    start, why = t, (step - 1, u)
            for p in f.blocking[i]:
                if end[p] > issuer:
                    issuer, issuer_cause = end[p], (step, p)
            issuer += f.issue_seconds[i]
            if issuer > start:
                start, why = issuer, issuer_cause
            out.cause[(step, i)] = why
            if (f.duplex_bandwidth or contended) and f.pcie_bytes[i] and f.seconds[i] > 0:
                other = links[Resource.D2H if r == Resource.H2D else Resource.H2D]
                rate = f.pcie_bytes[i] / f.seconds[i]
                updates = cpu if r == Resource.H2D and contended else None  # what slows this copy beside it
                end[i] = free[r] = _shared_copy_end(
                    start, f.pcie_bytes[i], rate, links[r], other, duplex, updates, f.h2d_beside_update
                )
            else:
                end[i] = free[r] = start + f.seconds[i]
            if r == Resource.CPU:
                cpu.add(start, end[i])
            last_on[r] = (step, i)
            out.spans.append(Span(f.order[i], step, r, f.kind[i], start, end[i]))
            if f.alloc[i]:
                out.mem_events.append((start, f.alloc[i]))
            if f.workspace[i]:
                out.mem_events += [(start, f.workspace[i]), (end[i], -f.workspace[i])]
            if f.freed[i]:
                out.mem_events.append((end[i], -f.freed[i]))
        ends.append(end)
        # train_step returns once the loss is read (compute stream) and, under after_norm, the norm is done
        for key in [last_on[Resource.GPU], (step, f.norm) if f.norm is not None else None]:
            if key is not None and end[key[1]] > issuer:
                issuer, issuer_cause = end[key[1]], key
        out.step_ends.append(issuer)
    out.final = issuer_cause
    return out


def _memory_timeline(base: int, events: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Phase 3: GPU bytes allocated over time, from the static buffers' level."""
    level, timeline = base, [(0.0, base)]
    for t, delta in sorted(events, key=lambda e: (e[0], e[1] > 0)):  # at a tie, free first (same stream)
        level += delta
        timeline.append((t, level))
    return timeline


def _critical_path(run: _Replay, ops_per_step: int, lo: float, hi: float) -> dict[Resource, float]:
    """Phase 4: seconds of the last step's critical path on each resource, followed back from its return."""
    critical = dict.fromkeys(RESOURCES, 0.0)
    key = run.final
    while key is not None and run.spans[key[0] * ops_per_step + key[1]].end > lo:
        span = run.spans[key[0] * ops_per_step + key[1]]
        critical[span.resource] += min(span.end, hi) - max(span.start, lo)
        key = run.cause[key]
    return critical


def simulate(cfg: ModelConfig, plan: Plan, profile: Profile, steps: int = 3) -> Simulation:
    """`steps` steps of `plan` on `profile`'s machine: flatten the graph, replay it, the GPU memory timeline
    and the last step's critical path."""
    plan.validate(cfg.num_layers)
    g = build_step_graph(cfg, plan)
    flat = _flatten(g, cfg, plan, profile)
    run = _replay(flat, steps)
    static = gpu_bytes(cfg, plan, profile)
    base = sum(v for k, v in static.items() if k not in ("kept_inputs", "kept_graphs", "workspace"))
    tokens = plan.ranks * plan.batch * plan.seq  # each rank trains `batch` sequences of every step
    sim = Simulation(
        plan,
        run.spans,
        run.step_ends,
        _memory_timeline(base, run.mem_events),
        host_bytes_all_ranks(cfg, plan, profile),
        static,
        host_bytes(cfg, plan, profile),
        tokens,
        cfg.model_flops_per_token(plan.seq) * tokens,
        disk_bytes(cfg, plan),
    )
    sim.work_per_step = dict.fromkeys(map(str, RESOURCES), 0.0)
    for d, r in zip(flat.seconds, flat.resource):
        sim.work_per_step[r] += d
    if profile.duplex_bandwidth:
        pcie = sum(o.nbytes for o in ops(g) if o.resource in (Resource.H2D, Resource.D2H))
        sim.work_per_step["pcie_duplex"] = pcie / profile.duplex_bandwidth
    lo, hi = run.step_ends[-2], run.step_ends[-1]
    busy = dict.fromkeys(RESOURCES, 0.0)
    for s in run.spans:
        if s.end > lo and s.start < hi:
            busy[s.resource] += min(s.end, hi) - max(s.start, lo)
    sim.utilisation = {r: busy[r] / (hi - lo) for r in RESOURCES}
    sim.critical = _critical_path(run, len(flat.order), lo, hi)
    return sim
