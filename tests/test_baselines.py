"""Automatic k, the LoRA-Split baseline, and the ablation flags."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_records, write_jsonl
from hydralora.cli import main

TRAIN = ["--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--save-steps", "0",
         "--target-modules", "q_proj", "v_proj", "up_proj"]


@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_cluster_command_on_builtin_mixture(tmp_path, capsys):
    assert main(["cluster", "--data", "builtin", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "clusters.json").read_text())
    assert result["k"] == 4 and result["purity"] >= 0.9  # math, code, topic, headline
    assert len(result["sse"]) == 10 and result["silhouette"][0] is None and "elbow" in result["method"]
    assert "k = 4" in out and "purity" in out and "| headline |" in out
    assert (tmp_path / "sse.png").stat().st_size > 1000
    labels = [json.loads(l) for l in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == result["examples"] and {"source", "domain", "cluster"} <= labels[0].keys()


def test_cluster_too_many_clusters(tmp_path, tiny_data, capsys):
    assert main(["cluster", "--data", str(tiny_data), "--output", str(tmp_path / "c"),
                 "--k-max", "100"]) == 2
    assert "more clusters than the 24 examples" in capsys.readouterr().err


@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_num_heads_auto_records_choice(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", tiny_records(40))
    out = tmp_path / "auto"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                 str(out), "--num-heads", "auto", "--k-max", "6", *TRAIN]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["k_selection"]["k"] == saved["num_heads"] == 2  # two kinds of instruction
    assert "elbow" in saved["k_selection"]["method"] and len(saved["k_selection"]["sse"]) == 6
    assert main(["info", str(out)]) == 0


def test_lora_split_trains_saves_routes_and_generates(tiny_model_dir, tmp_path, capsys):
    records = tiny_records(40)
    data = write_jsonl(tmp_path / "t.jsonl", records)
    out = tmp_path / "split"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                 str(out), "--method", "lora-split", "--num-heads", "2", "--r", "8", *TRAIN]) == 0
    assert "LoRA-Split 2 x r=4" in capsys.readouterr().out
    meta = json.loads((out / "lora_split.json").read_text())
    assert meta["ranks"] == [4, 4] and sum(meta["cluster_sizes"]) == 40
    for name in meta["adapters"]:
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    # held-out prompts of each source go to that source's cluster
    from hydralora.methods.lora_split import SplitRouter

    router = SplitRouter.load(out)
    math = router.route([f"What is {i} plus three?" for i in range(100, 110)])
    news = router.route([f"Write a headline for article {i}." for i in range(100, 110)])
    assert len(set(math)) == 1 and len(set(news)) == 1 and math[0] != news[0]
    # generation through the CLI mixes the two adapters in one batch
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt",
                 "What is 7 plus three?", "Write a headline for article 3.", "--max-new-tokens", "3"]) == 0
    assert main(["info", str(out)]) == 0
    assert "LoRA-Split, 2 PEFT LoRA adapters" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,expected,name",
    [
        (["--router", "uniform"], lambda i, o, r, k: r * i + k * o * r, "uniform router: w/o gate"),
        (["--no-shared-a"], lambda i, o, r, k: k * r * i + k * o * r + k * i, "one A per head: w/o Hydra"),
        (["--num-heads", "1"], lambda i, o, r, k: r * i + o * r, "one head: w/o MoE"),
        ([], lambda i, o, r, k: r * i + k * o * r + k * i, "HydraLoRA r=4, k=3"),
    ],
)
def test_ablation_flags_give_their_parameter_count(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                   flags, expected, name):
    out = tmp_path / "abl"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output",
                 str(out), "--r", "4", "--num-heads", "3", *TRAIN, *flags]) == 0
    assert name in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    k = 1 if "--num-heads" in flags else 3
    # tiny Llama: q_proj 64->64, v_proj 64->32 (2 kv heads of 16), up_proj 64->128, 2 layers
    shapes = [(64, 64), (64, 32), (64, 128)] * 2
    assert summary["trainable_params"] == sum(expected(i, o, 4, k) for i, o in shapes)
