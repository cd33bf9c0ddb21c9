"""The PEFT LoRA baseline: same targets, rank, alpha and dropout as the HydraLoRA config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import HydraLoraConfig
from ..data import Example
from ..files import read_manifest, temporary_dir
from ..files import CONFIG_NAME
from ..model import ALL_LINEAR, is_all_linear
from .base import Built, Method, one_part


def lora_config(adapter: HydraLoraConfig, r: int | None = None) -> LoraConfig:
    targets = ALL_LINEAR if is_all_linear(adapter.target_modules) else adapter.target_modules
    return LoraConfig(r=r or adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def build(model: nn.Module, adapter: HydraLoraConfig, seed: int, examples: list[Example],
          options: dict[str, Any]) -> Built:
    torch.manual_seed(seed)
    return Built(get_peft_model(model, lora_config(adapter)), one_part(variant(adapter, options)))


def save_peft_files(model: nn.Module, output: Path) -> None:
    """PEFT's own files, each moved into place atomically (the config last)."""
    ours = read_manifest(output) or set()
    with temporary_dir(output, ".peft-") as tmp:
        model.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            if f.name == "README.md" and (output / f.name).exists() and f.name not in ours:
                continue  # PEFT's model card must not replace the user's README
            os.replace(f, output / f.name)


def save(built: Built, output: Path, base_model: str) -> None:
    save_peft_files(built.model, output)


def load(model: nn.Module, path: Path) -> tuple[nn.Module, None]:
    return PeftModel.from_pretrained(model, str(path)), None


def variant(adapter: HydraLoraConfig, options: dict[str, Any]) -> str:
    alpha = "" if adapter.alpha == HydraLoraConfig().alpha else f", alpha={adapter.alpha:g}"
    return f"LoRA r={adapter.r}{alpha} (PEFT)"


METHOD = Method(name="lora", files=(CONFIG_NAME, "adapter_model.safetensors", "README.md"), build=build,
                save=save, load=load, variant=variant)
