"""Option names: TrainingArguments' names are the canonical ones (YAML keys, flags, what
train_config.yaml records), the short flags and PEFT / LLaMA-Factory names are aliases; an
option given twice under two names is an error; old train_config.yaml files still resume."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_records, write_jsonl
from hydralora.cli import build_parser, main, train_config_from_args
from hydralora.config import HydraLoraConfig
from hydralora.errors import ConfigError


def parse(*argv):
    return train_config_from_args(build_parser().parse_args(["train", "--data", "d.jsonl", "--output", "o", *argv]))


def test_short_flags_are_aliases_of_the_training_arguments_names():
    long = parse("--learning-rate", "1e-3", "--per-device-train-batch-size", "2",
                 "--gradient-accumulation-steps", "3", "--num-train-epochs", "2", "--lr-scheduler-type", "linear")
    short = parse("--lr", "1e-3", "--batch-size", "2", "--grad-accum", "3", "--epochs", "2", "--lr-scheduler", "linear")
    assert long == short
    assert (short.learning_rate, short.per_device_train_batch_size, short.gradient_accumulation_steps,
            short.num_train_epochs, short.lr_scheduler_type) == (1e-3, 2, 3, 2.0, "linear")
    peft_names = parse("--lora-alpha", "8", "--lora-dropout", "0.1", "--lora-rank", "2")
    assert (peft_names.adapter["alpha"], peft_names.adapter["dropout"], peft_names.adapter["r"]) == (8.0, 0.1, 2)
    assert parse("--lora-r", "3").adapter["r"] == parse("--adapter-rank", "3").adapter["r"] == 3


def test_yaml_takes_both_names_and_records_the_canonical_one(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 3.0e-4\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2\n"
                      "num_train_epochs: 3\nlr_scheduler_type: linear\nwarmup_ratio: 0.1\nlora_alpha: 8\n"
                      "lora_r: 4\nmodel_name_or_path: some/model\nmax_seq_length: 128\n")
    cfg = parse("--config", str(config))
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (3e-4, 2, 2)
    assert (cfg.num_train_epochs, cfg.lr_scheduler_type, cfg.warmup_ratio) == (3.0, "linear", 0.1)
    assert (cfg.adapter["alpha"], cfg.adapter["r"], cfg.model, cfg.max_length) == (8.0, 4, "some/model", 128)
    flat = cfg.flat()
    assert {"learning_rate", "per_device_train_batch_size", "num_train_epochs", "alpha", "r"} <= set(flat)
    assert not {"lr", "batch_size", "grad_accum", "epochs", "lr_scheduler", "lora_alpha"} & set(flat)
    config.write_text("lr: 1.0e-3\nbatch_size: 2\n")  # the short names work in YAML too
    cfg = parse("--config", str(config))
    assert (cfg.learning_rate, cfg.per_device_train_batch_size) == (1e-3, 2)


def test_an_option_given_twice_under_two_names_is_an_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1.0e-3\nlearning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match="'lr' and 'learning_rate' name the same option"):
        parse("--config", str(config))
    with pytest.raises(ConfigError, match="--learning-rate and --lr name the same option"):
        parse("--lr", "1e-3", "--learning-rate", "2e-4")
    with pytest.raises(ConfigError, match="name the same option \\(r\\)"):
        parse("--r", "2", "--lora-rank", "4")
    assert parse("--lr", "1e-3", "--lr", "2e-4").learning_rate == 2e-4  # one name twice: the last wins
    # a flag overrides the YAML under either name
    config.write_text("lr: 1.0e-3\n")
    assert parse("--config", str(config), "--learning-rate", "5e-4").learning_rate == 5e-4
    assert main(["train", "--data", "d.jsonl", "--output", str(tmp_path / "o"), "--epochs", "1",
                 "--num-train-epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_an_old_train_config_with_short_names_resumes(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "train_config.yaml").write_text(yaml.safe_dump({
        "data": ["x.jsonl"], "output": str(out), "preset": "recommended", "lr": 1e-3, "batch_size": 2,
        "grad_accum": 4, "epochs": 2.0, "lr_scheduler": "linear", "r": 4}))
    cfg = train_config_from_args(build_parser().parse_args(["train", "--output", str(out), "--resume"]))
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1e-3, 2, 4)
    assert (cfg.num_train_epochs, cfg.lr_scheduler_type, cfg.adapter["r"]) == (2.0, "linear", 4)


def test_range_errors_name_the_flag_and_its_alias(capsys):
    assert main(["train", "--data", "d.jsonl", "--output", "o", "--lr", "inf"]) == 2
    line = capsys.readouterr().err.strip()
    assert "--learning-rate (--lr)" in line and len(line.splitlines()) == 1


def test_a_yaml_with_training_arguments_names_trains(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(8))
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndata: {data}\nlearning_rate: 5.0e-3\n"
                      "per_device_train_batch_size: 4\ngradient_accumulation_steps: 1\nmax_steps: 2\n"
                      "lr_scheduler_type: constant\nsave_steps: 0\nlora_r: 2\nnum_heads: 2\n"
                      "target_modules: [q_proj]\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert recorded["learning_rate"] == 5e-3 and recorded["per_device_train_batch_size"] == 4
    assert recorded["r"] == 2 and "lr" not in recorded and "lora_r" not in recorded


def test_all_linear_with_other_names_is_refused(capsys):
    with pytest.raises(ConfigError, match="'all-linear' already selects every linear layer"):
        HydraLoraConfig(target_modules=["all-linear", "q_proj"])
    assert main(["train", "--data", "d.jsonl", "--output", "o", "--target-modules", "all-linear", "q_proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert "all-linear" in err and len(err.splitlines()) == 1


def test_hydralora_options_with_another_method_are_one_warning_line(capsys):
    cfg = parse("--method", "lora", "--num-heads", "4", "--router", "topk", "--router-lr-multiplier", "3")
    assert cfg.method == "lora"
    err = capsys.readouterr().err.strip()
    assert err == ("warning: --method lora does not use --router, --router-lr-multiplier, --num-heads "
                   "(HydraLoRA only): ignored")
    parse("--method", "lora", "--r", "4", "--alpha", "8")  # LoRA's own options: no warning
    parse("--preset", "paper")  # values a preset fills in: no warning
    assert capsys.readouterr().err == ""
    parse("--split-ranks", "each")
    assert "lora-split only" in capsys.readouterr().err
