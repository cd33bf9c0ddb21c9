"""QLoRA on the CPU: a bitsandbytes 4-bit (nf4) or 8-bit base under HydraLoRA and PEFT LoRA
(--quantize). bitsandbytes >= 0.50 runs these layers on a CPU; skipped when it is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hydralora import HydraLoraConfig, HydraLoraLinear, add_hydralora
from hydralora.base_models import check_quantize, load_model
from hydralora.cli import main
from hydralora.errors import ConfigError
from hydralora.methods import load_model_with_adapter
from hydralora.train.config import TrainConfig
from hydralora.train.run import run_training

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'hydralora[quantize]')")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def logged_losses(out):
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def train(model_dir, data, out, method="hydralora", quantize="4bit"):
    adapter = {"r": 4, "target_modules": TARGETS, **({"num_heads": 3} if method == "hydralora" else {})}
    cfg = TrainConfig(model=str(model_dir), data=[str(data)], output=str(out), method=method,
                      max_steps=8, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, save_steps=8, seed=1, bf16="false",
                      quantize=quantize, adapter=adapter)
    summary, model, _ = run_training(cfg)
    return summary, model


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ConfigError, match=r"pip install 'hydralora\[quantize\]'"):
        check_quantize("4bit")


def test_layer_wraps_linear4bit_and_refuses_merge(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), quantize="4bit", device="cpu")
    base = model.model.layers[0].mlp.down_proj
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    x = torch.randn(2, 5, base.in_features)
    expected = base(x)
    layer = HydraLoraLinear(base, HydraLoraConfig(num_heads=3, r=4, init_heads="random"))
    assert (layer.in_features, layer.out_features) == (128, 64)  # not the packed weight's shape
    assert layer.lora_A.shape == (4, 128) and layer.lora_B.shape == (64, 12)
    assert {p.dtype for p in layer.adapter_params().values()} == {torch.float32}
    assert torch.equal(layer(x), expected)  # B A = 0 at the start
    with pytest.raises(ConfigError, match="cannot merge into a quantized base"):
        layer.merge()


def test_8bit_base_forward_and_backward(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), quantize="8bit", device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    add_hydralora(model, HydraLoraConfig(num_heads=2, r=4, target_modules=TARGETS, init_heads="random"))
    ids = torch.randint(0, 300, (2, 7))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_qlora_trains_and_reloads_on_a_fresh_quantized_base(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "hydra"
    summary, model = train(tiny_model_dir, tiny_data, out)
    assert summary["base_dtype"] == "4bit"
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, HydraLoraLinear) and isinstance(layer.base, bnb.nn.Linear4bit)
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        fresh, _ = load_model_with_adapter(str(tiny_model_dir), out, quantize="4bit", device="cpu")
        assert isinstance(fresh.model.layers[0].self_attn.q_proj.base, bnb.nn.Linear4bit)
        assert torch.equal(fresh(ids).logits, trained)
    # the commands take the same base: eval, and export (calibration; merged is refused)
    model_args = ["--model", str(tiny_model_dir), "--adapter", str(out), "--quantize", "4bit"]
    assert main(["eval", *model_args, "--data", str(tiny_data), "--no-generate", "--device", "cpu"]) == 0
    assert main(["export", *model_args, "--output", str(tmp_path / "merged"), "--format", "merged"]) == 2
    assert main(["export", *model_args, "--output", str(tmp_path / "peft"), "--data", str(tiny_data),
                 "--gates", "mean"]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_peft_lora_baseline_gets_the_same_quantized_base(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "lora"
    _, model = train(tiny_model_dir, tiny_data, out, method="lora")
    lora_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(lora_layer.base_layer, bnb.nn.Linear4bit)
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        fresh, _ = load_model_with_adapter(str(tiny_model_dir), out, quantize="4bit", device="cpu")
        assert torch.equal(fresh(ids).logits, model(ids).logits)
