"""Re-time only the model's decoder layer at some sequence lengths (what `slideformer calibrate` times with
everything else) into a copy of an existing profile, for a lease too short for a whole calibration: the
forward, the recomputing backward, the backward from a saved attention (`Plan.saved_attention`), the kept
graph's backward and the sequence tiles, each entry replacing the profile's entry of the same shape, length
and chunk. The timings also go to a result file, with what saving the attention takes off each backward.

    python -m bench.layer_timings h200-2026-12-02-D profile.json --seq 32768 --seq 65536 --name X --out timings.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from bench.common import provenance, write_result
from slideformer.calibrate.measure import layer_timings
from slideformer.models import load_model_config
from slideformer.schedule.profile import Profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", help="a committed profile name or JSON path")
    ap.add_argument("new_profile", help="where to write the profile with the new layer timings")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--seq", type=int, action="append", required=True, help="sequence length (repeatable)")
    ap.add_argument("--sequences", type=int, nargs="+", default=[1], help="sequences per chunk to time")
    ap.add_argument("--out", required=True, help="the result file")
    ap.add_argument("--name", help="the new profile's name (default: the old one's)")
    a = ap.parse_args()
    cfg, prof = load_model_config(a.model), Profile.load(a.profile)
    timed = [t for seq in a.seq for t in layer_timings(cfg, seq, a.sequences, "cuda")]
    key = lambda t: (t.shape(), t.seq, t.tokens, t.seq_tile)  # noqa: E731
    new = {key(t) for t in timed}
    prof.layers = [t for t in prof.layers if key(t) not in new] + timed
    prof.name = a.name or prof.name
    prof.notes = f"{prof.notes} Layer timings at seq {a.seq} re-timed by bench.layer_timings.".strip()
    prof.save(a.new_profile)
    rows = [
        asdict(t)
        | {"saved_attention_saves_s": t.bwd_recompute_s - t.bwd_saved_attention_s if t.bwd_saved_attention_s else 0}
        for t in timed
    ]
    write_result(
        a.out, {"command": "python -m bench.layer_timings " + " ".join(sys.argv[1:]), **provenance(), "layers": rows}
    )


if __name__ == "__main__":
    main()
