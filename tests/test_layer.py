"""HydraLoraLinear: the fused math against straightforward references, gates, merge, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydralora import ConfigError, GateStats, HydraLoraConfig, HydraLoraLinear, RoutingContext, RoutingError

VARIANTS = {
    "softmax": {},
    "topk2": {"router": "topk", "top_k": 2},
    "top1": {"router": "topk", "top_k": 1},
    "uniform": {"router": "uniform"},
    "not-shared": {"shared_a": False},
    "route-on-a": {"router_input": "a"},
    "not-shared-route-on-a": {"shared_a": False, "router_input": "a"},
    "temperature": {"router_temperature": 0.5},
    "one-head": {"num_heads": 1},
}


def make_layer(d_in=24, d_out=40, seed=0, randomize=True, bias=True, **overrides):
    torch.manual_seed(seed)
    cfg = HydraLoraConfig(
        **{"r": 4, "alpha": 8, "num_heads": 3, "dropout": 0.0, "target_modules": ["x"], **overrides}
    )
    layer = HydraLoraLinear(nn.Linear(d_in, d_out, bias=bias).requires_grad_(False), cfg)
    if randomize:  # B = 0 at init would hide mistakes in the head arithmetic
        nn.init.normal_(layer.lora_B, std=0.5)
    return layer


def reference_forward(layer: HydraLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The method written the slow, obvious way: a loop over heads, A x per head."""
    cfg, k, r = layer.config, layer.num_heads, layer.r
    out = layer.base(x)
    a_heads = [layer.lora_A if cfg.shared_a else layer.lora_A[i * r : (i + 1) * r] for i in range(k)]
    b_heads = [layer.lora_B[:, i * r : (i + 1) * r] for i in range(k)]
    if layer.router is None:
        gates = torch.full((*x.shape[:-1], k), 1.0 / k)
    else:
        route_in = x if cfg.router_input == "x" else x @ layer.lora_A.T
        logits = route_in @ layer.router.T / cfg.router_temperature
        if cfg.router == "topk":
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep.scatter_(-1, logits.topk(cfg.top_k, dim=-1).indices, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        gates = torch.softmax(logits, dim=-1)
    for i in range(k):
        head = (x @ a_heads[i].T) @ b_heads[i].T
        out = out + cfg.scaling * gates[..., i : i + 1] * head
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_equals_per_head_reference(variant):
    layer = make_layer(**VARIANTS[variant])
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad_out = torch.randn(2, 5, 40)
    out = layer(x)
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in layer.adapter_params().items()}
    gx = x.grad.clone()
    for p in layer.adapter_params().values():
        p.grad = None
    x.grad = None
    ref = reference_forward(layer, x)
    ref.backward(grad_out)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.adapter_params().items():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_heads_give_base_output(variant):
    layer = make_layer(randomize=False, **VARIANTS[variant])
    x = torch.randn(3, 7, 24)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("init", [{"init_heads": "random"}, {"router_init": "zero", "init_heads": "random"}])
def test_random_head_init_starts_at_base_with_distinct_heads(init):
    layer = make_layer(randomize=False, **init)
    x = torch.randn(4, 24)
    assert torch.equal(layer(x), layer.base(x))
    heads = layer.lora_B.view(40, 3, 4)
    assert not torch.allclose(heads[:, 0], heads[:, 1])


def test_zero_router_with_zero_heads_is_refused():
    with pytest.raises(ConfigError, match="router_init"):
        HydraLoraConfig(router_init="zero", init_heads="zero")


def test_one_head_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    layer = make_layer(num_heads=1, d_in=16, d_out=16)
    holder = nn.Sequential(nn.Linear(16, 16))
    holder[0].load_state_dict(layer.base.state_dict())
    peft_model = get_peft_model(
        holder, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    )
    lora = peft_model.base_model.model[0]
    lora.lora_A["default"].weight.data.copy_(layer.lora_A)
    lora.lora_B["default"].weight.data.copy_(layer.lora_B)
    x = torch.randn(6, 16)
    torch.testing.assert_close(layer(x), peft_model(x), atol=1e-6, rtol=1e-6)
    n_ours = sum(p.numel() for p in layer.adapter_params().values())
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n_ours == n_peft


def gates_of(layer, x):
    with RoutingContext(keep_gates=True) as routing:
        layer(x)
    return routing.gates[layer]


def test_gates_sum_to_one_and_modes():
    x = torch.randn(50, 24)
    g = gates_of(make_layer(num_heads=4), x)
    torch.testing.assert_close(g.sum(-1), torch.ones(50))
    assert (g > 0).all()
    g = gates_of(make_layer(num_heads=4, router="topk", top_k=2), x)
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(50))
    g = gates_of(make_layer(num_heads=4, router="uniform"), x)
    assert torch.equal(g, torch.full((50, 4), 0.25))


def test_temperature_sharpens_gates():
    x = torch.randn(50, 24)
    soft = gates_of(make_layer(num_heads=4, router_temperature=4.0), x)
    sharp = gates_of(make_layer(num_heads=4, router_temperature=0.25), x)
    assert sharp.max(-1).values.mean() > soft.max(-1).values.mean()


def test_head_dropout_only_in_training():
    layer = make_layer(num_heads=4, head_dropout=0.5)
    x = torch.randn(200, 24)
    layer.eval()
    g_eval = gates_of(layer, x)
    assert (g_eval > 0).all()
    layer.train()
    g_train = gates_of(layer, x)
    assert (g_train == 0).any()
    torch.testing.assert_close(g_train.sum(-1), torch.ones(200))


def test_balance_loss_lowest_for_even_usage():
    layer = make_layer(num_heads=4, balance_loss_weight=0.1)
    even = torch.eye(4).repeat(25, 1) * 5.0  # each head chosen by a quarter of the tokens
    skewed = torch.zeros(100, 4)
    skewed[:, 0] = 5.0  # every token prefers head 0
    from hydralora.routing.router import balance_loss

    loss_even = balance_loss(even, layer.config, None)
    loss_skewed = balance_loss(skewed, layer.config, None)
    assert loss_even.item() == pytest.approx(1.0, abs=1e-6)
    assert loss_skewed.item() > 2.0
    # a training forward puts the weighted term into its routing context, with a gradient
    layer.train()
    with RoutingContext() as routing:
        layer(torch.randn(8, 24))
    aux = routing.balance_loss()
    assert aux is not None and aux.requires_grad and len(routing.balance_terms) == 1
    aux.backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    # without a context there is nowhere to put it: an error, not a silently lost loss term
    with pytest.raises(RoutingError, match="balance_loss_weight"):
        layer(torch.randn(8, 24))
    with torch.no_grad():  # but evaluation and no-grad forwards need none
        layer(torch.randn(8, 24))


def test_token_mask_limits_statistics():
    layer = make_layer(num_heads=3)
    stats = GateStats()
    with RoutingContext(token_mask=torch.tensor([[True, False, True, False]]), stats=stats):
        layer(torch.randn(4, 24))
    assert stats.by_layer[layer].tokens == 2


def test_dropout_shared_by_heads_and_off_in_eval():
    layer = make_layer(num_heads=3, dropout=0.5)
    x = torch.randn(10, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b) and not torch.allclose(a, reference_forward(layer, x))


def test_trainable_parameter_count():
    d_in, d_out, r, k = 24, 40, 4, 3
    shared = make_layer()
    assert sum(p.numel() for p in shared.adapter_params().values()) == r * d_in + k * d_out * r + k * d_in
    split = make_layer(shared_a=False)
    assert sum(p.numel() for p in split.adapter_params().values()) == k * r * d_in + k * d_out * r + k * d_in
    uniform = make_layer(router="uniform")
    assert sum(p.numel() for p in uniform.adapter_params().values()) == r * d_in + k * d_out * r
    on_a = make_layer(router_input="a")
    assert on_a.router.shape == (k, r)


@pytest.mark.parametrize("variant", ["softmax", "not-shared", "one-head"])
def test_merge_matches_fixed_gates_and_unmerge_restores(variant):
    layer = make_layer(**VARIANTS[variant])
    layer.eval()
    k = layer.num_heads
    gates = torch.softmax(torch.randn(k), 0)
    x = torch.randn(5, 24)
    # expected: the per-head sum with these gates for every token
    expected = layer.base(x)
    r = layer.r
    for i in range(k):
        a = layer.lora_A if layer.config.shared_a else layer.lora_A[i * r : (i + 1) * r]
        expected = expected + layer.scaling * gates[i] * (x @ a.T) @ layer.lora_B[:, i * r : (i + 1) * r].T
    w0 = layer.base.weight.clone()
    dynamic = layer(x)
    layer.merge(gates)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    if k == 1:  # one head: the merge is exact for the dynamic model too
        torch.testing.assert_close(layer(x), dynamic, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(gates)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    assert torch.equal(layer(x), dynamic)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_rejects_wrong_gate_count():
    layer = make_layer()
    with pytest.raises(ConfigError, match="expected 3 gate values"):
        layer.merge([0.5, 0.5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    layer = make_layer()
    layer.base.to(dtype)
    x = torch.randn(2, 3, 24, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 3, 40)
    assert layer.lora_A.dtype == torch.float32  # adapter weights stay in float32
    layer.base.float()
    ref = reference_forward(layer, x.float())
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_autocast_bf16():
    layer = make_layer()
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_forward(layer, x), atol=0.1, rtol=0.05)


def test_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(40, 24).requires_grad_(False)  # nf=out, nx=in
    nn.init.normal_(conv.weight, std=0.2)
    cfg = HydraLoraConfig(r=4, alpha=8, num_heads=3, dropout=0.0, target_modules=["c_attn"])
    layer = HydraLoraLinear(conv, cfg)
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(2, 5, 24)
    linear = nn.Linear(24, 40)
    linear.weight.data.copy_(conv.weight.T)
    linear.bias.data.copy_(conv.bias)
    twin = HydraLoraLinear(linear.requires_grad_(False), cfg)
    for name, p in layer.adapter_params().items():
        getattr(twin, name).data.copy_(p)
    torch.testing.assert_close(layer(x), twin(x), atol=1e-5, rtol=1e-5)
    w0 = conv.weight.clone()
    layer.merge()
    twin.merge()
    torch.testing.assert_close(layer.base.weight, twin.base.weight.T)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_wraps_only_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        HydraLoraLinear(nn.Embedding(4, 4), HydraLoraConfig())


@pytest.mark.parametrize(
    "options",
    [
        {"init_heads": "random"},
        {"init_heads": "random", "router_init": "zero"},
        {"head_dropout": 0.3},
        {"router_temperature": 0.3},
        {"balance_loss_weight": 0.05},
        {"router_input": "a"},
        {"router_input": "a", "init_heads": "random"},
    ],
)
def test_every_head_diversity_option_starts_at_the_base_model(options):
    """Training mode, dropout on: the first forward equals the frozen layer exactly."""
    layer = make_layer(randomize=False, dropout=0.1, num_heads=4, **options)
    layer.train()
    x = torch.randn(6, 24)
    with RoutingContext():
        assert torch.equal(layer(x), layer.base(x))


def test_base_io_reads_linear_and_conv1d_the_same_way():
    """(in, out) of nn.Linear and of GPT-2's Conv1D (weight stored as (in, out)): the layer, the
    size guard and compare's parameter count all read them through base_io."""
    from transformers.pytorch_utils import Conv1D

    from hydralora.layer import base_io
    from hydralora.model import check_adapter_size

    assert base_io(nn.Linear(4, 6)) == (4, 6) == base_io(Conv1D(6, 4))
    config = HydraLoraConfig(r=2, num_heads=3, target_modules=["c"])
    assert HydraLoraLinear(Conv1D(6, 4), config).lora_B.shape == (6, 6)
    with torch.device("meta"):  # in 1e6, out 1e9: A 2e6 + B 5*2*1e9 + router 5e6 (swapped: 7,010,000,000)
        huge = Conv1D(10**9, 10**6)
    with pytest.raises(ConfigError, match="10,007,000,000 parameters"):
        check_adapter_size(nn.Linear(1, 1), HydraLoraConfig(r=2, num_heads=5, target_modules=["c"]),
                           [("c", huge)])
