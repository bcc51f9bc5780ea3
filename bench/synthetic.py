"""A chat dataset and a byte-level BPE tokenizer with a chat template, made locally (no downloads): the
fine-tuning runs and tests use them where no real model directory is at hand."""

from __future__ import annotations

import json
import random
from pathlib import Path


from slideformer.models.config import ModelConfig
from slideformer.models.model import random_hf_state
from slideformer.models.weights import save_hf_checkpoint

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        word = rng.choice(["apple", "river", "planet", "engine", "garden", "copper", "window", "signal"])
        turns = rng.choice(
            [
                [("user", f"What is {a} plus {b}?"), ("assistant", f"{a} plus {b} is {a + b}.")],
                [("user", f"Spell the word {word} backwards."), ("assistant", f"{word} backwards is {word[::-1]}.")],
                [
                    ("system", "You answer briefly."),
                    ("user", f"Is {a} even?"),
                    ("assistant", "Yes." if a % 2 == 0 else "No."),
                    ("user", f"And {b}?"),
                    ("assistant", "Yes." if b % 2 == 0 else "No."),
                ],
            ]
        )
        rows.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(directory: Path, texts: list[str], vocab_size: int = 400) -> None:
    """tokenizer.json (byte-level BPE trained on `texts`) and tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|end|>",
                "unk_token": "<|unk|>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def make_model_dir(directory: Path, cfg: ModelConfig, rows: list[dict], seed: int = 0) -> Path:
    """A Hugging Face model directory: config.json, random bf16 safetensors, the tokenizer."""
    save_hf_checkpoint(cfg, random_hf_state(cfg, seed), directory)
    make_tokenizer(directory, [m["content"] for r in rows for m in r["messages"]])
    return directory
