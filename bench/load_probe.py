"""The fp32 weight stream's rate beside a layer's recompute + backward (what bounds small-batch steps), for
staging rings of 1 and 4 buffers, with and without the high-priority cast stream; ring 1 without priority
is the design before `runtime/weight_stream.py`.

    python -m bench.load_probe --out bench/results/X.json
"""

from __future__ import annotations

import argparse

from bench.common import provenance, write_result
from slideformer.calibrate.measure import staged_load_bandwidth
from slideformer.models import load_model_config
from slideformer.runtime.weight_stream import WeightStream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_model_config("llama-3.1-8b")
    rows = []
    for seq, sequences in ((1024, 8), (2048, 8)):
        for buffers, priority in ((1, False), (1, True), (4, False), (4, True)):
            rate = staged_load_bandwidth(WeightStream, cfg, seq, sequences, 64 * 2**20, buffers, priority)
            rows.append(
                {
                    "seq": seq,
                    "sequences": sequences,
                    "buffers": buffers,
                    "cast_priority": priority,
                    "gb_per_s": rate / 1e9,
                }
            )
            print(rows[-1], flush=True)
    write_result(a.out, {"command": f"python -m bench.load_probe --out {a.out}", **provenance(), "rows": rows})


if __name__ == "__main__":
    main()
