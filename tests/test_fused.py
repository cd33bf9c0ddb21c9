"""The fused autograd Function of the common configuration against the per-head formula, in
outputs and every gradient: float32 (with the same dropout mask), bf16 autocast, base layers it
computes itself and base layers it must call; and the operation budget of docs/benchmarks.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hydralora import GateStats, HydraLoraConfig, HydraLoraLinear, RoutingContext
from hydralora import fused as fused_module

ROOT = Path(__file__).resolve().parents[1]


def make_layer(d_in=24, d_out=40, k=3, r=4, dropout=0.0, bias=True, seed=0, base_dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = HydraLoraConfig(r=r, alpha=8, num_heads=k, dropout=dropout, target_modules=["x"])
    base = nn.Linear(d_in, d_out, bias=bias).to(base_dtype).requires_grad_(False)
    layer = HydraLoraLinear(base, cfg)
    nn.init.normal_(layer.lora_B, std=0.5)  # B = 0 at init would hide mistakes
    return layer


def reference(layer: HydraLoraLinear, x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The authors' formula with one shared mask: W0 x + b + s sum_i g_i(x) B_i A drop(x)."""
    k, r = layer.num_heads, layer.r
    out = layer.base(x)
    gates = torch.softmax(x @ layer.router.T, dim=-1)  # the router reads the clean x
    h = dropped @ layer.lora_A.T
    for i in range(k):
        out = out + layer.scaling * gates[..., i : i + 1] * (h @ layer.lora_B[:, i * r : (i + 1) * r].T)
    return out


def grads(layer, x, out, grad_out):
    out.backward(grad_out)
    result = {n: p.grad.clone() for n, p in layer.adapter_params().items()}
    if x.requires_grad:
        result["x"] = x.grad.clone()
    for p in layer.adapter_params().values():
        p.grad = None
    x.grad = None
    return result


def calls(monkeypatch):
    """Count the fused Function's uses."""
    seen = []
    real = fused_module.HydraFused.apply

    def spy(*args):
        seen.append(1)
        return real(*args)

    monkeypatch.setattr(fused_module.HydraFused, "apply", spy)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 5), (7,)], ids=["3d", "2d"])
@pytest.mark.parametrize("base", ["owned", "called"])
def test_fused_equals_the_per_head_formula_in_float32(monkeypatch, dropout, bias, shape, base):
    seen = calls(monkeypatch)
    layer = make_layer(dropout=dropout, bias=bias).train()
    if base == "called":  # a hook on the base layer: the Function must call it, not read W0
        layer.base.register_forward_hook(lambda m, i, o: None)
    assert layer._owns_base() == (base == "owned")
    x = torch.randn(*shape, 24, requires_grad=True)
    grad_out = torch.randn(*shape, 40)
    torch.manual_seed(5)
    out = layer(x)
    got = grads(layer, x, out, grad_out)
    assert seen, "the common configuration must take the fused path"
    torch.manual_seed(5)  # the same dropout mask: F.dropout draws what native_dropout draws
    dropped = F.dropout(x, dropout, training=True) if dropout else x
    ref = reference(layer, x, dropped)
    want = grads(layer, x, ref, grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_in_eval_and_without_input_gradient():
    layer = make_layer(dropout=0.3).eval()
    x = torch.randn(3, 6, 24)  # the first layers' input needs no gradient
    out = layer(x)
    torch.testing.assert_close(out, reference(layer, x, x), atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.router.grad is not None


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_under_bf16_autocast_matches_float32(base_dtype):
    """Under autocast the Function computes in bf16 (as autocast would) with float32 adapters;
    outputs and gradients agree with the float32 formula to bf16 precision."""
    layer = make_layer(base_dtype=base_dtype).train()
    x = torch.randn(4, 6, 24, requires_grad=True)
    grad_out = torch.randn(4, 6, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.to(base_dtype) if base_dtype != torch.float32 else x)
    assert out.dtype == torch.bfloat16
    got = grads(layer, x, out, grad_out.bfloat16())
    layer.base.float()
    ref = reference(layer, x, x)
    want = grads(layer, x, ref, grad_out)
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)
    for name in want:
        scale = want[name].abs().max()
        assert (got[name].float() - want[name]).abs().max() <= 0.05 * scale + 1e-3, name
    assert all(p.dtype == torch.float32 for p in layer.adapter_params().values())


def test_statistics_come_from_the_fused_gates():
    layer = make_layer().train()
    stats = GateStats()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with RoutingContext(token_mask=mask, stats=stats, keep_gates=True) as routing:
        layer(torch.randn(2, 3, 24))
    assert stats.by_layer[layer].tokens == 3
    kept = routing.gates[layer]
    assert kept.shape == (3, 3)
    torch.testing.assert_close(kept.sum(-1), torch.ones(3))


@pytest.mark.parametrize("options", [{"router": "topk", "top_k": 2}, {"routing": "sequence"},
                                     {"shared_a": False}, {"router_input": "a"},
                                     {"head_dropout": 0.2}, {"router_temperature": 2.0},
                                     {"num_heads": 1}, {"router": "uniform"}])
def test_other_modes_use_plain_autograd(monkeypatch, options):
    seen = calls(monkeypatch)
    cfg = HydraLoraConfig(**{"r": 4, "num_heads": 3, "target_modules": ["x"], **options})
    layer = HydraLoraLinear(nn.Linear(8, 8), cfg)
    with RoutingContext():
        layer(torch.randn(2, 3, 8))
    assert not seen


def test_balance_loss_and_forced_gates_leave_the_fused_path(monkeypatch):
    seen = calls(monkeypatch)
    layer = make_layer().train()
    with RoutingContext(forced_gates=torch.tensor([[1.0, 0.0, 0.0]] * 2)):
        layer(torch.randn(2, 3, 24))
    with RoutingContext(example_gates=True, labels=torch.tensor([0, 1])):
        layer(torch.randn(2, 3, 24))
    assert not seen
    layer.eval()
    with RoutingContext():
        layer(torch.randn(2, 3, 24))
    assert seen


def budget_from_docs() -> float:
    """The budget docs/benchmarks.md states: 'Operation budget: N extra operations ...'."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    match = re.search(r"Operation budget: at most (\d+(?:\.\d+)?) extra operations per adapted layer", text)
    assert match, "docs/benchmarks.md must state the operation budget"
    return float(match.group(1))


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_a_training_step_stays_within_the_operation_budget(bf16):
    """Extra operations per adapted layer over PEFT LoRA r=8 in one training step (train's
    defaults), counted as benchmarks/op_count.py counts them; logging steps (every 10th,
    statistics on) are averaged in."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_count import extra_per_layer

    plain, _ = extra_per_layer(bf16, logging=False)
    logged, _ = extra_per_layer(bf16, logging=True)
    budget = budget_from_docs()
    assert plain + (logged - plain) / 10 <= budget, (plain, logged, budget)
    assert plain <= budget


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_both_paths_compile_as_one_graph_and_agree_with_eager(fused):
    """torch.compile traces the Function (fuse_when_compiled) or the plain path (the default,
    layer.FUSED_UNDER_COMPILE); either way one graph, and the same output and gradients."""
    torch._dynamo.reset()
    layer = make_layer(dropout=0.0).train()
    layer.fuse_when_compiled = fused
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad_out = torch.randn(2, 5, 40)
    want = grads(layer, x, layer(x), grad_out)
    eager = layer(x).detach()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    got = grads(layer, x, out, grad_out)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
