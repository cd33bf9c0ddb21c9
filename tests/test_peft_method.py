"""HydraLoRA as a PEFT method (hydralora.peft_method): get_peft_model, save_pretrained,
PeftModel.from_pretrained on `hydralora train` folders, TRL's SFTTrainer(peft_config=...), the
strict key check, the version guard and the import hook that registers the method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, tiny_records, write_jsonl
from hydralora import HydraLoraConfig, HydraLoraLinear, HydraLoraPeftConfig, load_adapter
from hydralora.cli import main
from hydralora.errors import AdapterError, ConfigError
from hydralora.peft_method import SUPPORTED_PEFT, check_peft_version, registered

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def peft_model(**changes):
    cfg = HydraLoraPeftConfig.from_preset("recommended", **{"r": 4, "num_heads": 2,
                                                            "target_modules": ["q_proj", "up_proj"], **changes})
    return get_peft_model(make_tiny_llama(), cfg)


def train_a_little(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("version,ok", [(SUPPORTED_PEFT[0], True), ("0.21.2", True), ("0.20.0", False),
                                        ("0.18.1", False), (SUPPORTED_PEFT[1], False)])
def test_the_supported_peft_versions(version, ok):
    """One test per supported PEFT version line: 0.21.x (the installed one runs every test below);
    0.18-0.20 lack the state-dict hooks (they would silently save no tensor of ours) and newer
    ones are unchecked: one error line naming the pin."""
    if ok:
        check_peft_version(version)
        return
    with pytest.raises(ConfigError) as err:
        check_peft_version(version)
    message = str(err.value)
    assert f"found peft {version}" in message and "pip install 'peft>=0.21.0,<0.22.0'" in message
    assert "\n" not in message


def test_the_installed_peft_is_supported_and_registered():
    check_peft_version(peft.__version__)
    assert registered()


def test_an_unsupported_peft_is_one_error_line(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    with pytest.raises(ConfigError, match="needs peft>=0.21.0,<0.22.0.*found peft 0.20.0"):
        HydraLoraPeftConfig(r=4)


def test_get_peft_model_trains_and_save_pretrained_round_trips(tmp_path):
    model = peft_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "router") for n in trainable)
    layers = [m for m in model.modules() if isinstance(m, HydraLoraLinear)]
    assert len(layers) == 4 and all(m.base_layer is m.base for m in layers)
    before = logits(model)
    train_a_little(model)
    after = logits(model)
    assert not torch.allclose(before, after)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(make_tiny_llama()))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HYDRALORA" and saved["r"] == 4 and "peft_version" in saved
    keys = set(load_file(str(tmp_path / "saved" / "adapter_model.safetensors")))
    assert "model.layers.0.mlp.up_proj.router" in keys and not any(k.startswith("base_model") for k in keys)
    # both loaders read it, with the same logits
    assert torch.equal(logits(load_adapter(make_tiny_llama(), tmp_path / "saved")), after)
    again = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "saved")
    assert torch.equal(logits(again), after)
    assert not any(p.requires_grad for p in again.parameters())  # inference mode
    trainable_again = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "saved", is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(logits(again.unload()), logits(make_tiny_llama()))
    assert main(["info", str(tmp_path / "saved")]) == 0  # our own reader of the folder


def test_peft_loads_a_hydralora_train_folder_like_load_adapter(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(8))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "2e-2", "--save-steps", "0",
                 "--r", "4", "--num-heads", "3", "--target-modules", "q_proj", "v_proj", "up_proj"]) == 0
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    assert torch.equal(logits(ours), logits(theirs))
    assert not torch.equal(logits(theirs), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))


def test_missing_and_stray_keys_are_reported(tmp_path):
    model = peft_model()
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.endswith(".router")}, str(weights))
    with pytest.raises(AdapterError, match=r"missing keys \(4\).*router"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    save_file({**tensors, "model.layers.9.mlp.up_proj.lora_A": tensors["model.layers.0.mlp.up_proj.lora_A"].clone()},
              str(weights))
    with pytest.raises(AdapterError, match=r"unexpected keys \(1\)"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    # files in PEFT's usual prefixed form load too
    save_file({"base_model.model." + k: v for k, v in tensors.items()}, str(weights))
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")), logits(model))


def test_peft_only_settings_load_with_peft_and_are_refused_by_our_loader(tmp_path):
    model = peft_model(modules_to_save=["lm_head"])
    train_a_little(model)
    model.save_pretrained(tmp_path / "a")
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")), logits(model))
    with pytest.raises(ConfigError, match="modules_to_save=.*load it with peft.PeftModel.from_pretrained"):
        load_adapter(make_tiny_llama(), tmp_path / "a")


def test_what_peft_cannot_do_with_hydralora_is_refused_clearly(tmp_path):
    model = peft_model()
    with pytest.raises(ConfigError, match="one adapter"):
        model.add_adapter("second", HydraLoraPeftConfig(r=2, num_heads=2, target_modules=["v_proj"]))
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ConfigError, match="hydralora export"):
        model.merge_and_unload()
    with pytest.raises(ConfigError, match="not a linear layer"):
        get_peft_model(make_tiny_llama(), HydraLoraPeftConfig(num_heads=2, target_modules=["mlp"]))
    config = HydraLoraPeftConfig.from_hydra(HydraLoraConfig(r=2, num_heads=3), modules_to_save=None)
    assert config.to_hydra() == HydraLoraConfig(r=2, num_heads=3)


def test_sft_trainer_with_peft_config(tiny_model_dir, tmp_path):
    """TRL builds the PeftModel itself; checkpoints hold the adapter only; the routers learn in
    a group of their own (the mixin finds them in the PEFT model); a checkpoint loads with both
    loaders to the trained model's logits."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hydralora.integrations.trl import HydraSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]}
                              for r in tiny_records(16)])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=2, save_strategy="steps",
                     save_steps=4, report_to="none", use_cpu=True, seed=0, max_length=64,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False, completion_only_loss=True)
    config = HydraLoraPeftConfig.from_preset("recommended", r=4, num_heads=2, target_modules=["q_proj", "v_proj"])
    trainer = HydraSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                              args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    routers = {id(m.router) for m in trainer.model.modules() if isinstance(m, HydraLoraLinear)}
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in trainer.optimizer.param_groups]
    assert any(lr == pytest.approx(1e-1) and ids == routers for lr, ids in groups), groups  # x10: recommended
    assert all(lr == pytest.approx(1e-2) for lr, ids in groups if not ids & routers)
    checkpoint = tmp_path / "sft" / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    trained = logits(trainer.model)
    assert torch.equal(logits(load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)),
                       trained)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
    assert torch.equal(logits(reloaded), trained)
    # TRL's own SFTTrainer takes the config too (no HydraLoRA mixin: no router group)
    plain = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                       train_dataset=data, processing_class=tokenizer, peft_config=config)
    assert isinstance(plain.model, PeftModel)


@pytest.mark.parametrize("first", ["hydralora", "peft"])
def test_import_order_does_not_matter(tmp_path, first):
    """In a fresh interpreter: `import hydralora` before PEFT registers through the import hook,
    after PEFT at once; either way PeftModel.from_pretrained reads a HydraLoRA folder. And
    `import hydralora` alone imports neither PEFT nor torch."""
    model = peft_model()
    model.save_pretrained(tmp_path / "a")
    torch.save(logits(model), tmp_path / "logits.pt")
    imports = "import hydralora, peft" if first == "hydralora" else "import peft, hydralora"
    code = f"""
import sys
import hydralora
assert "peft" not in sys.modules and "torch" not in sys.modules
{imports}
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from peft import PeftModel
from conftest import make_tiny_llama
model = PeftModel.from_pretrained(make_tiny_llama(), {str(tmp_path / "a")!r}).eval()
with torch.no_grad():
    assert torch.equal(model(torch.tensor({IDS.tolist()})).logits, torch.load({str(tmp_path / "logits.pt")!r}))
print("ok")
"""
    if first == "peft":
        code = code.replace('import hydralora\nassert "peft"', 'assert "peft"').replace(
            'assert "peft" not in sys.modules and "torch" not in sys.modules\n', "")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "error::UserWarning"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_router_groups_find_routers_by_module_not_by_name():
    from torch import nn

    from hydralora.train.integration import router_parameter_groups

    class UserBlock(nn.Module):  # a user's own parameter that happens to be named "router"
        def __init__(self):
            super().__init__()
            self.router = nn.Parameter(torch.zeros(2, 2))

    model = nn.Sequential(UserBlock(), peft_model())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = router_parameter_groups(torch.optim.SGD(params, lr=0.1), model, 10.0)
    routers = {id(m.router) for m in model.modules() if isinstance(m, HydraLoraLinear)}
    fast = [g for g in optimizer.param_groups if g["lr"] == pytest.approx(1.0)]
    assert routers and len(fast) == 1 and {id(p) for p in fast[0]["params"]} == routers
    assert any(model[0].router is p for g in optimizer.param_groups if g["lr"] == pytest.approx(0.1)
               for p in g["params"])
