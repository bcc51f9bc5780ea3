"""The calibrate, simulate and plan commands end to end (on a CPU machine in CI)."""

import json

import torch

from slideformer.schedule.profile import Profile
from slideformer.cli import main
from slideformer.models import load_model_config

REPORT_FIELDS = {
    "fits",
    "batch",
    "seq",
    "predicted_step_s",
    "predicted_tokens_per_s",
    "predicted_tflops",
    "peak_gpu_bytes",
    "peak_host_bytes",
    "peak_disk_bytes",
    "bottleneck",
    "plan",
}


def test_calibrate_quick_measures_this_machine_into_a_loadable_profile(tmp_path):
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "calibrate",
                "--model",
                "tiny-llama",
                "--seq",
                "32",
                "--seq",
                "128",
                "--sequences",
                "1",
                "2",
                "--quick",
                "--max-chunk-tokens",
                "64",
                "--disk-dir",
                str(tmp_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    prof = Profile.load(out)
    assert prof.cpu_adamw_params_per_s and all(r > 0 for r in prof.cpu_adamw_params_per_s)
    assert prof.disk.read_bandwidth > 0 and prof.disk.write_bandwidth > 0
    # seq 32: one and two sequences; seq 128: one only (two would pass --max-chunk-tokens)
    assert [(t.seq, t.tokens) for t in prof.layers] == [(32, 32), (32, 64), (128, 128)]
    assert all(t.fwd_s > 0 for t in prof.layers)
    # the GPU's lines where there is one (a GPU machine), none without (CI)
    assert prof.has_gpu == torch.cuda.is_available() and (prof.h2d is not None) == torch.cuda.is_available()


def test_plan_for_8b_on_24_gib_fits_and_its_plan_simulates(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-3.1-8b",
                "--seq",
                "2048",
                "--gpu-mem",
                "24",
                "--host-mem",
                "120",
                "--batch",
                "8",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert REPORT_FIELDS <= set(report) and report["fits"] and report["batch"] == 8
    assert report["peak_gpu_bytes"] <= 24 * 2**30 and report["peak_host_bytes"] <= 120 * 2**30
    assert report["predicted_tokens_per_s"] == 8 * 2048 / report["predicted_step_s"]
    gantt = tmp_path / "g.png"
    assert main(["simulate", str(out), "--gantt", str(gantt), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out.split("wrote")[0])
    assert abs(sim["step_s"] - report["predicted_step_s"]) < 1e-9 and gantt.stat().st_size > 10_000


def test_plan_for_123b_in_120_gib_without_disk_is_refused_with_numbers(capsys):
    assert main(["plan", "--model", "mistral-large-123b", "--seq", "2048", "--host-mem", "120", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and report["plan"] is None and report["max_batch"] == 0
    assert any("host RAM needs at least 1356.8" in s for s in report["shortfalls"])


def test_simulate_with_a_cpu_only_profile_says_what_is_missing(tmp_path, capsys):
    prof = tmp_path / "cpu.json"
    main(["calibrate", "--model", "tiny-llama", "--seq", "32", "--sequences", "1", "--quick", "--out", str(prof)])
    assert main(["simulate", "examples/llama-3.1-8b-16l-offload.json", "--profile", str(prof)]) == 2
    assert "has no GPU measurements" in capsys.readouterr().err


def test_plan_says_when_the_longest_sequence_is_the_models_own_limit(capsys):
    assert main(["plan", "--model", "tiny-llama", "--seq", "32", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    longest = load_model_config("tiny-llama").max_position_embeddings
    assert f"max seq at batch 1: {longest} (the model's longest; more may fit)" in out
