"""HydraLoRA under TRL's SFTTrainer: prompt/completion and chat data, completion-only loss,
balance loss and router statistics from hydralora.integrations.trl."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig  # noqa: E402

from conftest import tiny_records  # noqa: E402
from hydralora import HydraLoraConfig, HydraLoraLinear, add_hydralora, load_adapter, save_adapter  # noqa: E402
from hydralora.integrations.trl import HydraSFTTrainer  # noqa: E402


def sft_args(tmp_path, steps=24, **extra):
    return SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=4, save_strategy="no", report_to="none",
                     use_cpu=True, seed=0, lr_scheduler_type="constant", max_length=64,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False, **extra)


def hydra_model(model_dir, weight=0.01):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = HydraLoraConfig(r=4, alpha=8, num_heads=2, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_heads="random", balance_loss_weight=weight)
    return add_hydralora(model, cfg)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_prompt_completion_lowers_the_loss(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = hydra_model(tiny_model_dir)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]}
                              for r in tiny_records(24)])
    trainer = HydraSFTTrainer(model=model, args=sft_args(tmp_path, completion_only_loss=True),
                              train_dataset=data, processing_class=tokenizer)
    assert trainer.completion_only_loss
    trainer.train()
    seen = losses(trainer)
    assert len(seen) >= 3 and seen[-1] < seen[0] - 0.3 and seen == sorted(seen, reverse=True), seen
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("gate_entropy" in h and "head_cos_sim" in h and "top_head_share" in h for h in logged)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


def test_completion_only_masks_the_prompt_and_balance_loss_is_added(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = {}

    class Spy(HydraSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen["labels"] = inputs["labels"].clone()
            seen["mask"] = inputs["attention_mask"].clone()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    data = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]}
                              for r in tiny_records(8)])
    model = hydra_model(tiny_model_dir, weight=1.0)
    trainer = Spy(model=model, args=sft_args(tmp_path, steps=1, completion_only_loss=True),
                  train_dataset=data, processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    with_balance = trainer.compute_loss(model, batch).item()
    for layer in model.modules():
        if isinstance(layer, HydraLoraLinear):
            layer.config.balance_loss_weight = 0.0
    without = trainer.compute_loss(model, batch).item()
    assert with_balance > without  # the switch balance loss is >= 1 per layer at weight 1
    labels = seen["labels"]
    assert ((labels == -100) & (seen["mask"] == 1)).any(dim=1).all()  # the prompt is masked


def test_sft_trainer_chat_data(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = hydra_model(tiny_model_dir, weight=0.0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]}
                              for r in tiny_records(24)])
    trainer = HydraSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=data,
                              processing_class=tokenizer)
    trainer.train()
    seen = losses(trainer)
    assert seen[-1] < seen[0] - 0.3, seen
