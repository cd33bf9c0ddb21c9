"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for HydraLoRA runs.

On GPUs the Trainer's `fsdp` option goes through accelerate, which shards the model itself.
On CPU processes (gloo) accelerate ignores its FSDP plugin and would fall back to DDP, which
refuses sharded parameters; there hydralora shards the model (each decoder layer, then the
root, as accelerate's FSDP2 does) and tells the Trainer that the model owns its placement and
gradient reduction. The helpers below also gather the full optimizer state for checkpoints
(rank 0 writes it, keyed by parameter name) and, after training, unshard the model so that
rank 0 alone can evaluate and save it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..dist import log
from ..errors import ConfigError

OPTIMIZER_FILE = "optimizer.safetensors"  # the whole state, by parameter name
OPTIMIZER_META = "optimizer_state.json"  # parameter groups and the scheduler's state


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages (part of) the model."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def layer_class_names(model: nn.Module, fsdp_config: dict[str, Any]) -> list[str]:
    names = fsdp_config.get("transformer_layer_cls_to_wrap") or getattr(model, "_no_split_modules", None)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    return list(names or [])


def requested_fsdp_config(args: Any) -> dict[str, Any] | None:
    """The FSDP settings asked for: TrainingArguments' fsdp_config, else those that
    `accelerate launch` passes in the environment; None when FSDP is not asked for."""
    if args.fsdp:
        return dict(args.fsdp_config or {})
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return {
        "version": os.environ.get("FSDP_VERSION", "2"),
        "transformer_layer_cls_to_wrap": os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or None,
        "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true"),
    }


def shard_model(model: nn.Module, fsdp_config: dict[str, Any]) -> int:
    """`fully_shard` every decoder layer (fsdp_config's transformer_layer_cls_to_wrap, else the
    model's _no_split_modules), then the root, in place. Returns the number of layers."""
    if str(fsdp_config.get("version", 2)) != "2":
        raise ConfigError("FSDP on CPU processes: only FSDP2 is supported; set fsdp_config version: 2")
    names = layer_class_names(model, fsdp_config)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"FSDP: no module of the classes {names} to wrap; set fsdp_config "
            "transformer_layer_cls_to_wrap to the model's decoder layer class"
        )
    reshard = str(fsdp_config.get("reshard_after_forward", True)).lower() != "false"
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return len(layers)


def unshard_for_inference(model: nn.Module) -> None:
    """Gather every FSDP2 module's parameters (every process must call this) and keep them
    gathered: afterwards a forward needs no collective, so one process may evaluate or save."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()


def like_parameter(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out like `param` (sharded when param is a DTensor)."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   folder: str, should_save: bool) -> None:
    """Gather the optimizer state of a sharded model (every process calls this) and let the
    writing process save it (tensors as safetensors, the rest as JSON) with the scheduler's."""
    inner = getattr(optimizer, "optimizer", optimizer)
    state = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
    if not should_save:
        return
    tensors = {f"{name}/{key}": value.contiguous() for name, values in state["state"].items()
               for key, value in values.items()}
    save_file(tensors, os.path.join(folder, OPTIMIZER_FILE))
    meta = {"param_groups": state["param_groups"], "scheduler": scheduler.state_dict()}
    with open(os.path.join(folder, OPTIMIZER_META), "w") as f:
        json.dump(meta, f)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   folder: str) -> None:
    """Load what save_optimizer wrote: rank 0 reads it and broadcasts the shards."""
    inner = getattr(optimizer, "optimizer", optimizer)
    with open(os.path.join(folder, OPTIMIZER_META)) as f:
        meta = json.load(f)
    state: dict[str, Any] = {}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        values: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(os.path.join(folder, OPTIMIZER_FILE)).items():
            name, _, field = key.rpartition("/")
            values.setdefault(name, {})[field] = tensor
        state = {"state": values, "param_groups": meta["param_groups"]}
    set_optimizer_state_dict(model, inner, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    scheduler.load_state_dict(meta["scheduler"])


class CpuFsdpMixin:
    """For the Trainer: FSDP2 applied by hydralora on CPU processes. The model reduces its own
    gradients, and checkpoints hold the whole optimizer state (the Trainer's own save would
    write rank 0's shards only)."""

    sharded_by_hydralora = False

    def shard_for_cpu(self) -> None:
        """FSDP asked for on CPU processes (the Trainer's `fsdp` option, or `accelerate launch`
        with an FSDP config), where accelerate ignores it: shard the model here and let the
        Trainer treat it as sharded at load time (no DDP around it)."""
        config = requested_fsdp_config(self.args)
        if config is None or self.is_fsdp_enabled or self.args.world_size < 2:
            return
        layers = shard_model(self.model, config)
        self.is_distributed_loading_by_transformers = True
        self.sharded_by_hydralora = True
        log(f"FSDP2 (fully_shard) on {layers} decoder layers and the root, "
            f"{self.args.world_size} CPU processes")

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):  # gradient accumulation: reduce at the last micro-step
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded_by_hydralora:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer(self.model, self.optimizer, self.lr_scheduler, output_dir, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded_by_hydralora or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer(self.model, self.optimizer, self.lr_scheduler, checkpoint)


def release_zero3(engine: Any, model: nn.Module) -> None:
    """After DeepSpeed ZeRO-3 training: gather every parameter whole (every process must call
    this), then drop the engine's hooks, so that one process alone can evaluate and save."""
    import deepspeed  # optional: only runs under --trainer-arg deepspeed=...

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        whole = [p.data.clone() for p in params]
    engine.destroy()  # removes the engine's module hooks
    for p, data in zip(params, whole):
        p.data = data
        if hasattr(p, "ds_status"):
            p.ds_status = deepspeed.runtime.zero.partition_parameters.ZeroParamStatus.AVAILABLE
    for module in model.modules():  # ZeRO-3's parameter dict gathers on access: a plain one
        module._parameters = dict(module._parameters.items())
