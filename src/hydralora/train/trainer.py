"""The transformers Trainer, extended for HydraLoRA, and `fit`: one Trainer run.

The Trainer brings gradient accumulation, schedules, bf16 autocast, logging, checkpoints with
optimizer/scheduler/RNG state, resume, and DDP under torchrun. On top of it: the response-only
loss (`ResponseLossTrainer`), HydraLoRA's routing, loss terms, router learning rate and logs
(`integration.HydraLoraTrainerMixin`, the same mixin TRL's SFTTrainer uses), adapter-only
checkpoints (written atomically and marked complete), a stop with a clear message on a
non-finite loss, and SIGINT -> checkpoint -> exit.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..base_models import is_quantized, resolve_device
from ..data import Collator, TokenizedDataset, group_by_domain
from ..data.tokenize import PackedRows, pack_features
from ..dist import is_main_process, log, world_size
from ..errors import ConfigError, TrainingError, TrainingInterrupted
from ..files import record_written, stamp_tree, storage_error
from ..eval.loss import response_nll
from ..model import (
    adapter_state_dict,
    count_parameters,
    full_adapter_tensors,
    hydralora_layers,
    load_adapter_weights,
    read_adapter,
    save_adapter,
)
from ..routing.context import checkpoint_kwargs
from .config import TrainConfig
from .integration import HydraLoraTrainerMixin
from .tracking import tracking_folders
from .arguments import normalize_trainer_args
from .output import COMPLETE_MARKER, claim_checkpoint, last_checkpoint, rotate_checkpoints, write_failure
from .sharding import CpuFsdpMixin, is_sharded, like_parameter, release_zero3, unshard_for_inference


class NonFiniteLossError(TrainingError):
    def __init__(self, step: int, value: float, checkpoints: str):
        self.step = step
        super().__init__(
            f"the loss became {value} at step {step}; training stopped before applying that "
            f"update. The last complete checkpoint (if any) is kept in {checkpoints}: lower "
            "--learning-rate, check the data, or try --bf16 false, then --resume."
        )


class ResponseLossTrainer(Trainer):
    """The Trainer with `hydralora train`'s loss: the mean cross-entropy over the response
    tokens, with vocabulary logits computed only where labeled; a non-finite loss stops."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.loss_is_scaled_for_ga = True  # compute_loss normalizes over the accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Normalized over the whole accumulated (and distributed) batch as the Trainer does
        for models that take num_items_in_batch; in evaluation, the batch's mean."""
        if model.training:  # a device tensor: no host synchronization per step
            self.tokens_seen = inputs["attention_mask"].sum() + self.tokens_seen
        nll, _ = response_nll(PackedRows(model, inputs["position_ids"]) if "position_ids" in inputs else model,
                              inputs)
        if num_items_in_batch is None:  # evaluation: the batch's mean
            loss = nll.sum() / max(nll.numel(), 1)
            if model.training:
                loss = loss / getattr(self, "current_gradient_accumulation_steps",
                                      self.args.gradient_accumulation_steps)
        else:
            loss = nll.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:  # DDP averages; undo it
                loss = loss * self.accelerator.num_processes
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(self.state.global_step + 1, loss.item(),
                                     str(Path(self.args.output_dir)))
        return (loss, {}) if return_outputs else loss  # no logits kept: evaluation reads the loss


class HydraTrainer(HydraLoraTrainerMixin, CpuFsdpMixin, ResponseLossTrainer):
    """`hydralora train`'s Trainer: HydraLoRA's mixin, the response-only loss, FSDP2 on CPU,
    per-domain held-out losses and adapter-only checkpoints."""

    def __init__(self, *args: Any, domain_eval: dict[str, Any] | None = None, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        # transformers refuses a quantized base unless a PEFT adapter is attached; HydraLoRA
        # layers are trainable adapters too, so they pass its check the same way (Trainer init only)
        vouch = model is not None and is_quantized(model) and bool(hydralora_layers(model))
        if vouch:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if vouch:
                del model._hf_peft_config_loaded
        self.domain_eval = domain_eval or {}  # {domain: dataset} logged beside eval_loss
        # the Trainer's rotation deletes every checkpoint-* folder, ours or not: ours keeps to ours
        self.checkpoint_limit, self.args.save_total_limit = self.args.save_total_limit, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's held-out loss (eval_loss); during training also each domain's
        (eval_<domain>_loss) when the held-out set has more than one."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and len(self.domain_eval) > 1:
            for name, dataset in self.domain_eval.items():
                metrics.update(super().evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._has_hydra():
            return super()._save(output_dir, state_dict)
        if self.is_deepspeed_enabled and state_dict:  # the engine's gathered weights (ZeRO-3 too)
            keys = adapter_state_dict(self._hydra_model())
            if self.args.should_save and keys.keys() <= state_dict.keys():
                tensors = {k: state_dict[k].detach().float().contiguous().cpu() for k in keys}
                save_adapter(self._hydra_model(), output_dir or self.args.output_dir, tensors=tensors)
        elif is_sharded(self._hydra_model()):  # every process gathers, the first one writes
            tensors = full_adapter_tensors(self._hydra_model())
            if self.args.should_save:
                save_adapter(self._hydra_model(), output_dir or self.args.output_dir, tensors=tensors)
        elif self.args.should_save:
            save_adapter(self._hydra_model(), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        if not self._has_hydra():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _, tensors = read_adapter(resume_from_checkpoint)
        params = adapter_state_dict(self._hydra_model())  # sharded ones get the saved tensor's shards
        tensors = {k: like_parameter(params[k], t) if k in params else t for k, t in tensors.items()}
        load_adapter_weights(self._hydra_model(), tensors, source=resume_from_checkpoint)

    def _load_best_model(self) -> None:  # load_best_model_at_end: the best checkpoint's adapter
        if not self._has_hydra():
            return super()._load_best_model()
        log(f"loading the best checkpoint {self.state.best_model_checkpoint} "
            f"({self.args.metric_for_best_model} {self.state.best_metric})")
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, into a folder that is ours (listed before it is written),
        marked complete last; a write that fails (disk full, ...) is one StorageError and the
        partial checkpoint is removed; then the oldest of our checkpoints beyond the limit go."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        folder = run_dir / name
        if self.args.should_save:
            run_dir.mkdir(parents=True, exist_ok=True)
            claim_checkpoint(run_dir, name)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:  # written last: the checkpoint is whole
                (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))
        except (OSError, RuntimeError) as err:
            failure = write_failure(err, run_dir)
            if failure is None or not self.args.should_save:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            record_written(run_dir, forget=[name])
            raise storage_error(failure, folder, "this checkpoint was removed, the earlier ones "
                                "are kept") from None
        if self.args.should_save:
            stamp_tree(folder, top=True)  # lists its files; permissions others can read
            rotate_checkpoints(run_dir, self.checkpoint_limit, self.state.best_model_checkpoint)


class InterruptCallback(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop."""

    def __init__(self) -> None:
        self.interrupted_at: int | None = None
        self._requested = False
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame):
        if self._requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._requested = True
        print("\n[hydralora] interrupt: saving a checkpoint after this step ...", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested:
            self.interrupted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the handlers found at the start back (also after a training that raised)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, max_steps: int, use_bf16: bool,
                       device: torch.device) -> TrainingArguments:
    """The run's TrainingArguments: train's own options, then `cfg.trainer_args` over them."""
    values = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        max_steps=max_steps,
        num_train_epochs=cfg.num_train_epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not is_main_process(),
        log_level="warning",
        label_names=["labels"],
        prediction_loss_only=True,  # evaluation: the held-out loss (compute_loss keeps no logits)
    )
    values.update(normalize_trainer_args(cfg.trainer_args))
    if values.get("eval_strategy", "no") != "no" and "per_device_eval_batch_size" not in cfg.trainer_args:
        values["per_device_eval_batch_size"] = cfg.per_device_train_batch_size
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError, OSError) as err:  # a value the Trainer refuses
        message = " ".join(str(err).split())
        raise ConfigError(f"trainer arguments {sorted(cfg.trainer_args)}: {message}") from None


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    features: list[dict[str, Any]],
    tokenizer: Any,
    checkpoint_dir: Path,
    max_steps: int,
    use_bf16: bool,
    resume: bool = False,
    label: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    eval_features: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train `model` (adapter already attached) on `features` with the Trainer; returns the
    unwrapped model and the run's numbers. `callbacks` are added to the Trainer's.
    `eval_features` (the held-out set) is the Trainer's eval dataset, used when
    `--trainer-arg eval_strategy=steps|epoch` asks for evaluation. Raises
    TrainingInterrupted after Ctrl-C."""
    trainable, total = count_parameters(model)
    if label:
        log(f"{label}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if cfg.gradient_checkpointing:  # the recomputation in backward sees the forward's routing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())
        model.enable_input_require_grads()
    device = resolve_device(cfg.device)
    if cfg.packing:
        packed = pack_features(features, cfg.max_length)
        log(f"packing: {len(features)} examples in {len(packed)} rows of at most {cfg.max_length} tokens")
        features = packed
    interrupt = InterruptCallback()
    args = training_arguments(cfg, checkpoint_dir, max_steps, use_bf16, device)
    if args.eval_strategy != "no" and not eval_features:
        raise ConfigError(f"trainer argument eval_strategy={args.eval_strategy.value} needs a "
                          "held-out set: give --eval-data FILE [FILE ...] (or --eval-data builtin)")
    domains = group_by_domain(eval_features or [])
    trainer = HydraTrainer(
        model=model,
        args=args,
        train_dataset=TokenizedDataset(features),
        eval_dataset=TokenizedDataset(eval_features) if eval_features else None,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[interrupt, *callbacks],
        router_lr_multiplier=cfg.router_lr_multiplier,
        domain_eval={d: TokenizedDataset(f) for d, f in domains.items()},
        guide_loss_weight=cfg.guide_loss_weight,
        guide_schedule=cfg.guide_schedule,
    )
    tracking_folders(trainer, Path(cfg.output))
    resume_from = None
    if resume:
        resume_from = str(last_checkpoint(checkpoint_dir.parent))
        log(f"resuming from {resume_from}")
    trainer.shard_for_cpu()
    t0 = time.time()
    try:
        outcome = trainer.train(resume_from_checkpoint=resume_from)
    finally:  # also when training raises: Ctrl-C must work again afterwards
        interrupt.restore()
    seconds = time.time() - t0
    # without accelerate's autocast wrapper on forward: the model returned behaves as one loaded fresh
    bare = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if is_sharded(bare):  # FSDP: gathered, so rank 0 alone can evaluate and save
        unshard_for_inference(bare)
    elif trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_config["zero_optimization"].get("stage") == 3:
        release_zero3(trainer.model_wrapped, bare)  # likewise for ZeRO-3's partitioned weights
    if interrupt.interrupted_at is not None:
        raise TrainingInterrupted(interrupt.interrupted_at, last_checkpoint(checkpoint_dir.parent))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "model": bare,
        "steps": trainer.state.global_step,
        "tokens": int(trainer.tokens_seen),
        "seconds": seconds,
        "final_loss": losses[-1] if losses else outcome.training_loss,
        "train_loss": outcome.training_loss,
        "trainable": trainable,
        "total": total,
        "fingerprints": rank_fingerprints(bare),
        "router_stats": trainer.take_router_stats(),
    }


def rank_fingerprints(model: nn.Module) -> list[str]:
    """A hash of the trainable weights from every process (DDP keeps them identical)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
