"""The generic layer path (an architecture's own Hugging Face modules) beside our native numerics on the GPU:
the Llama-3.1-8B layer shape cut to a few layers, once natively and once through transformers' LlamaDecoderLayer
(the same maths, so the ratio is the generic path's cost), and a Gemma-3-shaped model of similar size through
its own modules. Same plan for all, weights resident in the window, random weights and tokens. Each model's
layer and head are first measured as calibrate measures them (time and GPU workspace, at the plan's chunk) into
a copy of `--profile`; the memory model's peak from that measurement and from none is recorded beside the run.
Each model runs in a process of its own: within one, an engine's GPU buffers outlive it until the next is built
(the rows of 2026-12-02 lease H counted the earlier rows' engines in their peaks). `--peak-sites N` records one
more step's allocations and lists the N largest sites live at its peak.

    python -m bench.generic_speed --out bench/results/<device>-<date>-generic-speed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import memory_readings, provenance, time_steps, write_result
from slideformer.calibrate import measure
from slideformer.data import random_next_token_batch
from slideformer.models import ModelConfig, RandomWeights
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.profile import Profile
from slideformer.simulator import simulate

REPO = Path(__file__).resolve().parents[1]

LLAMA_8B_LAYERS = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
# Gemma 3 12B's layer shape (head_dim 256, a 5:1 sliding-window pattern), a smaller vocabulary than its 262K so
# the layers, not the head, dominate as in the Llama rows
GEMMA_3_12B_LAYERS = dict(
    model_type="gemma3_text",
    vocab_size=128256,
    hidden_size=3840,
    intermediate_size=15360,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    rope_theta=1000000.0,
    max_position_embeddings=8192,
    pad_token_id=0,
)


def configs(layers: int) -> dict[str, ModelConfig]:
    llama = LLAMA_8B_LAYERS | {"num_hidden_layers": layers}
    gemma = GEMMA_3_12B_LAYERS | {"num_hidden_layers": layers}
    gemma["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return {
        "llama-native": ModelConfig.from_hf(llama, name="llama-native"),
        "llama-generic": ModelConfig._generic(llama, "llama-generic"),
        "gemma3-generic": ModelConfig.from_hf(gemma, name="gemma3-generic"),
    }


def peak_sites(snapshot: dict, top: int) -> list[dict]:
    """The allocations live at the largest total of a recorded memory history (`torch.cuda.memory._snapshot`),
    grouped by the innermost frame in this repository and the innermost frame overall, largest first."""
    live: dict[int, tuple[int, tuple[str, str]]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, tuple[str, str]]] = {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            frames = [f"{f['filename']}:{f['line']} {f['name']}" for f in event.get("frames", [])]
            ours = next((f for f in frames if f.startswith(str(REPO)) and "/bench/" not in f), "?")
            live[event["addr"]] = (event["size"], (ours, frames[0] if frames else "?"))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    sites: dict[tuple[str, str], list[int]] = {}
    for size, site in at_peak.values():
        sites.setdefault(site, []).append(size)
    rows = sorted(sites.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [
        {
            "gib": sum(sizes) / 2**30,
            "blocks": len(sizes),
            "ours": site[0].removeprefix(str(REPO) + "/"),
            "innermost": site[1],
        }
        for site, sizes in rows
    ]


def run_row(name: str, a: argparse.Namespace) -> dict:
    """One model's row, in a process of its own (the engine's buffers and the host's pinned pool are not
    returned within a process: a second engine's peaks would count the first's)."""
    cfg = configs(a.layers)[name]
    plan = uniform_plan(name, cfg.num_layers, a.batch, a.seq, chunk=a.batch, window=2, activation="offload")
    uncalibrated, calibrated = Profile.load(a.profile), Profile.load(a.profile)
    calibrated.layers += measure.layer_timings(cfg, a.seq, [a.batch], "cuda")
    calibrated.heads += measure.head_timings(cfg, [a.batch * a.seq], plan.loss_chunk_tokens, "cuda")
    predicted = {
        f"predicted_peak_gpu_allocated_gib_{kind}": simulate(cfg, plan, prof).peak_gpu_allocated_bytes / 2**30
        for kind, prof in (("uncalibrated", uncalibrated), ("calibrated", calibrated))
    }
    allocated_before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine(cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5))
    init_s = time.perf_counter() - t0
    data = [random_next_token_batch(cfg.vocab_size, a.batch, a.seq, seed=i) for i in range(2)]
    timing = time_steps(lambda i: engine.train_step(*data[i % 2]).loss, a.warmup, a.steps, engine.synchronize)
    row = {
        "family": cfg.family,
        "params": cfg.total_params,
        "layer_params": cfg.layer_params,
        "plan": plan.__dict__,
        "init_s": init_s,
        **timing,
        "tokens_per_s": a.batch * a.seq / timing["step_s"],
        "model_tflops": cfg.model_flops_per_token(a.seq) * a.batch * a.seq / timing["step_s"] / 1e12,
        "allocated_before_engine_gib": allocated_before / 2**30,
        **memory_readings(),
        **predicted,
        "calibrated_layer": calibrated.layers[-1].__dict__,
    }
    if a.peak_sites:  # one more step with the allocator's history recorded
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        engine.train_step(*data[0])
        engine.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        row["recorded_step"] = {
            "allocated_before_gib": before / 2**30,
            "peak_sites": peak_sites(snapshot, a.peak_sites),
        }
    engine.close()
    row["gpu_peak_error_calibrated"] = (
        predicted["predicted_peak_gpu_allocated_gib_calibrated"] / row["peak_gpu_allocated_gib"] - 1
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile", default="calibrate/profiles/h200-2026-12-02-F.json", help="the machine's profile")
    ap.add_argument("--peak-sites", type=int, default=0, help="list this many allocation sites live at a step's peak")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # one row in this process, its JSON to --out
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.row:
        Path(a.out).write_text(json.dumps(run_row(a.row, a)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs(a.layers):
            out = Path(tmp) / f"{name}.json"
            argv = [sys.executable, "-m", "bench.generic_speed", "--row", name, "--out", str(out)]
            argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("row", "out")]
            subprocess.run(argv, check=True)
            rows[name] = row = json.loads(out.read_text())
            print(
                f"{name}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s, peak GPU "
                f"{row['peak_gpu_allocated_gib']:.2f} GiB (predicted {row['predicted_peak_gpu_allocated_gib_calibrated']:.2f} "
                f"calibrated, {row['predicted_peak_gpu_allocated_gib_uncalibrated']:.2f} not)",
                flush=True,
            )
    native, generic = rows["llama-native"]["tokens_per_s"], rows["llama-generic"]["tokens_per_s"]
    write_result(
        a.out,
        {
            "command": "python -m bench.generic_speed "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "row"),
            **provenance(),
            "rows": rows,
            "generic_over_native_llama": generic / native,
        },
    )


if __name__ == "__main__":
    main()
