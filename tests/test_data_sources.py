"""--data beyond JSONL: saved datasets, Arrow files, globs, hub ids; the record shapes of TRL,
ShareGPT and plain text, tool turns; data files that used to fail with a traceback or a
misleading message (one error line each); --packing."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_records, write_jsonl
from hydralora.cli import main
from hydralora.data import IGNORE_INDEX, Collator, DataError, load_examples, tokenize_example, tokenize_examples
from hydralora.data.tokenize import pack_features

PROMPT = {"prompt": "Add 2 and 3.", "completion": "5"}


def learned(tokenizer, feat):
    return tokenizer.decode([t for t, l in zip(feat["input_ids"], feat["labels"]) if l != IGNORE_INDEX])


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------- sources
def test_save_to_disk_folders_and_arrow_files(tmp_path):
    import datasets

    data = datasets.Dataset.from_list([PROMPT, {"prompt": "Add 1 and 1.", "completion": "2"}])
    data.save_to_disk(tmp_path / "one")
    assert [e.response for e in load_examples([tmp_path / "one"])] == ["5", "2"]
    arrow = next((tmp_path / "one").glob("*.arrow"))
    [first, _] = load_examples([arrow])
    assert first.response == "5" and first.source.endswith(".arrow, row 1")
    datasets.DatasetDict({"train": data, "test": data.select([1])}).save_to_disk(tmp_path / "dict")
    assert len(load_examples([tmp_path / "dict"])) == 2  # the train split by default
    assert [e.response for e in load_examples([f"{tmp_path / 'dict'}:test"])] == ["2"]
    with pytest.raises(DataError, match=r"no split 'dev' \(train, test\); choose one as .*:SPLIT"):
        load_examples([f"{tmp_path / 'dict'}:dev"])


def test_globs_and_folders_of_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [PROMPT])
    write_jsonl(tmp_path / "b.jsonl", [PROMPT, PROMPT])
    assert len(load_examples([str(tmp_path / "*.jsonl")])) == 3
    with pytest.raises(DataError, match="no data file matches"):
        load_examples([str(tmp_path / "*.csv")])
    with pytest.raises(DataError, match=r"is a folder, not a dataset saved with .*a.jsonl.*a glob works"):
        load_examples([tmp_path])


def test_a_hub_dataset_id_offline_is_one_error_line(tmp_path, capsys, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["train", "--data", "someone/no-such-dataset", "--output", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert "someone/no-such-dataset: no such local file, and not in the local cache" in err
    assert "HF_HUB_OFFLINE=1" in err


def test_a_hub_dataset_id_without_network_is_one_error_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    assert main(["train", "--data", "someone/no-such-dataset:train", "--output", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert "the Hub cannot be reached" in err and "set HF_HUB_OFFLINE=1 to use the local cache" in err


# ---------------------------------------------------------------------------- shapes
def test_sharegpt_records(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"},
                                {"from": "human", "value": "And 4 and 4?"}, {"from": "gpt", "value": "8"}],
              "system": "Be brief.", "domain": "math"}
    [ex] = load_examples([write_jsonl(tmp_path / "s.jsonl", [record])])
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.domain == "math" and ex.response == "8"
    tok = make_tiny_tokenizer()
    assert learned(tok, tokenize_example(ex, tok, 512)) == "5<|im_end|>\n8<|im_end|>\n"
    bad = {"conversations": [{"from": "robot", "value": "hi"}]}
    with pytest.raises(DataError, match=r"line 1: conversations\[0\] needs 'from' of human, user, gpt"):
        load_examples([write_jsonl(tmp_path / "bad.jsonl", [bad])])


def test_text_records_learn_every_token_without_a_template(tmp_path):
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [{"text": "The answer is five."}])])
    tok = make_tiny_tokenizer()
    feat = tokenize_example(ex, tok, 512)
    assert learned(tok, feat) == "The answer is five.<|im_end|>"
    assert tok.decode(feat["input_ids"]) == "The answer is five.<|im_end|>"  # no chat template


def test_trl_conversational_prompt_completion_learns_the_completion_only(tmp_path):
    record = {"prompt": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                         {"role": "user", "content": "And 4 and 4?"}],
              "completion": [{"role": "assistant", "content": "8"}]}
    [ex] = load_examples([write_jsonl(tmp_path / "c.jsonl", [record])])
    assert ex.learn_from == 3 and ex.response == "8"
    tok = make_tiny_tokenizer()
    assert learned(tok, tokenize_example(ex, tok, 512)) == "8<|im_end|>\n"  # not the prompt's "5"


def test_tool_turns(tmp_path):
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    record = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                           {"role": "assistant", "content": None, "tool_calls": call},
                           {"role": "tool", "content": "5", "tool_call_id": "1"},
                           {"role": "assistant", "content": "It is 5."}]}
    [ex] = load_examples([write_jsonl(tmp_path / "tools.jsonl", [record])])
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    assert ex.messages[1]["tool_calls"] == call and ex.messages[2]["tool_call_id"] == "1"
    plain = make_tiny_tokenizer(chat_template=False)
    text = plain.decode(tokenize_example(ex, plain, 512)["input_ids"])
    assert "### Tool result:\n5" in text and '"name": "add"' in text


def test_alpaca_system_and_history(tmp_path):
    record = {"instruction": "And 4 and 4?", "output": "8", "system": "Be brief.", "history": [["Add 2 and 3.", "5"]]}
    [ex] = load_examples([write_jsonl(tmp_path / "a.jsonl", [record])])
    assert [m["content"] for m in ex.messages] == ["Be brief.", "Add 2 and 3.", "5", "And 4 and 4?", "8"]


# ---------------------------------------------------------------------------- files that used to fail badly
def write(path, text):
    path.write_text(text)
    return path


def parquet_with_a_null(path):
    import datasets

    datasets.Dataset.from_list([PROMPT, {"prompt": "Add 1 and 1.", "completion": None}]).to_parquet(path)
    return path


BAD_FILES = {
    "null-cell": (lambda d: parquet_with_a_null(d / "n.parquet"),
                  "n.parquet, row 2: field 'completion' must be a string, it is null (the field is there"),
    "empty-csv": (lambda d: write(d / "e.csv", ""), "e.csv: empty CSV file (no header line"),
    "header-only-csv": (lambda d: write(d / "h.csv", "prompt,completion\n"), "h.csv: the file holds no records"),
    "empty-csv-cell": (lambda d: write(d / "c.csv", "prompt,completion\nAdd 2 and 3.,\n"),
                       "c.csv, line 2: field 'completion' is empty"),
    "numbers": (lambda d: write(d / "n.json", "[1, 2, 3]"),
                "n.json, record 1: unrecognized record (not an object but a int: 1)"),
    "duplicated-columns": (lambda d: write(d / "d.csv", "prompt,completion,prompt\na,b,c\n"),
                           "d.csv, line 1: column(s) 'prompt' appear twice in the header"),
    "ragged-row": (lambda d: write(d / "r.csv", "prompt,completion\na,b\nc,d,e\n"),
                   "r.csv, line 3: 3 cells for 2 columns (prompt, completion)"),
    "given-twice": (lambda d: [str(write_jsonl(d / "x.jsonl", [PROMPT])), str(d / "*.jsonl")],
                    "x.jsonl: given twice"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_are_one_error_line(tmp_path, capsys, case):
    make, expected = BAD_FILES[case]
    made = make(tmp_path)
    files = made if isinstance(made, list) else [str(made)]
    assert main(["train", "--data", *files, "--output", str(tmp_path / "run")]) == 2
    err = one_line(capsys)
    assert expected in err, err


def test_a_10_mb_line_is_rejected_by_its_size_without_tokenizing(tmp_path, capsys, tiny_model_dir):
    huge = {"prompt": "word " * 2_000_000, "completion": "5"}
    path = write_jsonl(tmp_path / "big.jsonl", [huge, PROMPT])
    tok = make_tiny_tokenizer()
    examples = load_examples([path])
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"1 example\(s\) have prompts of 64 tokens or more.*big.jsonl, line 1"):
        tokenize_examples(examples, tok, 64)
    features, report = tokenize_examples(examples, tok, 64, skip_overlong=True)
    assert time.perf_counter() - started < 5 and report.examples == 1 and len(report.dropped) == 1
    long_answer = load_examples([write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Add.", "completion": "x " * 2_000_000}])])
    started = time.perf_counter()
    [feat], report = tokenize_examples(long_answer, tok, 64)
    assert time.perf_counter() - started < 5 and len(feat["input_ids"]) == 64 and report.truncated == 1
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(path), "--output", str(tmp_path / "run"),
                 "--max-length", "64", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err  # transformers' loading bar, then our line
    assert err.strip().splitlines()[-1].startswith("error: ") and "big.jsonl, line 1" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- packing
def test_packing_keeps_every_example_and_its_loss(tmp_path):
    from hydralora.eval.loss import response_nll
    from hydralora.data.tokenize import PackedRows

    tok = make_tiny_tokenizer()
    examples = load_examples([write_jsonl(tmp_path / "d.jsonl", tiny_records(10))])
    features, _ = tokenize_examples(examples, tok, 64)
    rows = pack_features(features, 128)
    assert len(rows) < len(features) and all(len(r["input_ids"]) <= 128 for r in rows)
    assert sorted(s for r in rows for s in r["sources"]) == sorted(f["source"] for f in features)
    model = make_tiny_llama(vocab_size=300)
    with torch.no_grad():
        separate, _ = response_nll(model, Collator(tok.pad_token_id)(features))
        batch = Collator(tok.pad_token_id)(rows)
        packed, _ = response_nll(PackedRows(model, batch["position_ids"]), batch)
    assert torch.allclose(separate.sum(), packed.sum(), rtol=1e-4) and separate.numel() == packed.numel()


def test_train_with_packing(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(16))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--packing", "--max-length", "64", "--max-steps", "2", "--batch-size", "2", "--save-steps", "0",
                 "--r", "2", "--num-heads", "2", "--target-modules", "q_proj"]) == 0
    assert "packing: 16 examples in" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "r2"), "--packing",
                 "--routing", "sequence"]) == 2
    assert "--packing puts several examples in one row" in one_line(capsys)
