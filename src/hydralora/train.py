"""Fine-tuning on the Hugging Face Trainer: HydraLoRA or a PEFT LoRA baseline.

The transformers Trainer brings gradient accumulation, schedules, bf16 autocast, logging,
checkpoints with optimizer/scheduler/RNG state, resume, and DDP under torchrun. On top of it:
the balance loss, router statistics and head diversity in the logs, adapter-only checkpoints
(written atomically and marked complete), a stop with a clear message on a non-finite loss,
SIGINT -> checkpoint -> exit, and a closing summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TRAIN_ADAPTER_DEFAULTS, HydraLoraConfig
from .data import Collator, TokenizedDataset, load_examples, tokenize_examples
from .evaluate import domain_losses
from .loss import response_nll
from .model import (
    CONFIG_NAME,
    add_hydralora,
    atomic_write,
    balance_loss,
    count_parameters,
    find_targets,
    hydralora_layers,
    load_adapter_weights,
    read_adapter,
    save_adapter,
    set_token_mask,
)
from .routing import collect_router_stats, diversity_report, start_router_stats, stop_router_stats

METHODS = ("hydralora", "lora", "lora-split")
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = ".complete"
BUILTIN = "builtin"


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Everything about a run except the adapter's own settings (see HydraLoraConfig)."""

    model: str = "smollm2-135m"
    """Base model: hub id, local directory, .gguf file, or built-in name (smollm2-135m)."""
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
    router_lr_multiplier: float = 10.0
    """The routers learn at lr times this (the paper: 1; 10 with random heads was the best
    setting of the head-diversity study in docs/results.md)."""
    batch_size: int = 8
    """Examples per step per process."""
    grad_accum: int = 1
    """Gradient accumulation steps (effective batch = batch_size * grad_accum * processes)."""
    max_length: int = 512
    """Tokens per example; longer examples are truncated (and counted)."""
    skip_overlong: bool = False
    """Drop examples whose response is truncated away entirely instead of stopping."""
    seed: int = 0
    """Seed of initialization, data order and dropout."""
    bf16: str = "auto"
    """bf16 autocast: auto (on when the processor supports it), true or false."""
    dtype: str = "float32"
    """Dtype of the base weights: float32, bfloat16, float16 or auto."""
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
    k_max: int = 10
    """Largest k tried by --num-heads auto."""
    split_ranks: str = "budget"
    """lora-split: 'budget' gives each of the k adapters rank r/k (the paper's LoRA-Split), 'each' rank r."""
    builtin_train_per_domain: int = 200
    """Examples per domain of the built-in mixture's train split."""
    builtin_test_per_domain: int = 40
    """Examples per domain of the built-in mixture's test split."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model (off unless you trust it)."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """HydraLoraConfig values (the CLI fills these from the adapter flags); TRAIN_ADAPTER_DEFAULTS
    fills the keys not given."""

    def __post_init__(self) -> None:
        self.adapter = {**TRAIN_ADAPTER_DEFAULTS, **self.adapter}

    def validate(self) -> None:
        if not self.data:
            raise TrainingError("no training data: give --data FILE [FILE ...] (or --data builtin)")
        if not self.output:
            raise TrainingError("no output directory: give --output DIR")
        if self.method not in METHODS:
            raise TrainingError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise TrainingError("give --max-steps > 0 or --epochs > 0")
        if not self.lr > 0:
            raise TrainingError("--lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError("--warmup-ratio must be in [0, 1)")
        if self.split_ranks not in ("budget", "each"):
            raise TrainingError("--split-ranks must be budget or each")
        if self.method == "lora-split" and self.resume:
            raise TrainingError("--resume is not supported for --method lora-split; start again")
        if self.bf16 not in ("auto", "true", "false"):
            raise TrainingError("--bf16 must be auto, true or false")

    def flat(self) -> dict[str, Any]:
        """Flat dict of every value (adapter values beside run values), as in the YAML file."""
        values = dataclasses.asdict(self)
        return {**{k: v for k, v in values.items() if k != "adapter"}, **self.adapter}


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays: CUDA with bf16 support, or a CPU with native bf16 (AVX512-BF16
    or AMX). On an AVX2-only CPU, bf16 matmuls are emulated: a SmolLM2 step measured ~20x
    slower than float32 here, so 'auto' leaves it off there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
            return True
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def adapter_config(cfg: TrainConfig, k_selection: dict[str, Any] | None = None) -> HydraLoraConfig:
    values = dict(cfg.adapter)
    if k_selection is not None:
        values["num_heads"] = k_selection["k"]
        values["k_selection"] = k_selection
    return HydraLoraConfig(**values)


def variant_name(cfg: TrainConfig, adapter: HydraLoraConfig) -> str:
    """A short description of the trained variant, naming the paper's ablations."""
    if cfg.method == "lora":
        alpha = "" if adapter.alpha == HydraLoraConfig().alpha else f", alpha={adapter.alpha:g}"
        return f"LoRA r={adapter.r}{alpha} (PEFT)"
    if cfg.method == "lora-split":
        from .baselines import split_ranks

        ranks = split_ranks(adapter.r, adapter.num_heads, cfg.split_ranks)
        return f"LoRA-Split {adapter.num_heads} x r={ranks[0]} (PEFT, one LoRA per k-means cluster)"
    parts = [f"HydraLoRA r={adapter.r}, k={adapter.num_heads}"]
    if adapter.num_heads == 1:
        parts.append("one head: w/o MoE")
    elif adapter.router == "uniform":
        parts.append("uniform router: w/o gate")
    elif adapter.router == "topk":
        parts.append(f"top-{adapter.top_k} router")
    if not adapter.shared_a:
        parts.append("one A per head: w/o Hydra")
    if adapter.router_input == "a" and adapter.has_router:
        parts.append("routing on A x")
    if adapter.init_heads != "zero":
        parts.append(f"{adapter.init_heads} head init")
    if adapter.has_router and adapter.router_init != "kaiming":
        parts.append(f"{adapter.router_init} router init")
    if adapter.head_dropout > 0 and adapter.num_heads > 1:
        parts.append(f"head dropout {adapter.head_dropout:g}")
    if adapter.has_router and adapter.router_temperature != 1.0:
        parts.append(f"router temperature {adapter.router_temperature:g}")
    if adapter.has_router and adapter.balance_loss_weight > 0:
        parts.append(f"balance loss {adapter.balance_loss_weight:g}")
    if adapter.has_router and cfg.router_lr_multiplier != 1.0:
        parts.append(f"router lr x{cfg.router_lr_multiplier:g}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- trainer
def _make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class HydraTrainer(Trainer):
        """Trainer with HydraLoRA's extra loss, statistics and adapter-only checkpoints."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.tokens_seen = 0
            self.loss_is_scaled_for_ga = True  # compute_loss normalizes over the accumulation

        def _bare(self) -> nn.Module:
            return self.accelerator.unwrap_model(self.model)

        def _is_hydra(self) -> bool:
            return bool(hydralora_layers(self._bare()))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Mean cross-entropy over the response tokens (logits only where labeled), plus
            the balance loss; normalized over the whole accumulated (and distributed) batch
            as the Trainer does for models that take num_items_in_batch."""
            bare = self._bare()
            set_token_mask(bare, inputs["attention_mask"].bool())
            self.tokens_seen += int(inputs["attention_mask"].sum())
            nll, _ = response_nll(model, inputs)
            if num_items_in_batch is None:
                loss = nll.sum() / max(nll.numel(), 1) / self.current_gradient_accumulation_steps
            else:
                loss = nll.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices:  # DDP averages; undo it
                    loss = loss * self.accelerator.num_processes
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(self.state.global_step + 1, loss.item())
            aux = balance_loss(bare)
            if aux is not None and model.training:
                loss = loss + aux / self.current_gradient_accumulation_steps
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._is_hydra():
                stats = collect_router_stats(self._bare())
                logs.update({k: round(v, 4) for k, v in diversity_report(self._bare(), stats).items()})
            super().log(logs, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if not self._is_hydra():
                return super()._save(output_dir, state_dict)
            if self.args.should_save:
                save_adapter(self._bare(), output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
            if not self._is_hydra():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            _, tensors = read_adapter(resume_from_checkpoint)
            load_adapter_weights(self._bare(), tensors, source=resume_from_checkpoint)

        def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:  # written last: the checkpoint is whole
                folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
                (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))

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
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    class StepDelayCallback(TrainerCallback):
        """Testing aid: HYDRALORA_STEP_DELAY=seconds slows every step, so that tests can
        interrupt a run of a tiny model in the middle."""

        def __init__(self, seconds: float):
            self.seconds = seconds

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(self.seconds)

    HydraTrainer.StepDelayCallback = StepDelayCallback
    return HydraTrainer, InterruptCallback


class NonFiniteLossError(TrainingError):
    def __init__(self, step: int, value: float):
        self.step = step
        super().__init__(
            f"the loss became {value} at step {step}; training stopped before applying that "
            "update. The last complete checkpoint (if any) is kept in OUTPUT/checkpoints: lower "
            "--lr, check the data, or try --bf16 false, then --resume."
        )


# ---------------------------------------------------------------------------- helpers
def last_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that was completely written (partial ones are ignored)."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(f"[hydralora] {message}", flush=True)


def rank_fingerprints(model: nn.Module) -> list[str]:
    """A hash of the trainable weights from every process (DDP keeps them identical)."""
    import hashlib

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


def resolve_data(paths: list[str], cfg: TrainConfig, split: str) -> list[str]:
    """Replace 'builtin' by the built-in mixture's files, written under OUTPUT/data."""
    from .mixtures import resolve_builtin

    return resolve_builtin(paths, Path(cfg.output) / "data", split,
                           train_per_domain=cfg.builtin_train_per_domain,
                           test_per_domain=cfg.builtin_test_per_domain)


def build_model(cfg: TrainConfig, adapter: HydraLoraConfig, model: nn.Module) -> nn.Module:
    """Attach the method's adapter to a loaded base model."""
    if cfg.method == "hydralora":
        torch.manual_seed(cfg.seed)
        return add_hydralora(model, adapter)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules, task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; routers get lr * router_lr_multiplier."""
    router, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (router if name.endswith(".router") else other).append(p)
    groups = [{"params": other, "lr": cfg.lr}]
    if router:
        groups.append({"params": router, "lr": cfg.lr * cfg.router_lr_multiplier})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_peft_adapter(model: nn.Module, output: Path) -> None:
    """PEFT's own files, each moved into place atomically."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".peft-", dir=output))
    try:
        model.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "adapter_config.json"):
            os.replace(f, output / f.name)  # config last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_output(cfg: TrainConfig) -> Path:
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output {output} exists and is not a directory")
    has_adapter = (output / CONFIG_NAME).exists() or (output / "lora_split.json").exists()
    if cfg.resume:
        if last_checkpoint(output) is None:
            raise TrainingError(
                f"--resume: no complete checkpoint in {output / CHECKPOINTS}; start without --resume"
            )
    elif has_adapter and not cfg.overwrite:
        raise TrainingError(
            f"{output} already holds an adapter; choose another --output, or pass --overwrite "
            "to replace it (it is kept until the new one is saved)"
        )
    elif (output / CHECKPOINTS).exists() and last_checkpoint(output) and not cfg.overwrite:
        raise TrainingError(
            f"{output / CHECKPOINTS} holds checkpoints of an unfinished run: pass --resume to "
            "continue it or --overwrite to start again"
        )
    return output


def discard_old_checkpoints(output: Path) -> None:
    """With --overwrite (and no --resume) the previous run's checkpoints must not be mistaken
    for this run's: move them aside, then delete them."""
    import shutil

    folder = output / CHECKPOINTS
    if folder.exists():
        aside = output / f".{CHECKPOINTS}.old-{os.getpid()}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


LEFTOVERS = {  # files of the other adapter kinds, removed after a new adapter is saved
    "hydralora": ["lora_split.json", "cluster_model.json", "cluster_model.safetensors", "cluster_*", "README.md"],
    "lora": ["lora_split.json", "cluster_model.json", "cluster_model.safetensors", "cluster_*",
             "router_stats.json"],
    "lora-split": ["adapter_config.json", "adapter_model.safetensors", "router_stats.json", "README.md"],
}


def remove_leftovers(output: Path, method: str) -> None:
    import shutil

    for pattern in LEFTOVERS[method]:
        for path in output.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    import yaml

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))


# ---------------------------------------------------------------------------- entry
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one fine-tune and return its summary (also written to OUTPUT/summary.json)."""
    return run_training(cfg)[0]


def run_training(cfg: TrainConfig) -> tuple[dict[str, Any], nn.Module, Any]:
    """Run one fine-tune; returns (summary, trained model, tokenizer)."""
    from transformers import set_seed

    from .models import load_model

    cfg.validate()
    output = prepare_output(cfg)
    started = time.time()
    train_files = resolve_data(cfg.data, cfg, "train")
    eval_files = resolve_data(cfg.eval_data, cfg, "test") if cfg.eval_data else []
    examples = load_examples(train_files)
    eval_examples = load_examples(eval_files) if eval_files else []

    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    log(f"loaded {cfg.model} ({time.time() - started:.0f} s)")
    features, report = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.skip_overlong)
    log(f"data: {report.line()}")
    eval_features = []
    if eval_examples:
        eval_features, eval_report = tokenize_examples(
            eval_examples, tokenizer, cfg.max_length, skip_overlong=True
        )
        log(f"held-out: {eval_report.line()}")

    k_selection = None
    if cfg.method != "lora" and cfg.adapter.get("num_heads") == "auto":
        from .clustering import select_num_heads

        k_selection = select_num_heads([e.instruction for e in examples], k_max=cfg.k_max, seed=cfg.seed)
        log(f"num_heads auto: k = {k_selection['k']} ({k_selection['method']})")
    adapter = adapter_config(cfg, k_selection)
    find_targets(model, adapter.target_modules)  # a wrong target fails here, before any output

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and bf16_supported(device))
    results: dict[str, Any] = {}
    if eval_features and cfg.eval_base and is_main_process():
        model.to(device)
        t0 = time.time()
        results["base"] = domain_losses(model, eval_features, tokenizer.pad_token_id, bf16=use_bf16)
        log(f"base model held-out loss {results['base']['mean']['loss']:.4f} ({time.time() - t0:.0f} s)")
    if is_main_process():
        output.mkdir(parents=True, exist_ok=True)
        write_yaml(output / "train_config.yaml", cfg.flat())
    set_seed(cfg.seed)
    if cfg.overwrite and not cfg.resume and is_main_process():
        discard_old_checkpoints(output)
    if cfg.method == "lora-split":
        from .baselines import train_lora_split

        model, run = train_lora_split(cfg, adapter, model, examples, features, tokenizer, use_bf16)
        for f in eval_features:
            f["adapter_name"] = run["router"].route([f["instruction"]])[0]
        run.pop("router")
    else:
        model = build_model(cfg, adapter, model)
        run = fit(cfg, model, features, tokenizer, output / CHECKPOINTS, cfg.max_steps, use_bf16,
                  resume=cfg.resume, label=variant_name(cfg, adapter))
        model = run.pop("model")
    trainable, total = run["trainable"], run["total"]
    variant = run.get("variant") or variant_name(cfg, adapter)
    stats = collect_router_stats(model) if hydralora_layers(model) else {}
    stop_router_stats(model)  # no per-forward statistics after training
    if is_main_process():
        if cfg.method == "hydralora":
            save_adapter(model, output)
            if stats:
                with atomic_write(output / "router_stats.json") as tmp:
                    tmp.write_text(json.dumps(stats, indent=1))
        elif cfg.method == "lora":
            save_peft_adapter(model, output)
        remove_leftovers(output, cfg.method)
    diversity = diversity_report(model, stats) if hydralora_layers(model) else {}
    if eval_features and is_main_process():
        results["fine-tuned"] = domain_losses(model, eval_features, tokenizer.pad_token_id, bf16=use_bf16)
        if hydralora_layers(model) and adapter.has_router:
            from .analysis import gates_by_domain, router_report

            routing = router_report(gates_by_domain(model, eval_features, tokenizer.pad_token_id))
            diversity["domain_gate_spread"] = routing["domain_spread_mean"]
            diversity["mean_gate_by_domain"] = routing["mean_gate_by_domain"]

    world = world_size()
    summary = {
        "variant": variant,
        "method": cfg.method,
        "model": cfg.model,
        "steps": run["steps"],
        "tokens": run["tokens"] * world,
        "train_seconds": round(run["seconds"], 2),
        "tokens_per_second": round(run["tokens"] * world / max(run["seconds"], 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "final_loss": run["final_loss"],
        "train_loss": run["train_loss"],
        "bf16": use_bf16,
        "processes": world,
        "num_heads": adapter.num_heads if cfg.method != "lora" else None,
        "k_selection": k_selection,
        "diversity": diversity,
        "eval": results,
        "rank_fingerprints": run.get("fingerprints"),
        "wall_seconds": round(time.time() - started, 1),
        **({"clusters": run["clusters"]} if "clusters" in run else {}),
    }
    if is_main_process():
        with atomic_write(output / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        print(format_summary(summary, output), flush=True)
    return summary, model, tokenizer


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
) -> dict[str, Any]:
    """Train `model` (adapter already attached) on `features` with the Trainer; returns the
    unwrapped model and the run's numbers. Raises TrainingInterrupted after Ctrl-C."""
    from transformers import TrainingArguments

    trainable, total = count_parameters(model)
    if label:
        log(f"{label}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    HydraTrainer, InterruptCallback = _make_trainer_class()
    interrupt = InterruptCallback()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_steps=max_steps,
        num_train_epochs=cfg.epochs,
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
    )
    trainer = HydraTrainer(
        model=model,
        args=args,
        train_dataset=TokenizedDataset(features),
        data_collator=Collator(tokenizer.pad_token_id),
        optimizers=(make_optimizer(model, cfg), None),
        callbacks=[interrupt],
    )
    if os.environ.get("HYDRALORA_STEP_DELAY"):
        trainer.add_callback(HydraTrainer.StepDelayCallback(float(os.environ["HYDRALORA_STEP_DELAY"])))
    if hydralora_layers(model):
        start_router_stats(model)
    resume_from = None
    if resume:
        resume_from = str(last_checkpoint(checkpoint_dir.parent))
        log(f"resuming from {resume_from}")
    t0 = time.time()
    outcome = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - t0
    if interrupt.interrupted_at is not None:
        raise TrainingInterrupted(interrupt.interrupted_at, last_checkpoint(checkpoint_dir.parent))
    bare = trainer.accelerator.unwrap_model(trainer.model)
    set_token_mask(bare, None)  # the last batch's mask must not apply to later forwards
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "model": bare,
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "seconds": seconds,
        "final_loss": losses[-1] if losses else outcome.training_loss,
        "train_loss": outcome.training_loss,
        "trainable": trainable,
        "total": total,
        "fingerprints": rank_fingerprints(bare),
    }


class TrainingInterrupted(TrainingError):
    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        super().__init__(
            f"interrupted at step {step}; checkpoint saved at {checkpoint}. "
            "Continue with the same command plus --resume."
        )


def format_summary(s: dict[str, Any], output: Path) -> str:
    div = s.get("diversity") or {}
    extra = ""
    if "head_cos_sim" in div:
        extra += f" | head cos sim {div['head_cos_sim']:.3f}"
    if "gate_entropy_norm" in div:
        extra += f" | gate entropy {div['gate_entropy_norm']:.3f} of max"
    if "domain_gate_spread" in div:
        extra += f" | domain gate spread {div['domain_gate_spread']:.3f}"
    lines = [
        "",
        f"== {s['variant']} on {s['model']} ==",
        f"steps {s['steps']} | tokens {s['tokens']:,} | {s['tokens_per_second']:.0f} tokens/s | "
        f"{s['train_seconds']:.0f} s | peak memory {s['peak_memory_mb'] / 1024:.2f} GiB | "
        f"bf16 {s['bf16']} | processes {s['processes']}",
        f"trainable params {s['trainable_params']:,} ({100 * s['trainable_share']:.3f}% of "
        f"{s['total_params']:,}) | final loss {s['final_loss']:.4f}{extra}",
        f"adapter: {output}",
    ]
    return "\n".join(lines)

