"""Bad input fails before any GPU work, with a message that says what is wrong."""

import json

import pytest

from slideformer.cli import main
from slideformer.models import ModelConfigError, PRESETS, RandomWeights, load_model_config
from slideformer.schedule.plan import PlanError, uniform_plan
from slideformer.runtime import AdamWConfig, Engine


def test_unknown_preset():
    with pytest.raises(ModelConfigError, match="unknown model 'llama-9b'"):
        load_model_config("llama-9b")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not laid out as the sliding window streams"):
        load_model_config(str(tmp_path))


def test_plan_that_does_not_fit_the_gpu_is_refused_with_numbers():
    cfg = PRESETS["llama-3.1-8b"]
    plan = uniform_plan("llama-3.1-8b", cfg.num_layers, 8, 2048, chunk=8, window=4)
    with pytest.raises(
        PlanError, match=r"does not fit the GPU: needs .*weight_window 1\.63.*total 12\.33 GiB.*budget 8\.00 GiB"
    ):
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
    assert (
        main(
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--seq",
                "32",
                "--batch",
                "4",
                "--plan",
                str(tmp_path / "p.json"),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "chunk 3 must divide batch 4" in capsys.readouterr().err
    uniform_plan(str(model), 4, 4, 32, chunk=2, device="cuda").save(tmp_path / "p.json")
    assert (
        main(
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--seq",
                "32",
                "--batch",
                "4",
                "--device",
                "cpu",
                "--plan",
                str(tmp_path / "p.json"),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "plan is for device 'cuda', the run is on 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_config_and_bad_rows_are_named(tmp_path, capsys):
    model, data = tiny_job(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model: {model}\ndata: [{data}]\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err
    with data.open("a") as f:
        f.write('{"messages": "hello"}\n')
    assert (
        main(
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--device",
                "cpu",
                "--seq",
                "32",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert f"{data}:41: 'messages' must be a list" in capsys.readouterr().err


def test_example_config_is_a_valid_config(tmp_path, capsys):
    assert main(["train", "--print-config"]) == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    from slideformer.train_config import load_config

    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.seq == 2048 and cfg.schedule == "cosine" and cfg.plan == "auto"


def refused(capsys, argv, message):
    """The command exits 2 with one line on stderr that contains `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("slideformer")]  # not transformers' warnings
    assert (
        len(ours) == 1
        and err.endswith(ours[0] + "\n")
        and ours[0].startswith("slideformer: error: ")
        and message in ours[0]
    ), err
    return ours[0]


def test_yaml_numbers_read_as_strings_are_numbers_and_wrong_types_are_named(tmp_path, capsys):
    from slideformer.train_config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text("model: tiny-llama\ndata: x.jsonl\nlr: 3e-3\nmax_steps: 1.0e+3\n")
    cfg = load_config(str(tmp_path / "c.yaml"))  # PyYAML reads 3e-3 (no dot) as a string
    assert cfg.lr == 3e-3 and cfg.max_steps == 1000 and cfg.data == ["x.jsonl"]
    for line, message in [
        ("lr: fast", "lr must be a number, got 'fast'"),
        ("batch: 2.5", "batch must be an integer"),
        ("pack: 'yes'", "pack must be true or false"),
        ("seq: true", "seq must be an integer"),
        ("lr: .nan", "lr must be finite"),
        ("data: [3]", "data must be a string"),
    ]:
        (tmp_path / "c.yaml").write_text(f"model: tiny-llama\ndata: x.jsonl\n{line}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    refused(capsys, ["train", "--config", str(tmp_path / "c.yaml")], "not valid YAML")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-lr-ratio", "-0.5"], "min_lr_ratio must be in [0, 1]"),
        (["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--max-steps", "-5"], "max_steps must be >= 1"),
        (["--max-steps", "5", "--warmup-steps", "10"], "warmup_steps 10 is longer than max_steps 5"),
        (["--eval-data", "e.jsonl", "--eval-fraction", "0.1"], "eval_data or eval_fraction, not both"),
        (["--adam-beta2", "1.5"], "adam_beta2 must be in [0, 1)"),
        (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
        (["--seq", "4096"], "seq 4096 is longer than the model's max_position_embeddings 256"),
        (["--packing", "padding_free", "--cross-sample-attention"], "packing 'padding_free' keeps samples apart"),
        (["--packing", "padding_free", "--no-pack"], "it needs pack: true"),
    ],
)
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, capsys, flags, message):
    refused(
        capsys,
        ["train", "--model", "tiny-llama", "--data", "x.jsonl", "--output-dir", str(tmp_path / "out"), *flags],
        message,
    )
    assert not (tmp_path / "out").exists()


def test_plan_and_simulate_refuse_bad_numbers_and_malformed_files(tmp_path, capsys):
    refused(capsys, ["plan", "--model", "tiny-llama", "--seq", "64", "--gpu-mem", "0"], "--gpu-mem must be > 0")
    refused(capsys, ["plan", "--model", "tiny-llama", "--seq", "64", "--batch", "0"], "--batch must be 'auto'")
    (tmp_path / "p.json").write_text("{not json")
    refused(capsys, ["simulate", str(tmp_path / "p.json")], f"{tmp_path / 'p.json'}: not a valid plan")
    (tmp_path / "p.json").write_text('{"model": "tiny-llama"}')
    refused(capsys, ["simulate", str(tmp_path / "p.json")], "not a valid plan")
    uniform_plan("tiny-llama", 4, 2, 16).save(tmp_path / "good.json")
    refused(
        capsys, ["simulate", str(tmp_path / "good.json"), "--profile", str(tmp_path / "p.json")], "not a valid profile"
    )


def test_model_config_missing_fields_or_malformed_is_named(tmp_path, capsys):
    cfg = PRESETS["tiny-llama"].to_hf()
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    refused(capsys, ["model", str(tmp_path)], "hidden_size missing or not a positive integer")
    (tmp_path / "config.json").write_text("{")
    refused(capsys, ["model", str(tmp_path)], "config.json: not valid JSON")


def test_non_utf8_data_is_named(tmp_path):
    from slideformer.dataset import DataError, load_examples

    (tmp_path / "d.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="d.jsonl:1: not UTF-8 text"):
        load_examples([tmp_path / "d.jsonl"], None)


def test_an_unexpected_error_is_one_line_and_its_traceback_is_behind_debug(monkeypatch, capsys):
    import slideformer.cli as cli

    def bug(a):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "cmd_model", bug)
    assert main(["model", "tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["model", "tiny-llama", "--debug"])
    monkeypatch.setenv("SLIDEFORMER_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["model", "tiny-llama"])


def train_argv(model, data, tmp_path):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--device",
        "cpu",
        "--seq",
        "32",
        "--batch",
        "2",
        "--max-steps",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]


def test_a_model_directory_without_usable_weights_or_tokenizer_is_refused(tmp_path, capsys):
    model, data = tiny_job(tmp_path)
    (model / "model.safetensors").rename(tmp_path / "aside.safetensors")
    refused(capsys, train_argv(model, data, tmp_path), "no weights (model.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"not a pickle")
    refused(capsys, train_argv(model, data, tmp_path), "torch's safe loading refuses it")
    (model / "pytorch_model.bin").unlink()
    (tmp_path / "aside.safetensors").rename(model / "model.safetensors")
    (model / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    refused(capsys, train_argv(model, data, tmp_path), "no tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_pytorch_model_bin_loads_through_safe_loading(tmp_path):
    import torch

    from slideformer.models.weights import SafetensorsReader, TorchBinReader, check_weights, open_weights

    model, _ = tiny_job(tmp_path)
    st = SafetensorsReader(model)
    name = "model.layers.1.mlp.up_proj.weight"
    expected = st.get(name)
    torch.save({n: st.get(n, torch.bfloat16) for n in st.files}, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    reader = open_weights(model)
    assert isinstance(reader, TorchBinReader)
    check_weights(reader, load_model_config(str(model)))
    assert torch.equal(reader.get(name), expected) and reader.get(name).dtype == torch.float32


def test_every_tensor_is_checked_against_the_config(tmp_path, capsys):
    model, data = tiny_job(tmp_path)
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(hf | {"intermediate_size": 160}))  # same layer count, other shape
    refused(
        capsys,
        train_argv(model, data, tmp_path),
        "12 with another shape than config.json's (model.layers.0.mlp.gate_proj.weight [176, 64] (config: [160, 64])",
    )
    (model / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 5}))
    refused(capsys, train_argv(model, data, tmp_path), "tensors missing (model.layers.4.")
    (model / "config.json").write_text(json.dumps(hf | {"tie_word_embeddings": False, "num_hidden_layers": 3}))
    check = load_model_config(str(model) + ":2")  # a cut to fewer layers than the weights hold is fine
    from slideformer.models.weights import check_weights, open_weights

    check_weights(open_weights(model), check)
    from safetensors.torch import load_file, save_file

    state = load_file(model / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = state["model.norm.weight"].clone()
    save_file(state, model / "model.safetensors")
    refused(
        capsys,
        train_argv(model, data, tmp_path),
        "config.json does not describe (model.layers.0.self_attn.q_proj.bias)",
    )


def test_a_missing_shard_is_named(tmp_path, capsys):
    from slideformer.models.model import random_hf_state
    from slideformer.models.weights import save_hf_checkpoint

    model, data = tiny_job(tmp_path)
    (model / "model.safetensors").unlink()
    cfg = load_model_config(str(model))
    save_hf_checkpoint(cfg, random_hf_state(cfg), model, shard_bytes=200_000)
    (model / "model-00002-of-00003.safetensors").unlink()
    refused(
        capsys,
        train_argv(model, data, tmp_path),
        "shards ['model-00002-of-00003.safetensors'] named in model.safetensors.index.json are missing",
    )
