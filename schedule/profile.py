"""A machine profile: what `slideformer calibrate` measured (or a spec sheet says), as one JSON file.

Rates are in bytes/s, parameters/s or flop/s; times in seconds. Entries a machine lacks (no GPU, no
disk measured) are None. Kernel timings are per model shape, so the simulator can read the model's own
layer times and fall back to flops at the measured efficiency for shapes not measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


# The committed profiles are calibrate's outputs and live beside it (the package `slideformer.calibrate`).
PROFILES_DIR = Path(__file__).resolve().parent.parent / "calibrate" / "profiles"


class ProfileError(ValueError):
    """A profile that cannot be read, or lacks what the simulator needs (e.g. a CPU-only profile for a GPU plan)."""


def fit_at(points: list[tuple[int, float]], x: int) -> float | None:
    """A measured quantity at x: the least-squares line through (x, value) points (clamped at 0), proportional
    from a single point; None without points. Zero values mean unmeasured and are skipped."""
    points = [p for p in points if p[1] > 0]
    if not points:
        return None
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    # The least-squares line in closed form: the planner asks this tens of thousands of times per search.
    n = len(points)
    mean_x, mean_y = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / sum((p[0] - mean_x) ** 2 for p in points)
    return float(max(mean_y + slope * (x - mean_x), 0.0))


@dataclass
class Link:
    bandwidth: float  # bytes/s for large pinned copies
    latency_s: float  # fixed cost per copy


@dataclass
class LayerTiming:
    """One decoder layer of this shape at `tokens` tokens (`tokens // seq` sequences of `seq`); in sequence tiles
    of `seq_tile` tokens where that is not 0 (forward and recompute + backward only)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    seq: int
    tokens: int
    fwd_s: float  # forward without autograd
    bwd_recompute_s: float  # forward with autograd + backward (the offload and recompute policies)
    bwd_kept_s: float  # backward from a kept graph
    kept_graph_bytes: int = 0  # GPU bytes a forward with autograd keeps until its backward (0: unmeasured)
    seq_tile: int = 0
    layer: str = ""  # whose layer (`ModelConfig.layer_kind`): '' ours, else the architecture's own
    # GPU bytes the forward without gradients and the recompute + backward allocate at their peaks beyond
    # the layer's input (and output gradient) and weights (0: unmeasured); the memory model reads them for an
    # architecture's own layer, whose autograd it has no formula for
    fwd_workspace_bytes: int = 0
    bwd_workspace_bytes: int = 0
    # recompute + backward from the forward's saved attention output and log-sum-exp (`Plan.saved_attention`;
    # 0: unmeasured, and the simulator then costs such a layer as a plain recompute)
    bwd_saved_attention_s: float = 0.0

    def shape(self) -> tuple[int | str, ...]:
        return self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.layer


@dataclass
class HeadTiming:
    """Final norm, LM head and loss with gradients, in `loss_chunk_tokens` pieces."""

    hidden: int
    vocab: int
    tokens: int
    s: float
    peak_bytes: int = 0  # GPU bytes allocated beyond inputs, weights and gradient buffers (0: unmeasured)


@dataclass
class Disk:
    path: str
    method: str  # the tier's I/O path: 'kvikio', 'posix-odirect', 'posix-buffered' (O_DIRECT refused) or 'spec'
    read_bandwidth: float
    write_bandwidth: float
    read_latency_s: float = 0.0  # fixed cost per file read or written (open, sidecar, a partly busy pool)
    write_latency_s: float = 0.0


@dataclass
class Profile:
    name: str
    source: str  # 'measured' or 'spec' (derived from public specifications, not measured)
    device: str
    date: str
    notes: str = ""
    # host
    host_memory_bytes: int = 0
    host_cores: int = 1
    host_memcpy_bandwidth: float = 0.0  # bytes copied per second
    host_cast_bandwidth: float = 0.0  # fp32 bytes cast to bf16 per second
    cpu_adamw_threads: list[int] = field(default_factory=list)
    cpu_adamw_params_per_s: list[float] = field(default_factory=list)  # torch fused AdamW, fp32 states
    runtime_threads: int = 1  # torch intra-op threads the runtime's optimizer worker uses
    # The same AdamW on a layer-sized unit while PCIe DMA runs both ways (the runtime's backward); None: unmeasured
    cpu_adamw_busy_params_per_s: float | None = None
    # The one-pass AdamW + bf16 cast (kernels.host_adamw) of units keeping bf16 weights in RAM, idle at the
    # runtime's thread count and under PCIe traffic as above; None: unmeasured (costed as the AdamW, then a cast)
    cpu_adamw_cast_params_per_s: float | None = None
    cpu_adamw_cast_busy_params_per_s: float | None = None
    process_baseline_bytes: int = 0  # resident memory of a process with torch (and CUDA) initialised
    disk: Disk | None = None
    # GPU
    gpu_memory_bytes: int | None = None
    gpu_bf16_flops: float | None = None  # dense GEMM
    gpu_memory_bandwidth: float | None = None
    gpu_adamw_params_per_s: float | None = None
    issue_s: float = 0.0  # host time to launch one layer's forward for one chunk
    h2d: Link | None = None
    d2h: Link | None = None
    duplex_bandwidth: float | None = None  # both directions together
    # bytes/s of a large NCCL all-reduce's bus between two GPUs of the host (Plan.ranks > 1); None: unmeasured
    gpu_link_bandwidth: float | None = None
    # Host-to-GPU bytes/s while the CPU's AdamW runs (both draw on the host's memory, as in a backward with
    # CPU-updated layers), with the other direction idle and with it copying too; None: unmeasured (the link's
    # own rate). GPU-to-host copies kept their rate beside the update in traced steps.
    h2d_beside_update_bandwidth: float | None = None
    h2d_beside_update_duplex_bandwidth: float | None = None
    compute_slowdown_under_copies: float = 1.0  # layer time with both PCIe directions busy / alone
    layers: list[LayerTiming] = field(default_factory=list)
    heads: list[HeadTiming] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_bf16_flops is not None

    def cpu_adamw_rate(self) -> float:
        """Parameters/s of the runtime's CPU optimizer: under PCIe traffic where measured, else idle at the
        runtime's thread count."""
        if self.cpu_adamw_busy_params_per_s:
            return self.cpu_adamw_busy_params_per_s
        best = [r for t, r in zip(self.cpu_adamw_threads, self.cpu_adamw_params_per_s) if t <= self.runtime_threads]
        return max(best) if best else self.cpu_adamw_params_per_s[0]

    def cpu_adamw_cast_rate(self) -> float | None:
        """Parameters/s of the one-pass AdamW + bf16 cast: under PCIe traffic where measured, else idle; None
        where the profile has neither."""
        return self.cpu_adamw_cast_busy_params_per_s or self.cpu_adamw_cast_params_per_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ProfileError(
                f"unknown profile fields {sorted(unknown)}: a profile from another slideformer version; run "
                "`slideformer calibrate` again"
            )
        d = dict(d)
        for key, kind in (("h2d", Link), ("d2h", Link), ("disk", Disk)):
            if d.get(key) is not None:
                d[key] = kind(**d[key])
        d["layers"] = [LayerTiming(**x) for x in d.get("layers", [])]
        d["heads"] = [HeadTiming(**x) for x in d.get("heads", [])]
        return cls(**d)

    @classmethod
    def load(cls, path_or_name: str | Path) -> Profile:
        """A profile file, or the name of a committed one (e.g. 'h100-80gb')."""
        path = Path(path_or_name)
        if not path.exists():
            path = PROFILES_DIR / f"{path_or_name}.json"
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
            raise ProfileError(f"no profile {str(path_or_name)!r}: not a file nor a committed profile ({names})")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:  # malformed JSON, a field of the wrong shape
            raise ProfileError(f"{path}: not a valid profile ({e})") from None
