"""Any transformers TrainingArguments field reaches the Trainer: `--trainer-arg KEY=VALUE`
flags and a `trainer:` mapping in the YAML config, checked against TrainingArguments."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import TrainerCallback

from conftest import tiny_records, write_jsonl
from hydralora.cli import build_parser, main, train_config_from_args
from hydralora.errors import ConfigError
from hydralora.train.config import TrainConfig
from hydralora.train.run import run_training
from hydralora.train.trainer import training_arguments


def parse(*argv):
    return train_config_from_args(build_parser().parse_args(["train", *argv]))


def test_flag_values_are_read_as_yaml():
    cfg = parse("--trainer-arg", "max_grad_norm=0.5", "--trainer-arg", "optim=adafactor",
                "--trainer-arg", "report_to=[tensorboard]", "--trainer-arg", "torch_compile=true",
                "--trainer-arg", 'fsdp_config={"version": 2, "reshard_after_forward": true}',
                "--trainer-arg", "run-name=my run")
    assert cfg.trainer_args == {"max_grad_norm": 0.5, "optim": "adafactor",
                                "report_to": ["tensorboard"], "torch_compile": True,
                                "fsdp_config": {"version": 2, "reshard_after_forward": True},
                                "run_name": "my run"}


def test_yaml_trainer_section_merges_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\ntrainer:\n  max_grad_norm: 0.3\n  logging_first_step: true\n")
    cfg = parse("--config", str(config), "--trainer-arg", "max_grad_norm=0.7")
    assert cfg.learning_rate == 0.001
    assert cfg.trainer_args == {"max_grad_norm": 0.7, "logging_first_step": True}


def test_trainer_args_override_what_train_sets(tmp_path):
    cfg = TrainConfig(data=["x"], output=str(tmp_path),
                      trainer_args={"max_grad_norm": 0.25, "optim": "sgd", "report_to": "none",
                                    "ddp_find_unused_parameters": True})
    args = training_arguments(cfg, tmp_path / "checkpoints", 5, False, __import__("torch").device("cpu"))
    assert args.max_grad_norm == 0.25 and args.optim == "sgd" and args.ddp_find_unused_parameters
    assert args.learning_rate == cfg.learning_rate  # train's own options stay


@pytest.mark.parametrize("arg,expected", [
    ("max_grad_nrom=1", "unknown trainer argument 'max_grad_nrom'"),
    ("learning_rate=0.1", "trainer argument 'learning_rate' is set by hydralora train: use --learning-rate"),
    ("per_device_train_batch_size=2", "use --per-device-train-batch-size"),
    ("label_names=[x]", "is fixed by hydralora train"),
])
def test_bad_key_is_one_clear_error_line(tiny_model_dir, tiny_data, tmp_path, capsys, arg, expected):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data),
                 "--output", str(tmp_path / "run"), "--trainer-arg", arg])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_key_in_yaml_is_a_config_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  no_such_field: 1\n")
    with pytest.raises(ConfigError, match="unknown trainer argument 'no_such_field'"):
        parse("--config", str(config))
    config.write_text("trainer: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse("--config", str(config))


def test_value_the_trainer_refuses_is_a_config_error(tiny_model_dir, tiny_data, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--max-steps", "1",
                 "--output", str(tmp_path / "run"), "--trainer-arg", "optim=no_such_optimizer"])
    err = capsys.readouterr().err
    assert code == 2 and "error: trainer arguments ['optim']" in err and "no_such_optimizer" in err


class Seen(TrainerCallback):
    def __init__(self):
        self.args = None
        self.optimizer = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.args, self.optimizer = args, optimizer


def tiny_cfg(model_dir, data, out, **extra):
    return TrainConfig(model=str(model_dir), data=[str(data)], output=str(out), max_steps=4,
                       per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=2, save_steps=2, seed=1,
                       adapter={"r": 4, "num_heads": 3, "target_modules": ["q_proj", "v_proj"]},
                       **extra)


def test_max_grad_norm_and_optim_reach_the_trainer(tiny_model_dir, tiny_data, tmp_path):
    seen = Seen()
    cfg = tiny_cfg(tiny_model_dir, tiny_data, tmp_path / "run",
                   trainer_args={"max_grad_norm": 0.123, "optim": "adafactor"})
    summary, _, _ = run_training(cfg, callbacks=[seen])
    assert (summary["device"], summary["base_dtype"]) == ("cpu", "float32")  # --device/--dtype auto
    assert seen.args.max_grad_norm == 0.123 and seen.args.optim == "adafactor"
    assert type(seen.optimizer.optimizer if hasattr(seen.optimizer, "optimizer") else seen.optimizer
                ).__name__ == "Adafactor"
    # the router group is still built in create_optimizer, at lr x router_lr_multiplier
    inner = getattr(seen.optimizer, "optimizer", seen.optimizer)
    assert len(inner.param_groups) == 2
    recorded = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert recorded["trainer_args"] == {"max_grad_norm": 0.123, "optim": "adafactor"}


def test_resume_keeps_the_recorded_trainer_args(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out),
            "--max-steps", "4", "--batch-size", "4", "--save-steps", "2", "--r", "4",
            "--num-heads", "2", "--target-modules", "q_proj", "--trainer-arg", "max_grad_norm=0.2"]
    assert main(argv) == 0
    cfg = parse("--output", str(out), "--resume", "--trainer-arg", "logging_first_step=true")
    assert cfg.trainer_args == {"max_grad_norm": 0.2, "logging_first_step": True}


def test_eval_strategy_logs_held_out_loss_per_domain(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", tiny_records(24))
    held = write_jsonl(tmp_path / "held.jsonl", tiny_records(8))
    cfg = tiny_cfg(tiny_model_dir, train, tmp_path / "run", eval_data=[str(held)], eval_base=False,
                   trainer_args={"eval_strategy": "steps", "eval_steps": 2,
                                 "load_best_model_at_end": True})
    run_training(cfg)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    domain_keys = {k for e in state["log_history"] for k in e if k.startswith("eval_") and k.endswith("_loss")}
    assert {"eval_loss", "eval_math_loss", "eval_headline_loss"} <= domain_keys
    assert state["best_metric"] == min(e["eval_loss"] for e in evals)


def test_eval_strategy_without_held_out_set_is_refused(tiny_model_dir, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data, tmp_path / "run", trainer_args={"eval_strategy": "steps"})
    with pytest.raises(ConfigError, match="needs a held-out set: give --eval-data"):
        run_training(cfg)


def test_the_trained_model_is_returned_without_the_autocast_wrapper(tiny_model_dir, tiny_data, tmp_path):
    """With bf16 on, accelerate wraps forward in autocast during training; the model that
    run_training returns gives the logits of the saved adapter loaded fresh (float32)."""
    import torch

    from hydralora.methods import load_model_with_adapter

    out = tmp_path / "run"
    _, model, _ = run_training(tiny_cfg(tiny_model_dir, tiny_data, out, bf16="true"))
    assert "_original_forward" not in model.__dict__
    fresh, _ = load_model_with_adapter(str(tiny_model_dir), out, device="cpu")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("outcome", ["ok", "error"])
def test_train_command_ends_the_process_group(monkeypatch, tmp_path, outcome):
    """`hydralora train` destroys the process group the Trainer set up, also when training
    fails: left to exit, gloo's threads aborted a torchrun worker after its work (exit -6)."""
    import torch.distributed as dist

    from hydralora.errors import TrainingError
    from hydralora.train import run

    def fake_training(cfg):
        assert dist.is_initialized()
        if outcome == "error":
            raise TrainingError("boom")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(run, "run_training", fake_training)
        code = main(["train", "--data", "x.jsonl", "--output", str(tmp_path / "o")])
        assert code == (0 if outcome == "ok" else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
