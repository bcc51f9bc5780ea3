"""The independent reference: a plain PyTorch mixed-precision training loop (bf16 compute, fp32 master
weights, torch AdamW), with micro-batch gradient accumulation and global-norm clipping. It runs with the
Triton kernels off, so on the GPU the runtime (kernels on) is checked against plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slideformer import kernels
from slideformer.models import ModelConfig, Transformer
from slideformer.runtime.engine import AdamWConfig, WeightSource

IGNORE = -100


def reference_train(*args, **kwargs) -> tuple[list[float], dict[str, torch.Tensor]]:
    with kernels.use(False):
        return _train(*args, **kwargs)


def _train(cfg: ModelConfig, source: WeightSource, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    optim: AdamWConfig, micro_batch: int, device: str = "cpu",
                    lrs: list[float] | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                    ) -> tuple[list[float], dict[str, torch.Tensor]]:
    master_model = Transformer(cfg)
    master = master_model.named_hf_parameters()
    with torch.no_grad():
        for name, p in master.items():
            p.copy_(source.get(name))
    model = Transformer(cfg).to(device=device, dtype=compute_dtype)
    compute = model.named_hf_parameters()
    masters = [p for p in master.values()]
    opt = torch.optim.AdamW(masters, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                            weight_decay=optim.weight_decay, fused=True)
    losses = []
    for step, (input_ids, labels) in enumerate(batches):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        with torch.no_grad():
            for name, p in compute.items():
                p.copy_(master[name])
        for p in masters:
            p.grad = torch.zeros_like(p)
        total = int((labels != IGNORE).sum())
        step_loss = 0.0
        for ids, lab in zip(input_ids.split(micro_batch), labels.split(micro_batch)):
            logits = model(ids.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), lab.to(device).flatten(), ignore_index=IGNORE,
                                   reduction="sum") / total
            loss.backward()
            step_loss += float(loss.detach())
            for name, p in compute.items():
                master[name].grad += p.grad.float().cpu()
                p.grad = None
        if optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(masters, optim.max_grad_norm)
        opt.step()
        losses.append(step_loss)
    return losses, {n: p.detach().clone() for n, p in master.items()}
