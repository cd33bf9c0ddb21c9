"""The `hydralora` command line: train, compare, generate, eval, export, analyze, cluster, route,
data, info, push, demo.

Every subcommand's flags are generated from one dataclass (`options.add_dataclass_flags`), so
each default is written once, in that dataclass. Errors that come from the user's input
(`errors.UserError`) print one clear message and exit with status 2, without a traceback
unless --debug is given.

Start-up is cheap: this module and the option dataclasses (`commands/`, `train/config.py`)
import neither torch nor transformers; a command imports the code that carries it out when it
runs (`COMMANDS` names it as "module:function"), so `--help`, `info` and `route` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from pathlib import Path
from typing import Any

import yaml

from .commands.analyze import AnalyzeOptions, ClusterOptions
from .commands.compare import CompareOptions
from .commands.demo import BuiltinDataOptions, DemoOptions
from .commands.evaluate import EvalOptions, GenerateOptions
from .commands.export import ExportOptions, RouteOptions
from .commands.info import InfoOptions, PushOptions
from .config import LEGACY_PRESET, PRESETS, HydraLoraConfig
from .errors import ConfigError, TrainingInterrupted, UserError, short
from .files import RUN_CONFIG, STORAGE_ERRNOS, STORAGE_HINTS
from .options import (
    add_dataclass_flags,
    check_given_once,
    coerce_values,
    field_aliases,
    known_fields,
    normalize_targets,
    options_from_args,
    read_yaml_config,
    split_fields,
)
from .train.config import TrainConfig, check_trainer_args, unused_options_note

ADAPTER_SKIP = ("k_selection", "preset")  # written by the trainer; --preset is a run option


def run_target(target: str, *args: Any) -> Any:
    """Call "package.module:function" (imported now, not when the parser is built)."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(*args)


def preset_help(part: str) -> dict[str, str]:
    """What the flags' help shows as the default of a key a preset sets (`part`: 'adapter' or
    'training'): each preset's value."""
    values = {n: getattr(p, part) for n, p in PRESETS.items()}
    keys = sorted({k for v in values.values() for k in v})
    return {k: "from --preset (" + ", ".join(f"{n}: {v.get(k, 'as below')}" for n, v in values.items()) + ")"
            for k in keys}


def int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


# ---------------------------------------------------------------------------- train
def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model with HydraLoRA (or a LoRA baseline)")
    p.add_argument("--config", help="YAML file of options (flags given here win)")
    add_dataclass_flags(p, TrainConfig, skip=("adapter",), defaults=preset_help("training"))
    p.add_argument("--trainer-arg", dest="trainer_args", action="append", type=trainer_arg,
                   default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="any transformers TrainingArguments field, e.g. optim=adamw_torch_fused, "
                        "max_grad_norm=0.5, report_to=tensorboard, eval_strategy=steps, "
                        "fsdp_config=examples/fsdp2.json; VALUE is read as YAML (numbers, true/false, "
                        "lists, {json}); repeatable; YAML config: a `trainer:` mapping")
    # --adapter-rank (an alias of --r in HydraLoraConfig): torchrun's own parser mistakes a
    # bare --r for its --rdzv-* options
    add_dataclass_flags(p, HydraLoraConfig, skip=ADAPTER_SKIP, types_override={"num_heads": int_or_auto},
                        defaults=preset_help("adapter"))
    p.set_defaults(func=cmd_train)


def trainer_arg(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of --trainer-arg; VALUE is a YAML scalar, list or mapping (JSON is YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the text as given
    return key.strip().replace("-", "_"), value


def trainer_section(values: dict[str, Any], source: str) -> dict[str, Any]:
    """The `trainer:` (or `trainer_args:`) mapping of a YAML config, taken out of `values`."""
    merged: dict[str, Any] = {}
    for key in ("trainer_args", "trainer"):
        section = values.pop(key, None)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {key!r} must be a mapping of TrainingArguments fields")
        merged.update({str(k).replace("-", "_"): v for k, v in section.items()})
    return merged


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the preset < the run's recorded config (--resume) < --config YAML < flags
    given; the trainer arguments merge key by key in the same order. A recorded run without a
    preset predates presets: it was trained with the paper's values."""
    known = known_fields(TrainConfig, HydraLoraConfig) - {"adapter", "k_selection"}
    aliases = field_aliases(TrainConfig, HydraLoraConfig)  # lr -> learning_rate, lora_alpha -> alpha, ...
    check_given_once(args)
    values: dict[str, Any] = {}
    trainer_args: dict[str, Any] = {}
    given = {k: v for k, v in vars(args).items() if k in known and k != "trainer_args"}
    output = given.get("output")
    if given.get("resume") and not output:
        raise ConfigError("--resume needs --output DIR: the folder of the run to continue")
    if given.get("resume") and output and (Path(output) / RUN_CONFIG).exists():
        recorded = read_yaml_config(Path(output) / RUN_CONFIG, known, aliases)  # old runs: short names
        recorded.setdefault("preset", LEGACY_PRESET)
        if recorded.get("trust_remote_code") is True and "trust_remote_code" not in given:
            raise ConfigError(
                f"{Path(output) / RUN_CONFIG} records trust_remote_code: true (model "
                f"{short(recorded.get('model'))}); --resume does not run a model's own Python code "
                "because a file says so: pass --trust-remote-code again if you trust that model"
            )
        trainer_args.update(trainer_section(recorded, str(Path(output) / RUN_CONFIG)))
        values.update(recorded)
    from_file: dict[str, Any] = {}
    if args.config:
        from_file = read_yaml_config(args.config, known | {"trainer"}, aliases)
        trainer_args.update(trainer_section(from_file, args.config))
        values.update(from_file)
    values.update(given)
    trainer_args.update(dict(getattr(args, "trainer_args", [])))
    check_trainer_args(trainer_args)  # before any slow work
    values["trainer_args"] = trainer_args
    if "target_modules" in values:
        values["target_modules"] = normalize_targets(values["target_modules"])
    if isinstance(values.get("bf16"), bool):
        values["bf16"] = str(values["bf16"]).lower()
    values = coerce_values(values, TrainConfig, HydraLoraConfig)
    run, adapter = split_fields(values, TrainConfig, HydraLoraConfig)
    run["preset"] = adapter.pop("preset", None) or run.get("preset") or TrainConfig.preset
    num_heads = adapter.get("num_heads")
    if num_heads != "auto":  # validate adapter settings before any slow work
        HydraLoraConfig.from_preset(run["preset"], **adapter)
    elif run.get("method", "hydralora") == "lora":
        raise ConfigError("--num-heads auto applies to --method hydralora and lora-split only")
    note = unused_options_note(run.get("method", TrainConfig.method), set(given) | set(from_file))
    if note:  # given by the user (a flag or the YAML), not filled in by a preset or a recorded run
        print(f"warning: {note}", file=sys.stderr)
    return TrainConfig(**run, adapter=adapter)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config_from_args(args)  # a bad flag or file fails here, before torch loads
    try:
        run_target("hydralora.train.run:run_training", cfg)
    finally:
        run_target("hydralora.dist:end_process_group")
    return 0


# ---------------------------------------------------------------------------- other commands
# name, options, what runs it ("module:function", imported when the command runs);
# `data builtin` is added as a sub-subcommand in build_parser
COMMANDS: list[tuple[str, type, str]] = [
    ("generate", GenerateOptions, "hydralora.eval.run:run_generate"),
    ("eval", EvalOptions, "hydralora.eval.run:run_eval"),
    ("export", ExportOptions, "hydralora.export:run_export"),
    ("route", RouteOptions, "hydralora.routing.requests:run_route"),
    ("analyze", AnalyzeOptions, "hydralora.analysis:run_analyze_command"),
    ("cluster", ClusterOptions, "hydralora.clustering.choose_k:run_cluster"),
    ("info", InfoOptions, "hydralora.info:run_info"),
    ("push", PushOptions, "hydralora.hub:push"),
    ("demo", DemoOptions, "hydralora.demo:run_demo"),
    ("compare", CompareOptions, "hydralora.compare.report:run_compare"),
]


def add_options_parser(sub: argparse._SubParsersAction, name: str, cls: type,
                       run: str) -> argparse.ArgumentParser:
    doc = (cls.__doc__ or name).strip().rstrip(".")
    # compare passes unknown flags on to train: no abbreviations (`--lr` must not mean --lr-grid)
    p = sub.add_parser(name, help=doc[:1].lower() + doc[1:], allow_abbrev=cls is not CompareOptions)
    add_dataclass_flags(p, cls)

    def call(args: argparse.Namespace) -> int:
        opts = options_from_args(cls, args)
        if cls is CompareOptions:  # the other flags are training flags, for every run
            opts.train_args = list(getattr(args, "train_args", []))
            opts.train_values = training_flags(opts.train_args)
        run_target(run, opts)
        return 0

    p.set_defaults(func=call, options=cls)
    return p


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydralora",
        description="HydraLoRA fine-tuning: a shared A, k B heads and a per-token router.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    for name, cls, run in COMMANDS:
        add_options_parser(sub, name, cls, run)
    data = sub.add_parser("data", help="data utilities")
    add_options_parser(data.add_subparsers(dest="data_command", required=True), "builtin",
                       BuiltinDataOptions, "hydralora.data.builtin:run_builtin_data")
    return parser


def training_flags(argv: list[str]) -> dict[str, Any]:
    """{option: value} of `hydralora train` flags given in `argv`, read by train's own parser (an
    unknown flag or a bad value stops here, naming it)."""
    parser = argparse.ArgumentParser(prog="hydralora compare", add_help=False)
    add_train_parser(parser.add_subparsers(dest="command"))
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            args = parser.parse_args(["train", "--data", "-", "--output", "-", *argv])
    except SystemExit:
        why = (messages.getvalue().strip().splitlines() or ["?"])[-1].split("error:", 1)[-1].strip()
        raise ConfigError(f"compare: {why} (the flags after the compare options go to every "
                          "`hydralora train` run: see hydralora train --help)") from None
    return {k: v for k, v in vars(args).items() if k not in ("data", "output", "command", "func")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # only compare takes flags of another command: train's, for every run
            if getattr(args, "command", None) != "compare":
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.train_args = extra
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        message = str(err).strip()
        if isinstance(err, FileNotFoundError) and err.filename:
            message = f"{err.filename}: no such file or directory"
        print(f"error: {message}", file=sys.stderr)
        return 130 if isinstance(err, TrainingInterrupted) else 2
    except OSError as err:  # disk full, quota, read-only, no permission: one line naming the file
        if debug or err.errno not in STORAGE_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}: {STORAGE_HINTS[err.errno]}", file=sys.stderr)
        return 2
    except RecursionError:  # input nested deeper than Python reads (a reader that does not say so)
        if debug:
            raise
        print("error: an input is nested too deeply to read (a JSON or YAML value inside thousands "
              "of brackets?); flatten it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
