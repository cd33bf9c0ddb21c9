"""The launch configs shipped under examples/ parse and are what the README says they are.

The FSDP2 ones also run in tests/test_fsdp.py (two CPU processes), the DeepSpeed ones in
tests/test_deepspeed.py (when deepspeed is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hydralora.train.config import TrainConfig
from hydralora.train.trainer import training_arguments

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_accelerate_fsdp2_config():
    cfg = yaml.safe_load((EXAMPLES / "fsdp2.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] >= 2
    fsdp = cfg["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_accelerate_deepspeed_config():
    cfg = yaml.safe_load((EXAMPLES / "accelerate_deepspeed.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert (EXAMPLES.parent / cfg["deepspeed_config"]["deepspeed_config_file"]).exists()


def test_deepspeed_configs_are_zero2_and_zero3():
    for name, stage in (("ds_zero2.json", 2), ("ds_zero3.json", 3)):
        cfg = json.loads((EXAMPLES / name).read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it in
    assert json.loads((EXAMPLES / "ds_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"]  # adapter checkpoints need the gathered weights


def test_trainer_fsdp_config_is_accepted_by_training_arguments(tmp_path):
    cfg = TrainConfig(data=["x"], output=str(tmp_path), trainer_args={
        "fsdp": True, "fsdp_config": str(EXAMPLES / "fsdp2_trainer.json")})
    import torch

    args = training_arguments(cfg, tmp_path / "checkpoints", 2, False, torch.device("cpu"))
    assert args.fsdp and args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
