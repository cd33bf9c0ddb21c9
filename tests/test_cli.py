"""The command line end to end on a tiny random Llama saved to disk: train, resume, generate, info."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import save_tiny_model, tiny_records
from hydralora.cli import main


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", "6", "--batch-size", "4", "--lr", "5e-3", "--logging-steps", "2",
            "--save-steps", "3", "--r", "4", "--num-heads", "3", "--seed", "1",
            "--target-modules", "q_proj", "v_proj", "up_proj", *extra]


def adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_train_writes_adapter_summary_and_config(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, tiny_data, out)) == 0
    printed = capsys.readouterr().out
    assert "== HydraLoRA r=4, k=3, random head init, router lr x10 on" in printed and "tokens/s" in printed and "final loss" in printed
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["num_heads"] == 3
    log = [e for e in json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert log[-1]["loss"] < log[0]["loss"]
    assert "head_cos_sim" in log[-1] and "gate_entropy" in log[-1]
    # checkpoints hold the adapter and the optimizer state, not the base model
    ckpt = out / "checkpoints" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", ".complete"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    # info
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "heads=3" in info and "head similarity" in info and "training: 6 steps" in info
    # generate
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out),
                 "--prompt", "What is 2 plus three?", "Write a headline.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("### ") == 2


@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_resume_matches_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    straight = tmp_path / "straight"
    assert main(train_args(tiny_model_dir, tiny_data, straight)) == 0
    crashed = tmp_path / "crashed"
    assert main(train_args(tiny_model_dir, tiny_data, crashed)) == 0
    # simulate a crash right after the step-3 checkpoint: no final adapter, no later checkpoint
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (crashed / name).unlink()
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-6")
    # a half-written checkpoint (no completion marker) must be ignored
    (crashed / "checkpoints" / "checkpoint-5").mkdir()
    assert main(["train", "--output", str(crashed), "--resume"]) == 0
    a, b = adapter_tensors(straight), adapter_tensors(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_refuses_to_overwrite_without_flag(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, tiny_data, out)) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(train_args(tiny_model_dir, tiny_data, out)) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(train_args(tiny_model_dir, tiny_data, out, "--overwrite", "--seed", "2")) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before
    # overwriting with another kind removes the old kind's files and the old checkpoints
    assert main(train_args(tiny_model_dir, tiny_data, out, "--overwrite", "--method", "lora-split",
                           "--num-heads", "2", "--save-steps", "0")) == 0
    assert (out / "lora_split.json").exists() and not (out / "adapter_config.json").exists()
    assert not list((out / "checkpoints").glob("checkpoint-*"))  # the old run's are gone
    assert main(train_args(tiny_model_dir, tiny_data, out, "--overwrite", "--save-steps", "0")) == 0
    assert (out / "adapter_config.json").exists() and not (out / "lora_split.json").exists()
    assert not list(out.glob("cluster_*"))
    assert oct((out / "adapter_model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~0o022)


def test_lora_baseline_in_peft_format(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(train_args(tiny_model_dir, tiny_data, out, "--method", "lora", "--num-heads", "1")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert "LoRA r=4 (PEFT)" in capsys.readouterr().out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out),
                 "--prompt", "hi", "--max-new-tokens", "3"]) == 0


def test_yaml_config_and_flag_precedence(tiny_model_dir, tiny_data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: [{tiny_data}]\nmax-steps: 2\nr: 2\n"
                   "num_heads: 2\ntarget_modules: [q_proj]\nsave_steps: 0\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output", str(out), "--r", "3"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["num_heads"] == 2 and saved["target_modules"] == ["q_proj"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_plain_template_model(tmp_path, tiny_data):
    model_dir = save_tiny_model(tmp_path / "plain", chat_template=False)
    out = tmp_path / "run"
    assert main(train_args(model_dir, tiny_data, out, "--max-steps", "2")) == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-heads", "0"], "num_heads=0: the number of heads must be >= 1"),
        (["--router", "sparse"], "unknown router"),
        (["--target-modules", "c_attn"], "matched no module"),
        (["--method", "adalora"], "--method 'adalora'"),
    ],
)
def test_bad_options_exit_cleanly(tiny_model_dir, tiny_data, tmp_path, capsys, extra, message):
    assert main(train_args(tiny_model_dir, tiny_data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter_config.json").exists()


def test_bad_data_exits_before_training(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in tiny_records(6)] + ['{"prompt": "x"']
    bad.write_text("\n".join(lines) + "\n")
    assert main(train_args(tiny_model_dir, bad, tmp_path / "run")) == 2
    assert "bad.jsonl, line 7: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_builtin_command(tmp_path, capsys):
    assert main(["data", "builtin", "--output", str(tmp_path), "--train-per-domain", "5",
                 "--test-per-domain", "2"]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl: 20 records (code 5, headline 5, math 5, topic 5)" in out
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 8


def test_train_defaults_are_the_recommended_settings(tmp_path):
    """`hydralora train` uses the recommended preset over HydraLoraConfig's own defaults;
    a flag or a YAML key given by the user wins."""
    from hydralora.cli import build_parser, train_config_from_args
    from hydralora.config import PRESETS, HydraLoraConfig
    from hydralora.train.config import TrainConfig
    from hydralora.train.run import adapter_config

    recommended = PRESETS["recommended"]
    assert recommended.adapter  # the study found settings better than the paper's
    plain = HydraLoraConfig()
    base = ["train", "--data", "x.jsonl", "--output", str(tmp_path / "o")]
    cfg = train_config_from_args(build_parser().parse_args(base))
    chosen = adapter_config(cfg)
    assert cfg.preset == chosen.preset == "recommended"
    for key, value in recommended.adapter.items():
        assert getattr(chosen, key) == value != getattr(plain, key)
    assert adapter_config(TrainConfig(data=["x"], output="o")).init_heads == chosen.init_heads
    assert adapter_config(TrainConfig(data=["x"], output="o", adapter={"num_heads": 2})).init_heads == chosen.init_heads
    zero_router = train_config_from_args(build_parser().parse_args(base + ["--router-init", "zero"]))
    assert adapter_config(zero_router).router_init == "zero"  # allowed: the heads start random
    assert cfg.router_lr_multiplier == 10  # the study's best row: random heads, router lr x10
    flag = train_config_from_args(build_parser().parse_args(base + ["--init-heads", "zero"]))
    assert adapter_config(flag).init_heads == "zero"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("init_heads: zero\n")
    from_yaml = train_config_from_args(build_parser().parse_args(base + ["--config", str(yaml_file)]))
    assert adapter_config(from_yaml).init_heads == "zero"


def test_variant_name_lists_the_head_options():
    from hydralora.config import HydraLoraConfig
    from hydralora.train.config import TrainConfig
    from hydralora.train.run import variant_name

    cfg = TrainConfig(data=["x"], output="o", router_lr_multiplier=10)
    name = variant_name(cfg, HydraLoraConfig(num_heads=4, init_heads="random", head_dropout=0.3,
                                             router_temperature=0.5, balance_loss_weight=0.05))
    assert name == ("HydraLoRA r=8, k=4, random head init, head dropout 0.3, router temperature 0.5, "
                    "balance loss 0.05, router lr x10")
    assert variant_name(TrainConfig(data=["x"], output="o"), HydraLoraConfig(num_heads=1)) == \
        "HydraLoRA r=8, k=1, one head: w/o MoE"


def subparsers(parser):
    """{command path: parser} of every subcommand, nested ones included ("data builtin")."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subparsers(sub).items()})
    return found


def test_every_cli_default_comes_from_its_dataclass():
    """No parser writes a default of its own: every flag's default is SUPPRESSed, so the value
    of a flag not given is the options dataclass's default (each default is written once)."""
    import argparse
    import dataclasses

    from hydralora.cli import build_parser

    commands = subparsers(build_parser())
    assert set(commands) >= {"train", "generate", "eval", "export", "analyze", "cluster", "info",
                             "demo", "data", "data builtin"}
    for name, parser in commands.items():
        if name == "data":
            continue
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.dest == "config":
                continue
            assert action.default is argparse.SUPPRESS, f"{name} {action.option_strings}: own default"
        options = parser.get_default("options")
        if options is None:  # train: TrainConfig + HydraLoraConfig, checked below
            continue
        flags = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
        # fields marked `skip` are filled by the command line itself (compare's training flags)
        fields = [f for f in dataclasses.fields(options) if not f.metadata.get("skip")]
        assert flags == {f.name for f in fields}, name
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = next(a.help for a in parser._actions if a.dest == f.name)
            required = f.metadata.get("required") or f.metadata.get("positional")
            assert required or f"(default: {default})" in help_text, (name, f.name)


def test_commands_fill_unset_options_from_the_dataclass(tmp_path):
    from hydralora.cli import build_parser
    from hydralora.commands.analyze import ClusterOptions
    from hydralora.commands.evaluate import EvalOptions
    from hydralora.options import options_from_args

    args = build_parser().parse_args(["eval", "--data", "a.jsonl"])
    assert options_from_args(EvalOptions, args) == EvalOptions(data=["a.jsonl"])
    args = build_parser().parse_args(["cluster", "--data", "a.jsonl", "--output", "o", "--k-max", "3"])
    assert options_from_args(ClusterOptions, args) == ClusterOptions(data=["a.jsonl"], output="o", k_max=3)


def test_train_flags_cover_the_run_and_adapter_dataclasses():
    import argparse
    import dataclasses

    from hydralora.cli import build_parser
    from hydralora.config import HydraLoraConfig
    from hydralora.train.config import TrainConfig

    parser = subparsers(build_parser())["train"]
    flags = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    fields = {f.name for cls in (TrainConfig, HydraLoraConfig) for f in dataclasses.fields(cls)}
    assert flags == fields - {"adapter", "k_selection"} | {"config"}
