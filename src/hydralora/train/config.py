"""`hydralora train`'s options: everything about a run except the adapter's own settings.

Light on purpose (no torch, no transformers at import; the checks that need transformers
import it when they run): the command line builds its flags from this class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..commands.common import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL,
    K_MAX,
    METHOD_NAMES,
    QUANTIZE_MODES,
    SPLIT_MODES,
    TEST_PER_DOMAIN,
    TRAIN_PER_DOMAIN,
    check_placement,
)
from ..config import DEFAULT_PRESET, PRESETS, get_preset
from ..errors import ConfigError, TrainingError, short
from ..options import check_ranges


@dataclass
class TrainConfig:
    """Everything about a run except the adapter's own settings (see HydraLoraConfig)."""

    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name (smollm2-135m)."""
    preset: str = field(default=DEFAULT_PRESET, metadata={"choices": tuple(PRESETS)})
    """A named recipe for the adapter and training values not given: recommended (random heads,
    router lr x10) or paper (the authors' recipe: alpha 32, router lr x1, max length 1024)."""
    data: list[str] = field(default_factory=list)
    """Training files (.jsonl, .json, .csv, .parquet); 'builtin' = the built-in mixture's train split."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out files for per-domain loss before and after training; 'builtin' = its test split."""
    eval_base: bool = True
    """With --eval-data, also measure the base model's held-out loss before training."""
    output: str = ""
    """Output directory: the final adapter, train_config.yaml, summary.json, checkpoints/."""
    method: str = "hydralora"
    """hydralora; lora (PEFT LoRA, same data/schedule/targets); lora-split (k PEFT LoRAs, one per k-means cluster)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use --epochs."""
    epochs: float = 1.0
    """Passes over the training data when --max-steps is -1 (the paper: 1)."""
    lr: float = 2e-4
    """Peak learning rate (the paper: 2e-4)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear, constant, ..."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up from 0 (the paper: 0.03)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 0)."""
    router_lr_multiplier: float | None = None
    """The routers learn at lr times this; default: the preset's (recommended 10: the best
    setting of the head-diversity study in docs/results.md; paper 1)."""
    route_labels_from: str = "cluster"
    """Labels of the oracle routing and the guide loss: 'cluster' (k-means of the instructions,
    as for choosing k) or 'domain' (the records' domain field)."""
    guide_loss_weight: float = 0.0
    """Cluster-guided routing: weight of a loss pulling each example's mean gates toward the
    head of its label (see route_labels_from); 0 = off. Inference still routes on the input."""
    guide_schedule: str = "constant"
    """Weight of the guide loss over training: constant, or decay (linearly to 0)."""
    batch_size: int = 8
    """Examples per step per process."""
    grad_accum: int = 1
    """Gradient accumulation steps (effective batch = batch_size * grad_accum * processes)."""
    max_length: int | None = None
    """Tokens per example; longer examples are truncated (and counted). Default: the preset's
    (recommended 512, paper 1024)."""
    skip_overlong: bool = False
    """Drop examples whose response is truncated away entirely instead of stopping."""
    seed: int = 0
    """Seed of initialization, data order and dropout."""
    bf16: str = "auto"
    """bf16 autocast: auto (on when the processor supports it), true or false."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the base weights: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    device: str = DEFAULT_DEVICE
    """auto (the GPU when there is one; each torchrun process its own), cpu, or cuda (pick the GPU with CUDA_VISIBLE_DEVICES)."""
    quantize: str = field(default="none", metadata={"choices": QUANTIZE_MODES})
    """QLoRA: load the base quantized by bitsandbytes, 4bit (nf4, double quantization) or 8bit; none = full precision."""
    logging_steps: int = 10
    """Log loss, router statistics and head diversity every N steps."""
    save_steps: int = 100
    """Checkpoint every N steps (0: only the final adapter)."""
    save_total_limit: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the last complete checkpoint in OUTPUT/checkpoints."""
    overwrite: bool = False
    """Allow writing over an adapter that OUTPUT already holds."""
    k_max: int = K_MAX
    """Largest k tried by --num-heads auto."""
    split_ranks: str = "budget"
    """lora-split: 'budget' gives each of the k adapters rank r/k (the paper's LoRA-Split), 'each' rank r."""
    builtin_train_per_domain: int = TRAIN_PER_DOMAIN
    """Examples per domain of the built-in mixture's train split."""
    builtin_test_per_domain: int = TEST_PER_DOMAIN
    """Examples per domain of the built-in mixture's test split."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model (off unless you trust it)."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """HydraLoraConfig values (the CLI fills these from the adapter flags); the preset fills the
    keys not given."""
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Any other transformers TrainingArguments field (report_to, optim, max_grad_norm,
    eval_strategy, fsdp, deepspeed, ...); they override what train sets. CLI: repeatable
    --trainer-arg KEY=VALUE; YAML: a `trainer:` mapping."""

    def __post_init__(self) -> None:
        """Fill what was not given from the preset: adapter keys, then the training values
        whose default is None."""
        preset = get_preset(self.preset)
        self.adapter = {**preset.adapter, **self.adapter, "preset": self.preset}
        for key, value in preset.training.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.max_length is None:
            self.max_length = DEFAULT_MAX_LENGTH

    def validate(self) -> None:
        if not self.data:
            raise TrainingError("no training data: give --data FILE [FILE ...] (or --data builtin)")
        if not self.output:
            raise TrainingError("no output directory: give --output DIR")
        if self.method not in METHOD_NAMES:
            raise TrainingError(f"--method {self.method!r}: choose one of {', '.join(METHOD_NAMES)}")
        if self.route_labels_from not in ("cluster", "domain"):
            raise TrainingError("--route-labels-from must be cluster or domain")
        if self.guide_schedule not in ("constant", "decay"):
            raise TrainingError("--guide-schedule must be constant or decay")
        if not self.guide_loss_weight >= 0:
            raise TrainingError("--guide-loss-weight must be >= 0")
        if not self.router_lr_multiplier > 0:
            raise TrainingError("--router-lr-multiplier must be > 0 (a negative one makes the router ascend the loss)")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise TrainingError("give --max-steps > 0 or --epochs > 0")
        if not self.lr > 0:
            raise TrainingError("--lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError("--warmup-ratio must be in [0, 1)")
        if self.split_ranks not in SPLIT_MODES:
            raise TrainingError("--split-ranks must be budget or each")
        if self.method == "lora-split" and self.resume:
            raise TrainingError("--resume is not supported for --method lora-split; start again")
        if self.bf16 not in ("auto", "true", "false"):
            raise TrainingError("--bf16 must be auto, true or false")
        if isinstance(self.max_steps, int) and self.max_steps < -1:
            raise ConfigError("--max-steps must be -1 (train for --epochs) or >= 1")
        check_ranges(self, {**({"max_steps": ">=0"} if self.max_steps != -1 else {}), "epochs": ">=0.0",
                            "lr": ">0", "weight_decay": ">=0.0", "router_lr_multiplier": ">0",
                            "seed": ">=0", "save_steps": ">=0", "save_total_limit": ">=1",
                            "k_max": ">=1", "builtin_train_per_domain": ">=1",
                            "builtin_test_per_domain": ">=1"})
        from transformers.trainer_utils import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ConfigError(f"--lr-scheduler {short(self.lr_scheduler)}: choose one of {', '.join(schedulers)}")
        check_trainer_args(self.trainer_args)
        if self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device}: train places each process on its GPU itself; "
                              "choose the GPU with CUDA_VISIBLE_DEVICES and pass --device cuda")
        check_placement(self.device, self.dtype, self.quantize)

    def flat(self) -> dict[str, Any]:
        """Flat dict of every value (adapter values beside run values), as in the YAML file."""
        values = dataclasses.asdict(self)
        return {**{k: v for k, v in values.items() if k != "adapter"}, **self.adapter}


# TrainingArguments fields that train sets from its own options: the option to use instead
# (None: fixed, the data pipeline depends on it).
OWNED_TRAINER_ARGS: dict[str, str | None] = {
    "output_dir": "--output (checkpoints go to OUTPUT/checkpoints)",
    "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "learning_rate": "--lr",
    "lr_scheduler_type": "--lr-scheduler",
    "warmup_steps": "--warmup-ratio",
    "weight_decay": "--weight-decay",
    "max_steps": "--max-steps",
    "num_train_epochs": "--epochs",
    "logging_steps": "--logging-steps",
    "save_steps": "--save-steps",
    "save_total_limit": "--save-total-limit",
    "seed": "--seed",
    "bf16": "--bf16",
    "gradient_checkpointing": "--gradient-checkpointing",
    "resume_from_checkpoint": "--resume",
    "remove_unused_columns": None,
    "label_names": None,
}


def trainer_arg_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def check_trainer_args(values: dict[str, Any]) -> None:
    """Every key must be a TrainingArguments field that train does not set from its own options."""
    known = trainer_arg_names()
    for key in values:
        if key in OWNED_TRAINER_ARGS:
            instead = OWNED_TRAINER_ARGS[key]
            raise ConfigError(
                f"trainer argument {key!r} is set by hydralora train: use {instead}" if instead else
                f"trainer argument {key!r} is fixed by hydralora train (its data collator needs it)"
            )
        if key not in known:
            close = sorted(n for n in known if key.lower() in n or n in key.lower())[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown trainer argument {key!r}: not a field of transformers.TrainingArguments{hint}"
            )
