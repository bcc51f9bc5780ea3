"""The Plan: every decision the runtime and the simulator share, as one JSON-serialisable dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

ActivationPolicy = Literal["offload", "recompute", "keep", "disk"]
UpdateSchedule = Literal["during_backward", "after_norm"]
Placement = Literal["cpu", "gpu", "disk", "streamed"]
ComputeDtype = Literal["bfloat16", "float32"]
ACTIVATION_POLICIES: tuple[ActivationPolicy, ...] = get_args(ActivationPolicy)
UPDATE_SCHEDULES: tuple[UpdateSchedule, ...] = get_args(UpdateSchedule)
PLACEMENTS: tuple[Placement, ...] = get_args(Placement)
STAGING_BUFFERS = 4  # GPU buffers of `transfer_chunk_mb` in the fp32 weight stream's staging ring
STATE_STAGING_BUFFERS = 3  # GPU slots a streamed update's pieces (master, exp_avg, exp_avg_sq, bf16) pass through
# Bytes per parameter a streamed update moves: fp32 master and both AdamW states in; the same and the new
# bf16 weights (which the unit's next loads read) out.
STREAMED_IN_BYTES, STREAMED_OUT_BYTES = 12, 14
# Sequence tiles (`Plan.seq_tile_tokens`) the planner considers and calibrate times: long sequences only.
SEQ_TILES = (16384, 8192, 4096)


class PlanError(ValueError):
    """A plan that is malformed or does not fit; the message carries the numbers."""


@dataclass
class Plan:
    model: str  # preset name (optionally ':LAYERS'), config.json or model directory
    batch: int  # sequences per optimizer step
    seq: int
    chunk: int  # sequences a resident layer computes at once; batch/chunk chunks are accumulated layer-major
    window: int = 2  # decoder layers resident on the GPU
    # Decoder layers just below the last `window` whose bf16 weights stay on the GPU from their forward to their
    # backward, each in a slot of its own, so their backward loads nothing: spare GPU memory spent on fewer
    # bytes over PCIe (the backward's loads compete there with the streamed updates and the CPU's AdamW).
    kept_weights: int = 0
    # Per decoder layer, what happens to its input between forward and backward:
    #   offload   - copied to pinned host memory, fetched back for backward, layer recomputed;
    #   recompute - kept on the GPU, layer recomputed in backward;
    #   keep      - the layer's whole autograd graph stays on the GPU (no recompute; last `window` layers only);
    #   disk      - as offload, but on through `disk_ring` host buffers to the disk tier and back.
    activations: list[ActivationPolicy] = field(default_factory=list)
    # Where each unit's fp32 master weights and AdamW states live and are updated, in unit order
    # (embed, layer 0..L-1, head): 'cpu' (host RAM, CPU AdamW), 'gpu' (never cross PCIe), 'disk'
    # (decoder layers only: files in the disk tier, read ahead into `disk_ring` host buffers, updated by the
    # CPU AdamW and written back; the host keeps their bf16 weights for the GPU's loads), or 'streamed' (decoder
    # layers and the embedding: master and states in pinned RAM, streamed to the GPU in pieces after the unit's
    # backward, updated there by the fused AdamW and written back with the bf16 weights the unit's loads read;
    # its gradient never leaves the GPU and the CPU does no work for it, so a streamed embedding's update no
    # longer sits between one step's backward and the next step's first lookup).
    placement: list[Placement] = field(default_factory=list)
    update: UpdateSchedule = (
        "during_backward"  # or 'after_norm' (exact global-norm clipping, overlapped with next forward)
    )
    # during_backward only: the first `late_updates` units (embedding, layer 0, ...) updated on the CPU wait for
    # the end of the backward and then run in forward order, so the next step's forward starts after the first
    # of them instead of after all (their gradients get their own host buffers instead of the ring's).
    late_updates: int = 0
    # during_backward only: the last `deferred_updates` CPU-updated units from the head down (head, layer L-1,
    # ...) wait for the end of the backward too and run after the late ones, in forward order, so the CPU
    # updates them while the next step's forward runs the layers below, which it needs first (their gradients
    # get their own host buffers; the head's load is issued after the layers' loads).
    deferred_updates: int = 0
    transfer_chunk_mb: int = 64  # fp32 weight streaming piece (the GPU's staging ring holds a few such pieces)
    grad_ring: int = 4  # pinned host fp32 gradient buffers shared by the CPU-updated layers
    disk_ring: int = 2  # host buffers for each kind of disk traffic (states, activations): the read-ahead depth
    loss_chunk_tokens: int = 4096  # tokens per LM-head/loss piece; logits never exceed this many rows
    # Tokens per MLP tile in a recomputed layer's backward (0: the whole chunk at once): the MLP's wide
    # intermediates exist for one tile only. Smaller tiles trade a little speed for GPU memory.
    mlp_tile_tokens: int = 0
    # Tokens of each sequence a layer computes at once, forward and backward (0: the whole sequence): its
    # queries, attention output and MLP input exist for one tile, only its keys and values (and their fp32
    # gradients) for the whole sequence. For long sequences on a small GPU; the same maths, the key gradients
    # summed in another order.
    seq_tile_tokens: int = 0
    # The first `saved_attention` decoder layers (inputs 'offload') also copy their attention output and its
    # log-sum-exp to pinned RAM in the forward and fetch them back with their inputs, so their backward skips
    # the attention's forward (at long sequences the costliest part of a recompute): 8 KB more per token and
    # layer (8B shape) of RAM and of PCIe each way. Whole sequences (seq_tile_tokens 0), our own numerics. The
    # same maths: the backward runs from what the same kernel computed.
    saved_attention: int = 0
    # The last `resident_attention` decoder layers (inputs 'offload') save theirs the same way but keep it in
    # GPU memory until their backward: no copies, 8 KB per token and layer of GPU memory, for a GPU with room
    # left once the host's RAM is spent on the first layers'.
    resident_attention: int = 0
    # The head's fp32 gradient exists on the GPU only from the head's first piece until it has been copied to
    # the host, and the first layer's backward waits for that copy (host-updated, untied heads): for a GPU
    # short of memory, at the cost of one copy's time per step.
    transient_head_grad: bool = False
    # The CPU-updated ('cpu') units keep bf16 weights in pinned RAM too, cast from the new master by the CPU
    # after each update: their loads copy 2 bytes per parameter with no GPU cast (instead of streaming the
    # fp32 master through the staging ring), for 2 more bytes of RAM and the cast's CPU time. The same maths.
    host_bf16_weights: bool = False
    # GPU fp32 buffers, one streamed layer each, that a streamed layer's backward loads its fp32 master into
    # (0: none): the load copies 4 bytes per parameter instead of the bf16 weights' 2 and casts on the GPU, and
    # the layer's streamed update then moves only its AdamW states in (8 bytes instead of 12) and updates the
    # master where it lies; 2 bytes per parameter fewer over PCIe for one layer's worth of GPU memory per
    # buffer. At least `min_streamed_master_slots`. The same maths.
    streamed_master_slots: int = 0
    device: str = "cuda"
    # 'bfloat16' (mixed precision, the default) or 'float32' compute; float32 only on the CPU, whose bf16
    # matmuls are slow where the processor lacks bf16 instructions (the demo). fp32 masters and states either way.
    compute_dtype: ComputeDtype = "bfloat16"
    # Data-parallel ranks on one host, each running this plan on its own GPU over `batch` sequences of every
    # step (a step trains ranks x batch sequences); each unit's gradient is summed across ranks once complete.
    ranks: int = 1

    @property
    def chunks(self) -> int:
        return self.batch // self.chunk

    @property
    def weight_slots(self) -> int:
        """The GPU's bf16 slots for decoder layers: the window's, then one per kept layer."""
        return self.window + self.kept_weights

    @property
    def first_kept_layer(self) -> int:
        """The lowest decoder layer whose weights stay on the GPU from its forward to its backward (a kept one,
        else the window's lowest at the turn)."""
        return len(self.activations) - self.window - self.kept_weights

    def weight_slot(self, layer: int) -> int:
        """The slot a decoder layer's weights are loaded into: its own for a kept layer, else the window's
        `layer % window`."""
        kept = layer - self.first_kept_layer
        return self.window + kept if 0 <= kept < self.kept_weights else layer % self.window

    def loads_for_backward(self, layer: int) -> bool:
        """Whether the layer's weights are loaded again for its backward: not for the last `window` layers, whose
        slots still hold them at the turn, nor for the kept ones."""
        return layer < self.first_kept_layer

    @property
    def resident_attention_layers(self) -> range:
        """The decoder layers whose saved attention stays on the GPU (`resident_attention`, the last ones)."""
        L = len(self.activations)
        return range(L - self.resident_attention, L)

    def saves_attention(self, layer: int) -> bool:
        """Whether the layer's forward saves its attention for the backward, in RAM or on the GPU."""
        return self.attention_in_ram(layer) or layer in self.resident_attention_layers

    def attention_in_ram(self, layer: int) -> bool:
        """Whether the layer's saved attention goes to pinned RAM (and back through the GPU's two buffers)."""
        return layer < self.saved_attention

    @property
    def compute_itemsize(self) -> int:
        """Bytes per element of the compute dtype: the GPU's weights, activations and saved inputs."""
        return 4 if self.compute_dtype == "float32" else 2

    @property
    def bf16_layer_grads(self) -> bool:
        """Whether each decoder layer weight's step gradient is one bf16 result (the matmul's or the norm's own
        reduction): one chunk, no MLP or sequence tiles, one rank. Its fp32 sum would hold exactly that value,
        so the layers' shared GPU gradient buffers, their copies to the host and their host buffers hold it in
        bf16: half the bytes, the same values. Not where a CPU AdamW without the one-pass cast would need an
        fp32 copy (`stages_fp32_loads`); GPU-placed layers and the edges keep fp32 (`grad_itemsize`)."""
        whole_chunk = self.mlp_tile_tokens == 0 or self.mlp_tile_tokens >= self.chunk * self.seq
        return (
            self.compute_dtype == "bfloat16"
            and self.chunks == 1
            and self.ranks == 1
            and self.seq_tile_tokens == 0
            and whole_chunk
            and not self.stages_fp32_loads
        )

    def grad_itemsize(self, unit: int) -> int:
        """Bytes per parameter of the unit's gradient on the GPU, over PCIe and in RAM: 2 for a decoder layer
        outside the GPU-placed ones under `bf16_layer_grads`, else 4 (fp32)."""
        layer = 0 < unit < len(self.placement) - 1 and self.placement[unit] != "gpu"
        return 2 if layer and self.bf16_layer_grads else 4

    def reloads_streamed_layer(self, unit: int) -> bool:
        """Whether the unit is a streamed decoder layer loaded again for its backward."""
        layer = 0 < unit < len(self.placement) - 1
        return layer and self.placement[unit] == "streamed" and self.loads_for_backward(unit - 1)

    def loads_streamed_master(self, unit: int) -> bool:
        """Whether the unit's backward loads its fp32 master into a GPU master slot (`streamed_master_slots`)."""
        return self.streamed_master_slots > 0 and self.reloads_streamed_layer(unit)

    @property
    def min_streamed_master_slots(self) -> int:
        """The fewest master slots that never make a backward load wait for an update issued after it: the most
        master-loading layers among any `window` consecutive ones (a layer's load is issued `window - 1` layers
        ahead of its backward, its streamed update after it)."""
        loads = [self.reloads_streamed_layer(lay + 1) for lay in range(len(self.activations))]
        return max((sum(loads[i : i + self.window]) for i in range(len(loads))), default=0)

    @property
    def streamed_master_slot(self) -> dict[int, int]:
        """The master slot each master-loading unit's backward loads into: they take the slots in turn, in
        backward order."""
        order = [u for u in reversed(range(1, len(self.placement) - 1)) if self.loads_streamed_master(u)]
        return {u: k % self.streamed_master_slots for k, u in enumerate(order)}

    def host_updated(self, unit: int) -> bool:
        """The unit's gradient goes to host RAM and the CPU AdamW updates it ('cpu' and 'disk')."""
        return self.placement[unit] in ("cpu", "disk")

    @property
    def shares_grad_ring(self) -> bool:
        """CPU-updated layers pass their gradients through `grad_ring` shared host buffers (during_backward)."""
        late = set(self.late_units)
        return self.update == "during_backward" and any(
            self.host_updated(u) and u not in late for u in range(1, len(self.placement) - 1)
        )

    def shard_numel(self, numel: int) -> int:
        """Parameters of a unit's largest per-rank shard (`shard_numel`)."""
        return shard_numel(numel, self.ranks)

    @property
    def streamed_units(self) -> list[int]:
        return [u for u, p in enumerate(self.placement) if p == "streamed"]

    def streamed_pieces(self, numel: int) -> int:
        """Pieces a streamed unit of `numel` parameters is updated in (one staging slot each)."""
        return -(-numel // self.state_piece_numel)

    @property
    def state_piece_numel(self) -> int:
        """Parameters per streamed-update piece: twice a weight-stream piece's (8B layer: 7 pieces, 1.3 GiB of
        GPU slots at 64 MB)."""
        return self.transfer_chunk_mb * 2**20 // 2

    @property
    def late_units(self) -> list[int]:
        """Host-updated units whose updates run after the backward, in the order they run: the first
        `late_updates` and the last `deferred_updates`, each in forward order."""
        first = [u for u in range(self.late_updates) if self.placement[u] == "cpu"]
        top = range(len(self.placement) - self.deferred_updates, len(self.placement))
        return first + [u for u in top if self.placement[u] == "cpu" and u not in first]

    @property
    def shares_edge_grad(self) -> bool:
        """The embedding's and the head's host gradients share one pinned buffer: the head's update is done
        long before the embedding's gradient arrives (during_backward, both updated on the CPU)."""
        return (
            self.update == "during_backward"
            and self.placement[0] == self.placement[-1] == "cpu"
            and self.late_updates == self.deferred_updates == 0
        )

    def keeps_bf16_weights(self, unit: int) -> bool:
        """The host keeps the unit's bf16 weights, rewritten by every update, for the GPU's loads: disk and
        streamed units, and 'cpu' units under `host_bf16_weights`."""
        where = self.placement[unit]
        return where in ("disk", "streamed") or (where == "cpu" and self.host_bf16_weights)

    @property
    def stages_fp32_loads(self) -> bool:
        """Some unit streams fp32 masters through the GPU staging buffer (the RAM-updated ones without bf16
        weights in RAM)."""
        return "cpu" in self.placement and not self.host_bf16_weights

    @property
    def disk_units(self) -> list[int]:
        return [u for u, p in enumerate(self.placement) if p == "disk"]

    def validate(self, num_layers: int) -> None:
        problems = []
        if self.batch < 1 or self.seq < 2:
            problems.append(f"batch {self.batch} and seq {self.seq} must be >= 1 and >= 2")
        if self.chunk < 1 or self.batch % self.chunk:
            problems.append(f"chunk {self.chunk} must divide batch {self.batch}")
        if not 1 <= self.window <= num_layers:
            problems.append(f"window {self.window} must be between 1 and the {num_layers} layers")
        if not 0 <= self.kept_weights <= num_layers - self.window:
            problems.append(
                f"kept_weights {self.kept_weights} must be between 0 and the {num_layers - self.window} layers "
                "below the window"
            )
        if len(self.activations) != num_layers or set(self.activations) - set(ACTIVATION_POLICIES):
            problems.append(f"activations needs {num_layers} entries from {ACTIVATION_POLICIES}")
        elif any(p == "keep" for p in self.activations[: num_layers - self.window]):
            problems.append("'keep' is allowed only for the last `window` layers, whose weights stay resident")
        if len(self.placement) != num_layers + 2 or set(self.placement) - set(PLACEMENTS):
            problems.append(f"placement needs {num_layers + 2} entries (embed, layers, head) from {PLACEMENTS}")
        elif "disk" in (self.placement[0], self.placement[-1]) or self.placement[-1] == "streamed":
            problems.append(
                "'disk' placement is for decoder layers and 'streamed' for them and the embedding; the head is "
                "'cpu' or 'gpu'"
            )
        if self.update not in UPDATE_SCHEDULES:
            problems.append(f"update must be one of {UPDATE_SCHEDULES}")
        elif self.update != "during_backward" and "streamed" in self.placement:
            problems.append(
                "'streamed' placement needs update 'during_backward' (its gradient stays in a shared GPU "
                "buffer that the next layers' backward reuses)"
            )
        if self.compute_dtype not in get_args(ComputeDtype) or (
            self.compute_dtype == "float32" and self.device != "cpu"
        ):
            problems.append("compute_dtype is 'bfloat16', or 'float32' on device 'cpu'")
        if min(self.grad_ring, self.disk_ring, self.transfer_chunk_mb, self.loss_chunk_tokens) < 1:
            problems.append("grad_ring, disk_ring, transfer_chunk_mb and loss_chunk_tokens must be positive")
        for name in ("late_updates", "deferred_updates"):
            n = getattr(self, name)
            if not 0 <= n <= num_layers + 1 or (n and self.update != "during_backward"):
                problems.append(
                    f"{name} must be between 0 and {num_layers + 1}, and 0 unless update is 'during_backward'"
                )
        if self.mlp_tile_tokens < 0:
            problems.append("mlp_tile_tokens must be 0 (whole chunk) or positive")
        if self.transient_head_grad and self.placement and self.placement[-1] == "gpu":
            problems.append("transient_head_grad needs a host-updated head (its GPU AdamW reads the gradient)")
        if self.seq_tile_tokens < 0:
            problems.append("seq_tile_tokens must be 0 (whole sequence) or positive")
        if self.saved_attention and (
            self.saved_attention < 0
            or any(p != "offload" for p in self.activations[: self.saved_attention])
            or self.saved_attention > len(self.activations)
            or self.seq_tile_tokens
        ):
            problems.append(
                f"saved_attention {self.saved_attention} needs that many first layers with activations 'offload' "
                "and seq_tile_tokens 0"
            )
        resident = self.resident_attention
        if resident and (
            resident < 0
            or self.saved_attention + resident > len(self.activations)
            or any(self.activations[lay] != "offload" for lay in self.resident_attention_layers)
            or self.seq_tile_tokens
        ):
            problems.append(
                f"resident_attention {resident} needs that many last layers with activations 'offload', none of "
                f"them among the first saved_attention {self.saved_attention}, and seq_tile_tokens 0"
            )
        if self.streamed_master_slots < 0:
            problems.append("streamed_master_slots must be 0 or positive")
        elif self.streamed_master_slots and not problems:
            least = self.min_streamed_master_slots
            if least == 0:
                problems.append(
                    "streamed_master_slots must be 0: no streamed decoder layer is loaded again for its backward"
                )
            elif self.streamed_master_slots < least:
                problems.append(
                    f"streamed_master_slots {self.streamed_master_slots} must be 0 or at least {least}, the "
                    f"streamed layers loaded for their backward among {self.window} consecutive ones (the window)"
                )
        if self.ranks < 1:
            problems.append(f"ranks {self.ranks} must be >= 1")
        elif self.ranks > 1 and ({"disk", "streamed"} & set(self.placement) or "disk" in self.activations):
            problems.append(
                "'disk' and 'streamed' placements and 'disk' activations are not supported with several ranks: "
                "place those units 'cpu' or 'gpu' and those layers' inputs 'offload' or 'recompute', or use ranks 1"
            )
        if problems:
            raise PlanError("invalid plan: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError) as e:  # malformed JSON, missing or unknown fields
            raise PlanError(f"not a valid plan ({e})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(Path(path).read_text())
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def shard_numel(numel: int, ranks: int) -> int:
    """Parameters per rank of a unit split between `ranks` data-parallel ranks: contiguous shards, rounded up
    (the last may be shorter)."""
    return -(-numel // ranks)


def uniform_plan(
    model: str,
    num_layers: int,
    batch: int,
    seq: int,
    chunk: int | None = None,
    window: int = 2,
    activation: ActivationPolicy = "offload",
    keep_last: int = 0,
    gpu_units: int = 0,
    gpu_layers: int = 0,
    disk_layers: int = 0,
    streamed_layers: tuple[int, ...] = (),
    streamed_embedding: bool = False,
    **kw,
) -> Plan:
    """A plan with one policy for every layer; the last `keep_last` layers keep their graphs, the first
    `gpu_units` units (embed, layer 0, ...) plus the head when gpu_units > 0 are updated on the GPU, and so
    are the first `gpu_layers` decoder layers alone (the next forward needs them first, and the edges are the
    largest units), the last `disk_layers` layers keep their states on disk (updated first in backward,
    needed last in forward) and the layers `streamed_layers` (and the embedding, `streamed_embedding`) that
    are left on the CPU are updated by the streamed GPU AdamW."""
    acts: list[ActivationPolicy] = [activation] * num_layers
    for i in range(num_layers - keep_last, num_layers):
        acts[i] = "keep"
    placement: list[Placement] = ["cpu"] * (num_layers + 2)
    for i in range(min(gpu_units, num_layers + 1)):
        placement[i] = "gpu"
    if gpu_units > 0:
        placement[-1] = "gpu"
    for i in range(1, min(gpu_layers, num_layers) + 1):
        placement[i] = "gpu"
    for i in range(num_layers + 1 - disk_layers, num_layers + 1):
        placement[i] = "disk"
    for u in [lay + 1 for lay in streamed_layers] + ([0] if streamed_embedding else []):
        if placement[u] == "cpu":
            placement[u] = "streamed"
    return Plan(
        model=model,
        batch=batch,
        seq=seq,
        chunk=chunk or batch,
        window=window,
        activations=acts,
        placement=placement,
        **kw,
    )
