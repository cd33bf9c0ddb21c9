"""What HydraLoRA adds to any transformers Trainer: one mixin, used by `hydralora train`'s
trainer and by TRL's SFTTrainer alike (`integrations.trl.HydraSFTTrainer`).

    class MyTrainer(HydraLoraTrainerMixin, SFTTrainer): ...      # or any Trainer subclass

Through the Trainer's public extension points only:
- `compute_loss`: runs the forward inside a routing context built from the batch (real
  tokens, prompt tokens, head labels; activation checkpointing repeats it in the same
  context: `routing.context.route_checkpointing`), then adds the balance loss and, when asked, the guide
  loss, scaled for gradient accumulation exactly as the Trainer scales the language-model
  loss (`loss_is_scaled_for_ga`, or the Trainer's own rule). Router statistics are gathered
  only on the optimizer steps that log (every micro-batch of them): other steps pay nothing.
- `create_optimizer`: the routers in parameter groups of their own, at lr times
  `router_lr_multiplier` (default: the adapter's preset's, 1 without a preset).
- `log`: head similarity, gate entropy and top-head share beside the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model import hydralora_layers
from ..routing.context import GateStats, RoutingContext, route_checkpointing
from ..routing.stats import diversity_report

__all__ = ["HydraLoraTrainerMixin", "router_parameter_groups"]


def router_parameter_groups(optimizer: torch.optim.Optimizer, model: nn.Module,
                            multiplier: float) -> torch.optim.Optimizer:
    """Move the routers' parameters of `optimizer` into groups of their own that learn at
    lr * multiplier (every other setting as the group they came from). The routers: every
    HydraLoRA layer's, found by module (not by name: a user's parameter that happens to be
    called `router` stays in its group), so any wrapper's naming works: ours, PEFT's, FSDP's."""
    if multiplier == 1.0:
        return optimizer
    routers = {id(layer.router) for layer in hydralora_layers(model).values() if layer.router is not None}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in routers]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in routers]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                   "params": moved, "lr": group["lr"] * multiplier})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return optimizer


class HydraLoraTrainerMixin:
    """Put before the Trainer class. Keyword arguments it takes (the rest go to the Trainer):
    `router_lr_multiplier` (None: the adapter's preset's), `guide_loss_weight` (0: off; the
    batch's `route_labels` are the labels), `guide_schedule` ('constant' or 'decay')."""

    def __init__(self, *args: Any, router_lr_multiplier: float | None = None,
                 guide_loss_weight: float = 0.0, guide_schedule: str = "constant", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.router_lr_multiplier = router_lr_multiplier
        self.guide_loss_weight, self.guide_schedule = guide_loss_weight, guide_schedule
        self.gate_stats = GateStats()
        self.last_router_stats: dict[str, dict[str, Any]] = {}
        self._hydra_seen: tuple[int, bool] | None = None  # (id of the model looked at, has layers)
        self._checkpoint_seen: tuple[nn.Module, Any] | None = None  # a module and its checkpoint function

    # ------------------------------------------------------------------ helpers
    def _hydra_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _has_hydra(self) -> bool:
        """Whether the model holds HydraLoRA layers; looked up once per model (a walk over
        every module), not on every micro-batch."""
        model = self._hydra_model()
        if self._hydra_seen is None or self._hydra_seen[0] != id(model):
            self._hydra_seen = (id(model), bool(hydralora_layers(model)))
        return self._hydra_seen[1]

    def _route_checkpointing(self, model: nn.Module) -> None:
        """`route_checkpointing(model)`, walking the modules again only when the checkpoint
        functions changed since the last call (each `Trainer.train()` installs new ones)."""
        seen = self._checkpoint_seen
        if seen is not None and getattr(seen[0], "_gradient_checkpointing_func", None) is seen[1]:
            return
        route_checkpointing(model)
        first = next((m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None)), None)
        self._checkpoint_seen = (first, first._gradient_checkpointing_func) if first is not None else None

    def _hydra_config(self):
        layers = hydralora_layers(self._hydra_model())
        return next(iter(layers.values())).config if layers else None

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step now running ends in a training log (or ends training)."""
        args, state = self.args, self.state
        step = state.global_step + 1
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if state.max_steps and step >= state.max_steps:
            return True
        if strategy == "steps":
            every = state.logging_steps or args.logging_steps
            return step % max(int(every), 1) == 0 or (args.logging_first_step and step == 1)
        return strategy == "epoch"  # epoch ends are not known per step: gather always

    def _guide_weight_now(self) -> float:
        """The guide loss weight at this step: constant, or decaying linearly to 0 ('decay')."""
        if self.guide_schedule == "constant" or not self.state.max_steps:
            return self.guide_loss_weight
        return self.guide_loss_weight * max(0.0, 1.0 - self.state.global_step / self.state.max_steps)

    def _aux_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer treats compute_loss's result as already divided over the
        accumulated batch (then the router terms are divided here, else the Trainer does it)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # the Trainer's own rule (transformers Trainer.training_step)
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return bool(scaled)

    # ------------------------------------------------------------------ Trainer extension points
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        multiplier = self.router_lr_multiplier
        if multiplier is None:
            config = self._hydra_config()
            multiplier = config.preset_training("router_lr_multiplier", 1.0) if config else 1.0
        return router_parameter_groups(optimizer, model or self.model, multiplier)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._has_hydra():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        training = model.training
        if training and getattr(self.args, "gradient_checkpointing", False):
            self._route_checkpointing(model)  # the recomputation in backward sees this batch's routing
        guide = self._guide_weight_now() if training and "route_labels" in inputs else 0.0
        stats = self.gate_stats if training and self._logs_this_step() else None
        with RoutingContext.from_batch(inputs, stats=stats, example_gates=guide > 0) as routing:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if not training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        aux = routing.aux_loss(guide)
        if torch.is_tensor(aux):
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + (aux / steps if self._aux_scaled_for_ga(num_items_in_batch) else aux)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._has_hydra():
            stats = self.take_router_stats()
            logs.update({k: round(v, 4) for k, v in diversity_report(self._hydra_model(), stats).items()})
        super().log(logs, *args, **kwargs)

    def take_router_stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics gathered since the last call (then reset); when nothing was
        gathered since, the last ones taken."""
        if self.gate_stats:
            self.last_router_stats = self.gate_stats.summary(self._hydra_model())
            self.gate_stats.reset()
        return self.last_router_stats
