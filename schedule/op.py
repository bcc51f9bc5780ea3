"""The vocabulary of the step graph: the resources that serve ops, the kinds of op, and the record each graph
node carries. The runtime's executor runs an op's body on its resource; the simulator costs it there."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Resource(StrEnum):
    """What serves an op, one op at a time in issue order."""

    GPU = "gpu"  # the compute stream
    H2D = "h2d"  # host-to-GPU copies
    D2H = "d2h"  # GPU-to-host copies
    CPU = "cpu"  # the CPU AdamW worker
    DISK = "disk"  # the disk tier's worker
    OPT = "opt"  # the GPU stream of streamed updates


# Served by worker threads; the GPU's streams wait on them through futures.
HOST_RESOURCES = frozenset({Resource.CPU, Resource.DISK})


class OpKind(StrEnum):
    LOAD = "load"  # a unit's weights into its GPU slot
    EMBED = "embed"
    SAVE = "save"  # a layer's input out to the host
    FWD = "fwd"
    HEAD = "head"  # final norm, LM head, loss and their backward
    FETCH = "fetch"  # a saved input back for the backward
    SAVE_ATTENTION = "save_attention"  # a layer's attention output and log-sum-exp out to the host (after its forward)
    FETCH_ATTENTION = "fetch_attention"  # ... and back for its backward
    BWD = "bwd"
    EMBED_BWD = "embed_bwd"
    ALLREDUCE = "allreduce"  # a GPU-updated unit's complete gradient summed across data-parallel ranks (ranks > 1)
    REDUCE_SCATTER = "reduce_scatter"  # ... a host-updated unit's: each rank gets the sum of its shard only
    GRAD_OUT = "grad_out"  # a unit's fp32 gradient to its host buffer
    UPDATE = "update"  # AdamW on the CPU or, for GPU-placed units, on the GPU
    NORM = "norm"  # the global gradient norm (after_norm)
    STATE_IN = "state_in"  # a streamed update's piece of master and states in
    STATE_UPDATE = "state_update"
    STATE_OUT = "state_out"  # ... and out, with the new bf16 weights
    DISK_READ = "disk_read"  # a disk unit's master and states into a host ring buffer
    DISK_WRITE = "disk_write"
    ACT_WRITE = "act_write"  # a disk-bound layer's saved input out to the tier
    ACT_READ = "act_read"


COLLECTIVES = frozenset({OpKind.ALLREDUCE, OpKind.REDUCE_SCATTER})  # sums across ranks, on the compute stream


def collective_for(placement: str) -> OpKind:
    """How several ranks sum a unit's gradient: a GPU-updated unit needs the whole sum on every rank; a
    host-updated one only its rank's shard of it, which is all that rank's CPU AdamW updates and its copy to
    the host moves."""
    return OpKind.ALLREDUCE if placement == "gpu" else OpKind.REDUCE_SCATTER


BODY_ARGUMENTS = ("unit", "layer", "chunk", "slot", "piece")  # the fields an op's body takes, where set


@dataclass(frozen=True)
class Op:
    """One op of the step graph (the node's `op` attribute)."""

    name: str  # e.g. 'bwd:3:0' (kind, layer, chunk)
    seq: int  # issue order; every resource serves its ops in this order
    kind: OpKind
    resource: Resource
    unit: int | None = None  # 0 the embedding, 1..L the decoder layers, L+1 the final norm and head
    layer: int | None = None
    chunk: int | None = None
    slot: int | None = None  # the shared buffer it uses (disk ring, streamed-state slot)
    piece: int | None = None  # of a streamed update
    flops: int = 0
    nbytes: int = 0  # bytes moved (copies, disk I/O) or read and written (embedding)
    params: int = 0  # parameters updated
    gpu_alloc: int = 0  # GPU bytes taken at its start and kept after it (a kept input or graph)
    gpu_free: int = 0  # GPU bytes given back at its end
    staged: bool = False  # a load of fp32 masters through the staging ring, cast on the GPU
    cast: bool = False  # an update that also writes the bf16 weights kept in RAM

    def arguments(self) -> dict[str, int]:
        """What the op's body is called with."""
        return {k: v for k in BODY_ARGUMENTS if (v := getattr(self, k)) is not None}
