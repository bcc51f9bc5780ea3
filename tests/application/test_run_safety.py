"""A run's work is protected: divergence stops it before anything diverged is saved, checkpoints are verified
on resume (falling back past a damaged one), a resumed run must be the same run, an output_dir holds one run
at a time, a full disk is a clear error, and SIGTERM saves at the next step and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import yaml

from bench.synthetic import chat_rows, make_model_dir, write_jsonl
from slideformer.health import TrainingStopped
from slideformer.models import PRESETS
from slideformer.models.weights import CheckpointError
from slideformer.recipes.train import train_from_config
from slideformer.train_config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    rows = chat_rows(120)
    model = make_model_dir(d / "model", replace(PRESETS["tiny-llama"], vocab_size=512), rows)
    return d, model, write_jsonl(rows, d / "chat.jsonl")


def config(job, out, **kw) -> TrainConfig:
    d, model, data = job
    cfg = TrainConfig(
        **{
            "model": str(model),
            "data": [str(data)],
            "seq": 32,
            "batch": 2,
            "lr": 1e-3,
            "schedule": "constant",
            "max_steps": 4,
            "save_every": 1,
            "keep_checkpoints": 3,
            "device": "cpu",
            "output_dir": str(d / out),
        }
        | kw
    )
    cfg.validate()
    return cfg


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def steps(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_divergence_stops_the_run_and_keeps_the_finite_checkpoints(job):
    d = job[0]
    with pytest.raises(
        TrainingStopped,
        match=r"step \d+: loss .*, gradient norm nan: training diverged and stopped "
        r"\(the newest checkpoint, step-0+\d+, is from before it\)",
    ):
        train_from_config(config(job, "diverged", lr=1e7, warmup_steps=4, max_steps=20, keep_checkpoints=2))
    rows = [json.loads(line) for line in (d / "diverged" / "metrics.jsonl").read_text().splitlines()]
    norms = {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}
    bad = max(norms)
    assert bad >= 3 and [s for s, v in norms.items() if v != v] == [bad]  # stopped at the first non-finite step
    assert steps(d / "diverged") == [f"step-{bad - 2:06d}", f"step-{bad - 1:06d}"]  # both finite, nothing later


def test_nonfinite_skip_leaves_the_weights_of_a_nonfinite_step_alone(job, capsys):
    import torch
    from safetensors.torch import load_file

    d = job[0]
    train_from_config(config(job, "skipped", lr=1e7, warmup_steps=4, max_steps=12, nonfinite="skip"))
    assert "gradient norm nan: skipped (no update)" in capsys.readouterr().err
    state = load_file(d / "skipped" / "checkpoints" / "step-000012" / "training_state.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_resume_falls_back_past_a_damaged_checkpoint_and_says_which(job, capsys):
    d = job[0]
    train_from_config(config(job, "damaged"))
    root = d / "damaged" / "checkpoints"
    state = root / "step-000004" / "training_state.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the optimizer state
    state.write_bytes(bytes(data))
    (root / "LATEST").unlink()
    capsys.readouterr()
    summary = train_from_config(config(job, "damaged", resume=True, max_steps=6))
    err = capsys.readouterr().err
    assert "resume: skipping step-000004: training_state.safetensors fails its checksum" in err
    assert "resume: from step-000003" in err and summary["resumed_from"] == 3
    assert steps(d / "damaged")[-1] == "step-000006" and (root / "LATEST").read_text() == "step-000006"
    assert steps(d / "damaged") == ["step-000004", "step-000005", "step-000006"]  # the damaged step 4 was replaced
    (root / "step-000006" / "trainer_state.json").write_text("{}")
    (root / "step-000005" / "manifest.json").unlink()  # as a kill during its save would leave it
    with pytest.raises(ConfigError, match="at step 4, the run ends at step 4"):
        train_from_config(config(job, "damaged", resume=True, max_steps=4))
    err = capsys.readouterr().err
    assert "step-000006: trainer_state.json is truncated or overwritten (2 bytes" in err
    assert "step-000005: no manifest.json" in err and "resume: from step-000004" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 2e-3}, "lr: 0.001 -> 0.002"),
        ({"batch": 4}, "batch: 2 -> 4"),
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"eval_fraction": 0.1}, "eval_fraction: 0.0 -> 0.1"),
        ({"max_steps": 3}, "at step 4, the run ends at step 3"),
        ({"max_steps": 4}, "at step 4, the run ends at step 4; raise max_steps"),
    ],
)
def test_resume_refuses_a_changed_run(job, change, message):
    d = job[0]
    if not (d / "base").exists():
        train_from_config(config(job, "base"))
    with pytest.raises(ConfigError, match=message):
        train_from_config(config(job, "base", resume=True, **change))


def test_resume_refuses_changed_data_content(job, tmp_path):
    d, _, data = job
    copy = tmp_path / "chat.jsonl"
    copy.write_text(data.read_text())
    train_from_config(config(job, "data", data=[str(copy)]))
    copy.write_text(data.read_text().replace("plus", "and"))
    with pytest.raises(ConfigError, match="the tokenized data"):
        train_from_config(config(job, "data", data=[str(copy)], resume=True, max_steps=6))


def test_an_output_dir_holds_one_run(job):
    from slideformer.run_dir import claim_output_dir

    d = job[0]
    train_from_config(config(job, "one", max_steps=2))
    with pytest.raises(ConfigError, match="already holds a run .* --resume, replace it with --overwrite"):
        train_from_config(config(job, "one", max_steps=2))
    assert losses(d / "one") and steps(d / "one") == ["step-000001", "step-000002"]
    with claim_output_dir(d / "one", resume=True, overwrite=False):  # another run holds it
        with pytest.raises(
            ConfigError, match=f"output_dir {d / 'one'} is in use by another run \\(pid {os.getpid()}\\)"
        ):
            train_from_config(config(job, "one", resume=True, max_steps=3))
    train_from_config(config(job, "one", max_steps=1, overwrite=True))
    assert steps(d / "one") == ["step-000001"] and list(losses(d / "one")) == [1]


def test_a_full_disk_is_a_clear_error(job, monkeypatch):
    import shutil

    import slideformer.checkpoint as ckpt

    d = job[0]
    usage = shutil.disk_usage(d)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"a checkpoint needs 0\.0\d+ GiB in .*full, only 9.31e-07 GiB free"):
        train_from_config(config(job, "full"))
    monkeypatch.undo()

    from safetensors import SafetensorError

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    def no_space_in_safetensors(*a, **kw):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    for where, fail in (("write_safetensors", no_space), ("save_hf_checkpoint", no_space_in_safetensors)):
        with monkeypatch.context() as m:
            m.setattr(ckpt, where, fail)
            with pytest.raises(
                CheckpointError,
                match=r"checkpoint step-000001: the disk filled up in .* \(it needs "
                r"0\.0\d+ GiB\)",
            ):
                train_from_config(config(job, "full", resume=False, overwrite=True))
        assert not list((d / "full" / "checkpoints").iterdir())  # the partial step-000001.tmp is gone


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_matches(job):
    d = job[0]
    cfg = config(job, "x", max_steps=100000, save_every=0)
    path = d / "signal.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in vars(cfg).items() if k != "output_dir"}))
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # deterministic CPU kernels, as in the SIGKILL test

    def train(out, *extra):
        cmd = [
            sys.executable,
            "-m",
            "slideformer.cli",
            "train",
            "--config",
            str(path),
            "--output-dir",
            str(d / out),
            *extra,
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    proc = train("stopped")
    metrics = d / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = max(losses(d / "stopped"))
    assert err.strip().splitlines()[-1] == (
        f"slideformer: stopped by SIGTERM after step {last}: saved "
        f"{d / 'stopped' / 'checkpoints' / f'step-{last:06d}'}; continue with --resume"
    )
    resumed = train("stopped", "--resume", "--max-steps", str(last + 2))
    straight = train("straight", "--max-steps", str(last + 2))
    for p in (resumed, straight):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert losses(d / "stopped") == losses(d / "straight")  # bit for bit


def test_a_second_signal_stops_at_once():
    from slideformer.recipes.train import StopRequests

    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("preset", [None, "backend:native"])
def test_importing_slideformer_sets_expandable_segments_unless_the_user_chose(preset):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if preset:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    out = subprocess.run(
        [sys.executable, "-c", "import os, slideformer.runtime; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == (preset or "expandable_segments:True")
