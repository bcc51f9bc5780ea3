"""Fine-tuning data: local JSONL / JSON / Parquet files (or a `datasets` directory) in the common shapes,
tokenized, prompt-masked and packed into fixed-length sequences.

Row shapes: {"text"}; chat {"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat
template, trained on assistant turns only; instruction {"instruction", "input"?, "output"}, trained on
the output only. Packing fills fixed-length sequences with samples (each ending in EOS): whole samples by
best fit (`PACKINGS`' "best_fit", a sample longer than a sequence split into sequence-long pieces), the
same into bins of a whole chunk of sequences, samples crossing the sequences' boundaries within a bin
("padding_free": only a bin's tail is padded), or the samples' concatenated stream cut every `seq` tokens
("stream": no padding, but samples cut at the cuts).
Attention stays within each sample unless cross-sample attention is asked for. Without packing, each
sample is truncated or padded to one sequence.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from slideformer.kernels import IGNORE_INDEX

from .tokenizer import Tokenizer


class DataError(ValueError):
    """A file or row we cannot use; the message names the file and line."""


@dataclass
class Example:
    ids: list[int]
    trained: list[bool]  # per token: is it a training target


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, row) for each row; location is 'file:line' (or 'file:row N')."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise DataError(f"{path}: a directory needs the `datasets` package (pip install datasets)") from e
        for i, row in enumerate(load_from_disk(str(path))):
            yield f"{path}:row {i}", row
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise DataError(f"{path}:{n}: not UTF-8 text; convert the file to UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: Parquet needs pyarrow (pip install pyarrow)") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or a datasets directory)")


def to_example(row: dict, where: str, tok: Tokenizer) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if "messages" in row:
        return _chat(row["messages"], where, tok)
    if "instruction" in row or "output" in row:
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where}: instruction rows need string fields {missing}")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        if tok.has_chat_template:
            return _chat(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}], where, tok
            )
        head = tok.encode(f"### Instruction:\n{prompt}\n\n### Response:\n")
        answer = tok.encode(row["output"]) + [tok.eos_id]
        return Example(head + answer, [False] * len(head) + [True] * len(answer))
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        ids = tok.encode(row["text"]) + [tok.eos_id]
        return Example(ids, [True] * len(ids))
    raise DataError(f"{where}: a row needs 'text', 'messages', or 'instruction' and 'output'; got {sorted(row)}")


ROLES = ("system", "user", "assistant")


def _text(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts (the multimodal shape), concatenated."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        other = sorted(
            {str(p.get("type")) for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)}
        )
        if other:
            raise DataError(f"{where}: content parts of type {other} are not supported (only text parts)")
        return "".join(p["text"] for p in content)
    raise DataError(f"{where}: content must be a string or a list of text parts, got {json.dumps(content)[:40]}")


def _chat(messages, where: str, tok: Tokenizer) -> Example:
    if not tok.has_chat_template:
        raise DataError(f"{where}: chat rows need a tokenizer with a chat template")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; supported: {', '.join(ROLES)}")
    messages = [m | {"content": _text(m["content"], f"{where}: message {i}")} for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a chat row needs at least one assistant message")
    ids = tok.chat(messages, add_generation_prompt=False)
    trained = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The turn starts where its conversation prefix + generation prompt ends.
        head = tok.chat(messages[:i], add_generation_prompt=True)
        turn = tok.chat(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(head)] != head or turn[: len(head)] != head:
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        # `turn` renders it as the last message; a template may add to a last turn what it leaves out of an
        # earlier one (Qwen3: an empty thinking block after the last user message). The turn in the whole
        # conversation is the longest tail of that rendering found at its start.
        start, last = len(head), turn[len(head) :]
        n = next((k for k in range(min(len(last), len(ids) - start), 0, -1) if last[-k:] == ids[start : start + k]), 0)
        if n == 0:
            raise DataError(f"{where}: assistant message {i} is not found in the rendered conversation")
        trained[start : start + n] = [True] * n
    return Example(ids, trained)


def load_examples(paths: Sequence[str | Path], tok: Tokenizer) -> list[Example]:
    out = [to_example(row, where, tok) for p in paths for where, row in read_rows(p)]
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no rows")
    return out


def examples_from_rows(rows: Iterable[dict], name: str, tok: Tokenizer) -> list[Example]:
    """Rows given in Python (a `datasets.Dataset` or any iterable of dicts) of the shapes data files hold; a bad
    row is named as '<name> row N'."""
    out = [to_example(row, f"{name} row {i}", tok) for i, row in enumerate(rows)]
    if not out:
        raise DataError(f"{name}: no rows")
    return out


PACKINGS = ("best_fit", "padding_free", "stream")


def to_sequences(
    examples: list[Example],
    seq: int,
    tok: Tokenizer,
    pack: bool,
    per_sample: bool = True,
    packing: str = "best_fit",
    chunk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids and labels [N, seq]; labels[t] is token t+1 when that token is trained, else IGNORE_INDEX.

    Packed (`pack`) with `per_sample`, also each token's position in its sample [N, seq], 0 where a sample (or
    a piece of one) starts: attention never crosses a sample boundary and no token is a target of the sample
    before it. Packed without `per_sample`, positions are None and a sample attends to the samples before it in
    its sequence. `packing`: "best_fit" keeps each sample whole in one sequence where it fits; "padding_free"
    fills bins of `chunk` sequences (see `_padding_free_bins`); "stream" cuts the concatenated samples every
    `seq` tokens. Unpacked, one sample per sequence (padded), positions None."""
    if pack and packing == "padding_free":
        if not per_sample:
            raise DataError("packing 'padding_free' keeps samples apart: set cross_sample_attention: false")
        return _padding_free_bins(examples, seq, chunk, tok.pad_id)
    windows: list[tuple[list[int], list[bool], list[int]]] = []
    if pack and packing == "best_fit":
        windows = _best_fit_windows(examples, seq, tok.pad_id)
    elif pack:
        ids = [t for e in examples for t in e.ids]
        trained = [m for e in examples for m in e.trained]
        where = [i for e in examples for i in range(len(e.ids))]
        for start in range(0, max(len(ids) - 1, 0), seq):
            w, m, p = ids[start : start + seq + 1], trained[start : start + seq + 1], where[start : start + seq + 1]
            if len(w) < 2:
                break
            # A sample cut by the window's start counts its positions from there, as if it ran alone; the
            # padding is a sample of its own, with nothing to learn.
            first = next((t for t in range(1, len(p)) if p[t] == 0), len(p))
            p = [i - p[0] for i in p[:first]] + p[first:]
            pad = seq + 1 - len(w)
            windows.append((w + [tok.pad_id] * pad, m + [False] * pad, p + list(range(pad))))
    else:
        for e in examples:
            w, m = e.ids[: seq + 1], e.trained[: seq + 1]
            windows.append((w + [tok.pad_id] * (seq + 1 - len(w)), m + [False] * (seq + 1 - len(m)), []))
    rows = torch.tensor([w for w, _, _ in windows], dtype=torch.long)
    mask = torch.tensor([m for _, m, _ in windows], dtype=torch.bool)
    positions = torch.tensor([p for _, _, p in windows], dtype=torch.long) if pack and per_sample else None
    if positions is not None:
        mask[:, 1:] &= positions[:, 1:] != 0  # a sample's first token is no target of the one before
    labels = torch.where(mask[:, 1:], rows[:, 1:], torch.full_like(rows[:, 1:], IGNORE_INDEX))
    keep = (labels != IGNORE_INDEX).any(dim=1)  # a sequence with nothing to learn is dropped
    return (
        rows[keep, :-1].contiguous(),
        labels[keep].contiguous(),
        None if positions is None else positions[keep, :-1].contiguous(),
    )


def _best_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of at most `capacity` holding the items of `sizes` (by index): longest first, each into the fullest
    bin it fits (best fit decreasing; equal sizes keep their order). No two bins end up half empty or more."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free, bin index), sorted
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = bisect.bisect_left(room, (sizes[i], -1))
        if k == len(room):
            bins.append([])
            free, b = capacity, len(bins) - 1
        else:
            free, b = room.pop(k)
        bins[b].append(i)
        if free - sizes[i]:
            bisect.insort(room, (free - sizes[i], b))
    return bins


def _best_fit_windows(examples: list[Example], seq: int, pad_id: int) -> list[tuple[list[int], list[bool], list[int]]]:
    """Windows of seq + 1 tokens (a sequence and its last label) holding whole samples by best fit, the rest
    padded. A sample longer than a window is split into windows of its own that overlap by one token, as the
    stream cuts it, so each of its tokens stays a label."""
    width = seq + 1
    pieces: list[tuple[list[int], list[bool]]] = []
    for e in examples:
        for start in range(0, max(len(e.ids) - 1, 1), seq):
            # a later piece's first token is the last label of the piece before: not a label a second time
            trained = [start == 0 and e.trained[0]] + e.trained[start + 1 : start + width]
            pieces.append((e.ids[start : start + width], trained))
    windows = []
    for held in _best_fit([len(ids) for ids, _ in pieces], width):
        ids = [t for i in held for t in pieces[i][0]]
        trained = [m for i in held for m in pieces[i][1]]
        positions = [p for i in held for p in range(len(pieces[i][0]))]
        pad = width - len(ids)  # the padding is a sample of its own, with nothing to learn
        windows.append((ids + [pad_id] * pad, trained + [False] * pad, positions + list(range(pad))))
    return windows


def _padding_free_bins(
    examples: list[Example], seq: int, chunk: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bins of `chunk` sequences (the plan's chunk, which a layer computes as one stretch of tokens) filled with
    whole samples by best fit, a sample running on from one sequence into the next (its positions not
    restarting), only a bin's tail padded. Each token of a sample but its last is an input, each but its first a
    label: no sample's last token is computed (it has nothing to predict). A sample with more than seq inputs
    is split into pieces of seq, as best fit splits it."""
    pieces: list[tuple[list[int], list[int]]] = []  # (inputs, labels)
    for e in examples:
        inputs, labels = e.ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(e.ids[1:], e.trained[1:])]
        for start in range(0, len(inputs), seq):
            pieces.append((inputs[start : start + seq], labels[start : start + seq]))
    width = chunk * seq
    ids, labels, positions = [], [], []
    for held in _best_fit([len(inputs) for inputs, _ in pieces], width):
        if all(t == IGNORE_INDEX for i in held for t in pieces[i][1]):
            continue  # a bin with nothing to learn is dropped
        pad = width - sum(len(pieces[i][0]) for i in held)  # the padding is a sample of its own
        ids += [t for i in held for t in pieces[i][0]] + [pad_id] * pad
        labels += [t for i in held for t in pieces[i][1]] + [IGNORE_INDEX] * pad
        positions += [p for i in held for p in range(len(pieces[i][0]))] + list(range(pad))

    def sequences(tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long).view(-1, seq)

    return sequences(ids), sequences(labels), sequences(positions)


def cut_rows(examples: list[Example], seq: int, pack: bool) -> tuple[int, int]:
    """(truncated, dropped): rows that lose some / all of their trained tokens to the sequence length. Packing
    loses none (sequences overlap by one token, so every token after the first is some position's label)."""
    if pack:
        return 0, 0
    truncated = dropped = 0
    for e in examples:
        kept, cut = any(e.trained[1 : seq + 1]), any(e.trained[seq + 1 :])
        dropped += not kept
        truncated += kept and cut
    return truncated, dropped


def unit_order(count: int, unit: int, seed: int) -> torch.Tensor:
    """A seeded order of `count` sequences that keeps each run of `unit` consecutive ones (a padding-free bin)
    together and in its order; with `unit` 1, torch's permutation for the seed."""
    units = torch.randperm(count // unit, generator=torch.Generator().manual_seed(seed))
    return (units[:, None] * unit + torch.arange(unit)).flatten()


class Batches:
    """Sequences in a seeded order per epoch, `unit` consecutive ones kept together (a padding-free bin: its
    samples cross its sequences); the position (epoch, index) is part of a checkpoint."""

    def __init__(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        batch: int,
        seed: int,
        positions: torch.Tensor | None = None,
        unit: int = 1,
    ) -> None:
        if len(ids) < batch:
            raise DataError(
                f"{len(ids)} training sequences, fewer than one batch of {batch}: "
                "lower batch/accumulation or seq, or add data"
            )
        assert batch % unit == 0 and len(ids) % unit == 0, "a batch holds whole bins"
        self.ids, self.labels, self.positions, self.batch, self.seed = ids, labels, positions, batch, seed
        self.unit = unit
        self.epoch, self.index = 0, 0
        self.order = self._order()

    def _order(self) -> torch.Tensor:
        return unit_order(len(self.ids), self.unit, self.seed * 1000 + self.epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.ids) // self.batch

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """input_ids, labels and (packed per sample) positions of the next batch."""
        if self.index + self.batch > len(self.ids):  # drop the ragged tail, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._order()
        rows = self.order[self.index : self.index + self.batch]
        self.index += self.batch
        return self.ids[rows], self.labels[rows], None if self.positions is None else self.positions[rows]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self.order = self._order()
