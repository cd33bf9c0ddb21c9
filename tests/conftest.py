"""Shared fixtures: tiny random models built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny-llama"
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer (vocab 300) trained in code, optionally with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["What is two plus three? The answer is five.", "def add(a, b):\n    return a + b",
              "Write a headline for this article about the market."]
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def save_tiny_model(path, chat_template: bool = True, seed: int = 0):
    """A tiny random Llama and its tokenizer saved like a hub model, for CLI tests."""
    model = make_tiny_llama(seed=seed, vocab_size=300)
    tokenizer = make_tiny_tokenizer(chat_template)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path, records):
    import json

    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def tiny_records(n: int = 24):
    """A small two-domain prompt/completion set the tiny model can overfit."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"prompt": f"What is {i} plus three?", "completion": f"The answer is {i + 3}.",
                        "domain": "math"})
        else:
            out.append({"prompt": f"Write a headline for article {i}.", "completion": "Market rises",
                        "domain": "headline"})
    return out


@pytest.fixture
def tiny_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", tiny_records())
