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
    assert report["model"] == "tiny" and report["device"] and "errors" not in report
    eager = report["train"]["eager"]
    assert eager["step_ratio"] > 0 and eager["memory_ratio"] > 0
    assert eager["autograd_step_ratio"] > 0  # the plain-autograd path, measured beside the fused one
    assert report["layer"][0]["hydra_k4_over_lora"] > 0 and report["layer"][0]["autograd_k4_over_lora"] > 0
    ops = report["ops_per_step"]
    assert ops["hydra"] > 0 and ops["lora"] > 0 and ops["extra_per_layer"] < ops["autograd_extra_per_layer"]
    assert {"batch1_tok_s_ratio", "batch4_tok_s_ratio"} <= set(report["generation"])
    printed = capsys.readouterr().out
    assert "HydraLoRA/LoRA step time" in printed and "ops per training step" in printed and "wrote" in printed
    for name in ("gpu_check", "layer_speed", "op_count"):
        sys.modules.pop(name, None)


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    def broken(*args):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(gpu_check, "layer_bench", broken)
    monkeypatch.setattr(gpu_check, "train_steps", broken)
    out = tmp_path / "check.json"
    report = gpu_check.main(["--tiny", "--no-compile", "--json", str(out)])
    assert set(report["errors"]) == {"train eager", "layer"}
    assert "no kernel image" in report["errors"]["layer"]
    assert {"batch1_tok_s_ratio", "batch4_tok_s_ratio"} <= set(report["generation"])
    assert json.loads(out.read_text())["errors"] == report["errors"]
    for name in ("gpu_check", "layer_speed", "op_count"):
        sys.modules.pop(name, None)
