"""The `slideformer` command. Recipes live here; components stay in their packages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from functools import partial

from slideformer.schedule.profile import ProfileError
from slideformer.dataset import DataError
from slideformer.health import TrainingStopped
from slideformer.models import ModelConfigError, load_model_config
from slideformer.models.weights import CheckpointError
from slideformer.schedule.plan import Plan, PlanError
from slideformer.schedule.memory import GiB
from slideformer.runtime.disk import TierError
from slideformer.train_config import ConfigError, add_flags

DEFAULT_PROFILE = "h100-80gb"
# Failures the user causes and can fix: one line naming the thing and the fix, exit 2. OSError covers a
# missing or unreadable file and a full disk (its message names the file). Anything else is a bug.
EXPECTED_ERRORS = (
    ModelConfigError,
    PlanError,
    ProfileError,
    ConfigError,
    DataError,
    CheckpointError,
    TierError,
    OSError,
)


def cmd_train(a: argparse.Namespace) -> int:
    from slideformer.recipes.train import print_summary, train_from_config
    from slideformer.train_config import EXAMPLE, load_config

    if a.print_config:
        print(EXAMPLE, end="")
        return 0
    summary = train_from_config(load_config(a.config, a))
    if summary:  # under torchrun, ranks but the first have nothing to report
        print_summary(summary)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import torch

    from slideformer.recipes.demo import DEMO_STEPS, DEMO_TARGET, demo

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    steps = a.steps or DEMO_STEPS
    print(f"slideformer demo: a 2-layer model learns two-digit addition on {device} ({steps} steps)", flush=True)
    r = demo(steps, device, a.out)
    print(
        f"\nloss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, held-out loss {r['eval_loss_before']:.3f} -> "
        f"{r['eval_loss_after']:.3f}\nexact-match accuracy on 500 new problems: {r['accuracy_before']:.1%} -> "
        f"{r['accuracy_after']:.1%}  ({r['demo_seconds']:.0f} s)\ncheckpoint: {r['checkpoint']}"
    )
    if r["accuracy_after"] < DEMO_TARGET:
        print(
            f"slideformer demo: accuracy {r['accuracy_after']:.1%} is below the demo's {DEMO_TARGET:.0%}: "
            "please report it with this machine's CPU model",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from slideformer.calibrate.run import TimedPieces, calibrate
    from slideformer.runtime.disk import DiskTier

    models = [load_model_config(m) for m in a.model]
    prof = calibrate(
        TimedPieces(DiskTier),
        models,
        a.seq,
        a.sequences,
        a.disk_dir,
        quick=a.quick,
        name=a.name,
        max_chunk_tokens=a.max_chunk_tokens,
    )
    prof.save(a.out)
    parts = [
        f"H2D {prof.h2d.bandwidth / 1e9:.1f} GB/s" if prof.h2d else "",
        f"D2H {prof.d2h.bandwidth / 1e9:.1f} GB/s" if prof.d2h else "",
        f"GEMM {prof.gpu_bf16_flops / 1e12:.0f} TFLOPS" if prof.gpu_bf16_flops else "",
        f"CPU AdamW {prof.cpu_adamw_rate() / 1e9:.2f} Gparam/s",
        f"disk read {prof.disk.read_bandwidth / 1e9:.2f} / write {prof.disk.write_bandwidth / 1e9:.2f} GB/s"
        if prof.disk
        else "",
    ]
    print(f"wrote {a.out}: {prof.device}; " + ", ".join(p for p in parts if p))
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    from slideformer.api import simulate
    from slideformer.simulator import RESOURCE_NAMES
    from slideformer.simulator.gantt import draw

    plan = Plan.load(a.plan)
    sim = simulate(plan, a.profile)
    out = sim.summary()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{plan.model} batch {plan.batch} x seq {plan.seq}: {sim.step_s:.3f} s/step, {sim.tokens_per_s:,.0f} "
            f"tokens/s, {sim.tflops:.0f} TFLOPS; bottleneck {out['bottleneck']}\n"
            "busy: "
            + ", ".join(f"{RESOURCE_NAMES[k]} {v:.0%}" for k, v in sim.utilisation.items())
            + f"\npeak GPU {sim.peak_gpu_bytes / GiB:.2f} GiB, host {sim.host_memory_bytes / GiB:.2f} GiB, "
            f"disk {sim.disk_bytes / GiB:.2f} GiB"
        )
    if a.gantt:
        lo, hi = sim.step_ends[-2], sim.step_ends[-1]
        spans = [asdict(s) for s in sim.spans if s.end > lo and s.start < hi]
        draw([(f"simulated step ({a.profile})", spans, sim.gpu_memory)], a.gantt, window=(lo, hi))
        print(f"wrote {a.gantt}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from slideformer.api import plan as capacity
    from slideformer.planner.report import render

    # Checked here too, so that errors name the flags (the API names its own arguments).
    problems = [
        f"{flag} must be > 0, got {v}"
        for flag, v in (("--gpu-mem", a.gpu_mem), ("--host-mem", a.host_mem), ("--max-grad-norm", a.max_grad_norm))
        if v is not None and not v > 0
    ]
    if a.disk is not None and not a.disk >= 0:
        problems.append(f"--disk must be >= 0, got {a.disk}")
    if a.seq < 2:
        problems.append(f"--seq must be >= 2, got {a.seq}")
    if a.batch != "auto" and not (a.batch.isdigit() and int(a.batch) >= 1):
        problems.append(f"--batch must be 'auto' or an integer >= 1, got {a.batch!r}")
    if a.gpus < 1:
        problems.append(f"--gpus must be >= 1, got {a.gpus}")
    if problems:
        raise ConfigError("; ".join(problems))
    report = capacity(
        a.model,
        a.seq,
        None if a.batch == "auto" else int(a.batch),
        gpu_mem_gib=a.gpu_mem,
        host_mem_gib=a.host_mem,
        disk_gib=a.disk or 0.0,
        profile=a.profile,
        clip=a.max_grad_norm is not None,
        gpus=a.gpus,
    )
    if a.out and report["fits"]:
        plan = Plan(**report["plan"])
        plan.save(a.out)
    print(json.dumps(report, indent=2) if a.json else render(report))
    if a.out and report["fits"] and not a.json:
        print(f"wrote {a.out} (use it: slideformer train --config CONFIG --plan {a.out})")
    return 0 if report["fits"] else 2


def cmd_model(a: argparse.Namespace) -> int:
    cfg = load_model_config(a.model)
    shape = {k: v for k, v in cfg.to_dict().items() if k not in ("hf_config", "hf_layer_shapes")}
    if cfg.hf_config:  # an architecture run through its own modules: name it, and its layer's tensors
        shape |= {"model_type": cfg.to_hf()["model_type"], "layer_tensors": dict(cfg.hf_layer_shapes)}
    print(json.dumps({**shape, "total_params": cfg.total_params, "layer_params": cfg.layer_params}, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slideformer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error (or set SLIDEFORMER_DEBUG=1)"
    )
    add = partial(sub.add_parser, parents=[common])

    p = add("plan", help="capacity report: does it fit, how fast, what limits it; --out writes the plan")
    p.add_argument("--model", required=True, help="preset (optionally NAME:LAYERS), config.json or model directory")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--batch", default="auto", help="sequences per step, or 'auto' (default)")
    p.add_argument("--gpu-mem", type=float, help="GPU budget in GiB (default: 92%% of the profile's GPU)")
    p.add_argument("--host-mem", type=float, help="host RAM budget in GiB (default: 90%% of the profile's)")
    p.add_argument("--disk", type=float, help="disk budget in GiB for layers' states (default 0: none on disk)")
    p.add_argument("--max-grad-norm", type=float, help="plan for global-norm clipping (update after the norm)")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="data-parallel GPUs of this host (default 1): --batch and --gpu-mem are per GPU, --host-mem for all",
    )
    p.add_argument(
        "--profile", default=DEFAULT_PROFILE, help="profile JSON or committed name (h100-80gb, rtx4090-spec)"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", help="write the chosen plan here when it fits")
    p.set_defaults(func=cmd_plan)

    t = add("train", help="fine-tune from a YAML config (every key is also a flag)")
    t.add_argument("--config", help="YAML config (see --print-config)")
    t.add_argument("--print-config", action="store_true", help="print a commented example config and exit")
    add_flags(t)
    t.set_defaults(func=cmd_train)

    d = add("demo", help="train a small model on generated addition problems (about a minute on CPU)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's 600)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)

    s = add("simulate", help="predict a plan's step: time, utilisation, bottleneck, memory; Gantt PNG")
    s.add_argument("plan")
    s.add_argument("--profile", default=DEFAULT_PROFILE)
    s.add_argument("--gantt", help="write a Gantt chart with the GPU memory timeline (PNG)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)

    c = add("calibrate", help="measure this machine into a profile JSON")
    c.add_argument("--out", default="profile.json")
    c.add_argument("--model", action="append", default=[], help="measure this model's layer shapes (repeatable)")
    c.add_argument("--seq", type=int, action="append", help="sequence lengths for the layer timings (repeatable)")
    c.add_argument("--sequences", type=int, nargs="+", default=[1, 2, 4, 8], help="sequences per chunk to time")
    c.add_argument(
        "--max-chunk-tokens",
        type=int,
        default=None,
        help="time only chunks up to this many tokens at each --seq (one sequence always): long and short "
        "sequences in one call, e.g. --seq 1024 --seq 65536 --sequences 1 8 32 --max-chunk-tokens 65536",
    )
    c.add_argument("--disk-dir", help="directory to measure disk read/write in (default: not measured)")
    c.add_argument("--name", help="profile name (default: the GPU's name)")
    c.add_argument("--quick", action="store_true", help="small sizes: a smoke run, rough numbers")
    c.set_defaults(func=cmd_calibrate, seq=None)

    m = add("model", help="print a model's shape and parameter count")
    m.add_argument("model", help="preset (optionally NAME:LAYERS), config.json or model directory")
    m.set_defaults(func=cmd_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "calibrate" and not a.seq:
        a.seq = [2048]
    debug = a.debug or os.environ.get("SLIDEFORMER_DEBUG", "") not in ("", "0")
    try:
        return a.func(a)
    except TrainingStopped as e:
        print(f"slideformer: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        print(f"slideformer: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("slideformer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"slideformer: internal error: {type(e).__name__}: {one_line(e)} (a bug; rerun with --debug or "
            "SLIDEFORMER_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
