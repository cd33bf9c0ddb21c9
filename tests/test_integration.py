"""One training integration: `hydralora train`'s Trainer and TRL's SFTTrainer add the same
routing, loss terms, statistics and router learning rate (HydraLoraTrainerMixin); presets pick
train's values and are recorded; a training that raises gives the signal handlers back."""

from __future__ import annotations

import signal

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from conftest import tiny_records, write_jsonl
from hydralora import HydraLoraConfig, add_hydralora
from hydralora.base_models import load_tokenizer
from hydralora.cli import build_parser, train_config_from_args
from hydralora.data import Collator, TokenizedDataset, load_examples, tokenize_examples
from hydralora.train.config import TrainConfig
from hydralora.train.trainer import HydraTrainer


def hydra_model(model_dir, **options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = HydraLoraConfig.from_preset("recommended", **{
        "r": 4, "num_heads": 3, "dropout": 0.0, "balance_loss_weight": 0.3,
        "target_modules": ["q_proj", "v_proj", "up_proj"], **options})
    return add_hydralora(model, cfg)


@pytest.fixture
def batch_and_data(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(8))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    features, _ = tokenize_examples(load_examples([data]), tokenizer, 64)
    batch = Collator(tokenizer.pad_token_id)(features[:6])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    assert (batch["attention_mask"] == 0).any()  # padding, which the statistics must skip
    return batch, features, tokenizer


def one_logged_step(trainer, model, batch):
    """compute_loss of a training step that logs (the only kind that gathers statistics)."""
    trainer.state.max_steps, trainer.state.global_step = 1, 0
    model.train()
    loss = trainer.compute_loss(model, batch)
    return loss.item(), trainer.take_router_stats()


def test_train_and_trl_give_the_same_loss_and_router_statistics(tiny_model_dir, tmp_path, batch_and_data):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from hydralora.integrations.trl import HydraSFTTrainer

    batch, features, tokenizer = batch_and_data
    ours_model = hydra_model(tiny_model_dir)
    ours = HydraTrainer(model=ours_model, args=TrainingArguments(
        output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none", max_steps=1,
        remove_unused_columns=False, label_names=["labels"]),
        train_dataset=TokenizedDataset(features), data_collator=Collator(tokenizer.pad_token_id))
    trl_model = hydra_model(tiny_model_dir)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]}
                              for r in tiny_records(8)])
    theirs = HydraSFTTrainer(model=trl_model, args=SFTConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", max_steps=1, bf16=False,
        completion_only_loss=True, max_length=64), train_dataset=data, processing_class=tokenizer)
    loss_ours, stats_ours = one_logged_step(ours, ours_model, batch)
    loss_trl, stats_trl = one_logged_step(theirs, trl_model, batch)
    assert loss_ours == pytest.approx(loss_trl, rel=1e-5)
    assert set(stats_ours) == set(stats_trl) and len(stats_ours) == 6
    real = int(batch["attention_mask"].sum())
    for name, s in stats_ours.items():
        assert s["tokens"] == stats_trl[name]["tokens"] == real
        assert s["mean_gate"] == pytest.approx(stats_trl[name]["mean_gate"], abs=1e-6)
        assert s["entropy"] == pytest.approx(stats_trl[name]["entropy"], abs=1e-6)
    # the balance loss is in both, once: without it both losses drop by the same amount
    for model in (ours_model, trl_model):
        next(m for m in model.modules() if hasattr(m, "fusable")).config.balance_loss_weight = 0.0
    drop_ours = loss_ours - one_logged_step(ours, ours_model, batch)[0]
    drop_trl = loss_trl - one_logged_step(theirs, trl_model, batch)[0]
    assert drop_ours == pytest.approx(drop_trl, rel=1e-4) and drop_ours > 0.3 * 6 * 0.9


def test_steps_that_do_not_log_gather_no_statistics(tiny_model_dir, tmp_path, batch_and_data):
    batch, features, tokenizer = batch_and_data
    model = hydra_model(tiny_model_dir, balance_loss_weight=0.0)
    trainer = HydraTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", max_steps=20, logging_steps=10,
        remove_unused_columns=False, label_names=["labels"]), train_dataset=TokenizedDataset(features),
        data_collator=Collator(tokenizer.pad_token_id))
    trainer.state.max_steps, trainer.state.logging_steps = 20, 10
    model.train()
    for step, logs in ((0, False), (8, False), (9, True), (19, True)):
        trainer.state.global_step = step
        trainer.compute_loss(model, batch)
        assert bool(trainer.gate_stats) == logs, step
        trainer.gate_stats.reset()


@pytest.mark.parametrize("preset,multiplier", [("recommended", 10.0), ("paper", 1.0)])
def test_the_router_group_follows_the_adapters_preset(tiny_model_dir, tmp_path, batch_and_data, preset, multiplier):
    _, features, tokenizer = batch_and_data
    torch.manual_seed(0)
    model = add_hydralora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          HydraLoraConfig.from_preset(preset, target_modules=["q_proj"]))
    trainer = HydraTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", learning_rate=1e-3,
        remove_unused_columns=False), train_dataset=TokenizedDataset(features),
        data_collator=Collator(tokenizer.pad_token_id))
    optimizer = trainer.create_optimizer()
    routers = {id(p) for n, p in model.named_parameters() if n.endswith(".router")}
    rates = {g["lr"] for g in optimizer.param_groups if any(id(p) in routers for p in g["params"])}
    assert rates == {1e-3 * multiplier}


def test_presets_fill_what_was_not_given_and_are_recorded(tmp_path):
    parse = lambda *a: train_config_from_args(build_parser().parse_args(  # noqa: E731
        ["train", "--data", "x.jsonl", "--output", str(tmp_path / "o"), *a]))
    paper = parse("--preset", "paper")
    assert paper.preset == paper.adapter["preset"] == "paper"
    assert paper.adapter["alpha"] == 32.0 and paper.adapter["init_heads"] == "zero"
    assert paper.router_lr_multiplier == 1.0 and paper.max_length == 1024
    changed = parse("--preset", "paper", "--alpha", "8", "--router-lr-multiplier", "3", "--max-length", "64")
    assert changed.adapter["alpha"] == 8.0 and changed.router_lr_multiplier == 3.0 and changed.max_length == 64
    default = parse()
    assert default.preset == "recommended" and default.adapter["init_heads"] == "random"
    assert default.router_lr_multiplier == 10.0 and default.max_length == 512
    assert TrainConfig(data=["x"], output="o", preset="paper").adapter["alpha"] == 32.0
    with pytest.raises(SystemExit):
        parse("--preset", "fast")
    assert HydraLoraConfig.from_preset("paper", r=4).alpha == 32.0
    assert HydraLoraConfig.from_preset("paper").preset_training("router_lr_multiplier", None) == 1.0


def test_a_run_recorded_before_presets_resumes_with_the_papers_values(tmp_path):
    """A train_config.yaml without `preset` (written before presets existed) was trained with
    the paper's values: --resume fills the keys it lacks from them, never from today's default."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "train_config.yaml").write_text(yaml.safe_dump({"data": ["x.jsonl"], "output": str(out),
                                                           "lr": 1e-3, "r": 4}))
    cfg = train_config_from_args(build_parser().parse_args(["train", "--output", str(out), "--resume"]))
    assert cfg.preset == "paper" and cfg.adapter["init_heads"] == "zero"
    assert cfg.router_lr_multiplier == 1.0 and cfg.learning_rate == 1e-3 and cfg.adapter["r"] == 4


def test_resume_of_a_checkpoint_without_a_preset_fits_the_papers_settings(tmp_path, monkeypatch):
    """The preset is a label: a checkpoint written before presets (no `preset` key) fits a
    resumed run with the paper's settings; a setting that changes the computation still differs."""
    import json

    import hydralora.train.output as output
    from hydralora.errors import TrainingError

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    saved = HydraLoraConfig.from_preset("paper", r=4, target_modules=["q_proj"]).to_dict()
    saved.pop("preset")
    (checkpoint / "adapter_config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(output, "last_checkpoint", lambda folder: checkpoint)
    output.check_resume_fits(tmp_path, HydraLoraConfig.from_preset("paper", r=4, target_modules=["q_proj"]))
    with pytest.raises(TrainingError, match="r: checkpoint 4, this run 8"):
        output.check_resume_fits(tmp_path, HydraLoraConfig.from_preset("paper", r=8, target_modules=["q_proj"]))


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("the data loader broke")


def test_a_training_that_raises_gives_the_signal_handlers_back(tiny_model_dir, tmp_path):
    from hydralora.train.run import run_training

    def mine(signum, frame):
        pass

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = TrainConfig(model=str(tiny_model_dir), data=[str(write_jsonl(tmp_path / "d.jsonl", tiny_records(8)))],
                          output=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, save_steps=0,
                          adapter={"r": 4, "num_heads": 2, "target_modules": ["q_proj"]})
        with pytest.raises(RuntimeError, match="the data loader broke"):
            run_training(cfg, callbacks=[Boom()])
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_other_processes_read_the_builtin_mixtures_without_touching_the_output(tmp_path, monkeypatch):
    """Under torchrun only the main process writes OUTPUT/data; the others read the same seeded
    files from a private folder (no wait on the main process's lock, no half-replaced file)."""
    import hydralora.train.run as run

    cfg = TrainConfig(data=["builtin-conflict"], eval_data=["builtin"], output=str(tmp_path / "o"))
    monkeypatch.setattr(run, "is_main_process", lambda: False)
    other = run.read_data(cfg)
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(run, "is_main_process", lambda: True)
    main = run.read_data(cfg)
    assert (tmp_path / "o" / "data" / "conflict" / "train.jsonl").exists()
    assert [e.messages for e in other[0]] == [e.messages for e in main[0]]
    assert [e.messages for e in other[1]] == [e.messages for e in main[1]] and other[1]
