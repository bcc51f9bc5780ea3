"""A fine-tuning run on the GPU machine with a kill and a resume, recorded as a results note.

    python -m bench.finetune --out results.json --workdir /tmp/ft

A chat JSONL and a tokenizer are generated locally (bench/synthetic.py; no downloads), the model is the
Llama-3.1-8B shape cut to a few layers with random weights (the machine's 64 GB disk must hold two
checkpoints of 12 bytes of training state per parameter). `slideformer train` runs with checkpoints every
`--save-every` steps, is killed with SIGKILL after step `--kill-after`, and is resumed with --resume to
finish; the steps the killed run logged after its last checkpoint are compared with their replay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import provenance
from bench.synthetic import chat_rows, make_tokenizer, write_jsonl


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model", default="llama-3.1-8b:4")
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=15)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = chat_rows(a.rows, seed=1)
    make_tokenizer(work / "tokenizer", [m["content"] for r in rows[:2000] for m in r["messages"]])
    config = {
        "model": a.model,
        "tokenizer": str(work / "tokenizer"),
        "data": [str(write_jsonl(rows, work / "chat.jsonl"))],
        "eval_fraction": 0.02,
        "seq": a.seq,
        "batch": a.batch,
        "lr": 2e-5,
        "warmup_steps": 4,
        "max_steps": a.steps,
        "save_every": a.save_every,
        "eval_every": a.save_every,
        "keep_checkpoints": 1,
        "output_dir": str(work / "run"),
        "plan": "auto",
        "profile": "h100-80gb",
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "slideformer.cli", "train", "--config", str(work / "config.yaml")]
    log = (work / "train.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None and not any(
        m.get("step") == a.kill_after and "loss" in m for m in metrics(work / "run" / "metrics.jsonl")
    ):
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit(
            f"training ended (code {proc.returncode}) before step {a.kill_after}: "
            + (work / "train.log").read_text()[-2000:]
        )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time() - t0
    before = metrics(work / "run" / "metrics.jsonl")
    latest = (work / "run" / "checkpoints" / "LATEST").read_text()
    t1 = time.time()
    resumed = subprocess.run(cmd + ["--resume"], stdout=log, stderr=subprocess.STDOUT)
    after = metrics(work / "run" / "metrics.jsonl")
    loss_before = {m["step"]: m["loss"] for m in before if "loss" in m}
    loss_after = {m["step"]: m["loss"] for m in after if "loss" in m}
    replayed = {s: (loss_before[s], loss_after[s]) for s in loss_before if s > a.save_every and s in loss_after}
    ckpt = work / "run" / "checkpoints" / (work / "run" / "checkpoints" / "LATEST").read_text()
    resumed_step_s = [m["step_s"] for m in after if m.get("step", 0) > a.save_every + 1 and "step_s" in m]
    record = {
        "command": "python -m bench.finetune " + " ".join(sys.argv[1:]),
        **provenance(),
        "config": config,
        "plan": json.loads((work / "run" / "plan.json").read_text()),
        "killed_after_step": a.kill_after,
        "killed_at_s": killed_at,
        "checkpoint_at_kill": latest,
        "resume_returncode": resumed.returncode,
        "resume_s": time.time() - t1,
        "losses": loss_after,
        "eval": [m for m in after if "eval_loss" in m],
        "replayed_steps": replayed,
        "replay_identical": all(x == y for x, y in replayed.values()),
        "mean_step_s_resumed": sum(resumed_step_s) / max(1, len(resumed_step_s)),
        "tokens_per_s": [m["tokens_per_s"] for m in after if "tokens_per_s" in m],
        "peak_gpu_gib": max((m["gpu_gib"] for m in after if "gpu_gib" in m), default=None),
        "peak_host_gib": max((m["host_gib"] for m in after if "host_gib" in m), default=None),
        "final_checkpoint": sorted(p.name for p in ckpt.iterdir()),
        "final_checkpoint_gb": sum(p.stat().st_size for p in ckpt.iterdir()) / 1e9,
        "summary": json.loads((work / "run" / "summary.json").read_text())
        if (work / "run" / "summary.json").exists()
        else None,
        "log_tail": (work / "train.log").read_text()[-3000:],
    }
    Path(a.out).write_text(json.dumps(record, indent=1))
    print(
        json.dumps(
            {k: v for k, v in record.items() if k not in ("log_tail", "tokens_per_s", "plan", "config")}, indent=1
        )
    )


if __name__ == "__main__":
    main()
