"""Injection into a Hugging Face model, training, adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from hydralora import (
    AdapterError,
    ConfigError,
    HydraLoraConfig,
    HydraLoraLinear,
    add_hydralora,
    adapter_state_dict,
    RoutingContext,
    count_parameters,
    disable_adapter,
    hydralora_layers,
    load_adapter,
    remove_hydralora,
    save_adapter,
    trainable_summary,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_targets_by_suffix_and_regex(tiny_llama):
    add_hydralora(tiny_llama, HydraLoraConfig(target_modules=["q_proj", "v_proj"]))
    names = sorted(hydralora_layers(tiny_llama))
    assert names == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    model = make_tiny_llama()
    add_hydralora(model, HydraLoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert sorted(hydralora_layers(model)) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_no_match_lists_linear_layers(tiny_llama):
    with pytest.raises(ConfigError, match=r"matched no module.*self_attn\.q_proj.*lm_head"):
        add_hydralora(tiny_llama, HydraLoraConfig(target_modules=["c_attn"]))


def test_non_linear_target_is_an_error(tiny_llama):
    with pytest.raises(ConfigError, match="not linear layers"):
        add_hydralora(tiny_llama, HydraLoraConfig(target_modules=["mlp"]))


def test_double_injection_is_an_error(tiny_llama):
    add_hydralora(tiny_llama, HydraLoraConfig())
    with pytest.raises(ConfigError, match="already has HydraLoRA"):
        add_hydralora(tiny_llama, HydraLoraConfig())


def test_rank_above_layer_size_warns(tiny_llama):
    with pytest.warns(UserWarning, match="exceeds the layer's smaller dimension"):
        add_hydralora(tiny_llama, HydraLoraConfig(r=100, target_modules=["k_proj"]))


def test_exact_trainable_count_and_freezing(tiny_llama):
    cfg = HydraLoraConfig(r=4, num_heads=3, target_modules=ALL_LINEAR)
    add_hydralora(tiny_llama, cfg)
    expected = 0
    for layer in hydralora_layers(tiny_llama).values():
        d_in, d_out = layer.in_features, layer.out_features
        expected += 4 * d_in + 3 * d_out * 4 + 3 * d_in
    trainable, total = count_parameters(tiny_llama)
    assert trainable == expected
    assert all(
        p.requires_grad == (".lora_" in n or n.endswith(".router"))
        for n, p in tiny_llama.named_parameters()
    )
    assert trainable_summary(tiny_llama).startswith(f"trainable params: {expected:,} ||")


def test_remove_gives_back_original_modules(tiny_llama, tiny_batch):
    original = tiny_llama.model.layers[0].self_attn.q_proj
    before = tiny_llama(tiny_batch).logits
    add_hydralora(tiny_llama, HydraLoraConfig(target_modules=ALL_LINEAR))
    for layer in hydralora_layers(tiny_llama).values():
        torch.nn.init.normal_(layer.lora_B)
    assert not torch.allclose(tiny_llama(tiny_batch).logits, before)
    remove_hydralora(tiny_llama)
    assert tiny_llama.model.layers[0].self_attn.q_proj is original
    assert torch.equal(tiny_llama(tiny_batch).logits, before)
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_base_output_at_init_and_disable_adapter(tiny_llama, tiny_batch):
    before = tiny_llama(tiny_batch).logits
    add_hydralora(tiny_llama, HydraLoraConfig(target_modules=ALL_LINEAR))
    assert torch.equal(tiny_llama(tiny_batch).logits, before)
    for layer in hydralora_layers(tiny_llama).values():
        torch.nn.init.normal_(layer.lora_B)
    assert not torch.allclose(tiny_llama(tiny_batch).logits, before)
    with disable_adapter(tiny_llama):
        assert torch.equal(tiny_llama(tiny_batch).logits, before)


@pytest.mark.parametrize("balance", [0.0, 0.01])
def test_training_lowers_loss_and_changes_only_adapter(tiny_llama, tiny_batch, balance):
    cfg = HydraLoraConfig(r=4, num_heads=3, target_modules=ALL_LINEAR, balance_loss_weight=balance)
    add_hydralora(tiny_llama, cfg)
    tiny_llama.train()
    frozen = {n: p.clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    adapter_before = {k: v.clone() for k, v in adapter_state_dict(tiny_llama).items()}
    opt = torch.optim.AdamW([p for p in tiny_llama.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        with RoutingContext() as routing:
            loss = tiny_llama(tiny_batch, labels=tiny_batch).loss
        losses.append(loss.item())
        aux = routing.balance_loss()
        assert (aux is not None) == (balance > 0)
        if aux is not None:
            loss = loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]
    for n, p in tiny_llama.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for k, v in adapter_state_dict(tiny_llama).items():
        assert not torch.equal(v, adapter_before[k]), k


def trained_model(seed=0, **cfg):
    model = make_tiny_llama()
    add_hydralora(model, HydraLoraConfig(target_modules=ALL_LINEAR, **cfg))
    torch.manual_seed(seed)
    for p in adapter_state_dict(model).values():
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("cfg", [{}, {"shared_a": False, "router_input": "a"}, {"num_heads": 1}])
def test_save_load_bit_identical(tmp_path, tiny_batch, cfg):
    model = trained_model(**cfg)
    model.eval()
    logits = model(tiny_batch).logits
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HYDRALORA" and saved["base_model_name_or_path"] == "tiny-llama"
    assert "hydralora_version" in saved
    fresh = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    assert torch.equal(fresh(tiny_batch).logits, logits)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_safetensors_keys_follow_the_documented_layout(tmp_path):
    from safetensors.torch import load_file

    model = trained_model(r=4, num_heads=3)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.up_proj"
    assert tensors[f"{key}.lora_A"].shape == (4, 64)
    assert tensors[f"{key}.lora_B"].shape == (128, 12)
    assert tensors[f"{key}.router"].shape == (3, 64)
    layer = hydralora_layers(model)[key]
    assert torch.equal(tensors[f"{key}.lora_B"][:, 4:8], layer.lora_B[:, 4:8].detach())


def test_mismatched_adapter_lists_every_problem(tmp_path, tiny_batch):
    model = trained_model()
    save_adapter(model, tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    reference = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(AdapterError) as err:
        load_adapter(other, tmp_path / "a")
    message = str(err.value)
    assert "missing keys" in message and "model.layers.2." in message
    assert "model.layers.0.self_attn.q_proj.lora_A: saved shape (8, 64), model expects (8, 32)" in message
    assert message.count("saved shape") == 2 * 7 * 3  # every (layer, module, tensor) mismatch
    # the model is given back untouched
    assert not hydralora_layers(other)
    assert all(torch.equal(p, reference[n]) for n, p in other.named_parameters())


def test_bad_config_file_errors(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**data, "num_heads": 0}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: HydraLoraConfig.num_heads=0"):
        load_adapter(make_tiny_llama(), tmp_path / "a")
    cfg_file.write_text(json.dumps({**data, "rank": 8}))
    with pytest.raises(ConfigError, match=r"unknown HydraLoRA config key\(s\) \['rank'\]"):
        load_adapter(make_tiny_llama(), tmp_path / "a")
    cfg_file.write_text("{not json")
    with pytest.raises(ConfigError, match="line 1: not valid JSON"):
        load_adapter(make_tiny_llama(), tmp_path / "a")
    cfg_file.unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        load_adapter(make_tiny_llama(), tmp_path / "a")


def test_corrupted_weights_file(tmp_path):
    save_adapter(trained_model(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        load_adapter(make_tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("r", 0, "rank must be >= 1"),
        ("num_heads", 0, "heads must be >= 1"),
        ("alpha", 0, "alpha must be > 0"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("router", "sparse", "unknown router"),
        ("router_input", "h", "unknown router input"),
        ("target_modules", [], "non-empty list"),
        ("target_modules", "(", "not a valid regular expression"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ConfigError, match=match):
        HydraLoraConfig(**{field: value})


def test_topk_validation():
    with pytest.raises(ConfigError, match="top_k must be between 1 and num_heads=4"):
        HydraLoraConfig(router="topk", top_k=5)
    HydraLoraConfig(router="softmax", top_k=5)  # top_k only matters for the topk router


def test_config_json_round_trip():
    cfg = HydraLoraConfig(r=4, num_heads=2, target_modules=r".*q_proj", router="topk", top_k=2)
    assert HydraLoraConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_failed_save_keeps_previous_adapter(tmp_path, tiny_batch, monkeypatch):
    import hydralora.model

    model = trained_model(seed=0)
    save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    model2 = trained_model(seed=1)

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hydralora.model, "save_file", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model2, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory left


def test_save_refuses_existing_without_overwrite(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="already holds an adapter"):
        save_adapter(model, tmp_path / "a", overwrite=False)


def test_layers_are_drop_in(tiny_llama):
    add_hydralora(tiny_llama, HydraLoraConfig(target_modules=["q_proj"]))
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, HydraLoraLinear)
    out = layer(torch.randn(2, 3, 4, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 4, 64)
