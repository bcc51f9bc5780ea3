"""Plans, predictions and CPU training results, to show a refactor preserves behaviour.

    python -m bench.identity snapshot before.json        # at the commit before
    python -m bench.identity snapshot after.json         # at the commit after
    python -m bench.identity compare before.json after.json --out bench/results/identity-X.json

The snapshot: the planner's choice, predicted step and peaks for 15 (profile, model, workload, budget)
cases, the losses and a checksum of every saved state tensor of 7 small CPU training runs (offload,
late updates, MLP tiles, kept graphs, streamed layers, after-norm with GPU-placed units, a ring of one), and
a digest of every op record and edge of the step graphs of 240 small plans.
"""

import hashlib
import itertools
import json
import sys
from dataclasses import asdict

import torch

from slideformer.schedule.profile import Profile
from slideformer.schedule.plan import uniform_plan
from slideformer.models import PRESETS, RandomWeights, load_model_config
from slideformer.planner.search import Budgets, choose_plan
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.graph import build_step_graph, ops


def graph_digests() -> dict[str, str]:
    """SHA-256 of each step graph's op records, edges and cross-step maps, over a grid of tiny-llama plans."""
    cfg, out = PRESETS["tiny-llama"], {}
    grid = itertools.product(
        ["offload", "recompute", "disk"],
        ["during_backward", "after_norm"],
        [0, 2],
        [0, 2],
        [(), (0, 2)],
        [0, 2],
        [1, 2],
        [2, 3],
    )
    for act, update, gpu_units, disk, streamed, late, ring, window in grid:
        if update == "after_norm" and (streamed or late):
            continue
        kw = dict(
            activation=act,
            update=update,
            gpu_units=gpu_units,
            disk_layers=disk,
            streamed_layers=streamed,
            late_updates=late,
            grad_ring=ring,
            window=window,
            keep_last=1,
        )
        g = build_step_graph(cfg, uniform_plan("tiny-llama", cfg.num_layers, 4, 32, chunk=2, device="cpu", **kw))
        record = [
            [asdict(o) for o in ops(g)],
            sorted(g.edges),
            g.graph["after_previous_step"],
            g.graph["updates"],
            g.graph["disk_slot"],
        ]
        out[json.dumps(kw)] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return out


def snapshot() -> dict:
    out = {"plans": {}, "losses": {}, "graphs": graph_digests()}
    for prof_name in ("h100-80gb", "h100-80gb-2026-11-25", "rtx4090-spec"):
        prof = Profile.load(prof_name)
        for model, seq, batch, gpu, host, disk in [
            ("llama-3.1-8b", 2048, 8, 22, 121, 0),
            ("llama-3.1-8b", 1024, 8, 22, 121, 0),
            ("llama-3.1-8b", 65536, 1, 22, 112, 0),
            ("qwen3-14b", 2048, 8, 72.8, 105.8, 59.6),
            ("llama-3.1-8b:16", 2048, 8, 72, 105, 0),
        ]:
            cfg = load_model_config(model)
            key = f"{prof_name}/{model}/{seq}x{batch}"
            try:
                v = choose_plan(
                    cfg, model, seq, batch, prof, Budgets(int(gpu * 2**30), int(host * 2**30), int(disk * 2**30))
                )
            except ValueError as e:
                out["plans"][key] = str(e)
                continue
            out["plans"][key] = (
                None
                if not v.fits
                else {
                    "plan": asdict(v.plan),
                    "step": v.simulation.step_s,
                    "gpu": v.simulation.peak_gpu_bytes,
                    "host": v.simulation.host_memory_bytes,
                }
            )
    cfg = PRESETS["tiny-llama"]
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, cfg.vocab_size, (4, 32), generator=g), torch.randint(0, cfg.vocab_size, (4, 32), generator=g))
        for _ in range(3)
    ]
    for name, kw in {
        "offload": dict(activation="offload"),
        "late": dict(activation="offload", late_updates=3),
        "tiles": dict(activation="recompute", mlp_tile_tokens=24),
        "keep": dict(window=3, keep_last=2),
        "streamed": dict(activation="offload", streamed_layers=(0, 2), late_updates=2),
        "after_norm": dict(update="after_norm", gpu_units=2),
        "ring1": dict(grad_ring=1),
    }.items():
        plan = uniform_plan("tiny-llama", cfg.num_layers, 4, 32, chunk=2, device="cpu", **kw)
        e = Engine(cfg, plan, RandomWeights(cfg, seed=2), AdamWConfig(lr=1e-3))
        out["losses"][name] = [e.train_step(i, l).loss for i, l in data]
        out["losses"][name + "/state"] = {k: float(v.double().sum()) for k, v in e.training_state().items()}
        e.close()
    return out


def main() -> None:
    if sys.argv[1] == "snapshot":
        json.dump(snapshot(), open(sys.argv[2], "w"), indent=1, sort_keys=True)
        return
    before, after = (json.load(open(p)) for p in sys.argv[2:4])
    differ = sorted(f"{sec}/{k}" for sec in before for k in before[sec] if before[sec][k] != after[sec].get(k))
    record = {
        "command": "python -m bench.identity " + " ".join(sys.argv[1:]),
        "identical": not differ,
        "differ": differ,
        "cases": sorted(f"{sec}/{k}" for sec in before for k in before[sec]),
    }
    json.dump(record, open(sys.argv[sys.argv.index("--out") + 1], "w"), indent=1)
    print("identical" if not differ else f"{len(differ)} differ: {differ}")


if __name__ == "__main__":
    main()
