"""What every adapter method provides, so that the method is chosen in one place.

A method builds its adapter on a loaded base model, tells the trainer what to train (one part,
or one part per cluster for LoRA-Split), saves and loads its folder, and names its variant
(`hydralora info` describes the folders from their files alone: info.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..config import HydraLoraConfig


class PromptRouter(Protocol):
    """Names the adapter that serves each prompt (LoRA-Split); None for the other methods."""

    def route(self, instructions: list[str]) -> list[str]: ...


@dataclass
class TrainPart:
    """One Trainer run of a method: which PEFT adapter is active, on which examples."""

    adapter_name: str | None  # None: the model's only adapter
    sources: set[str] | None  # the examples' `source`s; None: every example
    share: float  # of the run's optimizer steps
    label: str  # shown in the log
    checkpoint_subdir: str = ""  # under OUTPUT/checkpoints


@dataclass
class Built:
    """A base model with a fresh adapter, and how to train it."""

    model: nn.Module
    parts: list[TrainPart]
    router: PromptRouter | None = None
    state: dict[str, Any] = field(default_factory=dict)  # what `save` needs besides the model
    summary: dict[str, Any] = field(default_factory=dict)  # extra summary.json entries


@dataclass(frozen=True)
class Method:
    """One adapter method. `build(model, adapter, seed, examples, options)` attaches a fresh
    adapter; `save(built, output, base_model)` writes its folder; `load(model, path)` gives
    (model, prompt router or None); `variant(adapter, options)` names the trained variant."""

    name: str
    files: tuple[str, ...]  # names it writes into an output folder (globs allowed)
    build: Callable[..., Built]
    save: Callable[[Built, Path, str], None]
    load: Callable[[nn.Module, Path], tuple[nn.Module, PromptRouter | None]]
    variant: Callable[[HydraLoraConfig, dict[str, Any]], str]
    trains_router: bool = False  # HydraLoRA layers whose router stats are collected


def one_part(label: str) -> list[TrainPart]:
    return [TrainPart(adapter_name=None, sources=None, share=1.0, label=label)]
