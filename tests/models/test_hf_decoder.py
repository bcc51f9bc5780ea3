"""Any other Hugging Face decoder through its own modules (`models/hf_decoder.py`): logits and gradients match
transformers on tiny random configs of Gemma 2, Gemma 3, Phi-3, OLMo 2 and two mixture-of-experts families, and
the runtime trains them like a plain transformers training loop."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from slideformer.models import ModelConfig, ModelConfigError, RandomWeights
from slideformer.models.hf_decoder import decoder_for
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.plan import uniform_plan

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
CONFIGS = {
    "gemma2": dict(
        sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    ),
    "gemma3_text": dict(
        sliding_window=8,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "phi3": dict(head_dim=None),
    "olmo2": dict(),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def hf_dict(model_type: str) -> dict:
    values = {k: v for k, v in (SMALL | CONFIGS[model_type]).items() if v is not None}
    return {"model_type": model_type, **values}


def hf_model(cfg: ModelConfig, state: dict) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**hf_dict(json.loads(cfg.hf_config)["model_type"]))
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied heads
    return model


def generic_logits(cfg: ModelConfig, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Our composition of the architecture's own modules, as the runtime calls them."""
    dec = decoder_for(cfg.hf_config, "cpu")
    x = dec.embed(params["model.embed_tokens.weight"], ids)
    kwargs = dec.layer_kwargs(torch.zeros_like(x), None)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        x = dec.layer(i, {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}, x, kwargs[i])
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return dec.logits(params["model.norm.weight"], head, x)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_logits_and_gradients_match_transformers(model_type):
    cfg = ModelConfig.from_hf(hf_dict(model_type), name=model_type)
    assert cfg.family == "hf"
    src = RandomWeights(cfg, seed=4)
    hf = hf_model(cfg, {n: src.get(n) for n in hf_dict_names(cfg)})
    params = {n: src.get(n).requires_grad_() for n in hf_dict_names(cfg)}
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, theirs = generic_logits(cfg, params, ids), hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    hf_params = dict(hf.named_parameters())
    for n, p in params.items():
        torch.testing.assert_close(p.grad, hf_params[n].grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2", "gemma2"])
def test_the_head_through_the_architectures_norm_gives_the_loss_and_gradients_of_its_logits(model_type):
    """Without soft-capping the generic head is our fused norm + linear + cross-entropy (Triton on the GPU, here
    through the interpreter) with the architecture's own norm; with it (Gemma 2), its pieces through autograd."""
    from slideformer import kernels

    cfg = ModelConfig.from_hf(hf_dict(model_type), name=model_type)
    dec = decoder_for(cfg.hf_config, "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, cfg.hidden_size, generator=g).bfloat16()
    norm_w = (1 + 0.1 * torch.randn(cfg.hidden_size, generator=g)).bfloat16()
    head_w = (0.05 * torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)).bfloat16()
    labels = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels[0, :3] = -100
    total = int((labels != -100).sum())
    xr, nr, hr = (t.float().requires_grad_() for t in (x, norm_w, head_w))
    ref = F.cross_entropy(dec.logits(nr, hr, xr).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref / total, [xr, nr, hr])
    grad_norm = torch.zeros(cfg.hidden_size)
    grad_head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    with kernels.use(True, on_cpu=True):
        loss, dx = dec.head_loss_and_grads(x, labels, norm_w, head_w, total, 8, grad_norm, grad_head)
    torch.testing.assert_close(loss, (ref / total).detach(), rtol=2e-2, atol=1e-3)
    for ours, theirs in zip((dx, grad_norm, grad_head), ref_grads):
        torch.testing.assert_close(ours.float(), theirs, rtol=5e-2, atol=2e-3)


def hf_dict_names(cfg: ModelConfig) -> list[str]:
    from slideformer.models.model import hf_param_shapes

    return list(hf_param_shapes(cfg))


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3_moe"])
@pytest.mark.parametrize("activation, keep_last", [("offload", 0), ("recompute", 2)])
def test_the_runtime_trains_them_like_a_transformers_loop(model_type, activation, keep_last):
    """fp32 compute on the CPU: the engine's sliding window against transformers' own model and torch AdamW."""
    cfg = ModelConfig.from_hf(hf_dict(model_type), name=model_type)
    src, optim = RandomWeights(cfg, seed=2), AdamWConfig(lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(9)
    data = []
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (4, 24), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        labels[0, :10] = -100
        data.append((ids, labels))
    plan = uniform_plan(
        model_type,
        cfg.num_layers,
        4,
        24,
        chunk=2,
        window=2,
        activation=activation,
        keep_last=keep_last,
        device="cpu",
        compute_dtype="float32",
    )
    engine = Engine(cfg, plan, src, optim)
    losses = [engine.train_step(ids, labels).loss for ids, labels in data]
    ours = engine.hf_state()
    engine.close()

    hf = hf_model(cfg, {n: src.get(n) for n in hf_dict_names(cfg)})
    params = dict(hf.named_parameters())
    opt = torch.optim.AdamW(
        params.values(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, fused=True
    )
    ref_losses = []
    for ids, labels in data:
        opt.zero_grad()
        total, step_loss = int((labels != -100).sum()), 0.0
        for i, y in zip(ids.split(2), labels.split(2)):
            loss = (
                F.cross_entropy(hf(input_ids=i).logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
                / total
            )
            loss.backward()
            step_loss += float(loss.detach())
        opt.step()
        ref_losses.append(step_loss)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for n, p in params.items():
        torch.testing.assert_close(ours[n], p.detach(), rtol=1e-4, atol=1e-6, msg=n)


def test_architectures_the_window_cannot_stream_are_refused_with_why():
    encoder_decoder = {"model_type": "t5", "vocab_size": 64, "d_model": 32, "num_layers": 2}
    with pytest.raises(ModelConfigError, match="model_type='t5' .*transformers cannot build it"):
        ModelConfig.from_hf(encoder_decoder)
    with pytest.raises(ModelConfigError, match="model_type='nonexistent' .*transformers cannot build it"):
        ModelConfig.from_hf({"model_type": "nonexistent", "hidden_size": 8})
    bert = {
        "model_type": "bert",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    with pytest.raises(ModelConfigError, match="'bert' is not laid out as the sliding window streams a decoder"):
        ModelConfig.from_hf(bert)


def test_slideformer_model_names_the_architecture_and_its_layer(tmp_path, capsys):
    from slideformer.cli import main
    from slideformer.models.model import random_hf_state
    from slideformer.models.weights import save_hf_checkpoint

    cfg = ModelConfig.from_hf(hf_dict("olmo2"), name="olmo2")
    save_hf_checkpoint(cfg, random_hf_state(cfg, seed=0), tmp_path / "olmo2")
    assert main(["model", f"{tmp_path / 'olmo2'}:2"]) == 0
    shape = json.loads(capsys.readouterr().out)
    assert shape["model_type"] == "olmo2" and shape["num_layers"] == 2 and "hf_config" not in shape
    assert shape["layer_tensors"]["self_attn.q_norm.weight"] == [64] and shape["layer_params"] == cfg.layer_params
