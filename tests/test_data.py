"""Data rows in their common shapes: tokenized, prompt-masked, packed; bad rows named by file and line."""
import json

import pytest
import torch

from bench.synthetic import chat_rows, make_tokenizer
from slideformer.dataset import DataError, Example, load_examples, to_sequences
from slideformer.runtime.loss import IGNORE_INDEX
from slideformer.tokenizer import HFTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, [m["content"] for r in chat_rows(50) for m in r["messages"]] + ["hello world"])
    return HFTokenizer(d)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tok, ex: Example) -> str:
    return tok.tok.decode([i for i, t in zip(ex.ids, ex.trained) if t])


def test_chat_rows_train_on_assistant_turns_only(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "Is 4 even?"}, {"role": "assistant", "content": "Yes."},
                        {"role": "user", "content": "And 5?"}, {"role": "assistant", "content": "No."}]}
    (ex,) = load_examples([write(tmp_path / "c.jsonl", [row])], tok)
    assert ex.ids == tok.chat(row["messages"], add_generation_prompt=False)
    assert trained_text(tok, ex) == "Yes.<|end|>No.<|end|>"


def test_instruction_and_text_rows(tmp_path, tok):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"text": "hello world"}]
    inst, text = load_examples([write(tmp_path / "d.jsonl", rows)], tok)
    assert trained_text(tok, inst) == "5<|end|>" and "Add" in tok.tok.decode(inst.ids)
    assert all(text.trained) and text.ids[-1] == tok.eos_id


def test_packing_fills_sequences_and_labels_are_the_next_trained_token(tok):
    examples = [Example([1, 2, 3, 4], [False, False, True, True]), Example([5, 6, 7], [False, True, True])]
    ids, labels = to_sequences(examples, seq=3, tok=tok, pack=True)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert labels.tolist() == [[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 6, 7]]
    ids, labels = to_sequences(examples, seq=5, tok=tok, pack=False)  # one sample per sequence, padded
    assert ids[1].tolist()[:3] == [5, 6, 7] and labels[1].tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert (labels != IGNORE_INDEX).sum() == torch.tensor(4)


@pytest.mark.parametrize("line, message", [
    ('{"text": 3}', "c.jsonl:2: 'text' must be a string"),
    ('{"prompt": "x"}', "c.jsonl:2: a row needs 'text', 'messages', or 'instruction' and 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "c.jsonl:2: a chat row needs at least one assistant"),
    ('{"text": "a"', "c.jsonl:2: not valid JSON"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path, tok, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_examples([path], tok)


def test_unsupported_or_missing_files_are_refused(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        load_examples([tmp_path / "missing.jsonl"], tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples([tmp_path / "x.csv"], tok)
