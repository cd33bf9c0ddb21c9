"""benchmarks/gpu_check.py runs its whole code path on the CPU with a tiny model, in seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_runs_tiny_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import torch

    import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    out = tmp_path / "check.json"
    report = gpu_check.main(["--tiny", "--no-compile", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["model"] == "tiny" and report["device"]
    eager = report["train"]["eager"]
    assert eager["step_ratio"] > 0 and eager["memory_ratio"] > 0
    assert report["layer"][0]["hydra_k4_over_lora"] > 0
    assert {"batch1_tok_s_ratio", "batch4_tok_s_ratio"} <= set(report["generation"])
    printed = capsys.readouterr().out
    assert "HydraLoRA/LoRA step time" in printed and "wrote" in printed
    sys.modules.pop("gpu_check", None)
    sys.modules.pop("layer_speed", None)
