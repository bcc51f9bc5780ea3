"""The Python API does what the CLI does: a capacity report as `plan --json` prints it, a prediction as
`simulate --json` prints it, a training run as `train --config` makes it (also on rows given in Python, with
metrics to callbacks and Weights & Biases), bad settings refused with the setting's name; the README's example runs."""

import importlib.machinery
import json
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import slideformer
from bench.synthetic import chat_rows, make_model_dir, write_jsonl
from slideformer.cli import main
from slideformer.dataset import DataError
from slideformer.models import PRESETS
from slideformer.schedule.plan import uniform_plan
from slideformer.train_config import ConfigError
from tests import REPO


def test_plan_is_the_cli_report(capsys):
    args = dict(gpu_mem_gib=20.0, host_mem_gib=60.0)
    report = slideformer.plan("llama-3.1-8b:4", 1024, 8, **args)
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-3.1-8b:4",
                "--seq",
                "1024",
                "--batch",
                "8",
                "--gpu-mem",
                "20",
                "--host-mem",
                "60",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert report["fits"] and report["plan"]["batch"] == 8
    with pytest.raises(ConfigError, match="gpu_mem_gib must be > 0"):
        slideformer.plan("llama-3.1-8b:4", 1024, 8, gpu_mem_gib=0)


def test_train_takes_a_dict_with_overrides(tmp_path):
    rows = chat_rows(60)
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    config = {
        "model": str(model_dir),
        "data": [str(write_jsonl(rows, tmp_path / "chat.jsonl"))],
        "seq": 64,
        "batch": 2,
        "lr": 1e-3,
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
    }
    summary = slideformer.train(config, max_steps=3, eval_every=0)
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])
    assert (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(ConfigError, match="unknown training settings"):
        slideformer.train(config, learning_rate=1e-3)


def test_finetune_trains_on_rows_from_python_and_calls_back_with_every_record(tmp_path):
    rows = chat_rows(60)
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    records = []
    summary = slideformer.finetune(
        model=str(model_dir),
        dataset=(r for r in rows),
        eval_dataset=rows[:8],
        seq=64,
        batch=2,
        lr=1e-3,
        device="cpu",
        max_steps=3,
        output_dir=str(tmp_path / "run"),
        report_to=[],
        callbacks=[records.append],
    )
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])
    steps = [r["step"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert steps == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    assert evals[-1]["eval_loss"] == summary["eval_loss_after"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == records  # the callbacks see exactly what metrics.jsonl holds
    assert (Path(summary["checkpoint"]) / "config.json").exists()


def test_finetune_trains_on_padding_free_bins_of_the_plans_chunk(tmp_path):
    """packing 'padding_free': the data is bins of the plan's chunk of sequences (fewer of them than best fit
    makes of the same rows), held out and shuffled as whole bins, and the run trains on them."""
    from slideformer.recipes.train import tokenized_data
    from slideformer.tokenizer import HFTokenizer
    from slideformer.train_config import TrainConfig

    rows = chat_rows(80)
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    settings = dict(model=str(model_dir), seq=64, batch=2, accumulation=2, device="cpu", eval_fraction=0.2)
    tok = HFTokenizer(model_dir)
    whole = dict(settings, eval_fraction=0.0, data=["-"])
    best_fit, _ = tokenized_data(TrainConfig(**whole, packing="best_fit"), tok, rows)
    padding_free, _ = tokenized_data(TrainConfig(**whole, packing="padding_free"), tok, rows, chunk=2)
    assert len(padding_free.ids) < len(best_fit.ids)
    train, held = tokenized_data(TrainConfig(**settings, packing="padding_free", data=["-"]), tok, rows, chunk=2)
    assert len(train.ids) % 2 == 0 and len(held.ids) % 2 == 0
    bins = [t.positions.view(-1, 2, 64) for t in (train, held)]
    assert all((b[:, 0, 0] == 0).all() and (b[:, 1, 0] != 0).any() for b in bins)  # samples cross a bin's rows
    assert len(train.ids) + len(held.ids) == len(padding_free.ids)
    summary = slideformer.finetune(
        **settings, dataset=rows, packing="padding_free", max_steps=3, output_dir=str(tmp_path / "run"), report_to=[]
    )
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["chunk"] == 2
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"]) and math.isfinite(summary["eval_loss_after"])


def test_finetune_names_a_bad_row_by_its_index_and_refuses_two_sources_of_data(tmp_path):
    rows = chat_rows(10)
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    with pytest.raises(DataError, match="dataset row 3: a row needs 'text', 'messages'"):
        slideformer.finetune(
            model=str(model_dir),
            dataset=rows[:3] + [{"prompt": "x"}],
            seq=64,
            batch=2,
            device="cpu",
            output_dir=str(tmp_path / "run"),
        )
    with pytest.raises(ConfigError, match="give data \\(files\\) or a dataset, not both"):
        slideformer.finetune(model=str(model_dir), data=["chat.jsonl"], dataset=rows, output_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="data is required"):
        slideformer.finetune(model=str(model_dir), output_dir=str(tmp_path / "r"))


def test_report_to_wandb_logs_every_record_and_needs_wandb_installed(tmp_path, monkeypatch):
    rows = chat_rows(40)
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    settings = dict(model=str(model_dir), dataset=rows, seq=64, batch=2, device="cpu", max_steps=2, report_to=["wandb"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="report_to 'wandb' needs the wandb package: pip install wandb"):
        slideformer.finetune(output_dir=str(tmp_path / "a"), **settings)

    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    slideformer.finetune(output_dir=str(tmp_path / "b"), **settings)
    assert calls[0][0] == "init" and calls[0][1]["config"]["max_steps"] == 2 and calls[-1] == ("finish",)
    logged = [(step, scalars) for kind, *rest in calls[1:-1] if kind == "log" for step, scalars in [rest]]
    assert [step for step, s in logged if "loss" in s] == [1, 2]
    assert all(isinstance(v, (int, float)) for _, s in logged for v in s.values())
    with pytest.raises(ConfigError, match=r"report_to takes \['tensorboard', 'wandb'\], not \['mlflow'\]"):
        slideformer.finetune(output_dir=str(tmp_path / "c"), **(settings | {"report_to": ["mlflow"]}))


def test_simulate_is_the_cli_prediction(capsys, tmp_path):
    plan = uniform_plan("llama-3.1-8b:4", 4, 8, 1024, chunk=4)
    plan.save(tmp_path / "plan.json")
    sim = slideformer.simulate(plan)
    assert main(["simulate", str(tmp_path / "plan.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(sim.summary()))
    assert sim.step_s > 0 and sim.spans


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written, with a small synthetic model directory in place of the
    Qwen one (the only thing CI cannot have)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The Python API") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    example_model = "/models/Qwen2.5-0.5B-Instruct"
    assert example_model in code
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {a}?"},
                {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."},
            ]
        }
        for a in range(200)
    ]
    model_dir = make_model_dir(
        tmp_path / "model", replace(PRESETS["tiny-llama"], vocab_size=512, name="tiny-chat"), rows
    )
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace(example_model, str(model_dir)), scope)
    assert scope["report"]["fits"] and scope["sim"].step_s == pytest.approx(scope["report"]["predicted_step_s"])
    assert len(scope["losses"]) == 20 and scope["losses"][-1] < scope["losses"][0]
    assert (tmp_path / "runs" / "quick" / "summary.json").exists()


def test_finetune_trains_an_architecture_through_its_own_modules_and_transformers_loads_the_result(tmp_path):
    """A Gemma-3-shaped model directory (no family of ours): the generic path trains it and writes a checkpoint
    that transformers loads, with the trained weights."""
    import transformers

    from bench.synthetic import make_tokenizer
    from slideformer.models import ModelConfig
    from slideformer.models.model import random_hf_state
    from slideformer.models.weights import save_hf_checkpoint

    hf = {
        "model_type": "gemma3_text",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "sliding_window": 8,
        "query_pre_attn_scalar": 16,
    }
    cfg = ModelConfig.from_hf(hf, name="tiny-gemma3")
    rows = chat_rows(40)
    save_hf_checkpoint(cfg, random_hf_state(cfg, seed=1), tmp_path / "model")
    make_tokenizer(tmp_path / "model", [m["content"] for r in rows for m in r["messages"]])
    summary = slideformer.finetune(
        model=str(tmp_path / "model"),
        dataset=rows,
        seq=64,
        batch=2,
        lr=3e-3,
        device="cpu",
        max_steps=6,
        output_dir=str(tmp_path / "run"),
        report_to=[],
    )
    assert summary["last_loss"] < summary["first_loss"]
    with pytest.raises(ConfigError, match="packing 'padding_free' runs on our own numerics"):
        slideformer.finetune(model=str(tmp_path / "model"), dataset=rows, seq=64, packing="padding_free", device="cpu")
    trained = transformers.AutoModelForCausalLM.from_pretrained(summary["checkpoint"], dtype=torch.float32)
    assert type(trained).__name__ == "Gemma3ForCausalLM"
    before = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(trained(input_ids=ids).logits, before(input_ids=ids).logits)
