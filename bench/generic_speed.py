"""The generic layer path (an architecture's own Hugging Face modules) beside our native numerics on the GPU:
the Llama-3.1-8B layer shape cut to a few layers, once natively and once through transformers' LlamaDecoderLayer
(the same maths, so the ratio is the generic path's cost), and a Gemma-3-shaped model of similar size through
its own modules. Same plan for all, weights resident in the window, random weights and tokens. Each model's
layer and head are first measured as calibrate measures them (time and GPU workspace, at the plan's chunk) into
a copy of `--profile`; the memory model's peak from that measurement and from none is recorded beside the run.

    python -m bench.generic_speed --out bench/results/<device>-<date>-generic-speed.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import memory_readings, provenance, time_steps, write_result
from slideformer.calibrate import measure
from slideformer.data import random_next_token_batch
from slideformer.models import ModelConfig, RandomWeights
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.profile import Profile
from slideformer.simulator import simulate

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile", default="calibrate/profiles/h200-2026-12-02-F.json", help="the machine's profile")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = {}
    for name, cfg in configs(a.layers).items():
        plan = uniform_plan(name, cfg.num_layers, a.batch, a.seq, chunk=a.batch, window=2, activation="offload")
        uncalibrated, calibrated = Profile.load(a.profile), Profile.load(a.profile)
        calibrated.layers += measure.layer_timings(cfg, a.seq, [a.batch], "cuda")
        calibrated.heads += measure.head_timings(cfg, [a.batch * a.seq], plan.loss_chunk_tokens, "cuda")
        predicted = {
            f"predicted_peak_gpu_allocated_gib_{kind}": simulate(cfg, plan, prof).peak_gpu_allocated_bytes / 2**30
            for kind, prof in (("uncalibrated", uncalibrated), ("calibrated", calibrated))
        }
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine = Engine(cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5))
        init_s = time.perf_counter() - t0
        data = [random_next_token_batch(cfg.vocab_size, a.batch, a.seq, seed=i) for i in range(2)]
        timing = time_steps(lambda i: engine.train_step(*data[i % 2]).loss, a.warmup, a.steps, engine.synchronize)
        engine.close()
        tokens = a.batch * a.seq
        rows[name] = {
            "family": cfg.family,
            "params": cfg.total_params,
            "layer_params": cfg.layer_params,
            "plan": plan.__dict__,
            "init_s": init_s,
            **timing,
            "tokens_per_s": tokens / timing["step_s"],
            "model_tflops": cfg.model_flops_per_token(a.seq) * tokens / timing["step_s"] / 1e12,
            **memory_readings(),
            **predicted,
            "calibrated_layer": calibrated.layers[-1].__dict__,
        }
        rows[name]["gpu_peak_error_calibrated"] = (
            predicted["predicted_peak_gpu_allocated_gib_calibrated"] / rows[name]["peak_gpu_allocated_gib"] - 1
        )
        print(
            f"{name}: {timing['step_s']:.3f} s/step, {rows[name]['tokens_per_s']:,.0f} tokens/s, peak GPU "
            f"{rows[name]['peak_gpu_allocated_gib']:.2f} GiB (predicted {predicted['predicted_peak_gpu_allocated_gib_calibrated']:.2f} "
            f"calibrated, {predicted['predicted_peak_gpu_allocated_gib_uncalibrated']:.2f} not)",
            flush=True,
        )
    native, generic = rows["llama-native"]["tokens_per_s"], rows["llama-generic"]["tokens_per_s"]
    write_result(
        a.out,
        {
            "command": "python -m bench.generic_speed " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
            **provenance(),
            "rows": rows,
            "generic_over_native_llama": generic / native,
        },
    )


if __name__ == "__main__":
    main()
