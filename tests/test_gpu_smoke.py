"""benchmarks/gpu_smoke.py: every check reports pass, fail or skipped and the others still run;
its CLI checks run on the CPU too (the GPU figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_smoke(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_smoke

    yield gpu_smoke
    sys.modules.pop("gpu_smoke", None)


def test_a_failing_check_is_reported_and_the_rest_still_run(gpu_smoke, tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("kernel exploded")

    def fine(ctx):
        assert ctx.model.joinpath("config.json").exists() and ctx.train.exists()
        return {"value": 1}

    monkeypatch.setitem(gpu_smoke.CHECKS, "cli", broken)
    monkeypatch.setitem(gpu_smoke.CHECKS, "lora", fine)
    out = tmp_path / "smoke.json"
    report = gpu_smoke.main(["--device", "cpu", "--checks", "cli", "lora", "layer-no-sync", "--json", str(out)])
    checks = json.loads(out.read_text())["checks"]
    assert checks["cli"]["status"] == "fail" and "kernel exploded" in checks["cli"]["error"]
    assert checks["lora"] == {"status": "pass", "value": 1, "seconds": checks["lora"]["seconds"]}
    assert checks["layer-no-sync"]["status"] == "skipped" and "CUDA" in checks["layer-no-sync"]["reason"]
    assert report["checks"].keys() == checks.keys()
    assert "failed: cli" in capsys.readouterr().out


@pytest.mark.slow  # a training subprocess
def test_lora_check_trains_on_the_cpu(gpu_smoke, tmp_path):
    report = gpu_smoke.main(["--device", "cpu", "--checks", "lora", "--json", str(tmp_path / "s.json")])
    lora = report["checks"]["lora"]
    assert lora["status"] == "pass", lora
    assert lora["device"] == "cpu" and lora["base_dtype"] == "float32"
    assert lora["last_loss"] < lora["first_loss"] and lora["held_out"][1] < lora["held_out"][0]
