"""Measure only the rates of the host's memory shared between the CPU update and PCIe (what `slideformer
calibrate` measures with everything else) into a copy of an existing profile, for a lease too short for a
whole calibration: the host-to-GPU link beside the CPU's AdamW (alone and with copies out too) and the CPU
update, plain and one-pass with the bf16 cast, under PCIe traffic.

    python -m bench.link_rates h200-2026-12-01-late-onepass profile.json
"""

from __future__ import annotations

import argparse

from slideformer.calibrate import measure
from slideformer.calibrate.run import measure_beside_update
from slideformer.models import load_model_config
from slideformer.schedule.profile import Profile

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", help="a committed profile name or JSON path")
    ap.add_argument("out", help="where to write the profile with the new rates")
    ap.add_argument("--model", default="llama-3.1-8b", help="whose layer size the CPU updates run on")
    ap.add_argument("--name", help="the new profile's name (default: the old one's)")
    ap.add_argument("--note", default="", help="appended to the profile's notes")
    a = ap.parse_args()
    prof = Profile.load(a.profile)
    measure_beside_update(prof, load_model_config(a.model).layer_params, measure.BackgroundCopies(), 256 * MiB)
    prof.name = a.name or prof.name
    prof.notes = f"{prof.notes} {a.note}".strip()
    print(
        f"H2D beside the update {prof.h2d_beside_update_bandwidth / 1e9:.1f} GB/s alone, "
        f"{prof.h2d_beside_update_duplex_bandwidth / 1e9:.1f} with copies out; CPU update under copies "
        f"{prof.cpu_adamw_busy_params_per_s / 1e9:.2f} G params/s, one-pass with cast "
        f"{prof.cpu_adamw_cast_busy_params_per_s / 1e9:.2f}"
    )
    prof.save(a.out)


if __name__ == "__main__":
    main()
