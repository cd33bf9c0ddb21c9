"""One fine-tune from data to summary: load, tokenize, choose k, build the method's adapter,
train each of its parts with the Trainer, save, evaluate, summarize."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, set_seed

from ..base_models import bf16_supported, load_model, prepare_for_kbit_training, resolve_device, resolve_dtype
from ..clustering.choose_k import select_num_heads
from ..clustering.kmeans import ClusterModel
from ..config import HydraLoraConfig
from ..data import Example, load_examples, tokenize_examples
from ..data.words import names_a_mixture, resolve_words
from ..dist import is_main_process, log, world_size
from ..eval.loss import domain_losses
from ..files import make_readable, record_written, redact, redacted_header, stamp_tree, write_json, write_yaml
from ..cards import card_is_ours, write_model_card
from ..methods import METHODS, count_adapter_parameters
from ..model import find_targets, hydralora_layers
from ..routing.labels import attach_route_labels, route_label_names
from ..routing.stats import diversity_report, gates_by_domain, router_report
from .config import TrainConfig
from .output import (
    BUILTIN_DATA,
    CARD,
    CHECKPOINTS,
    RUN_CONFIG,
    SUMMARY,
    check_resume_fits,
    discard_old_checkpoints,
    prepare_output,
    remove_leftovers,
    run_folder,
    run_names,
)
from .trainer import fit, peak_memory_mb


def skip_unused_deepspeed() -> None:
    """accelerate's `unwrap_model` (the Trainer calls it from its __init__ on) imports deepspeed
    whenever it is installed, only to test `isinstance(model, DeepSpeedEngine)`; that import
    logs "Setting accelerator to CPU ..." (and costs a second) in every run. A DeepSpeedEngine
    exists only once deepspeed is imported, and a DeepSpeed run imports it while setting up, so
    for that test deepspeed counts as available only when already imported. Only `hydralora
    train` installs this (a user's own Trainer is left alone); idempotent, and skipped where
    accelerate has moved the name."""
    import sys

    try:
        from accelerate.utils import other
    except ImportError:
        return
    probe = getattr(other, "is_deepspeed_available", None)
    if probe is None or getattr(probe, "hydralora_lazy", False):
        return

    def lazy() -> bool:
        return "deepspeed" in sys.modules and probe()

    lazy.hydralora_lazy = True  # type: ignore[attr-defined]
    other.is_deepspeed_available = lazy


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one fine-tune and return its summary (also written to OUTPUT/summary.json)."""
    return run_training(cfg)[0]


def read_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples of --data and --eval-data. The built-in mixtures' files are
    written by the main process under OUTPUT/data; every other process of a multi-process run
    writes the same (seeded) files into a private temporary folder and reads them from there,
    so no two processes wait on one folder's lock or read a file while it is replaced."""
    with contextlib.ExitStack() as stack:
        folder = None
        if not is_main_process() and names_a_mixture([*cfg.data, *cfg.eval_data]):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hydralora-data-")))
        examples = load_examples(resolve_data(cfg.data, cfg, "train", folder))
        eval_examples = load_examples(resolve_data(cfg.eval_data, cfg, "test", folder)) if cfg.eval_data else []
    return examples, eval_examples


def resolve_data(paths: list[str], cfg: TrainConfig, split: str, folder: Path | None = None) -> list[str]:
    """Replace 'builtin' and 'builtin-conflict' by the built-in mixtures' files, written under
    OUTPUT/data."""
    return resolve_words(paths, folder or Path(cfg.output) / "data", split, overwrite=True,  # ours only
                         train_per_domain=cfg.builtin_train_per_domain,
                         test_per_domain=cfg.builtin_test_per_domain)


def write_run_record(path: Path, values: dict[str, Any], as_yaml: bool = False) -> None:
    """train_config.yaml or summary.json, credentials taken out (a token given as a trainer
    argument or inside a URL never reaches a file that `push` may upload)."""
    clean, found = redact(values)
    if found:
        log(f"{path.name}: left out {', '.join(found)} (credentials are never written to files)")
    if as_yaml:
        write_yaml(path, clean, header=redacted_header(found))
    else:
        write_json(path, clean)


def run_training(cfg: TrainConfig, callbacks: Sequence[TrainerCallback] = ()
                 ) -> tuple[dict[str, Any], nn.Module, Any]:
    """Run one fine-tune; returns (summary, trained model, tokenizer). `callbacks` are added
    to every Trainer run (e.g. your own logging). OUTPUT is locked during the run."""
    cfg.validate()
    skip_unused_deepspeed()
    output = prepare_output(cfg)
    names = run_names(cfg) + ([CARD] if card_is_ours(output) else [])
    # checked again once the lock is held: another process may have written in between
    with run_folder(output, names, check=lambda: prepare_output(cfg)):
        return _run_training(cfg, callbacks)


def _run_training(cfg: TrainConfig, callbacks: Sequence[TrainerCallback]
                  ) -> tuple[dict[str, Any], nn.Module, Any]:
    method = METHODS[cfg.method]
    output = Path(cfg.output)
    started = time.time()
    our_card = card_is_ours(output)  # decided before this run writes anything (PEFT writes one)
    examples, eval_examples = read_data(cfg)

    device = resolve_device(cfg.device)
    base_dtype = resolve_dtype(cfg.dtype, device)
    quantized = cfg.quantize != "none"  # a k-bit base is placed while loading; the Trainer moves the others
    model, tokenizer = load_model(cfg.model, dtype=base_dtype,
                                  trust_remote_code=cfg.trust_remote_code,
                                  device=device if quantized else None, quantize=cfg.quantize)
    if quantized:
        model = prepare_for_kbit_training(model)
    if Path(cfg.model).is_dir():  # the adapter's base_model_name_or_path: loadable from anywhere
        model.config.name_or_path = str(Path(cfg.model).resolve())
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
        k_selection = select_num_heads([e.instruction for e in examples], k_max=cfg.k_max, seed=cfg.seed)
        log(f"num_heads auto: k = {k_selection['k']} ({k_selection['method']})")
    adapter = adapter_config(cfg, k_selection)
    find_targets(model, adapter.target_modules)  # a wrong target fails here, before any output
    route_clusters = None
    if cfg.method == "hydralora" and (adapter.routing == "oracle" or cfg.guide_loss_weight > 0):
        adapter, route_clusters = label_routes(cfg, adapter, examples, features, eval_features)
    if cfg.resume and cfg.method == "hydralora":
        check_resume_fits(output, adapter)  # before anything is written

    use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and bf16_supported(device))
    results: dict[str, Any] = {}
    if eval_features and cfg.eval_base and is_main_process():
        if not quantized:
            model.to(device)
        t0 = time.time()
        results["base"] = domain_losses(model, eval_features, tokenizer.pad_token_id, bf16=use_bf16)
        log(f"base model held-out loss {results['base']['mean']['loss']:.4f} ({time.time() - t0:.0f} s)")
    set_seed(cfg.seed)
    built = method.build(model, adapter, cfg.seed, examples, cfg.flat())
    if route_clusters is not None and adapter.routing == "oracle":
        built.state["route_clusters"] = route_clusters  # saved: evaluation labels by cluster
    variant = method.variant(adapter, cfg.flat())
    if is_main_process() and not cfg.resume:  # a resumed run's record changes once it worked
        output.mkdir(parents=True, exist_ok=True)
        write_run_record(output / RUN_CONFIG, cfg.flat(), as_yaml=True)
        if cfg.overwrite:
            discard_old_checkpoints(output)
    run = train_parts(cfg, built, features, tokenizer, output, use_bf16, variant, callbacks, eval_features)
    if is_main_process() and cfg.resume:
        write_run_record(output / RUN_CONFIG, cfg.flat(), as_yaml=True)
    model = built.model
    if built.router is not None:
        for f in eval_features:
            f["adapter_name"] = built.router.route([f["instruction"]])[0]
    stats = run.get("router_stats") or {}  # of the last optimizer step that logged
    built.state["router_stats"] = stats
    if is_main_process():
        method.save(built, output, cfg.model)
        for name in set(run_names(cfg)) - {CHECKPOINTS, BUILTIN_DATA}:
            if (output / name).is_dir() and not (output / name).is_symlink():
                stamp_tree(output / name, top=True)  # the method's folders (LoRA-Split's): each lists its files
            make_readable(output / name)  # PEFT saves adapter_model.safetensors as 0600
        remove_leftovers(output, cfg.method)
    diversity = diversity_report(model, stats) if hydralora_layers(model) else {}
    if eval_features and is_main_process():
        results["fine-tuned"] = domain_losses(model, eval_features, tokenizer.pad_token_id, bf16=use_bf16)
        if hydralora_layers(model) and adapter.has_router:
            routing = router_report(gates_by_domain(model, eval_features, tokenizer.pad_token_id))
            diversity["domain_gate_spread"] = routing["domain_spread_mean"]
            diversity["mean_gate_by_domain"] = routing["mean_gate_by_domain"]

    trainable, total = count_adapter_parameters(model)
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
        "device": str(device),
        "base_dtype": cfg.quantize if quantized else str(base_dtype).removeprefix("torch."),
        "processes": world,
        "num_heads": adapter.num_heads if cfg.method != "lora" else None,
        "k_selection": k_selection,
        "data": {"train": domain_sizes(examples), "held_out": domain_sizes(eval_examples)},
        "diversity": diversity,
        "eval": results,
        "rank_fingerprints": run.get("fingerprints"),
        "wall_seconds": round(time.time() - started, 1),
        **built.summary,
    }
    if is_main_process():
        write_run_record(output / SUMMARY, summary)
        if our_card:  # a README.md the user put there is never replaced
            write_model_card(output)
        print(format_summary(summary, output), flush=True)
    return summary, model, tokenizer


def domain_sizes(examples: list[Example]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for e in examples:
        sizes[e.domain or "all"] = sizes.get(e.domain or "all", 0) + 1
    return sizes


def label_routes(cfg: TrainConfig, adapter: HydraLoraConfig, examples: list[Example],
                 features: list[dict[str, Any]], eval_features: list[dict[str, Any]]
                 ) -> tuple[HydraLoraConfig, ClusterModel | None]:
    """Give every example the head its label stands for (oracle routing, guide loss): its
    domain, or its k-means cluster (fitted on the training instructions with k = num_heads)."""
    k = adapter.num_heads
    clusters = None
    if cfg.route_labels_from == "cluster":
        clusters = ClusterModel.fit([e.instruction for e in examples], k, seed=cfg.seed)
    names = route_label_names([e.domain for e in examples], cfg.route_labels_from, k)
    for group in (features, eval_features):
        attach_route_labels(group, names, clusters)
    log(f"route labels ({cfg.route_labels_from}): heads stand for {', '.join(names)}")
    if adapter.routing == "oracle":
        adapter = dataclasses.replace(adapter, route_labels=names)
    return adapter, clusters


def train_parts(cfg: TrainConfig, built, features: list[dict[str, Any]], tokenizer: Any,
                output: Path, use_bf16: bool, variant: str,
                callbacks: Sequence[TrainerCallback],
                eval_features: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train every part of the method (one, or one per LoRA-Split cluster) in turn; the run's
    steps are shared by the parts' shares."""
    run: dict[str, Any] = {"steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 0.0}
    for part in built.parts:
        if part.adapter_name is not None:
            built.model.set_adapter(part.adapter_name)  # only this adapter trains
        subset = features if part.sources is None else [f for f in features if f["source"] in part.sources]
        if part.checkpoint_subdir and is_main_process():  # a part's own checkpoints folder: ours
            (output / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            record_written(output / CHECKPOINTS, add=[part.checkpoint_subdir])
        steps = cfg.max_steps if cfg.max_steps < 0 or part.share == 1.0 else max(1, round(cfg.max_steps * part.share))
        result = fit(cfg, built.model, subset, tokenizer, output / CHECKPOINTS / part.checkpoint_subdir,
                     steps, use_bf16, resume=cfg.resume, label=part.label, callbacks=callbacks,
                     eval_features=eval_features if len(built.parts) == 1 else None)
        built.model = result.pop("model")
        run["steps"] += result["steps"]
        run["tokens"] += result["tokens"]
        run["seconds"] += result["seconds"]
        run["train_loss"] += result["train_loss"] * part.share
        run["final_loss"] = result["final_loss"]
        run["fingerprints"] = result["fingerprints"]
        run["router_stats"] = result["router_stats"]
    if len(built.parts) > 1:
        built.model.eval()
    return run


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


def adapter_config(cfg: TrainConfig, k_selection: dict[str, Any] | None = None) -> HydraLoraConfig:
    values = dict(cfg.adapter)
    if k_selection is not None:
        values["num_heads"] = k_selection["k"]
        values["k_selection"] = k_selection
    return HydraLoraConfig(**values)


def variant_name(cfg: TrainConfig, adapter: HydraLoraConfig) -> str:
    """A short description of the trained variant (the method's own wording)."""
    return METHODS[cfg.method].variant(adapter, cfg.flat())
