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
    MAX_SEED,
    METHOD_NAMES,
    QUANTIZE_MODES,
    SPLIT_MODES,
    TEST_PER_DOMAIN,
    TRAIN_PER_DOMAIN,
    check_int_bounds,
    check_placement,
)
from ..config import DEFAULT_PRESET, PRESETS, get_preset
from ..errors import ConfigError, TrainingError, short
from ..options import check_ranges, option_label


@dataclass
class TrainConfig:
    """Everything about a run except the adapter's own settings (see HydraLoraConfig)."""

    model: str = field(default=DEFAULT_MODEL, metadata={"aliases": ("model_name_or_path",)})
    """Base model: hub id, local directory, .gguf file, or built-in name (smollm2-135m)."""
    preset: str = field(default=DEFAULT_PRESET, metadata={"choices": tuple(PRESETS)})
    """A named recipe for the adapter and training values not given: recommended (random heads,
    router lr x10) or paper (the authors' recipe: alpha 32, router lr x1, max length 1024)."""
    data: list[str] = field(default_factory=list)
    """Training data: files (.jsonl, .json, .csv, .parquet, .arrow), globs, save_to_disk folders or hub
    dataset ids (NAME:SPLIT picks a split); 'builtin' = the built-in mixture's train split."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out data (as --data) for per-domain loss before and after training; 'builtin' = its test split."""
    eval_base: bool = True
    """With --eval-data, also measure the base model's held-out loss before training."""
    output: str = field(default="", metadata={"aliases": ("output_dir",)})
    """Output directory: the final adapter, train_config.yaml, summary.json, checkpoints/."""
    method: str = "hydralora"
    """hydralora; lora (PEFT LoRA, same data/schedule/targets); lora-split (k PEFT LoRAs, one per k-means cluster)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use --num-train-epochs."""
    num_train_epochs: float = field(default=1.0, metadata={"aliases": ("epochs",)})
    """Passes over the training data when --max-steps is -1 (the paper: 1)."""
    learning_rate: float = field(default=2e-4, metadata={"aliases": ("lr",)})
    """Peak learning rate (the paper: 2e-4)."""
    lr_scheduler_type: str = field(default="cosine", metadata={"aliases": ("lr_scheduler",)})
    """Learning-rate schedule after warmup: cosine, linear, constant, ..."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up from 0 (the paper: 0.03)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 0)."""
    router_lr_multiplier: float | None = None
    """The routers learn at the learning rate times this; default: the preset's (recommended 10: the best
    setting of the head-diversity study in docs/results.md; paper 1)."""
    route_labels_from: str = "cluster"
    """Labels of the oracle routing and the guide loss: 'cluster' (k-means of the instructions,
    as for choosing k) or 'domain' (the records' domain field)."""
    guide_loss_weight: float = 0.0
    """Cluster-guided routing: weight of a loss pulling each example's mean gates toward the
    head of its label (see route_labels_from); 0 = off. Inference still routes on the input."""
    guide_schedule: str = "constant"
    """Weight of the guide loss over training: constant, or decay (linearly to 0)."""
    per_device_train_batch_size: int = field(default=8, metadata={"aliases": ("batch_size",)})
    """Examples per step per process."""
    gradient_accumulation_steps: int = field(default=1, metadata={"aliases": ("grad_accum",)})
    """Gradient accumulation steps (effective batch = per-device batch size * these steps *
    processes)."""
    max_length: int | None = field(default=None, metadata={"aliases": ("max_seq_length", "cutoff_len")})
    """Tokens per example; longer examples are truncated (and counted). Default: the preset's
    (recommended 512, paper 1024)."""
    packing: bool = False
    """Pack whole examples into rows of up to --max-length tokens (attention stays within each
    example): less padding, the same loss per example. Not with sequence or oracle routing or
    the guide loss, which need one example per row."""
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
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{option_label(TrainConfig, name)} must be >= 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise TrainingError("give --max-steps > 0 or --num-train-epochs (--epochs) > 0")
        if not self.learning_rate > 0:
            raise TrainingError("--learning-rate (--lr) must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError("--warmup-ratio must be in [0, 1)")
        if self.split_ranks not in SPLIT_MODES:
            raise TrainingError("--split-ranks must be budget or each")
        if self.packing and (self.guide_loss_weight > 0 or self.adapter.get("routing") in ("sequence", "oracle")):
            raise TrainingError("--packing puts several examples in one row: not with sequence or oracle "
                                "routing or --guide-loss-weight, which need one example per row")
        if self.method == "lora-split" and self.resume:
            raise TrainingError("--resume is not supported for --method lora-split; start again")
        if self.bf16 not in ("auto", "true", "false"):
            raise TrainingError("--bf16 must be auto, true or false")
        if isinstance(self.max_steps, int) and self.max_steps < -1:
            raise ConfigError("--max-steps must be -1 (train for --num-train-epochs) or >= 1")
        check_ranges(self, {**({"max_steps": ">=0"} if self.max_steps != -1 else {}), "num_train_epochs": ">=0.0",
                            "learning_rate": ">0", "weight_decay": ">=0.0", "router_lr_multiplier": ">0",
                            "seed": ">=0", "save_steps": ">=0", "save_total_limit": ">=1",
                            "k_max": ">=1", "builtin_train_per_domain": ">=1",
                            "builtin_test_per_domain": ">=1"})
        check_int_bounds(self, {"seed": MAX_SEED})  # any other integer: 2**63 - 1
        from transformers.trainer_utils import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(f"--lr-scheduler-type (--lr-scheduler) {short(self.lr_scheduler_type)}: "
                              f"choose one of {', '.join(schedulers)}")
        check_trainer_args(self.trainer_args)
        from .arguments import normalize_trainer_args

        normalize_trainer_args(self.trainer_args)  # what this machine has: backends, config files
        if self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device}: train places each process on its GPU itself; "
                              "choose the GPU with CUDA_VISIBLE_DEVICES and pass --device cuda")
        check_placement(self.device, self.dtype, self.quantize)

    def flat(self) -> dict[str, Any]:
        """Flat dict of every value (adapter values beside run values), as in the YAML file."""
        values = dataclasses.asdict(self)
        return {**{k: v for k, v in values.items() if k != "adapter"}, **self.adapter}


# Options only HydraLoRA uses (the adapter's and train's): given with another --method they do nothing.
HYDRALORA_ONLY = ("router", "top_k", "shared_a", "router_input", "balance_loss_weight", "router_temperature",
                  "init_heads", "router_init", "head_dropout", "routing", "route_labels",
                  "router_lr_multiplier", "guide_loss_weight", "guide_schedule", "route_labels_from")
UNUSED_BY_METHOD = {"lora": (*HYDRALORA_ONLY, "num_heads", "k_max", "split_ranks"),
                    "lora-split": HYDRALORA_ONLY, "hydralora": ("split_ranks",)}


def unused_options_note(method: str, given: set[str]) -> str | None:
    """One line naming the options given (flags or YAML) that `method` does not use, or None."""
    unused = [n for n in UNUSED_BY_METHOD.get(method, ()) if n in given]
    if not unused:
        return None
    owner = "lora-split only" if unused == ["split_ranks"] else "HydraLoRA only"
    flags = ", ".join("--" + n.replace("_", "-") for n in unused)
    return f"--method {method} does not use {flags} ({owner}): ignored"


# TrainingArguments fields that train sets from its own options: the option to use instead
# (None: fixed, the data pipeline depends on it).
OWNED_TRAINER_ARGS: dict[str, str | None] = {
    "output_dir": "--output (checkpoints go to OUTPUT/checkpoints)",
    "per_device_train_batch_size": "--per-device-train-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "learning_rate": "--learning-rate",
    "lr_scheduler_type": "--lr-scheduler-type",
    "warmup_steps": "--warmup-ratio",
    "weight_decay": "--weight-decay",
    "max_steps": "--max-steps",
    "num_train_epochs": "--num-train-epochs",
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
            own = key in {f.name for f in dataclasses.fields(TrainConfig)}
            where = " (in a YAML config: a top-level key, not under trainer:)" if own else ""
            raise ConfigError(
                f"trainer argument {key!r} is set by hydralora train: use {instead}{where}" if instead else
                f"trainer argument {key!r} is fixed by hydralora train (its data collator needs it)"
            )
        if key not in known:
            close = sorted(n for n in known if key.lower() in n or n in key.lower())[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown trainer argument {key!r}: not a field of transformers.TrainingArguments{hint}"
            )
    from .arguments import normalize_trainer_args

    normalize_trainer_args(values, backends=False)  # types and ranges (train/arguments.py)
