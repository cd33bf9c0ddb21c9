"""Export: a standard PEFT LoRA and a merged model that reproduce HydraLoRA with fixed gates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hydralora import ConfigError, load_adapter
from hydralora.cli import main
from hydralora.export import merge_fixed, resolve_gates


def trained(tiny_model_dir, tiny_data, tmp_path, *extra):
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out),
                 "--max-steps", "6", "--batch-size", "4", "--lr", "2e-2", "--save-steps", "0",
                 "--r", "4", "--num-heads", "3", "--target-modules", "q_proj", "v_proj", "up_proj",
                 *extra]) == 0
    return out


def fixed_gate_logits(model_dir, adapter, gates_spec, ids, data=None):
    from transformers import AutoModelForCausalLM

    from hydralora.data import load_examples, tokenize_examples
    from hydralora.base_models import load_tokenizer

    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    features = None
    if data:
        tok = load_tokenizer(str(model_dir))
        features, _ = tokenize_examples(load_examples([data]), tok, 256)
    gates = resolve_gates(model, gates_spec, features, 0)
    dynamic = model(ids).logits
    merge_fixed(model, gates)
    return model(ids).logits, dynamic, gates


PEFT_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
ids = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert not any(m.startswith("hydralora") for m in sys.modules), "hydralora was imported"
"""


@pytest.mark.slow  # a second Python process loads the export
@pytest.mark.parametrize("extra", [[], ["--no-shared-a"]])
def test_peft_lora_export_loads_without_hydralora(tiny_model_dir, tiny_data, tmp_path, extra, capsys):
    adapter = trained(tiny_model_dir, tiny_data, tmp_path, *extra)
    out = tmp_path / "peft"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(out), "--format", "peft-lora", "--gates", "uniform", "--data", str(tiny_data)]) == 0
    printed = capsys.readouterr().out
    assert "dynamic" in printed and "fixed" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == (4 if not extra else 12)
    result = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", PEFT_CHECK, str(tiny_model_dir), str(out), str(result)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11]])
    with torch.no_grad():
        ours, dynamic, _ = fixed_gate_logits(tiny_model_dir, adapter, "uniform", ids)
    theirs = torch.load(result, weights_only=True)  # a tensor this test wrote itself
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, dynamic, atol=1e-6)  # the routing did something


def test_merged_export_loads_with_transformers(tiny_model_dir, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = trained(tiny_model_dir, tiny_data, tmp_path)
    out = tmp_path / "merged"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(out), "--format", "merged", "--gates", "mean", "--data", str(tiny_data)]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours, _, gates = fixed_gate_logits(tiny_model_dir, adapter, "mean", ids, tiny_data)
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=1e-4)
    assert all(abs(float(g.sum()) - 1) < 1e-5 for g in gates.values())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    saved = json.loads((out / "hydralora_export.json").read_text())
    assert saved["gates"] == "mean" and len(saved["gates_per_layer"]) == 6
    # refuses to overwrite
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(out), "--format", "merged"]) == 2


def test_domain_gates_and_gate_files(tiny_model_dir, tiny_data, tmp_path, capsys):
    adapter = trained(tiny_model_dir, tiny_data, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        _, _, math_gates = fixed_gate_logits(tiny_model_dir, adapter, "domain=math", ids, tiny_data)
        _, _, news_gates = fixed_gate_logits(tiny_model_dir, adapter, "domain=headline", ids, tiny_data)
    assert any(not torch.allclose(math_gates[n], news_gates[n]) for n in math_gates)
    with pytest.raises(ConfigError, match="no examples of domain 'poetry'.*headline, math"):
        fixed_gate_logits(tiny_model_dir, adapter, "domain=poetry", ids, tiny_data)
    layer = "model.layers.0.self_attn.q_proj"
    cases = {
        json.dumps({"*": [0.5, 0.5]}): "2 gate values for 3 heads",
        json.dumps({"*": [0.5, 0.5, 0.5]}): "must sum to 1",
        json.dumps({"*": [1.2, -0.1, -0.1]}): "non-negative",
        json.dumps({"model.nope": [1, 0, 0], "*": [1, 0, 0]}): "unknown layer",
        json.dumps({layer: [1, 0, 0]}): "no gates for layer",
        "{bad": "not valid JSON",
    }
    for text, message in cases.items():
        path = tmp_path / "gates.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            fixed_gate_logits(tiny_model_dir, adapter, str(path), ids)
    path.write_text(json.dumps({"*": [1 / 3] * 3, layer: [1, 0, 0]}))
    _, _, gates = fixed_gate_logits(tiny_model_dir, adapter, str(path), ids)
    assert gates[layer].tolist() == [1, 0, 0]
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(tmp_path / "x"), "--gates", "mean"]) == 2
    assert "needs a calibration file" in capsys.readouterr().err
    for target in (adapter, tmp_path):  # the adapter itself, or a folder holding it
        assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                     str(target), "--overwrite"]) == 2
        assert "would replace the adapter" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").exists()
