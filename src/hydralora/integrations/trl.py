"""Train a HydraLoRA model with TRL's `SFTTrainer` (or any transformers Trainer subclass).

    from trl import SFTConfig
    from hydralora.integrations.trl import HydraLoraCallback, HydraSFTTrainer

    model = add_hydralora(AutoModelForCausalLM.from_pretrained(BASE), HydraLoraConfig(...))
    trainer = HydraSFTTrainer(model=model, args=SFTConfig(output_dir="out", completion_only_loss=True),
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[HydraLoraCallback()])
    trainer.train()
    save_adapter(model, "out/adapter")

What HydraLoRA adds to a Trainer, in two parts that work apart:
- `HydraLoraTrainerMixin.compute_loss`: before the forward, tells the layers which tokens are
  real and which are prompt (`routing.route_batch`: the balance loss and statistics skip
  padding; sequence routing pools the prompt); after it, adds `balance_loss(model)` scaled for
  gradient accumulation exactly as the Trainer scales the language-model loss.
- `HydraLoraCallback`: starts the router statistics when training starts and puts head
  similarity, gate entropy and top-head share into every training log.
`HydraSFTTrainer` is TRL's SFTTrainer with the mixin. trl is imported only by this module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from ..model import balance_loss, hydralora_layers
from ..routing import collect_router_stats, diversity_report, route_batch, start_router_stats, stop_router_stats

__all__ = ["HydraLoraCallback", "HydraLoraTrainerMixin", "HydraSFTTrainer", "add_balance_loss",
           "route_inputs", "router_log"]


def _bare(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def route_inputs(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Tell the HydraLoRA layers about the batch: its real tokens (attention_mask; a
    padding-free batch without one counts every token) and its prompt (labels == -100)."""
    model = _bare(model)
    if not hydralora_layers(model) or "input_ids" not in inputs:
        return
    batch = dict(inputs)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    route_batch(model, batch)


def add_balance_loss(model: nn.Module, loss: torch.Tensor, accumulation_steps: int = 1) -> torch.Tensor:
    """`loss` plus the layers' balance loss of the last forward (divided by
    `accumulation_steps`: pass the Trainer's accumulation steps when the loss is already
    normalized over the whole accumulated batch, else 1). Unchanged when the weight is 0."""
    aux = balance_loss(_bare(model))
    return loss if aux is None else loss + aux / accumulation_steps


def router_log(model: nn.Module) -> dict[str, float]:
    """Head similarity and, when statistics are being collected, gate entropy and top-head
    share since the last call (then reset), rounded for the logs."""
    model = _bare(model)
    if not hydralora_layers(model):
        return {}
    stats = collect_router_stats(model)
    return {k: round(v, 4) for k, v in diversity_report(model, stats).items()}


class HydraLoraTrainerMixin:
    """Put before the Trainer class: `class T(HydraLoraTrainerMixin, SFTTrainer)`. Adds a
    HydraLoraCallback unless one is given."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not any(isinstance(c, HydraLoraCallback) for c in self.callback_handler.callbacks):
            self.add_callback(HydraLoraCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the masks stay set until the next batch: gradient checkpointing recomputes the
        # forward during backward and must see the same masks
        route_inputs(model, inputs)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if model.training:
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:  # the Trainer's own rule (transformers Trainer.training_step)
                scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                    or getattr(self, "compute_loss_func", None) is not None
            loss = add_balance_loss(model, loss, self.current_gradient_accumulation_steps if scaled else 1)
        else:
            balance_loss(_bare(model))  # forget evaluation's term
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # every reporter sees the router numbers
            logs.update(router_log(self.model))
        super().log(logs, *args, **kwargs)


class HydraLoraCallback(TrainerCallback):
    """Router statistics during training: collected from the first step, and added to each
    training log (`head_cos_sim`, `gate_entropy`, `gate_entropy_norm`, `top_head_share`).
    With `HydraLoraTrainerMixin` the mixin fills the logs and this callback only starts and
    stops the statistics; with a plain Trainer it adds them to the logs and the log history."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and hydralora_layers(_bare(model)):
            start_router_stats(_bare(model))

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or logs is None or "loss" not in logs or "gate_entropy" in logs:
            return
        extra = router_log(model)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and hydralora_layers(_bare(model)):
            stop_router_stats(_bare(model))


class HydraSFTTrainer(HydraLoraTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with HydraLoRA's balance loss, token masks and router logs."""
