"""One command for the benchmark suites; each configuration runs in its own process, results merge into
one JSON with the command, date, device and commit.

    python -m bench.run --suite main   # ours (plans) + the GPU-resident ceiling, 16-layer Llama-3.1-8B shape
    python -m bench.run --suite peer   # DeepSpeed ZeRO-3 and ZeRO-2 offload + ours again, same lease
    python -m bench.run --suite big    # full 32-layer Llama-3.1-8B shape with the GPU capped at 24 GiB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import provenance

OURS_FULL_OFFLOAD = ["--window", "3", "--activation", "offload", "--keep-last", "1"]
OURS_GPU_SHARE = OURS_FULL_OFFLOAD + ["--gpu-units", "6"]

SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "main": [
        ("ours-offload-w2", ["bench.ours", "--window", "2", "--activation", "offload"]),
        ("ours-offload-w3-keep1", ["bench.ours", *OURS_FULL_OFFLOAD]),
        ("ours-recompute-w3-keep1", ["bench.ours", "--window", "3", "--activation", "recompute", "--keep-last", "1"]),
        ("ours-offload-gpu6", ["bench.ours", *OURS_GPU_SHARE]),
        ("ours-after-norm", ["bench.ours", *OURS_FULL_OFFLOAD, "--update", "after_norm"]),
        ("resident", ["bench.resident"]),
    ],
    "peer": [
        ("zero3", ["bench.deepspeed_zero", "--stage", "3"]),
        ("zero2", ["bench.deepspeed_zero", "--stage", "2"]),
        ("ours-offload-w3-keep1", ["bench.ours", *OURS_FULL_OFFLOAD]),
        ("ours-offload-gpu6", ["bench.ours", *OURS_GPU_SHARE]),
    ],
    "big": [
        (
            "ours-8b-32l-24gib",
            [
                "bench.ours",
                "--model",
                "llama-3.1-8b",
                "--window",
                "2",
                "--activation",
                "offload",
                "--chunk",
                "4",
                "--loss-chunk",
                "2048",
                "--gpu-cap-gib",
                "24",
            ],
        ),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--only", default=None, help="comma-separated run names of the suite")
    ap.add_argument("--out", required=True, help="JSON file for the merged results")
    a = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in SUITES[a.suite]:
            if a.only and name not in a.only.split(","):
                continue
            path = Path(tmp) / f"{name}.json"
            args = [sys.executable, "-m", *cmd, "--out", str(path)] + (
                ["--name", name] if cmd[0] == "bench.ours" else []
            )
            print("+", " ".join(args[1:]), flush=True)
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0 or not path.exists():
                runs[name] = {"error": (proc.stdout + proc.stderr)[-4000:], "returncode": proc.returncode}
                print(f"  {name} FAILED:\n{runs[name]['error'][-1500:]}", flush=True)
                continue
            runs[name] = json.loads(path.read_text())
            r = runs[name]
            print(
                f"  {name}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, {r['model_tflops']:.0f} TFLOPS, "
                f"GPU {r['peak_gpu_allocated_gib']:.1f} GiB, host {r['peak_host_rss_gib']:.1f} GiB",
                flush=True,
            )
    record = {"command": "python -m bench.run " + " ".join(sys.argv[1:]), **provenance(), "runs": runs}
    ok = {k: v for k, v in runs.items() if "tokens_per_s" in v}
    for peer in ("zero3", "zero2", "resident"):
        if peer in ok:
            record[f"speedup_vs_{peer}"] = {
                k: v["tokens_per_s"] / ok[peer]["tokens_per_s"] for k, v in ok.items() if k.startswith("ours")
            }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k.startswith("speedup")}, indent=1))


if __name__ == "__main__":
    main()
