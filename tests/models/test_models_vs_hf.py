"""Our model numerics against Hugging Face transformers' own modeling, every family, logits and gradients."""

import pytest
import torch
import transformers

from slideformer.models import PRESETS, ModelConfig, Transformer, random_hf_state
from slideformer.models.weights import SafetensorsReader, save_hf_checkpoint

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def hf_model(cfg: ModelConfig, state: dict) -> torch.nn.Module:
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf()), attn_implementation="sdpa"
    ).float()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def ours(cfg: ModelConfig, state: dict) -> Transformer:
    m = Transformer(cfg)
    m.load_hf_state(state)
    return m


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_gradients_match_transformers(name):
    cfg = PRESETS[name]
    state = random_hf_state(cfg, seed=11)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    a, b = ours(cfg, state), hf_model(cfg, state)
    la, lb = a(ids), b(input_ids=ids).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    (la.square().mean()).backward()
    (lb.square().mean()).backward()
    hf_params = dict(b.named_parameters())
    for n, p in a.named_hf_parameters().items():
        torch.testing.assert_close(p.grad, hf_params[n].grad, rtol=1e-3, atol=1e-6, msg=n)


def test_llama3_rope_scaling_changes_long_wavelengths():
    """The Llama-3 scaling is applied (a preset without it would give different logits)."""
    from dataclasses import replace

    cfg = PRESETS["tiny-llama"]
    state = random_hf_state(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 128))
    scaled, plain = ours(cfg, state)(ids), ours(replace(cfg, rope_scaling=None), state)(ids)
    assert (scaled - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_sharded_checkpoint_round_trips_through_transformers(name, tmp_path):
    cfg = PRESETS[name]
    state = random_hf_state(cfg, seed=5)
    save_hf_checkpoint(cfg, state, tmp_path, shard_bytes=64 * 1024)  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    reader = SafetensorsReader(tmp_path)
    loaded = ours(cfg, {n: reader.get(n) for n in state})
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # bf16 on disk: the values are the bf16 rounding of what we saved
    torch.testing.assert_close(reader.get("model.norm.weight"), state["model.norm.weight"].bfloat16().float())


def test_config_json_of_a_real_shape_builds(tmp_path):
    """A Llama-3.1-8B config.json as Hugging Face ships it gives our preset's shape."""
    import json

    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from slideformer.models import load_model_config

    cfg = load_model_config(str(tmp_path))
    assert cfg.total_params == PRESETS["llama-3.1-8b"].total_params == 8_030_261_248


@pytest.mark.parametrize("tile", [0, 7, 64])
def test_layer_backward_matches_autograd_through_the_layer(tile):
    """decoder_layer_backward (MLP in token tiles, down_proj's forward skipped) gives autograd's gradients."""
    from slideformer.models.layers import decoder_layer, decoder_layer_backward, rope_tables

    cfg = PRESETS["tiny-qwen3"]  # GQA and q/k norms
    g = torch.Generator().manual_seed(0)
    params = {
        n: (torch.randn(s, generator=g) * 0.1 + (1.0 if n.endswith("norm.weight") else 0.0)).requires_grad_()
        for n, s in cfg.layer_param_shapes().items()
    }
    x = torch.randn(3, 16, cfg.hidden_size, generator=g, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(3, 16, cfg.hidden_size, generator=g)
    cos, sin = rope_tables(cfg, 16, "cpu", torch.float32)
    want = torch.autograd.grad(decoder_layer(params, x, cos, sin, cfg), [x, *params.values()], dy)
    got: dict[str, torch.Tensor] = {}
    dx = decoder_layer_backward(
        params, x, dy, cos, sin, cfg, tile, lambda n, t: got.__setitem__(n, got[n] + t if n in got else t.clone())
    )
    torch.testing.assert_close(dx, want[0], rtol=1e-5, atol=1e-6)
    assert set(got) == set(params)
    for (name, _), w in zip(params.items(), want[1:]):
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
