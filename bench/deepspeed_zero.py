"""The peer: DeepSpeed ZeRO-3 (params + optimizer offloaded) or ZeRO-2 (optimizer offloaded), pinned, with
gradient checkpointing, on the same transformers model and workload (the 16-layer benchmark's by default;
`bench.consumer --system deepspeed` runs it on the consumer suite's, the GPU capped)."""

from __future__ import annotations

import argparse
import os

import torch
import transformers

from bench.common import (
    BATCH,
    MODEL,
    SEQ,
    cap_gpu,
    memory_readings,
    provenance,
    throughput,
    time_steps,
    write_result,
)
from slideformer.data import random_next_token_batch
from slideformer.models import load_model_config


def ds_config(stage: int, batch: int) -> dict:
    zero: dict = {
        "stage": stage,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "steps_per_print": 10**9,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, choices=(2, 3), required=True)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--gpu-cap-gib", type=float, help="cap the CUDA caching allocator (as on a card of that size)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed()
    cap_gpu(a.gpu_cap_gib)
    cfg = load_model_config(a.model)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    config = ds_config(a.stage, a.batch)
    torch.set_default_dtype(torch.bfloat16)
    if a.stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = [tuple(t.cuda() for t in random_next_token_batch(cfg.vocab_size, a.batch, a.seq, seed=i)) for i in range(2)]

    def step(i: int) -> float:
        ids, labels = data[i % 2]
        logits = engine(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        engine.backward(loss)
        engine.step()
        return float(loss)

    timing = time_steps(step, a.warmup, a.steps, torch.cuda.synchronize)
    write_result(
        a.out,
        {
            "system": f"deepspeed {deepspeed.__version__} zero-{a.stage} cpu offload",
            "name": f"zero{a.stage}",
            **provenance(),
            "ds_config": config,
            **timing,
            "gpu_cap_gib": a.gpu_cap_gib,
            **throughput(a.model, a.batch, a.seq, timing["step_s"]),
            **memory_readings(),
        },
    )


if __name__ == "__main__":
    main()
