"""Where a decoder layer's GPU memory goes in recompute + backward: peak bytes beyond the layer's input,
output gradient and weights, per token, for several shapes, chunk sizes and MLP tiles, next to autograd
through the whole layer at once (the path before `decoder_layer_backward`), and next to the memory model's
figure (`schedule.memory.layer_workspace`).

    python -m bench.layer_memory --out bench/results/X.json
    python -m bench.layer_memory --seq-tiles --out bench/results/Y.json   # long sequences in sequence tiles
    python -m bench.layer_memory --kept --out bench/results/Z.json        # a kept layer's graph and backward

With --seq-tiles: the whole-sequence backward beside the tiled one (`decoder_layer_backward_in_tiles`) for
long single sequences of three shapes, and the tiled forward, with their times.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import provenance, write_result
from slideformer.calibrate.measure import peak_extra_bytes
from slideformer.models import load_model_config
from slideformer.models.layers import (
    decoder_layer,
    decoder_layer_backward,
    decoder_layer_backward_in_tiles,
    decoder_layer_in_tiles,
    rope_tables,
)
from slideformer.schedule.memory import kept_backward_workspace, layer_workspace

# (model, batch, seq): short sequences in a batch and long single sequences, for each shape
WORKLOADS = {
    "llama-3.1-8b": [(1, 2048), (4, 2048), (8, 2048), (1, 32768), (1, 65536)],
    "qwen3-14b": [(1, 2048), (4, 2048), (1, 16384)],
    "qwen2.5-32b": [(1, 2048), (4, 2048), (1, 16384)],
}
TILES = (0, 8192, 2048)
# (model, seq at batch 1, sequence tiles), MLP tile 2048 throughout
SEQ_TILE_WORKLOADS = {
    "llama-3.1-8b": [(32768, (0, 8192)), (65536, (0, 16384, 8192)), (131072, (16384, 8192, 4096))],
    "qwen3-14b": [(32768, (0, 8192))],
    "qwen2.5-32b": [(32768, (0, 8192))],
}
SEQ_MLP_TILE = 2048


def measure(fn) -> tuple[int | None, float | None]:
    """Peak bytes beyond what was allocated before, and milliseconds per call (mean of 3 after a warm-up)."""
    try:
        fn()
        torch.cuda.synchronize()
        peak = peak_extra_bytes(fn)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return peak, (time.perf_counter() - t0) / 3 * 1e3
    except torch.OutOfMemoryError:
        return None, None
    finally:
        torch.cuda.empty_cache()


def layer_params(cfg, dev: str) -> dict[str, torch.Tensor]:
    return {
        n: (torch.randn(s, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
        for n, s in cfg.layer_param_shapes().items()
    }


def layer_inputs(cfg, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient (bf16, on the GPU) for `batch` rows of `seq` tokens, and their rotary
    tables."""
    x = torch.randn(batch, seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    return (x, torch.randn_like(x), *rope_tables(cfg, seq, "cuda", torch.bfloat16))


def seq_tile_rows() -> list[dict]:
    rows = []
    for model, shapes in SEQ_TILE_WORKLOADS.items():
        cfg = load_model_config(model)
        params = layer_params(cfg, "cuda")
        for seq, tiles in shapes:
            x, dy, cos, sin = layer_inputs(cfg, 1, seq)
            for tile in tiles:
                if tile:
                    bwd = lambda t=tile: decoder_layer_backward_in_tiles(  # noqa: E731
                        params, x, dy, cos, sin, cfg, SEQ_MLP_TILE, t, lambda n, g: None
                    )
                    fwd = lambda t=tile: decoder_layer_in_tiles(params, x, cos, sin, cfg, t)  # noqa: E731
                else:
                    bwd = lambda: decoder_layer_backward(params, x, dy, cos, sin, cfg, SEQ_MLP_TILE, lambda n, g: None)  # noqa: E731
                    fwd = lambda: decoder_layer(params, x, cos, sin, cfg)  # noqa: E731
                for phase, fn in (("backward", bwd), ("forward", fwd)):
                    with torch.no_grad() if phase == "forward" else torch.enable_grad():
                        peak, ms = measure(fn)
                    predicted = layer_workspace(cfg, seq, SEQ_MLP_TILE, tile) if phase == "backward" else None
                    row = {
                        "model": model,
                        "seq": seq,
                        "seq_tile": tile,
                        "phase": phase,
                        "ms": ms,
                        "peak_extra_bytes": peak,
                        "bytes_per_token": peak / seq if peak else None,
                        "predicted_bytes": predicted,
                        "predicted_error": (predicted / peak - 1) if peak and predicted else None,
                    }
                    rows.append(row)
                    print(row, flush=True)
        torch.cuda.empty_cache()
    return rows


KEPT_WORKLOADS = {"llama-3.1-8b": [(32, 1024), (8, 2048), (16, 1024)]}


def kept_rows() -> list[dict]:
    """A kept layer (`Plan.activations` 'keep'): the autograd graph its forward leaves, and the peak of its
    backward beyond that graph (weights' gradients included), against `schedule.memory.kept_backward_workspace`."""
    rows = []
    for model, shapes in KEPT_WORKLOADS.items():
        cfg = load_model_config(model)
        params = layer_params(cfg, "cuda")
        for batch, seq in shapes:
            x, dy, cos, sin = layer_inputs(cfg, batch, seq)
            x.requires_grad_()
            for _ in range(2):  # the second, warm
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                out = decoder_layer(params, x, cos, sin, cfg)
                torch.cuda.synchronize()
                graph = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                grads = torch.autograd.grad(out, [x, *params.values()], dy)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
                del out, grads
            tokens = batch * seq
            row = {
                "model": model,
                "batch": batch,
                "seq": seq,
                "tokens": tokens,
                "kept_graph_bytes": graph,
                "backward_peak_beyond_graph_bytes": peak,
                "predicted_bytes": kept_backward_workspace(cfg, tokens),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-tiles", action="store_true", help="long sequences, whole and in sequence tiles")
    ap.add_argument("--kept", action="store_true", help="a kept layer: its graph, and its backward beyond it")
    a = ap.parse_args()
    if a.kept:
        command = f"python -m bench.layer_memory --kept --out {a.out}"
        write_result(a.out, {"command": command, **provenance(), "rows": kept_rows()})
        return
    if a.seq_tiles:
        command = f"python -m bench.layer_memory --seq-tiles --out {a.out}"
        write_result(a.out, {"command": command, **provenance(), "rows": seq_tile_rows()})
        return
    rows = []
    for model, shapes in WORKLOADS.items():
        cfg = load_model_config(model)
        params = layer_params(cfg, "cuda")
        for batch, seq in shapes:
            x, dy, cos, sin = layer_inputs(cfg, batch, seq)
            tokens = batch * seq

            def whole_layer_autograd() -> None:
                xi = x.detach().requires_grad_()
                y = decoder_layer(params, xi, cos, sin, cfg)
                torch.autograd.grad(y, [xi, *params.values()], dy)

            variants = {"autograd": whole_layer_autograd} | {
                f"tile{t}": (lambda t=t: decoder_layer_backward(params, x, dy, cos, sin, cfg, t, lambda n, g: None))
                for t in TILES
                if t == 0 or t < tokens
            }
            for name, fn in variants.items():
                peak, ms = measure(fn)
                row = {
                    "model": model,
                    "batch": batch,
                    "seq": seq,
                    "tokens": tokens,
                    "variant": name,
                    "ms": ms,
                    "peak_extra_bytes": peak,
                    "bytes_per_token": peak / tokens if peak else None,
                    "predicted_bytes": layer_workspace(cfg, tokens, int(name[4:])) if name != "autograd" else None,
                }
                rows.append(row)
                print(row, flush=True)
        torch.cuda.empty_cache()
    write_result(a.out, {"command": f"python -m bench.layer_memory --out {a.out}", **provenance(), "rows": rows})


if __name__ == "__main__":
    main()
