"""`hydralora analyze`: router heatmap and the A-vs-B comparison on a tiny model."""

from __future__ import annotations

import json

import torch

from hydralora.analysis import ab_similarity
from hydralora.cli import main


def test_ab_similarity_separates_shared_from_different():
    torch.manual_seed(0)
    a = torch.randn(4, 32)
    loras = {d: {"m": {"A": a + 0.01 * torch.randn(4, 32), "B": torch.randn(16, 4)}} for d in "xyz"}
    s = ab_similarity(loras)["summary"]
    assert s["A_cos"] > 0.99 and s["A_subspace"] > 0.99
    assert abs(s["B_cos"]) < 0.5 and s["B_subspace"] < 0.9


def test_analyze_writes_plots_and_numbers(tiny_model_dir, tiny_data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output",
                 str(adapter), "--max-steps", "4", "--batch-size", "4", "--save-steps", "0",
                 "--r", "4", "--num-heads", "3", "--target-modules", "q_proj", "up_proj"]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data",
                 str(tiny_data), "--output", str(out), "--per-domain-steps", "3"]) == 0
    report = json.loads((out / "analysis.json").read_text())
    router = report["router"]
    assert router["domains"] == ["headline", "math"] and router["num_heads"] == 3
    assert len(router["layers"]) == 4 and len(router["mean_gate_by_domain"]["math"]) == 3
    assert abs(sum(router["mean_gate_by_domain"]["math"]) - 1) < 1e-5
    assert 0 <= router["domain_spread_mean"] <= 1
    ab = report["ab"]
    assert ab["domains"] == ["headline", "math"] and len(ab["modules"]) == 4
    assert set(ab["summary"]) == {"A_cos", "B_cos", "A_subspace", "B_subspace"}
    for name in ("router_heatmap.png", "ab_similarity.png"):
        assert (out / name).stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "A vs B across domains" in printed and "domain spread" in printed
