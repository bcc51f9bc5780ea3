"""Discrete-event replay of the runtime's step graph on a profiled machine.

The executor's model, as the runtime behaves: one host thread issues ops in `seq` order; each of the
GPU's streams (gpu, h2d, d2h) and the single CPU optimizer worker serves its ops one at a time in that
order; an op starts once issued, its resource is free and its dependencies are done. A GPU-side op that
waits for a CPU op (a weight load after last step's host update, a gradient copy into a ring buffer the
optimizer still reads) blocks the issuing thread, as a Python future does. Steps run back to back (the
next step's loads wait for this step's updates) and a step ends when its loss is read. Memory is tracked
per tier: the plan's static buffers, kept activations from their forward to their backward, and each
compute op's workspace while it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slideformer.calibrate.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.opgraph import build_step_graph, issue_order
from slideformer.plan import Plan
from slideformer.planner.memory import gpu_bytes, head_workspace, host_bytes, layer_workspace

from .costs import CostModel, issue_seconds, op_seconds

RESOURCES = ("gpu", "h2d", "d2h", "cpu")
RESOURCE_NAMES = {"gpu": "GPU compute", "h2d": "PCIe host-to-device", "d2h": "PCIe device-to-host",
                  "cpu": "CPU optimizer"}


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
    utilisation: dict[str, float] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        """Steady-state step time: the last step, after the pipeline has filled."""
        return self.step_ends[-1] - self.step_ends[-2]

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
    def bottleneck(self) -> str:
        return max(self.utilisation, key=self.utilisation.get)


def simulate(cfg: ModelConfig, plan: Plan, profile: Profile, steps: int = 3) -> Simulation:
    plan.validate(cfg.num_layers)
    g = build_step_graph(cfg, plan)
    cost = CostModel(profile, cfg, plan.seq)
    order = issue_order(g)
    head_last = g.nodes[f"head:{plan.chunks - 1}"]["seq"]
    duration = {n: op_seconds(g, n, cost, backward=g.nodes[n]["seq"] > head_last) for n in order}
    issue = {n: issue_seconds(g, n, cost) for n in order}
    tokens = plan.chunk * plan.seq
    workspace = {"bwd": layer_workspace(cfg, plan.seq, tokens, profile),
                 "head": head_workspace(cfg, min(plan.loss_chunk_tokens, tokens), tokens, profile)}
    static = gpu_bytes(cfg, plan, profile)
    base = sum(v for k, v in static.items() if k not in ("kept_inputs", "kept_graphs", "workspace"))

    issuer = 0.0
    free = dict.fromkeys(RESOURCES, 0.0)
    last_update: dict[int, tuple[float, str]] = {}
    spans: list[Span] = []
    step_ends: list[float] = []
    mem_events: list[tuple[float, int]] = []  # (time, +/- bytes)
    for step in range(steps):
        for r in ("h2d", "d2h"):  # the step's barrier: copy streams wait for compute issued so far
            free[r] = max(free[r], free["gpu"])
        end: dict[str, float] = {}
        for n in order:
            a = g.nodes[n]
            res = a["resource"]
            ready = [end[p] for p in g.predecessors(n)]
            if res != "cpu":
                for p in g.predecessors(n):
                    if g.nodes[p]["resource"] == "cpu":
                        issuer = max(issuer, end[p])
            if a["kind"] == "load" and a["unit"] in last_update:
                t, r = last_update[a["unit"]]
                if r == "cpu":
                    issuer = max(issuer, t)
                ready.append(t)
            issuer += issue[n]
            start = max(issuer, free[res], *ready)
            end[n] = free[res] = start + duration[n]
            spans.append(Span(n, step, res, a["kind"], start, end[n]))
            if a["alloc"].get("gpu"):
                mem_events.append((start, a["alloc"]["gpu"]))
            if a["kind"] in workspace:
                mem_events += [(start, workspace[a["kind"]]), (end[n], -workspace[a["kind"]])]
            if a["free"].get("gpu"):
                mem_events.append((end[n], -a["free"]["gpu"]))
        issuer = max(issuer, free["gpu"], end.get("norm", 0.0))  # float(loss), and the norm under after_norm
        step_ends.append(issuer)
        last_update = {u: (end[op], g.nodes[op]["resource"]) for u, op in g.graph["updates"].items()}

    level, timeline = base, [(0.0, base)]
    for t, delta in sorted(mem_events, key=lambda e: (e[0], e[1] > 0)):  # at a tie, free first (same stream)
        level += delta
        timeline.append((t, level))
    sim = Simulation(plan, spans, step_ends, timeline, sum(host_bytes(cfg, plan, profile).values()), static,
                     host_bytes(cfg, plan, profile), plan.batch * plan.seq,
                     cfg.model_flops_per_token(plan.seq) * plan.batch * plan.seq)
    lo, hi = step_ends[-2], step_ends[-1]
    for r in RESOURCES:
        busy = sum(max(0.0, min(s.end, hi) - max(s.start, lo)) for s in spans if s.resource == r)
        sim.utilisation[r] = busy / (hi - lo)
    return sim
