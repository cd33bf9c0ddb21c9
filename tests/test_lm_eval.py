"""lm-evaluation-harness: `--model hydralora` scores an adapter offline (a local task YAML over a
JSONL file), and its loglikelihoods equal our own computation within 1e-4."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import write_jsonl  # noqa: E402
from hydralora import HydraLoraConfig, add_hydralora, save_adapter  # noqa: E402
from hydralora.data import IGNORE_INDEX, Collator  # noqa: E402
from hydralora.eval.loss import response_nll  # noqa: E402
from hydralora.methods import load_model_with_adapter  # noqa: E402

DOCS = [{"question": f"What is {i} plus three?", "choices": [f"The answer is {i + 3}.", "Market rises",
                                                            f"The answer is {i}."], "answer": i % 3}
        for i in range(6)]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def hydra_adapter(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_hydralora(model, HydraLoraConfig(r=4, num_heads=3, target_modules=["q_proj", "v_proj", "up_proj"],
                                         init_heads="random"))
    with torch.no_grad():  # give A non-zero values so the adapter changes the output
        for name, p in model.named_parameters():
            if name.endswith("lora_A"):
                p.normal_(std=0.3)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = write_jsonl(folder / "tiny.jsonl", DOCS)
    (folder / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return folder


def our_loglikelihoods(model_dir, adapter, pairs):
    """Sum log p(continuation | context) with our loss code; the split of lm_eval's HFLM."""
    model, tokenizer = load_model_with_adapter(str(model_dir), adapter)
    feats = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        feats.append({"input_ids": whole, "labels": [IGNORE_INDEX] * n + whole[n:]})
    batch = Collator(tokenizer.pad_token_id)(feats)
    with torch.no_grad():
        nll, rows = response_nll(model, batch)
    return (-torch.zeros(len(feats)).index_add_(0, rows, nll)).tolist()


def test_harness_loglikelihoods_equal_ours(tiny_model_dir, hydra_adapter, task_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hydralora.integrations.lm_eval  # noqa: F401  registers --model hydralora

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="hydralora", model_args=f"pretrained={tiny_model_dir},adapter={hydra_adapter},dtype=float32",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(task_dir)), device="cpu",
        batch_size=4, log_samples=True)
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(DOCS)
    pairs = [tuple(arg) for s in samples for arg in s["arguments"]]
    harness = [float(r[0][0]) for s in samples for r in s["resps"]]
    ours = our_loglikelihoods(tiny_model_dir, str(hydra_adapter), pairs)
    assert max(abs(a - b) for a, b in zip(harness, ours)) < 1e-4
    base = our_loglikelihoods(tiny_model_dir, None, pairs)
    assert max(abs(a - b) for a, b in zip(harness, base)) > 1e-3  # the adapter was applied
    assert "acc,none" in results["results"]["tiny_mc"]


@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_the_command_line_wrapper(tiny_model_dir, hydra_adapter, task_dir, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "hydralora.integrations.lm_eval", "--model", "hydralora",
         "--model_args", f"pretrained={tiny_model_dir},adapter={hydra_adapter}", "--tasks", "tiny_mc",
         "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results*.json"))
    assert files and "tiny_mc" in json.loads(files[0].read_text())["results"]


def test_sequence_routed_adapters_are_scored_one_example_at_a_time(tiny_model_dir, tmp_path):
    """The harness pads without an attention mask, which would enter the prompt pool of a
    sequence-routed adapter: such adapters get batch size 1, per-token ones keep theirs."""
    from transformers import AutoModelForCausalLM

    from hydralora.integrations.lm_eval import HydraLoraLM

    for routing, expected in (("sequence", 1), ("token", 4)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_hydralora(model, HydraLoraConfig(r=4, num_heads=2, target_modules=["q_proj"], routing=routing))
        save_adapter(model, tmp_path / routing)
        lm = HydraLoraLM(pretrained=str(tiny_model_dir), adapter=str(tmp_path / routing), device="cpu",
                         batch_size=4, dtype="float32")
        assert int(lm.batch_size) == expected, routing


def test_generation_runs_in_one_routing_context_per_call(tiny_model_dir, tmp_path):
    """The harness's generate runs inside one generation-scoped routing context whose prompt
    mask is the batch's attention mask (so sequence routing reuses the prompt's gates at every
    decoding step), and the context is gone after the call."""
    import torch
    from transformers import AutoModelForCausalLM

    from hydralora.integrations.lm_eval import HydraLoraLM
    from hydralora.routing.context import active_routing

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    add_hydralora(model, HydraLoraConfig(r=4, num_heads=2, target_modules=["q_proj", "v_proj"],
                                         routing="sequence", init_heads="random"))
    save_adapter(model, tmp_path / "seq")
    lm = HydraLoraLM(pretrained=str(tiny_model_dir), adapter=str(tmp_path / "seq"), device="cpu",
                     batch_size=1, dtype="float32")
    seen = []
    real = lm.model.generate

    def spy(*args, **kwargs):
        seen.append(active_routing())
        return real(*args, **kwargs)

    lm.model.generate = spy
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    out = lm._model_generate(ids, max_length=9, stop=[], attention_mask=mask, do_sample=False)
    assert len(seen) == 1 and seen[0].generation and torch.equal(seen[0].prompt_mask, mask.bool())
    assert active_routing() is None and out.shape[1] <= 9
