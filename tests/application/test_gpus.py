"""`slideformer train --gpus N`: N processes (gloo on the CPU) train the run of one process with the same
sequences per step, write one run's files, and resume on another number of processes."""

import json
import math
from dataclasses import replace

import pytest

import slideformer
from bench.synthetic import chat_rows, make_model_dir, write_jsonl
from slideformer.checkpoint import STATE_FILE
from slideformer.models import PRESETS
from slideformer.train_config import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpus")
    rows = chat_rows(48)
    model = make_model_dir(tmp / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows)
    config = {
        "model": str(model),
        "data": [str(write_jsonl(rows, tmp / "chat.jsonl"))],
        "seq": 64,
        "batch": 2,
        "lr": 1e-3,
        "device": "cpu",
        "eval_fraction": 0.1,
        "report_to": [],
    }
    return tmp, config


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def states(summary: dict) -> dict:
    """The checkpoint's fp32 masters and AdamW states."""
    from safetensors.torch import load_file

    return load_file(f"{summary['checkpoint']}/{STATE_FILE}")


def assert_same_run(a: dict, b: dict, run_a, run_b) -> None:
    assert losses(run_a) == pytest.approx(losses(run_b), rel=1e-6)
    assert a["eval_loss_after"] == pytest.approx(b["eval_loss_after"], rel=1e-6)
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert (sa[name] - sb[name]).abs().max() <= 1e-5 * (1 + sb[name].abs().max()), name


def test_two_processes_train_the_run_of_one_with_the_same_sequences_per_step(setup):
    tmp, config = setup
    one = slideformer.train(config | {"output_dir": str(tmp / "one")}, accumulation=2, max_steps=3)
    two = slideformer.train(config | {"output_dir": str(tmp / "two")}, gpus=2, max_steps=3)
    assert two["steps"] == 3 and math.isfinite(two["last_loss"])
    assert_same_run(two, one, tmp / "two", tmp / "one")
    assert sorted(p.name for p in (tmp / "two").iterdir()) == sorted(p.name for p in (tmp / "one").iterdir())


def test_a_run_of_two_processes_resumes_on_one(setup):
    tmp, config = setup
    config = config | {"schedule": "constant"}  # the first run's 2 steps have the 3-step run's learning rates
    slideformer.train(config | {"output_dir": str(tmp / "moved")}, gpus=2, max_steps=2, save_every=1)
    resumed = slideformer.train(config | {"output_dir": str(tmp / "moved")}, accumulation=2, max_steps=3, resume=True)
    whole = slideformer.train(config | {"output_dir": str(tmp / "whole")}, accumulation=2, max_steps=3)
    assert_same_run(resumed, whole, tmp / "moved", tmp / "whole")
    with pytest.raises(ConfigError, match=r"sequences per step \(batch x accumulation x gpus\): 4 -> 2"):
        slideformer.train(config | {"output_dir": str(tmp / "moved")}, max_steps=4, resume=True)


def test_callbacks_need_torchrun_with_several_processes(setup):
    tmp, config = setup
    with pytest.raises(ConfigError, match="with gpus > 1, start the ranks with torchrun"):
        slideformer.finetune(config | {"output_dir": str(tmp / "cb")}, gpus=2, max_steps=1, callbacks=[print])
