"""FSDP2 on two CPU processes (gloo): `accelerate launch --config_file examples/fsdp2.yaml` and
the Trainer's own `fsdp` option (`--trainer-arg fsdp=true --trainer-arg fsdp_config=...`).

accelerate only shards on GPUs; on CPU processes hydralora applies `fully_shard` itself (each
decoder layer, then the root; train/sharding.py). Checked here: the loss curve matches one
process with the same global batch, the adapter file has a one-process run's format and
loads into a one-process model with the same logits, and resume continues bit for bit (with
a bfloat16 base and float32 adapters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_records, write_jsonl

pytestmark = pytest.mark.slow  # several processes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Same global batches, same token-weighted loss: only the order of floating-point reductions
# (reduce-scatter instead of one process's sums) differs, so losses and weights agree to
# float32 round-off: 1e-4 relative (as tests/test_distributed.py for DDP).
TOL = 1e-4


def run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out: Path, step: int) -> list[float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def common_args(model_dir, data):
    return ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "6",
            "--lr", "5e-3", "--adapter-rank", "4", "--num-heads", "3", "--dropout", "0",
            "--target-modules", "q_proj", "v_proj", "down_proj", "--save-steps", "3",
            "--logging-steps", "1", "--bf16", "false"]


@pytest.fixture
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_accelerate_fsdp2_matches_one_process(tiny_model_dir, tmp_path, env):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(32))
    common = common_args(tiny_model_dir, data)
    one = tmp_path / "one"
    run([sys.executable, "-m", "hydralora", *common, "--output", str(one), "--batch-size", "4"], env)
    two = tmp_path / "two"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(EXAMPLES / "fsdp2.yaml"), "--main_process_port", "29561", "-m", "hydralora",
                *common, "--output", str(two), "--batch-size", "2"], env)
    assert "FSDP2 (fully_shard) on 2 decoder layers" in proc.stdout
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["rank_fingerprints"][0] == summary["rank_fingerprints"][1]

    curve_one, curve_two = losses(one, 6), losses(two, 6)
    assert len(curve_one) == len(curve_two) == 6
    for a, b in zip(curve_one, curve_two):
        assert abs(a - b) <= TOL * abs(a), (curve_one, curve_two)

    # the file: same keys, shapes and dtypes as one process's; the same config
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= TOL * max(a[key].abs().max().item(), 1.0), key
    config_one = json.loads((one / "adapter_config.json").read_text())
    config_two = json.loads((two / "adapter_config.json").read_text())
    assert config_one == config_two
    # checkpoints hold the gathered adapter too
    ckpt = load_file(str(two / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in a.items()}

    # the FSDP adapter loads into a one-process model and gives one process's logits
    from transformers import AutoModelForCausalLM

    from hydralora import load_adapter

    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (one, two):
        model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.allclose(logits[0], logits[1], rtol=TOL, atol=TOL)


def test_trainer_fsdp_option_resumes_bit_for_bit_with_bf16_base(tiny_model_dir, tmp_path, env):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(32))
    common = [*common_args(tiny_model_dir, data), "--dtype", "bfloat16", "--batch-size", "2",
              "--trainer-arg", "fsdp=true",
              "--trainer-arg", f"fsdp_config={EXAMPLES / 'fsdp2_trainer.json'}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29563", "-m", "hydralora"]
    out = tmp_path / "run"
    proc = run([*torchrun, *common, "--output", str(out)], env)
    assert "FSDP2 (fully_shard) on 2 decoder layers" in proc.stdout
    straight = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in straight.values())  # adapters over a bf16 base
    curve = losses(out, 6)
    assert curve[-1] < curve[0]
    # optimizer state is whole (keyed by parameter name), written once by rank 0
    optim = load_file(str(out / "checkpoints" / "checkpoint-3" / "optimizer.safetensors"))
    lora_a = "model.layers.0.self_attn.q_proj.lora_A"
    assert optim[f"{lora_a}/exp_avg"].shape == straight[lora_a].shape
    # a crash after the step-3 checkpoint: resume gives the same adapter, bit for bit
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    run([*torchrun, "train", "--output", str(out), "--resume"], env)
    resumed = load_file(str(out / "adapter_model.safetensors"))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
