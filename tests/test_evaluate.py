"""Evaluation: every metric, the code sandbox, and `hydralora eval` on a tiny model."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from hydralora.cli import main
from hydralora.data import Example
from hydralora.eval.metrics import code_program, final_number, normalize_label, same_number, score


def ex(response, **meta):
    return Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": response}],
                   domain=meta.pop("domain", None), source="t.jsonl, line 1", meta=meta)


def test_number_metric():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("the answer is 12.") == "12"
    assert final_number("no digits") is None
    assert final_number("3 apples and 5 pears, total 8.\n#### eight") == "8"  # last number as fallback
    assert same_number("18", "18.0") and not same_number("18", "19")
    assert score("number", "She makes 9 * 2 = 18 dollars.\n#### 18", ex("x", answer="18")) == 1.0
    assert score("number", "#### 17", ex("x", answer="18")) == 0.0


def test_label_metric():
    assert normalize_label(" Business.") == "business"
    assert score("label", "Sport, clearly", ex("sport", label="sport")) == 1.0
    assert score("label", "tech", ex("sport", label="sport")) == 0.0


def test_rouge_metric():
    assert score("rouge-l", "Lacroix label bought by US firm", ex("Lacroix label bought by US firm")) == 1.0
    assert 0 < score("rouge-l", "US firm buys label", ex("Lacroix label bought by US firm")) < 1


PREFIX = "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


@pytest.mark.parametrize(
    "generated,expected",
    [
        ("    return a + b\n", 1.0),
        ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
        ("    return a - b\n", 0.0),
        ("    while True:\n        pass\n", 0.0),  # the sandbox stops the infinite loop
        ("    import os; os.system('touch /tmp/hydralora-pwned'); return a + b\n", 0.0),
    ],
)
def test_pass_at_1_in_the_sandbox(generated, expected):
    example = ex("    return a + b\n", code_prefix=PREFIX, test=TEST, entry_point="add")
    assert score("pass@1", generated, example, timeout_s=3) == expected


def test_code_program_keeps_the_prompts_imports_and_helpers():
    prefix = ("from typing import List\n\n\ndef helper(x):\n    return x + 1\n\n\n"
              "def f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n")
    meta = {"code_prefix": prefix, "entry_point": "f"}
    for generated in ("```python\ndef f(x: List[int]) -> int:\n    return helper(x[0])\n```",
                      "    return helper(x[0])\n"):
        scope: dict = {}
        exec(code_program(generated, meta), scope)  # trusted test code, not model output
        assert scope["f"]([4]) == 5


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "x", ex("x"))


def builtin_eval_file(tmp_path):
    from hydralora.data.builtin import builtin_mixture

    _, test = builtin_mixture(train_per_domain=1, test_per_domain=2)
    return write_jsonl(tmp_path / "test.jsonl", test)


def test_eval_with_a_perfect_model_scores_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Generation replaced by the references: every metric must give 1.0 end to end."""
    import hydralora.eval.metrics as generation
    from hydralora.data import load_examples

    path = builtin_eval_file(tmp_path)
    reference = {e.prompt_messages[-1]["content"]: e.response for e in load_examples([path])}
    monkeypatch.setattr(generation, "generate",
                        lambda model, tok, convs, **kw: [reference[c[-1]["content"]] for c in convs])
    # the tiny model states a 256-token context, which the BBC prompts pass: as if it stated none
    monkeypatch.setattr("hydralora.eval.run.context_length", lambda model, tokenizer: None)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(path), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {d: r["score"] for d, r in result["tasks"].items()} == {
        "code": 1.0, "headline": 1.0, "math": 1.0, "topic": 1.0, "mean": 1.0}
    assert {d for d in result["loss"]} == {"code", "headline", "math", "topic", "mean"}
    assert "| code loss |" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(path), "--output", str(out)]) == 2


@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_eval_real_generation_with_adapters(tiny_model_dir, tmp_path, tiny_data):
    path = builtin_eval_file(tmp_path)
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data), "--max-steps", "2",
              "--batch-size", "4", "--save-steps", "0", "--target-modules", "q_proj"]
    for method in ("hydralora", "lora", "lora-split"):
        extra = ["--num-heads", "2", "--r", "4"]
        assert main(["train", *common, "--output", str(tmp_path / method), "--method", method, *extra]) == 0
        out = tmp_path / f"{method}.json"
        assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / method),
                     "--data", str(path), "--output", str(out), "--max-new-tokens", "4"]) == 0
        result = json.loads(out.read_text())
        # the tiny model reads 256 tokens: prompts without room for the answer are left out of
        # generation (and counted), the rest are scored
        scored = sum(r["examples"] for d, r in result["tasks"].items() if d != "mean")
        assert scored + result["prompts_without_room"] == 8
        assert 0 < scored
        assert set(result["tasks"]) <= {"code", "headline", "math", "topic", "mean"}
        assert all(0.0 <= r["score"] <= 1.0 for r in result["tasks"].values())
        assert len(result["outputs"]) == scored


def test_response_nll_same_with_or_without_boolean_logits_mask(tiny_llama, monkeypatch):
    """transformers releases without the boolean logits_to_keep (5.17 on the GPU machine raised
    IndexError) get 1-D positions instead; both give the full-logits cross-entropy."""
    import torch
    import torch.nn.functional as F

    from hydralora.data import Collator
    from hydralora.eval import loss

    g = torch.Generator().manual_seed(0)
    feats = []
    for n, prompt in ((9, 5), (14, 3), (6, 4)):  # rows with different prompt and response spans
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = Collator(pad_token_id=0)(feats)
    with torch.no_grad():
        full = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        want = F.cross_entropy(full[keep].float(), labels[:, 1:][keep[:, :-1]], reduction="none")
        for boolean in (True, False):
            monkeypatch.setattr(loss, "BOOLEAN_LOGITS_MASK", boolean)
            nll, rows = loss.response_nll(tiny_llama, batch)
            assert torch.allclose(nll, want, atol=1e-5), boolean
            assert rows.tolist() == keep.nonzero()[:, 0].tolist()


def test_max_new_tokens_beyond_the_context_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "256", "--prompt", "hi"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --max-new-tokens 256: the model reads at most 256 tokens (prompt and answer); "
                   "give fewer"]
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "8",
                 "--prompt", "x" * 400]) == 2
    assert "shorten the prompt" in capsys.readouterr().err
    # eval: when no held-out prompt leaves room for its answer, one line and nothing written
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "output": "a", "metric": "label"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(path), "--output",
                 str(tmp_path / "e.json")]) == 2
    assert "no held-out prompt leaves room for its answer" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_prompts_without_room_are_left_out_of_generation_and_counted(tiny_llama):
    from conftest import make_tiny_tokenizer

    from hydralora.data import Example
    from hydralora.eval.run import fitting_for_generation

    tok = make_tiny_tokenizer()

    def example(prompt, metric):
        return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": "a"}],
                       meta={"metric": metric} if metric else {})

    short, long, unscored = example("hi", "label"), example("word " * 300, "label"), example("word " * 300, None)
    kept, dropped = fitting_for_generation(tiny_llama, tok, 16, [short, long, unscored, short])
    assert kept == [short, unscored, short] and dropped == 1  # nothing is generated for `unscored`
    # the answer's budget is the metric's (label: 8 tokens, pass@1: 256), lowered by --max-new-tokens
    middle = "word " * 40
    n = len(tok(tok.decode(tok("")["input_ids"][:1]) + middle)["input_ids"])
    assert n < 240  # leaves room for a label, not for a pass@1 answer of 256 tokens
    assert fitting_for_generation(tiny_llama, tok, None, [example(middle, "label"), example(middle, "pass@1"),
                                                          short])[1] == 1
    assert fitting_for_generation(tiny_llama, tok, 8, [example(middle, "pass@1")])[1] == 0


def test_eval_takes_both_builtin_words(tiny_model_dir, tmp_path):
    out = tmp_path / "conflict.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", "builtin-conflict", "--output", str(out),
                 "--no-generate", "--limit", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result["loss"]) == {"count", "reverse", "topic", "upper", "mean"}
    assert (tmp_path / "conflict-data" / "conflict" / "test.jsonl").exists()


def test_a_user_file_named_like_a_builtin_word_is_only_a_file(tmp_path):
    from hydralora.train.config import TrainConfig
    from hydralora.train.output import BUILTIN_DATA, run_names

    mine = TrainConfig(data=[str(tmp_path / "builtin.jsonl")], output=str(tmp_path / "o"))
    assert BUILTIN_DATA not in run_names(mine)
    assert BUILTIN_DATA in run_names(TrainConfig(data=["builtin-conflict"], output=str(tmp_path / "o")))
