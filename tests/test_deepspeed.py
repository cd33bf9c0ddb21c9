"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (`--trainer-arg deepspeed=examples/...`).

deepspeed 0.19.8 runs on CPU with DS_ACCELERATOR=cpu (gloo; it builds a small shared-memory
op with ninja on first use, ~1 minute, cached afterwards). Checked: checkpoints and the final
adapter hold the whole adapter (ZeRO-3's gathered 16-bit state dict, not its empty
placeholders) in a one-process run's format, which loads into a one-process model, and
ZeRO-2 and ZeRO-3 train the same adapter. Skipped where deepspeed is not installed
(`pip install -e .[deepspeed]`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_records, write_jsonl

pytestmark = [
    pytest.mark.slow,  # several processes
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install -e .[deepspeed])"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def train(model_dir, data, out, config, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "hydralora", "train", "--model", str(model_dir),
           "--data", str(data), "--eval-data", str(data), "--output", str(out), "--max-steps", "4",
           "--batch-size", "2", "--lr", "5e-3", "--adapter-rank", "4", "--num-heads", "3",
           "--dropout", "0", "--target-modules", "q_proj", "v_proj", "down_proj",
           "--save-steps", "2", "--logging-steps", "1", "--bf16", "false",
           "--trainer-arg", f"deepspeed={EXAMPLES / config}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out / "adapter_model.safetensors"))


def test_zero2_and_zero3_save_whole_adapters(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(32))
    zero2 = train(tiny_model_dir, data, tmp_path / "z2", "ds_zero2.json", 29581)
    zero3 = train(tiny_model_dir, data, tmp_path / "z3", "ds_zero3.json", 29583)

    from transformers import AutoModelForCausalLM

    from hydralora import add_hydralora, load_adapter
    from hydralora.config import HydraLoraConfig
    from hydralora.model import adapter_state_dict

    config = HydraLoraConfig.from_json_file(tmp_path / "z3" / "adapter_config.json")
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(
        add_hydralora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)).items()}
    for adapter in (zero2, zero3):
        assert {k: tuple(v.shape) for k, v in adapter.items()} == expected  # no placeholders
        assert all(v.dtype == torch.float32 for v in adapter.values())
    # the last checkpoint's adapter (saved through the engine) is the final one
    last = load_file(str(tmp_path / "z3" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.equal(last[k], zero3[k]) for k in zero3)
    # ZeRO-2 and ZeRO-3: the same training up to round-off
    for key in zero2:
        assert torch.allclose(zero2[key], zero3[key], rtol=1e-4, atol=1e-5), key
    summary = json.loads((tmp_path / "z3" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["eval"]["fine-tuned"]["mean"]["loss"] > 0
    assert summary["trainable_params"] == sum(v.numel() for v in zero3.values())
    # loads into a one-process model
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "z3")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
