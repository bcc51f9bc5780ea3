"""The ceiling: the same model wholly on the GPU (transformers, bf16 params/grads/AdamW, checkpointing)."""

from __future__ import annotations

import argparse

import torch
import transformers

from bench.common import BATCH, MODEL, SEQ, memory_readings, provenance, throughput, time_steps, write_result
from slideformer.data import random_next_token_batch
from slideformer.models import load_model_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_model_config(a.model)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").cuda()
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    data = [tuple(t.cuda() for t in random_next_token_batch(cfg.vocab_size, BATCH, SEQ, seed=i)) for i in range(2)]

    def step(i: int) -> float:
        ids, labels = data[i % 2]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    timing = time_steps(step, a.warmup, a.steps, torch.cuda.synchronize)
    write_result(
        a.out,
        {
            "system": "gpu-resident transformers (bf16 AdamW, checkpointing)",
            "name": "resident",
            **provenance(),
            **timing,
            **throughput(a.model, BATCH, SEQ, timing["step_s"]),
            **memory_readings(),
        },
    )


if __name__ == "__main__":
    main()
