"""Bad input fails before any GPU work, with a message that says what is wrong."""
import json

import pytest

from slideformer.cli import main
from slideformer.models import ModelConfigError, PRESETS, RandomWeights, load_model_config
from slideformer.plan import PlanError, uniform_plan
from slideformer.runtime import AdamWConfig, Engine


def test_unknown_preset():
    with pytest.raises(ModelConfigError, match="unknown model 'llama-9b'"):
        load_model_config("llama-9b")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelConfigError, match="unsupported architecture model_type='gpt2'"):
        load_model_config(str(tmp_path))


def test_plan_that_does_not_fit_the_gpu_is_refused_with_numbers():
    cfg = PRESETS["llama-3.1-8b"]
    plan = uniform_plan("llama-3.1-8b", cfg.num_layers, 8, 2048, chunk=8, window=4)
    with pytest.raises(PlanError, match=r"does not fit the GPU: needs .*weight_window 1\.63.*total 19\.54 GiB.*budget 8\.00 GiB"):
        # the check runs before any buffer is allocated, so it needs no GPU
        Engine(cfg, plan, RandomWeights(cfg), gpu_budget_bytes=8 * 2**30)


def test_clipping_needs_after_norm_schedule():
    cfg = PRESETS["tiny-llama"]
    plan = uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu")
    with pytest.raises(PlanError, match="update='after_norm'"):
        Engine(cfg, plan, RandomWeights(cfg), AdamWConfig(max_grad_norm=1.0))


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    plan = uniform_plan("tiny-llama", 4, 4, 32, chunk=3, device="cpu")
    plan.save(tmp_path / "p.json")
    assert main(["train", "--plan", str(tmp_path / "p.json")]) == 2
    assert "chunk 3 must divide batch 4" in capsys.readouterr().err


def test_cli_trains_a_plan_on_cpu(tmp_path, capsys):
    plan = uniform_plan("tiny-llama", 4, 4, 32, chunk=2, keep_last=1, device="cpu")
    plan.save(tmp_path / "p.json")
    assert main(["train", "--plan", str(tmp_path / "p.json"), "--steps", "2", "--lr", "1e-3"]) == 0
    assert capsys.readouterr().out.count("loss") == 2
