"""Discrete-event replay of the runtime's step graph on a profiled machine.

The executor's model, as the runtime behaves: one host thread issues ops in `seq` order; each of the
GPU's streams (gpu, h2d, d2h), the single CPU optimizer worker and the disk-tier worker serves its ops one
at a time in that order; an op starts once issued, its resource is free and its dependencies are done. A
GPU-side op that waits for a host op (a weight load after last step's host update, a gradient copy into a ring buffer the
optimizer still reads) blocks the issuing thread, as a Python future does. Steps run back to back (the
next step's loads wait for this step's updates) and a step ends when its loss is read. Memory is tracked
per tier: the plan's static buffers, kept activations from their forward to their backward, and each
compute op's workspace while it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slideformer.schedule.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.schedule.graph import build_step_graph, issue_order
from slideformer.schedule.plan import Plan
from slideformer.schedule.memory import disk_bytes, gpu_bytes, head_workspace, host_bytes, kept_graph, layer_workspace

from .costs import CostModel, issue_seconds, op_seconds

RESOURCES = ("gpu", "h2d", "d2h", "cpu", "disk", "opt")
HOST_RESOURCES = ("cpu", "disk")  # served by worker threads; the GPU's streams wait on them through futures
RESOURCE_NAMES = {"gpu": "GPU compute", "h2d": "PCIe host-to-device", "d2h": "PCIe device-to-host",
                  "cpu": "CPU optimizer", "disk": "disk tier", "opt": "GPU streamed optimizer"}


@dataclass
class Span:
    name: str
    step: int
    resource: str
    kind: str
    start: float
    end: float


@dataclass
class Simulation:
    plan: Plan
    spans: list[Span]
    step_ends: list[float]  # when each step's train_step returns
    gpu_memory: list[tuple[float, int]]  # (time, bytes allocated) after each change
    host_memory_bytes: int
    gpu_static: dict[str, int]
    host_static: dict[str, int]
    tokens_per_step: int
    flops_per_step: float
    disk_bytes: int = 0  # the disk tier's files
    # seconds of ops per step on each resource, and 'pcie_duplex': both copy directions' bytes at the duplex rate
    work_per_step: dict[str, float] = field(default_factory=dict)
    utilisation: dict[str, float] = field(default_factory=dict)
    critical: dict[str, float] = field(default_factory=dict)  # seconds of the last step's critical path per resource

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
    def bottleneck(self) -> str:
        """The resource holding the largest share of the last step's critical path."""
        return max(self.critical, key=lambda r: self.critical[r])


def simulate(cfg: ModelConfig, plan: Plan, profile: Profile, steps: int = 3) -> Simulation:
    plan.validate(cfg.num_layers)
    g = build_step_graph(cfg, plan)
    cost = CostModel(profile, cfg, plan.seq)
    order = issue_order(g)
    tokens = plan.chunk * plan.seq
    workspace = {"bwd": layer_workspace(cfg, tokens, plan.mlp_tile_tokens),
                 "head": head_workspace(cfg, min(plan.loss_chunk_tokens, tokens), tokens, profile)}
    static = gpu_bytes(cfg, plan, profile)
    base = sum(v for k, v in static.items() if k not in ("kept_inputs", "kept_graphs", "workspace"))

    # The graph as flat arrays in issue order: the loop below runs once per op per step.
    index = {n: i for i, n in enumerate(order)}
    res = [g.nodes[n]["resource"] for n in order]
    preds = [tuple(index[p] for p in g.predecessors(n)) for n in order]
    blocking = [tuple(p for p in preds[i] if res[p] in HOST_RESOURCES) if res[i] not in HOST_RESOURCES else ()
                for i in range(len(order))]
    after_update = [index[g.graph["after_previous_step"][n]] if n in g.graph["after_previous_step"] else -1
                    for n in order]
    dur = [op_seconds(g, n, cost) for n in order]
    iss = [issue_seconds(g, n, cost) for n in order]
    kinds = [g.nodes[n]["kind"] for n in order]
    graph = kept_graph(cfg, plan.seq, tokens, profile)  # measured, where the graph's own figure is a formula

    def gpu_delta(n: str, key: str) -> int:
        a = g.nodes[n]
        if a[key].get("gpu") and plan.activations[a["layer"]] == "keep":
            return graph
        return a[key].get("gpu", 0)
    alloc = [gpu_delta(n, "alloc") for n in order]
    freed = [gpu_delta(n, "free") for n in order]
    norm = index.get("norm")

    issuer, issuer_cause = 0.0, None
    free = dict.fromkeys(RESOURCES, 0.0)
    last_on: dict[str, tuple[int, int] | None] = dict.fromkeys(RESOURCES)
    cause: dict[tuple[int, int], tuple[int, int] | None] = {}  # the op whose end let each op start
    ends: list[list[float]] = []
    spans: list[Span] = []
    step_ends: list[float] = []
    mem_events: list[tuple[float, int]] = []  # (time, +/- bytes)
    for step in range(steps):
        for r in ("h2d", "d2h"):  # the step's barrier: copy streams wait for compute issued so far
            free[r] = max(free[r], free["gpu"])
        end = [0.0] * len(order)
        for i in range(len(order)):
            r = res[i]
            start, why = free[r], last_on[r]
            for p in preds[i]:
                if end[p] > start:
                    start, why = end[p], (step, p)
            u = after_update[i]
            if u >= 0 and step:  # this step's load waits for last step's update of the unit
                t = ends[-1][u]
                if res[u] == "cpu" and t > issuer:  # waiting on a future blocks the issuing thread
                    issuer, issuer_cause = t, (step - 1, u)
                if t > start:
                    start, why = t, (step - 1, u)
            for p in blocking[i]:
                if end[p] > issuer:
                    issuer, issuer_cause = end[p], (step, p)
            issuer += iss[i]
            if issuer > start:
                start, why = issuer, issuer_cause
            cause[(step, i)] = why
            end[i] = free[r] = start + dur[i]
            last_on[r] = (step, i)
            spans.append(Span(order[i], step, r, kinds[i], start, end[i]))
            if alloc[i]:
                mem_events.append((start, alloc[i]))
            if kinds[i] in workspace:
                mem_events += [(start, workspace[kinds[i]]), (end[i], -workspace[kinds[i]])]
            if freed[i]:
                mem_events.append((end[i], -freed[i]))
        ends.append(end)
        # train_step returns once the loss is read (compute stream) and, under after_norm, the norm is done
        for key in [last_on["gpu"], (step, norm) if norm is not None else None]:
            if key is not None and end[key[1]] > issuer:
                issuer, issuer_cause = end[key[1]], key
        step_ends.append(issuer)
    final = issuer_cause

    level, timeline = base, [(0.0, base)]
    for t, delta in sorted(mem_events, key=lambda e: (e[0], e[1] > 0)):  # at a tie, free first (same stream)
        level += delta
        timeline.append((t, level))
    host = host_bytes(cfg, plan, profile)
    sim = Simulation(plan, spans, step_ends, timeline, sum(host.values()), static, host, plan.batch * plan.seq,
                     cfg.model_flops_per_token(plan.seq) * plan.batch * plan.seq, disk_bytes(cfg, plan))
    sim.work_per_step = dict.fromkeys(RESOURCES, 0.0)
    for d, r in zip(dur, res):
        sim.work_per_step[r] += d
    if profile.duplex_bandwidth:
        pcie = sum(g.nodes[n].get("bytes", 0) for n, r in zip(order, res) if r in ("h2d", "d2h"))
        sim.work_per_step["pcie_duplex"] = pcie / profile.duplex_bandwidth
    lo, hi = step_ends[-2], step_ends[-1]
    busy = dict.fromkeys(RESOURCES, 0.0)
    for s in spans:
        if s.end > lo and s.start < hi:
            busy[s.resource] += min(s.end, hi) - max(s.start, lo)
    sim.utilisation = {r: busy[r] / (hi - lo) for r in RESOURCES}
    sim.critical = dict.fromkeys(RESOURCES, 0.0)
    key = final
    while key is not None and spans[key[0] * len(order) + key[1]].end > lo:
        span = spans[key[0] * len(order) + key[1]]
        sim.critical[span.resource] += min(span.end, hi) - max(span.start, lo)
        key = cause[key]
    return sim
