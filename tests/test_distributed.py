"""Two processes (torchrun, DDP over gloo on CPU) train the same adapter as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import tiny_records, write_jsonl

pytestmark = pytest.mark.slow  # several processes


def run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "4",
              "--lr", "5e-3", "--adapter-rank", "4", "--num-heads", "3", "--dropout", "0",
              "--target-modules", "q_proj", "v_proj", "--save-steps", "0", "--bf16", "false"]
    one = tmp_path / "one"
    run([sys.executable, "-m", "hydralora", *common, "--output", str(one), "--batch-size", "4"], env)
    two = tmp_path / "two"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29533", "-m", "hydralora", *common, "--output", str(two),
         "--batch-size", "2"], env)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    fingerprints = summary["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # ranks identical
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    # same global batches and the same token-weighted loss; only the order of floating-point
    # reductions differs, so the weights agree to float32 round-off
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        scale = a[key].abs().max().item()
        assert diff <= 1e-4 * max(scale, 1.0), (key, diff, scale)
