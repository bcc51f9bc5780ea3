"""The Python API does what the CLI does: a capacity report as `plan --json` prints it, a training run as
`train --config` makes it, bad settings refused with the setting's name."""
import json
import math
from dataclasses import replace

import pytest

import slideformer
from bench.synthetic import chat_rows, make_model_dir, write_jsonl
from slideformer.cli import main
from slideformer.models import PRESETS
from slideformer.train_config import ConfigError


def test_plan_is_the_cli_report(capsys):
    args = dict(gpu_mem_gib=20.0, host_mem_gib=60.0)
    report = slideformer.plan("llama-3.1-8b:4", 1024, 8, **args)
    assert main(["plan", "--model", "llama-3.1-8b:4", "--seq", "1024", "--batch", "8", "--gpu-mem", "20",
                 "--host-mem", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert report["fits"] and report["plan"]["batch"] == 8
    with pytest.raises(ConfigError, match="gpu_mem_gib must be > 0"):
        slideformer.plan("llama-3.1-8b:4", 1024, 8, gpu_mem_gib=0)


def test_train_takes_a_dict_with_overrides(tmp_path):
    rows = chat_rows(60)
    model_dir = make_model_dir(tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows)
    config = {"model": str(model_dir), "data": [str(write_jsonl(rows, tmp_path / "chat.jsonl"))], "seq": 64,
              "batch": 2, "lr": 1e-3, "device": "cpu", "output_dir": str(tmp_path / "run")}
    summary = slideformer.train(config, max_steps=3, eval_every=0)
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])
    assert (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(ConfigError, match="unknown training settings"):
        slideformer.train(config, learning_rate=1e-3)
