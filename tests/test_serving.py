"""Per-request adapters for serving engines: `export --gates per-domain|per-cluster` and
`hydralora route` (the request router)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from hydralora import load_adapter
from hydralora.cli import main
from hydralora.clustering.choose_k import purity
from hydralora.clustering.kmeans import ClusterModel
from hydralora.data import load_examples
from hydralora.data.builtin import builtin_mixture
from hydralora.export import merge_fixed
from hydralora.routing.requests import route_prompts


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    train, test = builtin_mixture(train_per_domain=8, test_per_domain=8, seed=0)
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "test.jsonl", test)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(mixture[0]), "--output", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "2e-2", "--save-steps", "0",
                 "--max-length", "768", "--skip-overlong", "--r", "4", "--num-heads", "3",
                 "--target-modules", "q_proj", "v_proj", "up_proj"]) == 0
    return out


def test_per_domain_export_serves_each_domain_with_its_own_lora(tiny_model_dir, mixture, adapter,
                                                               tmp_path, capsys):
    out = tmp_path / "serve"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(out), "--gates", "per-domain", "--data", str(mixture[1]), "--max-length", "768"]) == 0
    printed = capsys.readouterr().out
    assert "per-request adapters" in printed
    report = json.loads((out / "hydralora_export.json").read_text())
    assert report["groups"] == ["code", "headline", "math", "topic"]
    for name in report["groups"]:
        assert (out / name / "adapter_config.json").exists()
    # the request router sends held-out prompts to their domain's adapter at least as often as
    # k-means (the paper's way to find the groups) puts them with their own domain
    examples = load_examples([mixture[1]])
    prompts = [e.instruction for e in examples]
    domains = [e.domain for e in examples]
    clusters = ClusterModel.fit(prompts, 4, seed=0)
    routed = route_prompts(out, prompts)
    accuracy = sum(r == d for r, d in zip(routed, domains)) / len(domains)
    assert accuracy >= purity(clusters.labels, domains) - 1e-9
    assert report["router_accuracy"] == pytest.approx(accuracy)
    assert set(report["per_request"]) == set(report["dynamic"])
    # each group's LoRA, loaded by PEFT alone, is HydraLoRA with that group's fixed gates
    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11]])
    for name in ("math", "code"):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                               str(out / name)).eval()
        hydra = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
        gates = {layer: torch.tensor(g) for layer, g in report["gates_per_group"][name].items()}
        merge_fixed(hydra, gates)
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, hydra(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a second export and an evaluation
def test_route_command_and_eval_of_the_folder(tiny_model_dir, mixture, adapter, tmp_path, capsys):
    out = tmp_path / "serve"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(out), "--gates", "per-cluster", "--data", str(mixture[1]), "--max-length", "768"]) == 0
    capsys.readouterr()
    math_prompt = next(e.instruction for e in load_examples([mixture[1]]) if e.domain == "math")
    assert main(["route", "--adapter", str(out), "--prompt", math_prompt, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer[0]["adapter"].startswith("cluster_") and (out / answer[0]["adapter"]).is_dir()
    assert answer[0]["adapter"] == route_prompts(out, [math_prompt])[0]
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--data",
                 str(mixture[1]), "--no-generate", "--max-length", "768"]) == 0
    assert main(["route", "--adapter", str(adapter), "--prompt", "hi"]) == 2
    assert "lora_split.json" in capsys.readouterr().err


def test_per_group_export_needs_data(tiny_model_dir, adapter, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output",
                 str(tmp_path / "x"), "--gates", "per-domain"]) == 2
    assert "--data" in capsys.readouterr().err
