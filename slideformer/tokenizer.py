"""Tokenizers the data pipeline accepts: a Hugging Face tokenizer from a local directory, or the demo's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from slideformer.models.config import ModelConfigError


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]: ...


class HFTokenizer:
    """`tokenizer.json` / `tokenizer_config.json` of a model directory, loaded offline through transformers."""

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        # Without tokenizer.json, transformers may build a tokenizer that encodes every text to nothing.
        if not (self.directory / "tokenizer.json").is_file():
            raise ModelConfigError(
                f"{self.directory}: no tokenizer.json; save the model's fast tokenizer there "
                "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR)) or set tokenizer"
            )
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelConfigError(
                f"{self.directory}: the tokenizer does not load ({' '.join(str(e).split())})"
            ) from None
        if self.tok.eos_token_id is None:
            raise ModelConfigError(
                f"{self.directory}: the tokenizer defines no eos token; set eos_token in tokenizer_config.json"
            )
        if not self.tok.encode("Hello, world.", add_special_tokens=False):
            raise ModelConfigError(f"{self.directory}: the tokenizer encodes text to no tokens; check tokenizer.json")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        out: Any = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def files(self) -> list[Path]:
        """The tokenizer's files, copied into each checkpoint."""
        names = (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "chat_template.jinja",
            "generation_config.json",
        )
        return [self.directory / n for n in names if (self.directory / n).is_file()]
