"""Adapter methods behind one interface (`base.Method`); the only place that picks one.

    hydralora    this package's HydraLoRA layers
    lora         PEFT LoRA (the baseline)
    lora-split   k PEFT LoRAs, one per k-means cluster, routed by the prompt's cluster
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..base_models import DEFAULT_DTYPE, load_model
from ..errors import ConfigError
from ..hub import resolve_adapter
from ..info import adapter_kind
from . import hydralora, lora_split, peft_lora
from .base import Built, Method, PromptRouter, TrainPart

METHODS: dict[str, Method] = {m.name: m for m in (hydralora.METHOD, peft_lora.METHOD, lora_split.METHOD)}

__all__ = ["METHODS", "Built", "Method", "PromptRouter", "TrainPart", "adapter_kind", "get_method",
           "load_model_with_adapter"]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def load_model_with_adapter(
    name_or_path: str,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = DEFAULT_DTYPE,
    trust_remote_code: bool = False,
    with_router: bool = False,
    device: str | torch.device | None = None,
    quantize: str | None = None,
):
    """(model, tokenizer) with a HydraLoRA, PEFT LoRA or LoRA-Split adapter applied when one is
    given; with `with_router`, (model, tokenizer, router) where router routes prompts to
    LoRA-Split adapters (None for the other kinds). `device`, `quantize`: as load_model (the
    adapter is created on the base layers' device, in float32)."""
    adapter = resolve_adapter(adapter) if adapter else None  # a hub id: its local snapshot
    kind = adapter_kind(adapter) if adapter else None  # check before the slow model load
    model, tokenizer = load_model(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                  device=device, quantize=quantize)
    router = None
    if kind is not None:
        model, router = METHODS[kind].load(model, Path(adapter))
    model.eval()
    return (model, tokenizer, router) if with_router else (model, tokenizer)


def count_adapter_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) of a model under training (PEFT's inactive adapters are counted too:
    LoRA-Split's budget is all of its adapters)."""
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad or "lora_" in n)
    return trainable, sum(p.numel() for p in model.parameters())
