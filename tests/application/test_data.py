"""Data rows in their common shapes: tokenized, prompt-masked, packed; bad rows named by file and line."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.synthetic import chat_rows, make_tokenizer
from slideformer.dataset import DataError, Example, load_examples, to_sequences
from slideformer.kernels import IGNORE_INDEX
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
    row = {
        "messages": [
            {"role": "user", "content": "Is 4 even?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "And 5?"},
            {"role": "assistant", "content": "No."},
        ]
    }
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
    ids, labels, positions = to_sequences(examples, seq=3, tok=tok, pack=True, packing="stream")
    assert ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert labels.tolist() == [[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 6, 7]]
    # positions restart where a sample starts, and where the window cuts one (token 4 runs as if alone)
    assert positions.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert to_sequences(examples, seq=3, tok=tok, pack=True, per_sample=False, packing="stream")[2] is None
    ids, labels, positions = to_sequences(examples, seq=5, tok=tok, pack=False)  # one sample per sequence, padded
    assert positions is None
    assert ids[1].tolist()[:3] == [5, 6, 7] and labels[1].tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert (labels != IGNORE_INDEX).sum() == torch.tensor(4)


def test_best_fit_packing_keeps_samples_whole_and_fills_the_fullest_sequence_first(tok):
    a, b, c = [11, 12, 13], [14, 15, 16, 17, 18], [19, 20]  # ids apart from the tokenizer's pad
    examples = [Example(a, [True] * 3), Example(b, [True] * 5), Example(c, [True] * 2)]
    ids, labels, positions = to_sequences(examples, seq=5, tok=tok, pack=True)  # windows of 6 tokens
    # longest first: b opens a window, a does not fit its one free token and opens another, c goes where it
    # fits; a stream cut every 5 tokens would split two of the three samples
    assert ids.tolist() == [b, a + c]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert labels.tolist() == [[15, 16, 17, 18, IGNORE_INDEX], [12, 13, IGNORE_INDEX, 20, IGNORE_INDEX]]
    # a sample longer than a window is split into overlapping pieces, each of its tokens a label once
    long = list(range(11, 20))
    ids, labels, positions = to_sequences([Example(long, [True] * 9)], seq=4, tok=tok, pack=True)
    assert ids.tolist() == [long[0:4], long[4:8]] and labels.tolist() == [long[1:5], long[5:9]]


@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    seq=st.integers(2, 12),
    cross=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_best_fit_packing_loses_no_target_and_keeps_a_sample_that_fits_whole(tok, lengths, seq, cross):
    """Every trained token but a sample's first is a label exactly once, as in the stream; a sample that fits a
    row (its tokens and its last label) sits whole in one, its positions 0..n-1."""
    examples, next_id = [], 100  # every token id distinct and apart from the pad: a label names its place
    for n in lengths:
        examples.append(Example(list(range(next_id, next_id + n)), [True] * n))
        next_id += n
    ids, labels, positions = to_sequences(examples, seq=seq, tok=tok, pack=True, per_sample=not cross)
    firsts = {e.ids[0] for e in examples}
    later = sorted(t for e in examples for t in e.ids[1:])
    got = labels[labels != IGNORE_INDEX].tolist()
    # across samples a first token may also be the label of the sample before it in its row
    assert sorted(t for t in got if t not in firsts) == later and (cross or len(got) == len(later))
    rows = ids.tolist()
    for e in examples:
        if 2 <= len(e.ids) <= seq + 1:  # (a row with nothing to learn is dropped)
            (row,) = [i for i, r in enumerate(rows) if e.ids[0] in r]
            window = rows[row] + labels[row, -1:].tolist()  # the row's tokens and its last label
            at = window.index(e.ids[0])
            assert window[at : at + len(e.ids)] == e.ids
            if not cross:
                assert positions[row, at : at + len(e.ids)].tolist() == list(range(len(e.ids)))[: seq - at]


def test_padding_free_bins_run_samples_across_the_rows_of_a_chunk(tok):
    a, b, c = [11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33]
    examples = [Example(a, [True] * 5), Example(b, [True] * 5), Example(c, [True] * 3)]
    # best fit, rows of 5 (windows of 6 with the last label): no two samples share a row, 3 rows
    assert len(to_sequences(examples, seq=5, tok=tok, pack=True)[0]) == 3
    # one bin of two rows: each sample's tokens but its last are inputs (4 + 4 + 2), b crossing the rows
    ids, labels, positions = to_sequences(examples, seq=5, tok=tok, pack=True, packing="padding_free", chunk=2)
    assert ids.tolist() == [a[:4] + b[:1], b[1:4] + c[:2]]
    assert positions.tolist() == [[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]]
    assert labels.tolist() == [a[1:] + b[1:2], b[2:] + c[1:]]
    with pytest.raises(DataError, match="set cross_sample_attention: false"):
        to_sequences(examples, seq=5, tok=tok, pack=True, per_sample=False, packing="padding_free", chunk=2)


@given(
    lengths=st.lists(st.integers(2, 30), min_size=1, max_size=30),
    seq=st.integers(2, 12),
    chunk=st.integers(1, 4),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_padding_free_bins_lose_no_target_keep_each_piece_whole_and_leave_one_bin_at_most_half_empty(
    tok, lengths, seq, chunk
):
    """Bins of `chunk` rows: every token but a sample's first is a label exactly once; each piece of a sample (up
    to seq inputs) sits whole in one bin at positions 0..n-1, the labels its next tokens; a bin starts a sample;
    and best fit leaves no two bins half empty or more."""
    examples, next_id = [], 100
    for n in lengths:
        examples.append(Example(list(range(next_id, next_id + n)), [True] * n))
        next_id += n
    ids, labels, positions = to_sequences(examples, seq=seq, tok=tok, pack=True, packing="padding_free", chunk=chunk)
    assert len(ids) % chunk == 0
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == sorted(t for e in examples for t in e.ids[1:])
    width = chunk * seq
    flat_ids, flat_labels, flat_pos = (t.reshape(-1, width) for t in (ids, labels, positions))
    assert (flat_pos[:, 0] == 0).all()  # a bin starts a sample: bins are the engine's chunks
    for e in examples:
        for start in range(0, len(e.ids) - 1, seq):
            inputs = e.ids[:-1][start : start + seq]
            (bin_,) = [i for i, r in enumerate(flat_ids.tolist()) if inputs[0] in r]
            at = flat_ids[bin_].tolist().index(inputs[0])
            assert flat_ids[bin_, at : at + len(inputs)].tolist() == inputs
            assert flat_labels[bin_, at : at + len(inputs)].tolist() == e.ids[start + 1 : start + seq + 1]
            assert flat_pos[bin_, at : at + len(inputs)].tolist() == list(range(len(inputs)))
    held = (flat_ids != tok.pad_id).sum(dim=1)
    assert int((2 * held <= width).sum()) <= 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": 3}', "c.jsonl:2: 'text' must be a string"),
        ('{"prompt": "x"}', "c.jsonl:2: a row needs 'text', 'messages', or 'instruction' and 'output'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "c.jsonl:2: a chat row needs at least one assistant"),
        ('{"text": "a"', "c.jsonl:2: not valid JSON"),
    ],
)
def test_a_bad_row_names_its_file_and_line(tmp_path, tok, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_examples([path], tok)


def test_packed_samples_are_no_targets_of_the_sample_before_unless_attention_crosses(tok):
    examples = [Example([1, 2], [True, True]), Example([3, 4], [True, True])]  # text rows: every token trained
    ids, labels, positions = to_sequences(examples, seq=4, tok=tok, pack=True)
    assert ids.tolist() == [[1, 2, 3, 4]] and positions.tolist() == [[0, 1, 0, 1]]
    assert labels.tolist() == [[2, IGNORE_INDEX, 4, IGNORE_INDEX]]  # token 3 is not predicted from sample 1
    ids, labels, positions = to_sequences(examples, seq=4, tok=tok, pack=True, per_sample=False)
    assert labels.tolist() == [[2, 3, 4, IGNORE_INDEX]] and positions is None


def test_unsupported_or_missing_files_are_refused(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        load_examples([tmp_path / "missing.jsonl"], tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples([tmp_path / "x.csv"], tok)


# Chat templates in the shapes the supported families ship (written here, not copied): each renders a turn its
# own way, and Qwen3's renders an assistant turn after the last user message with a thinking block it leaves
# out of earlier turns, so a conversation is not rendered prefix by prefix there.
TEMPLATES = {
    "qwen2.5": (
        r"""{%- if messages[0].role != 'system' %}
{{- '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{%- endif %}
{%- for m in messages %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}""",
        "A one.<|im_end|>\nA two.<|im_end|>\n",
    ),
    "qwen3": (
        r"""{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}""",
        "A one.<|im_end|>\n<think>\n\n</think>\n\nA two.<|im_end|>\n",
    ),
    "llama-3.1": (
        r"""{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\n\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}{{- '<|eot_id|>' }}
{%- for m in messages %}{%- if m.role != 'system' %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content + '<|eot_id|>' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}""",
        "A one.<|eot_id|>A two.<|eot_id|>",
    ),
    "mistral": (
        r"""{{- '<s>' }}{%- for m in messages %}
{%- if m.role == 'user' %}{{- '[INST] ' + m.content + ' [/INST]' }}
{%- elif m.role == 'assistant' %}{{- ' ' + m.content + '</s>' }}
{%- else %}{{- raise_exception('system messages are not supported') }}{%- endif %}{%- endfor %}""",
        " A one.</s> A two.</s>",
    ),
}
FAMILY_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
]


@pytest.fixture(scope="module")
def family_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("families")
    raw = RawTokenizer(models.BPE(unk_token="<|unk|>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|unk|>", *FAMILY_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["Hi there. A one. A two. Why? system user assistant"] * 10, trainer)
    raw.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("family", TEMPLATES)
def test_each_family_template_masks_exactly_the_assistant_turns(family, family_tokenizer_dir, tmp_path):
    import shutil

    template, expected = TEMPLATES[family]
    shutil.copy(family_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "unk_token": "<|unk|>",
                "chat_template": template,
            }
        )
    )
    tok = HFTokenizer(tmp_path)
    row = {
        "messages": [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "A one."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "A two."},
        ]
    }
    (ex,) = load_examples([write(tmp_path / "c.jsonl", [row])], tok)
    assert ex.ids == tok.chat(row["messages"], add_generation_prompt=False)
    assert trained_text(tok, ex) == expected


def test_content_as_text_parts_is_concatenated_and_other_shapes_are_refused(tmp_path, tok):
    text = [{"type": "text", "text": "Is 4 "}, {"type": "text", "text": "even?"}]
    parts = {
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ]
    }
    plain = {"messages": [{"role": "user", "content": "Is 4 even?"}, {"role": "assistant", "content": "Yes."}]}
    a, b = load_examples([write(tmp_path / "p.jsonl", [parts, plain])], tok)
    assert a == b
    for content, message in [
        ([{"type": "image", "url": "x.png"}], r"content parts of type \['image'\] are not supported"),
        (None, "content must be a string or a list of text parts, got null"),
    ]:
        bad = {"messages": [plain["messages"][0], {"role": "assistant", "content": content}]}
        with pytest.raises(DataError, match=r"b.jsonl:1: message 1: " + message):
            load_examples([write(tmp_path / "b.jsonl", [bad])], tok)
    bad = {"messages": [{"role": "tool", "content": "42"}, plain["messages"][1]]}
    with pytest.raises(DataError, match="b.jsonl:1: message 0 has role 'tool'; supported: system, user, assistant"):
        load_examples([write(tmp_path / "b.jsonl", [bad])], tok)


def test_rows_cut_at_seq_are_counted_reported_and_stop_the_run_above_the_threshold(tmp_path, tok, capsys):
    from slideformer.recipes.train import tokenized_data
    from slideformer.train_config import TrainConfig

    rows = [
        {"text": "hello world " * 20},
        {"instruction": "hello world " * 20, "output": "hi"},
        {"text": "hello"},
        {"text": "world"},
    ]
    cfg = TrainConfig(model="tiny-llama", data=[str(write(tmp_path / "d.jsonl", rows))], seq=8, pack=False)
    with pytest.raises(
        DataError,
        match=r"train data: of 4 rows, 1 longer than seq 8 were truncated and 1 dropped "
        r"\(no trained token within seq\): 50.0% of the rows, above max_cut_fraction 0.0",
    ):
        tokenized_data(cfg, tok)
    cfg.max_cut_fraction = 0.5
    train, _ = tokenized_data(cfg, tok)
    assert len(train.ids) == 3 and "1 longer than seq 8 were truncated and 1 dropped" in capsys.readouterr().err
    cfg.pack = True  # packing loses no trained token
    tokenized_data(cfg, tok)
    assert capsys.readouterr().err == ""
    cfg.pack, cfg.max_cut_fraction = False, 1.0
    cfg.eval_data = [str(write(tmp_path / "e.jsonl", rows[1:2]))]
    with pytest.raises(DataError, match="e.jsonl: no row has a trained token within seq 8"):
        tokenized_data(cfg, tok)
