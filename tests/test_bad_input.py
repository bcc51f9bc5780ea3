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
    with pytest.raises(PlanError, match=r"does not fit the GPU: needs .*weight_window 1\.63.*total 15\.33 GiB.*budget 8\.00 GiB"):
        # the check runs before any buffer is allocated, so it needs no GPU
        Engine(cfg, plan, RandomWeights(cfg), gpu_budget_bytes=8 * 2**30)


def test_clipping_needs_after_norm_schedule():
    cfg = PRESETS["tiny-llama"]
    plan = uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu")
    with pytest.raises(PlanError, match="update='after_norm'"):
        Engine(cfg, plan, RandomWeights(cfg), AdamWConfig(max_grad_norm=1.0))


def tiny_job(tmp_path, rows=None):
    from dataclasses import replace

    from bench.synthetic import chat_rows, make_model_dir, write_jsonl
    rows = rows or chat_rows(40)
    model = make_model_dir(tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512), chat_rows(40))
    return model, write_jsonl(rows, tmp_path / "chat.jsonl")


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    model, data = tiny_job(tmp_path)
    plan = uniform_plan(str(model), 4, 4, 32, chunk=3, device="cpu")
    plan.save(tmp_path / "p.json")
    assert main(["train", "--model", str(model), "--data", str(data), "--seq", "32", "--batch", "4",
                 "--plan", str(tmp_path / "p.json"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "chunk 3 must divide batch 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_config_and_bad_rows_are_named(tmp_path, capsys):
    model, data = tiny_job(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model: {model}\ndata: [{data}]\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err
    with data.open("a") as f:
        f.write('{"messages": "hello"}\n')
    assert main(["train", "--model", str(model), "--data", str(data), "--device", "cpu", "--seq", "32",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert f"{data}:41: 'messages' must be a list" in capsys.readouterr().err


def test_example_config_is_a_valid_config(tmp_path, capsys):
    assert main(["train", "--print-config"]) == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    from slideformer.train_config import load_config
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.seq == 2048 and cfg.schedule == "cosine" and cfg.plan == "auto"
