"""The `hydralora` command line: train, generate, eval, export, analyze, cluster, data, info, demo.

Errors that come from the user's input (data, config, adapter, model) print one clear message
and exit with status 2, without a traceback unless --debug is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import TRAIN_ADAPTER_DEFAULTS, ConfigError, HydraLoraConfig
from .options import (
    add_dataclass_flags,
    known_fields,
    normalize_targets,
    read_yaml_config,
    split_fields,
)

ADAPTER_SKIP = ("k_selection",)


def int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .mixtures import MixtureError
    from .model import AdapterError
    from .models import ModelLoadError
    from .train import TrainingError

    from .clustering import ClusterModelError

    return (ConfigError, DataError, AdapterError, ModelLoadError, TrainingError, MixtureError,
            ClusterModelError, FileNotFoundError)


# ---------------------------------------------------------------------------- train
def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="fine-tune a model with HydraLoRA (or a LoRA baseline)")
    p.add_argument("--config", help="YAML file of options (flags given here win)")
    add_dataclass_flags(p, TrainConfig, skip=("adapter",))
    # --adapter-rank: torchrun's own parser mistakes a bare --r for its --rdzv-* options
    add_dataclass_flags(p, HydraLoraConfig, skip=ADAPTER_SKIP, types_override={"num_heads": int_or_auto},
                        aliases={"r": ["--adapter-rank"]}, defaults=TRAIN_ADAPTER_DEFAULTS)
    p.set_defaults(func=cmd_train)


def train_config_from_args(args: argparse.Namespace):
    from .train import TrainConfig

    known = known_fields(TrainConfig, HydraLoraConfig) - {"adapter", *ADAPTER_SKIP}
    values: dict[str, Any] = {}
    given = {k: v for k, v in vars(args).items() if k in known}
    output = given.get("output")
    if given.get("resume") and output and (Path(output) / "train_config.yaml").exists():
        values.update(read_yaml_config(Path(output) / "train_config.yaml", known))
        # a run recorded before train's defaults departed from the paper's used zero heads
        values.setdefault("init_heads", "zero")
    if args.config:
        values.update(read_yaml_config(args.config, known))
    values.update(given)
    if "target_modules" in values:
        values["target_modules"] = normalize_targets(values["target_modules"])
    if isinstance(values.get("bf16"), bool):
        values["bf16"] = str(values["bf16"]).lower()
    run, adapter = split_fields(values, TrainConfig, HydraLoraConfig)
    num_heads = adapter.get("num_heads")
    if num_heads != "auto":  # validate adapter settings before any slow work
        HydraLoraConfig(**{**TRAIN_ADAPTER_DEFAULTS, **adapter})
    elif run.get("method", "hydralora") == "lora":
        raise ConfigError("--num-heads auto applies to --method hydralora and lora-split only")
    return TrainConfig(**run, adapter=adapter)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    train(train_config_from_args(args))
    return 0


# ---------------------------------------------------------------------------- generate
def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer prompts with a base model and an optional adapter")
    p.add_argument("--model", default="smollm2-135m", help="base model (default: smollm2-135m)")
    p.add_argument("--adapter", help="adapter directory (HydraLoRA or PEFT LoRA)")
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate
    from .models import load_model_with_adapter

    model, tokenizer, router = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype,
                                                       with_router=True)
    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    names = router.route(args.prompt) if router else None
    answers = generate(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                       do_sample=args.sample, temperature=args.temperature, adapter_names=names)
    for prompt, answer in zip(args.prompt, answers):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0


# ---------------------------------------------------------------------------- data, info
def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("builtin", help="write the built-in mixture as train.jsonl and test.jsonl")
    b.add_argument("--output", required=True, help="directory to write into")
    b.add_argument("--train-per-domain", type=int, default=200)
    b.add_argument("--test-per-domain", type=int, default=40)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_data_builtin)


def cmd_data_builtin(args: argparse.Namespace) -> int:
    from collections import Counter

    from .data import load_examples
    from .mixtures import write_builtin

    paths = write_builtin(args.output, train_per_domain=args.train_per_domain,
                          test_per_domain=args.test_per_domain, seed=args.seed)
    for path in paths:
        counts = Counter(e.domain for e in load_examples([path]))
        print(f"{path}: {sum(counts.values())} records ({', '.join(f'{d} {n}' for d, n in sorted(counts.items()))})")
    return 0


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarize an adapter directory")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from .info import adapter_info, format_info

    info = adapter_info(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------------------- eval
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-domain held-out loss and task metrics")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="HydraLoRA, PEFT LoRA or LoRA-Split directory")
    p.add_argument("--data", nargs="+", required=True, help="held-out files, or 'builtin' (its test split)")
    p.add_argument("--output", help="write the results here as JSON (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing --output")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, help="cap on new tokens per answer (defaults per metric: number/pass@1 256, label 8, rouge-l 32)")
    p.add_argument("--limit", type=int, help="at most N examples per domain")
    p.add_argument("--no-generate", action="store_true", help="losses only, no task metrics")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    if args.output and Path(args.output).exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; choose another --output or pass --overwrite")
    run_eval(args.model, args.adapter, args.data, output=args.output, batch_size=args.batch_size,
             max_length=args.max_length, max_new_tokens=args.max_new_tokens, limit=args.limit,
             generate_tasks=not args.no_generate, dtype=args.dtype)
    return 0


# ---------------------------------------------------------------------------- export
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a HydraLoRA adapter as a PEFT LoRA or a merged model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["peft-lora", "merged"], default="peft-lora")
    p.add_argument("--gates", default="uniform",
                   help="uniform | mean | domain=NAME (both need --data) | a JSON file {layer: [g...]}")
    p.add_argument("--data", nargs="+", help="calibration / held-out file(s)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import run_export

    run_export(args.model, args.adapter, args.output, args.format, args.gates, args.data,
               overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------- analyze
def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="router usage per domain and the A-vs-B comparison (plots + JSON)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="HydraLoRA adapter directory")
    p.add_argument("--data", nargs="+", required=True, help="examples with a 'domain' field, or 'builtin'")
    p.add_argument("--output", required=True)
    p.add_argument("--domain-lora", nargs="+", metavar="DOMAIN=DIR",
                   help="PEFT LoRAs trained separately per domain, for the A-vs-B comparison")
    p.add_argument("--per-domain-steps", type=int, default=0,
                   help="train one LoRA per domain for this many steps (same seed) when no --domain-lora")
    p.add_argument("--batch-size", type=int, default=4, help="batch size of the per-domain LoRAs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the per-domain LoRAs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import run_analyze

    from .mixtures import resolve_builtin

    data = resolve_builtin(args.data, Path(args.output) / "data", "test")
    loras = None
    if args.domain_lora:
        bad = [x for x in args.domain_lora if "=" not in x]
        if bad:
            raise ConfigError(f"--domain-lora expects DOMAIN=DIR, got {bad}")
        loras = dict(x.split("=", 1) for x in args.domain_lora)
    run_analyze(args.model, args.adapter, data, args.output, loras, args.per_domain_steps,
                seed=args.seed, train_extra={"batch_size": args.batch_size, "lr": args.lr,
                                             "skip_overlong": True, "max_length": 256})
    return 0


# ---------------------------------------------------------------------------- cluster
def add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="choose k: TF-IDF (or embeddings) + k-means + elbow")
    p.add_argument("--data", nargs="+", required=True, help="data files, or 'builtin'")
    p.add_argument("--output", required=True, help="directory for clusters.json, labels, plot")
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--features", choices=["tfidf", "embeddings"], default="tfidf")
    p.add_argument("--model", default="smollm2-135m", help="model for --features embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args: argparse.Namespace) -> int:
    from .clustering import ClusterModel, choose_k, domain_cluster_table, plot_sse, purity
    from .data import load_examples
    from .model import atomic_write

    from .mixtures import resolve_builtin

    out = Path(args.output)
    examples = load_examples(resolve_builtin(args.data, out / "data", "train"))
    texts = [e.instruction for e in examples]
    if args.k_max > len(texts):
        raise ConfigError(
            f"--k-max {args.k_max} is more clusters than the {len(texts)} examples; "
            f"pass --k-max {len(texts)} or less"
        )
    if args.features == "embeddings":
        from .clustering import embedding_features
        from .models import load_model

        model, tokenizer = load_model(args.model)
        features = embedding_features(texts, model, tokenizer)
    else:
        features = texts
    selection = choose_k(features, k_max=args.k_max, seed=args.seed)
    result = {**selection.to_dict(), "features": args.features, "examples": len(texts)}
    domains = [e.domain for e in examples]
    has_domains = all(d is not None for d in domains)
    if has_domains:
        result["purity"] = purity(selection.labels, domains)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "clusters.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_write(out / "labels.jsonl") as tmp:
        with open(tmp, "w") as f:
            for e, label in zip(examples, selection.labels):
                f.write(json.dumps({"source": e.source, "domain": e.domain, "cluster": label}) + "\n")
    plot_sse(selection, out / "sse.png")
    if args.features == "tfidf":
        ClusterModel.fit(texts, selection.k, seed=args.seed).save(out)
    print(f"k = {selection.k}  ({selection.method})")
    print("k:          " + " ".join(f"{k:>7d}" for k in selection.k_values))
    print("SSE:        " + " ".join(f"{v:7.1f}" for v in selection.sse))
    print("silhouette: " + " ".join("      -" if v is None else f"{v:7.3f}" for v in selection.silhouette))
    if has_domains:
        print(f"purity against the 'domain' field: {result['purity']:.3f}")
        print(domain_cluster_table(selection.labels, domains))
    print(f"wrote {out / 'clusters.json'}, {out / 'labels.jsonl'}, {out / 'sse.png'}")
    return 0


# ---------------------------------------------------------------------------- demo
def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short real fine-tune of SmolLM2 on the built-in mixture")
    p.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--method", default="hydralora", choices=["hydralora", "lora"])
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, max_steps=args.max_steps, method=args.method)
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydralora",
        description="HydraLoRA fine-tuning: a shared A, k B heads and a per-token router.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_generate_parser, add_data_parser, add_info_parser,
                add_eval_parser, add_export_parser, add_analyze_parser, add_cluster_parser,
                add_demo_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if debug:
            raise
        message = str(err).strip()
        if isinstance(err, FileNotFoundError) and err.filename:
            message = f"{err.filename}: no such file or directory"
        print(f"error: {message}", file=sys.stderr)
        from .train import TrainingInterrupted

        return 130 if isinstance(err, TrainingInterrupted) else 2


if __name__ == "__main__":
    sys.exit(main())
