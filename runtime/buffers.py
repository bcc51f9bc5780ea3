"""The step's buffers, allocated once from the plan's manifests (`schedule.memory.host_buffers` and
`gpu_buffers`, which the planner sums) and handed out as typed views by role.

Host buffers are carved from one page-locked arena sized by the same manifest, so the engine can take no
buffer the planner did not count; data-parallel ranks carve the buffers they share from a second arena that
every rank maps.
"""

from __future__ import annotations

import torch

from slideformer.models.config import ModelConfig
from slideformer.models.layers import AttentionStats, attention_stats_views
from slideformer.schedule.memory import (
    SHARED_HOST_KINDS,
    gpu_buffers,
    host_buffers,
    host_grad_buffer,
    saved_input_bytes,
)
from slideformer.schedule.plan import STATE_STAGING_BUFFERS, Plan

from .layout import UnitLayout
from .pinned import PAGE, PinnedArena, page_round
from .ranks import Ranks

F32 = torch.float32


class StepBuffers:
    def __init__(
        self,
        owner: object,
        cfg: ModelConfig,
        plan: Plan,
        layouts: list[UnitLayout],
        device: torch.device,
        compute: torch.dtype,
        ranks: Ranks | None = None,
    ) -> None:
        """`ranks`: data-parallel ranks, which share one copy of the `SHARED_HOST_KINDS` buffers."""
        L = cfg.num_layers
        n = [layout.numel for layout in layouts]
        host_specs, gpu_specs = host_buffers(cfg, plan), [s for s in gpu_buffers(cfg, plan) if not s.lazy]
        pinned = device.type == "cuda"
        shared = [s for s in host_specs if ranks is not None and s.kind in SHARED_HOST_KINDS]
        own = [s for s in host_specs if s not in shared]
        self.arena = PinnedArena(owner, sum(page_round(s.nbytes) for s in own), pinned)
        host = {s.name: self.arena.take(s.nbytes, torch.uint8) for s in own}
        self.shared_arena = None
        if shared and ranks is not None:
            size = sum(page_round(s.nbytes) for s in shared)
            self.shared_arena = PinnedArena(owner, size, pinned, ranks.shared_host_memory(size + PAGE))
            host |= {s.name: self.shared_arena.take(s.nbytes, torch.uint8) for s in shared}
        gpu = {s.name: torch.empty(s.nbytes, dtype=torch.uint8, device=device) for s in gpu_specs}
        self.host, self.gpu = host, gpu

        # Units' state in RAM (masters, streamed states, bf16 weights), by unit
        self.master = {u: host[f"master:{u}"].view(F32) for u in range(L + 2) if f"master:{u}" in host}
        self.exp_avg = {u: host[f"exp_avg:{u}"].view(F32) for u in plan.streamed_units}
        self.exp_avg_sq = {u: host[f"exp_avg_sq:{u}"].view(F32) for u in plan.streamed_units}
        self.bf16_weights = {u: host[f"bf16:{u}"].view(compute) for u in range(L + 2) if plan.keeps_bf16_weights(u)}
        self.gpu_master = {u: gpu[f"gpu_master:{u}"].view(F32) for u in range(L + 2) if plan.placement[u] == "gpu"}
        # Weights on the GPU: the window's slots and the edges
        self.slots = [gpu[f"slot:{k}"].view(compute) for k in range(plan.weight_slots)]
        self.compute = compute
        # the edges' weights; a transient embedding's are taken by each of its loads (`StepOps`)
        self.edge_weights = {
            u: gpu[f"edge_weights:{u}"].view(compute) if f"edge_weights:{u}" in gpu else torch.empty(0)
            for u in (0, L + 1)
        }
        self.staging = [gpu[f"staging:{k}"].view(F32) for k in range(len(gpu)) if f"staging:{k}" in gpu]

        # Gradients, fp32 or (`Plan.bf16_layer_grads`) bf16: on the GPU (edges and GPU-placed layers own one, the
        # others share two) and their host destinations (a ring, the edges' shared one, or their own)
        def grad_dtype(u: int) -> torch.dtype:
            return F32 if plan.grad_itemsize(u) == 4 else torch.bfloat16

        self.gpu_grad: list[torch.Tensor] = [torch.empty(0)] * (L + 2)
        for spec in gpu_specs:
            if spec.name.startswith(("grad:", "layer_grad:")):
                for u in spec.users:
                    self.gpu_grad[u] = gpu[spec.name].view(grad_dtype(u))[: n[u]]
        self.host_grad = {u: host[name].view(grad_dtype(u))[: n[u]] for u, name in host_grad_buffer(cfg, plan).items()}
        # Activations: the hidden states flowing through the layers, saved inputs on the GPU or in RAM
        shape = (plan.batch, plan.seq, cfg.hidden_size)

        def hidden(name: str) -> torch.Tensor:
            return gpu[name].view(compute).view(shape)

        self.hidden = [hidden(f"hidden:{k}") for k in range(2)]
        self.dgrad = [hidden(f"dgrad:{k}") for k in range(2)]
        self.fetched = self.hidden  # saved inputs come back into the forward's buffers once the head is done
        self.kept_input = {
            lay: hidden(f"kept_input:{lay}") for lay, p in enumerate(plan.activations) if p == "recompute"
        }
        self.host_act = {
            lay: host[f"act:{lay}"].view(compute).view(shape)
            for lay, p in enumerate(plan.activations)
            if p == "offload"
        }

        # Saved attention (`Plan.saved_attention`): the layers' in RAM, two on the GPU (a layer uses layer % 2),
        # and the resident layers' own on the GPU (`Plan.resident_attention`)
        def stats(buf: torch.Tensor) -> AttentionStats:
            return attention_stats_views(buf, plan.batch, plan.seq, cfg, compute)

        self.host_attention = {lay: stats(host[f"attention:{lay}"]) for lay in range(plan.saved_attention)}
        self.attention = [stats(gpu[f"attention:{k}"]) for k in range(2) if f"attention:{k}" in gpu]
        self.resident_attention = {
            lay: stats(gpu[f"resident_attention:{lay}"]) for lay in plan.resident_attention_layers
        }
        act_bytes = saved_input_bytes(cfg, plan)
        self.act_ring = [host[f"act_ring:{k}"] for k in range(plan.disk_ring) if f"act_ring:{k}" in host]
        self.act_views = [buf[:act_bytes].view(compute).view(shape) for buf in self.act_ring]
        # Disk units' states pass through `disk_ring`; streamed pieces through the GPU's state slots
        self.disk_ring = [host[f"disk_ring:{k}"] for k in range(plan.disk_ring) if f"disk_ring:{k}" in host]
        piece = plan.state_piece_numel
        self.state_slots = [
            (
                gpu[f"state_slot:{k}"][: 12 * piece].view(F32).view(3, piece),
                gpu[f"state_slot:{k}"][12 * piece :].view(compute),
            )
            for k in range(STATE_STAGING_BUFFERS)
            if f"state_slot:{k}" in gpu
        ]
        # streamed layers' fp32 masters, from their backward's load to their update's last piece
        self.master_slots = [gpu[f"master_slot:{k}"].view(F32) for k in range(plan.streamed_master_slots)]
        # a streamed layer's bf16 gradient piece in fp32, for the fused AdamW (one at a time, on its stream)
        self.state_grad = gpu["state_grad"].view(F32) if "state_grad" in gpu else None

    def gpu_attention(self, layer: int) -> AttentionStats:
        """Where a saving layer's forward writes its attention and its backward reads it on the GPU."""
        resident = self.resident_attention.get(layer)
        return self.attention[layer % 2] if resident is None else resident
