"""`--target-modules all-linear` as PEFT resolves it, and progress bars that stay off stdout."""

from __future__ import annotations

import io
import sys

import pytest
from peft import LoraConfig, get_peft_model

from conftest import make_tiny_llama
from hydralora import HydraLoraConfig, add_hydralora, hydralora_layers
from hydralora.model import find_targets

LAYER_NAMES = {f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("targets", ["all-linear", ["all-linear"], "ALL-LINEAR"])
def test_all_linear_wraps_every_linear_layer_but_the_head(targets):
    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=2, num_heads=2, target_modules=targets))
    assert set(hydralora_layers(model)) == LAYER_NAMES
    assert "lm_head" not in hydralora_layers(model)


def test_all_linear_selects_what_peft_selects():
    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    ours = {n for n, _ in find_targets(make_tiny_llama(), "all-linear")}
    assert ours == peft_targets == LAYER_NAMES


def test_all_linear_adapter_saves_and_loads(tmp_path):
    from hydralora import load_adapter, save_adapter

    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=2, num_heads=2, target_modules=["all-linear"]))
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(make_tiny_llama(), tmp_path / "a")
    assert set(hydralora_layers(loaded)) == LAYER_NAMES


def test_all_linear_for_the_peft_baseline():
    from hydralora.methods.peft_lora import lora_config

    assert lora_config(HydraLoraConfig(target_modules=["all-linear"])).target_modules == "all-linear"


def test_progress_bars_write_nothing_to_stdout_and_hide_without_a_terminal(monkeypatch, capsys):
    from hydralora.dist import progress

    assert list(progress(range(3), "x")) == [0, 1, 2]
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # stderr is not a terminal here: no bar at all

    class Tty(io.StringIO):
        def isatty(self):
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert "counting" in fake.getvalue() and capsys.readouterr().out == ""
    fake.truncate(0)
    monkeypatch.setenv("RANK", "1")  # not the main process: no bar
    list(progress(range(3), "again"))
    assert "again" not in fake.getvalue()
