"""Measure only the streamed-update copy rates (what `slideformer calibrate` measures with everything else) into
a copy of an existing profile, for a lease too short for a whole calibration.

    python -m bench.streamed_rates h100-80gb-2026-11-25 profile.json
"""

from __future__ import annotations

import argparse

from slideformer.calibrate import measure
from slideformer.models import load_model_config
from slideformer.schedule.plan import STATE_STAGING_BUFFERS, Plan
from slideformer.schedule.profile import Profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", help="a committed profile name or JSON path")
    ap.add_argument("out", help="where to write the profile with the two rates")
    ap.add_argument("--model", default="llama-3.1-8b", help="whose layer size the pieces come from")
    ap.add_argument("--transfer-chunk-mb", type=int, default=64)
    a = ap.parse_args()
    prof = Profile.load(a.profile)
    piece = Plan(model=a.model, batch=1, seq=2, chunk=1, transfer_chunk_mb=a.transfer_chunk_mb).state_piece_numel
    numel = load_model_config(a.model).layer_params
    rates = measure.streamed_update_bandwidths(numel, piece, STATE_STAGING_BUFFERS, measure.BackgroundAdamW(numel))
    prof.streamed_in_bandwidth, prof.streamed_out_bandwidth = rates
    print(f"streamed in {rates[0] / 1e9:.1f} GB/s, out {rates[1] / 1e9:.1f} GB/s")
    prof.save(a.out)


if __name__ == "__main__":
    main()
