"""Data files: every record shape, every file type, labels on the response only, clear errors."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_tokenizer, write_jsonl
from hydralora.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    load_examples,
    tokenize_example,
    tokenize_examples,
)

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "domain": "math"}
PROMPT = {"prompt": "Add 2 and 3.", "completion": "5"}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 and 4?"},
    {"role": "assistant", "content": "8"},
], "task": "math"}


def learned_text(tokenizer, feat):
    return tokenizer.decode([t for t, l in zip(feat["input_ids"], feat["labels"]) if l != IGNORE_INDEX])


@pytest.mark.parametrize("chat_template", [True, False])
def test_alpaca_shape(tmp_path, chat_template):
    tok = make_tiny_tokenizer(chat_template)
    [ex] = load_examples([write_jsonl(tmp_path / "a.jsonl", [ALPACA])])
    assert ex.domain == "math" and ex.messages[0]["content"] == "Add the numbers.\n\n2 and 3"
    feat = tokenize_example(ex, tok, 512)
    assert learned_text(tok, feat).startswith("5")
    assert "Add the numbers" in tok.decode(feat["input_ids"])
    if chat_template:
        assert learned_text(tok, feat) == "5<|im_end|>\n"
    else:
        assert "### Response:" in tok.decode(feat["input_ids"])


def test_prompt_completion_shape_keeps_extra_fields(tmp_path):
    [ex] = load_examples([write_jsonl(tmp_path / "p.jsonl", [{**PROMPT, "answer": "5"}])])
    assert ex.response == "5" and ex.domain is None and ex.meta == {"answer": "5"}


def test_chat_shape_learns_every_assistant_turn(tmp_path):
    tok = make_tiny_tokenizer()
    [ex] = load_examples([write_jsonl(tmp_path / "c.jsonl", [CHAT])])
    assert ex.domain == "math"
    feat = tokenize_example(ex, tok, 512)
    assert learned_text(tok, feat) == "5<|im_end|>\n8<|im_end|>\n"


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_other_file_types(tmp_path, suffix):
    import datasets

    records = [PROMPT, {"prompt": "Add 1 and 1.", "completion": "2"}]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(records))
    else:
        table = datasets.Dataset.from_list(records)
        table.to_csv(path, index=False) if suffix == "csv" else table.to_parquet(path)
    examples = load_examples([path])
    assert [e.response for e in examples] == ["5", "2"]


def test_truncation_is_counted_and_overlong_is_an_error(tmp_path):
    tok = make_tiny_tokenizer()
    long_prompt = {"prompt": "word " * 200, "completion": "5"}
    short = {"prompt": "Add.", "completion": "five " * 40}
    examples = load_examples([write_jsonl(tmp_path / "t.jsonl", [short, long_prompt, PROMPT])])
    with pytest.raises(DataError, match=r"1 example\(s\) have prompts of 64 tokens.*t.jsonl, line 2.*--skip-overlong"):
        tokenize_examples(examples, tok, 64)
    feats, report = tokenize_examples(examples, tok, 64, skip_overlong=True)
    assert report.examples == 2 and report.truncated == 2 and len(report.dropped) == 1
    assert all(len(f["input_ids"]) <= 64 for f in feats)


@pytest.mark.parametrize(
    "lines,match",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '],
         r"bad.jsonl, line 2: not valid JSON"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'],
         r"bad.jsonl, line 2: this file's records have the prompt-completion shape.*fields: prompt"),
        (['{"instruction": "a", "output": 5}'], r"line 1: unrecognized record|line 1: field 'output' must be a string"),
        (['{"question": "a", "answer": "b"}'], r"line 1: unrecognized record \(fields: answer, question\)"),
        (['[1, 2]'], r"line 1: unrecognized record \(not an object but a list: \[1, 2\]\)"),
        (['{"prompt": "a", "completion": "  "}'], r"line 1: field 'completion' is empty"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"line 1: the last message must be the assistant"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], r"line 1: messages\[0\] needs a 'role'"),
        (['{"prompt": "a", "completion": "b", "domain": 3}'], r"line 1: field 'domain' must be a string"),
        ([], r"bad.jsonl: the file holds no records"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=match):
        load_examples([path])


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_examples([tmp_path / "nope.jsonl"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_examples([tmp_path / "x.txt"])


def test_collator_pads_and_masks():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [5], "labels": [5]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_builtin_test_split_never_overlaps_any_train_split():
    from hydralora.data.builtin import MixtureError, builtin_mixture

    _, test_small = builtin_mixture(train_per_domain=5, test_per_domain=8)
    train_big, test_big = builtin_mixture(train_per_domain=100, test_per_domain=40)
    train_prompts = {r["prompt"] for r in train_big}
    assert not train_prompts & {r["prompt"] for r in test_small + test_big}
    assert {r["prompt"] for r in test_small} <= {r["prompt"] for r in test_big}
    with pytest.raises(MixtureError, match="exceeds the held-out reserve"):
        builtin_mixture(test_per_domain=41)


def test_builtin_mixture_split_is_fixed_and_disjoint():
    from hydralora.data.builtin import DOMAINS, builtin_mixture

    train, test = builtin_mixture(train_per_domain=30, test_per_domain=10, seed=0)
    train2, _ = builtin_mixture(train_per_domain=30, test_per_domain=10, seed=0)
    assert train == train2
    assert {r["domain"] for r in train} == set(DOMAINS)
    assert sum(r["domain"] == "code" for r in test) == 10
    prompts_train = {r["prompt"] for r in train}
    assert not prompts_train & {r["prompt"] for r in test}
    math = next(r for r in train if r["domain"] == "math")
    assert math["completion"].rstrip().endswith(math["answer"]) and "<<" not in math["completion"]
    code = next(r for r in train if r["domain"] == "code")
    assert "def check" in code["test"] and code["entry_point"]
    topic = next(r for r in train if r["domain"] == "topic")
    assert topic["completion"] in {"business", "entertainment", "politics", "sport", "tech"}
