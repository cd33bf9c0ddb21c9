"""Routing modes (per token, per sequence, oracle), the guide loss, and a training forward
with no host synchronization that compiles as one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_records, write_jsonl
from hydralora import GateStats, HydraLoraConfig, HydraLoraLinear, RoutingContext
from hydralora.cli import main
from hydralora.routing.router import RouterStats, guide_loss

OPTIONS = [
    {},
    {"router": "topk", "top_k": 2, "balance_loss_weight": 0.1, "head_dropout": 0.2},
    {"routing": "sequence", "balance_loss_weight": 0.1},
    {"router_input": "a", "dropout": 0.1},
    {"num_heads": 1},
]


def make_layer(device="cpu", **cfg):
    config = HydraLoraConfig(**{"r": 4, "num_heads": 3, "target_modules": ["x"], **cfg})
    return HydraLoraLinear(nn.Linear(16, 12, device=device), config)


class SyncRecorder(TorchDispatchMode):
    """Records ops that read a tensor back to the host or whose output shape depends on data."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "item")

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if any(f in name for f in self.FORBIDDEN):
            self.found.append(name)
        if name.startswith("aten.index.") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.found.append(name + " (boolean mask)")
        to_device = kwargs.get("device")
        if to_device is not None and torch.device(to_device).type == "cpu":
            self.found.append(f"{name} -> cpu")  # the inputs live on the meta device
        return func(*args, **kwargs)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_training_forward_never_synchronizes_with_the_host(options):
    """Forward + backward of a layer in training, with statistics, token mask, balance loss
    and example gates on, runs entirely on the 'meta' device: any .item()/.cpu()/float() or
    data-dependent shape would fail or be recorded."""
    layer = make_layer(device="meta", **options).train()
    stats = GateStats()
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    x = torch.randn(2, 5, 16, device="meta", requires_grad=True)
    with SyncRecorder() as recorder:
        with RoutingContext(token_mask=mask, prompt_mask=mask, stats=stats, example_gates=True) as routing:
            y = layer(x)
        loss = y.sum() + routing.aux_loss()
        loss.backward()
    assert recorder.found == []
    assert bool(stats)  # the statistics were gathered (on the meta device)


def test_the_recorder_catches_a_host_read():
    x = torch.ones(3, device="meta")
    for read in (lambda: x.sum().item(), lambda: (x > 0).nonzero(), lambda: x[x > 0], lambda: x.cpu()):
        with SyncRecorder() as recorder:
            try:
                read()
            except (RuntimeError, NotImplementedError):  # meta tensors cannot answer these
                pass
        assert recorder.found


@pytest.mark.parametrize("options", OPTIONS[:3], ids=["default", "topk", "sequence"])
def test_layer_compiles_as_one_graph(options):
    torch._dynamo.reset()
    layer = make_layer(**options).train()
    stats = GateStats()
    mask = torch.ones(2, 5, dtype=torch.bool)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # forward and backward
    x = torch.randn(2, 5, 16, requires_grad=True)
    with RoutingContext(token_mask=mask, stats=stats) as routing:
        y = compiled(x)
    (y.sum() + routing.aux_loss()).backward()
    assert layer.lora_B.grad is not None and stats.by_layer[layer].tokens == 10
    with RoutingContext(token_mask=mask, stats=GateStats()):
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0


def test_statistics_stay_on_the_gates_device_until_read():
    stats = RouterStats(3)
    stats.add(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0]]), torch.tensor([1.0, 1.0, 0.0]))
    summary = stats.summary()
    assert summary["tokens"] == 2 and summary["mean_gate"] == [0.5, 0.5, 0.0]
    assert summary["top1_share"] == [0.5, 0.5, 0.0]


# ---------------------------------------------------------------------------- sequence routing
def test_sequence_routing_gives_each_example_one_gate_vector_from_its_prompt():
    layer = make_layer(routing="sequence").eval()
    x = torch.randn(2, 6, 16)
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)

    def gates_for(inputs):
        with RoutingContext(prompt_mask=prompt, keep_gates=True) as routing:
            out = layer(inputs)
        return out, routing.gates[layer].view(2, 6, 3)

    y, gates = gates_for(x)
    assert torch.allclose(gates, gates[:, :1].expand_as(gates))  # one vector per example
    changed = x.clone()
    changed[0, 5] += 10  # a response token: the gates do not move
    assert torch.allclose(gates_for(changed)[1], gates)
    changed[0, 0] += 10  # a prompt token: they do
    assert not torch.allclose(gates_for(changed)[1][0], gates[0])
    assert y.shape == (2, 6, 12)


def test_sequence_routing_decodes_with_the_prompts_gates():
    """A decoding step (one new token per example) reuses the gates of its prompt, so cached
    generation computes what a full forward of the whole sequence would."""
    layer = make_layer(routing="sequence").eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    prompt, new = torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    full_mask = torch.tensor([[True] * 5 + [False]] * 2)
    with RoutingContext(prompt_mask=full_mask):
        full = layer(torch.cat([prompt, new], dim=1))
    with RoutingContext(generation=True):  # one generate call
        layer(prompt)  # prefill: the prompt alone
        step = layer(new)  # decode step
    torch.testing.assert_close(step[:, 0], full[:, 5])


def test_top1_sequence_routing_is_one_head_per_example():
    layer = make_layer(routing="sequence", router="topk", top_k=1).eval()
    with RoutingContext(keep_gates=True) as routing:
        layer(torch.randn(3, 4, 16))
    gates = routing.gates[layer]
    assert ((gates == 0) | (gates == 1)).all() and (gates.sum(-1) == 1).all()


# ---------------------------------------------------------------------------- oracle, guide
def test_forced_gates_pick_one_head_per_example():
    layer = make_layer().eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    x = torch.randn(2, 4, 16)
    with RoutingContext(forced_gates=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])):
        y = layer(x)
    for b, head in ((0, 1), (1, 2)):
        one_head = layer.base(x[b]) + x[b] @ layer.delta_weight(nn.functional.one_hot(
            torch.tensor(head), 3).float()).T
        torch.testing.assert_close(y[b], one_head, rtol=1e-4, atol=1e-5)


def test_oracle_config_has_no_router_and_checks_its_labels():
    assert make_layer(routing="oracle").router is None
    with pytest.raises(ValueError, match="one label per head"):
        HydraLoraConfig(num_heads=3, routing="oracle", route_labels=["a", "b"])


def test_guide_loss_pulls_example_gates_toward_the_label():
    torch.manual_seed(0)
    layer = make_layer().train()
    x, labels = torch.randn(4, 5, 16), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD([layer.router], lr=1.0)
    losses = []
    for _ in range(20):
        with RoutingContext(labels=labels, example_gates=True) as routing:
            layer(x)
        loss = routing.guide_loss()
        torch.testing.assert_close(loss, guide_loss(routing.example_probs[0], labels))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_cli_trains_and_evaluates_oracle_and_guided_routing(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_records(24))
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "3",
              "--batch-size", "4", "--r", "4", "--num-heads", "2", "--target-modules", "q_proj",
              "v_proj", "--route-labels-from", "domain", "--save-steps", "0"]
    oracle = tmp_path / "oracle"
    assert main(["train", *common, "--output", str(oracle), "--routing", "oracle",
                 "--eval-data", str(data)]) == 0
    from hydralora.config import HydraLoraConfig as Config

    saved = Config.from_json_file(oracle / "adapter_config.json")
    assert saved.routing == "oracle" and saved.route_labels == ["headline", "math"]
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(oracle), "--data",
                 str(data), "--no-generate"]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(oracle), "--data",
                 str(data)]) == 2
    assert "--no-generate" in capsys.readouterr().err
    guided = tmp_path / "guided"
    assert main(["train", *common, "--output", str(guided), "--guide-loss-weight", "1",
                 "--guide-schedule", "decay"]) == 0
    assert "domain-guided 1 (decay)" in capsys.readouterr().out


def test_generation_with_sequence_routing_matches_full_recomputation(tiny_model_dir):
    """Cached decoding (the prompt's gates reused) gives the tokens that recomputing the whole
    sequence at every step gives."""
    from transformers import AutoModelForCausalLM

    from hydralora import add_hydralora
    from hydralora.base_models import load_tokenizer
    from hydralora.eval.generation import generate

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    add_hydralora(model, HydraLoraConfig(r=4, num_heads=3, routing="sequence", init_heads="random",
                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    chats = [[{"role": "user", "content": "add two and three"}], [{"role": "user", "content": "hi"}]]
    cached = generate(model, tokenizer, chats, max_new_tokens=6)
    real_generate = model.generate
    model.generate = lambda **kw: real_generate(**{**kw, "use_cache": False})
    assert generate(model, tokenizer, chats, max_new_tokens=6) == cached
