"""The routing context: what a forward needs from its batch travels in one object that cannot
outlive its `with` block; inputs that do not fit are errors; a custom training loop needs
nothing else; activation checkpointing repeats a forward inside the same context."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from hydralora import (
    GateStats,
    HydraLoraConfig,
    HydraLoraLinear,
    RoutingContext,
    RoutingError,
    add_hydralora,
    hydralora_layers,
)
from hydralora.routing.context import active_routing, checkpoint_kwargs, route_checkpointing


def make_layer(**options):
    torch.manual_seed(0)
    cfg = HydraLoraConfig(**{"r": 4, "num_heads": 3, "target_modules": ["x"], **options})
    layer = HydraLoraLinear(nn.Linear(16, 12), cfg)
    nn.init.normal_(layer.lora_B, std=0.5)
    return layer


def test_the_context_is_gone_after_the_block_even_after_an_error():
    assert active_routing() is None
    outer = RoutingContext()
    with outer:
        assert active_routing() is outer
        with RoutingContext() as inner:
            assert active_routing() is inner
        assert active_routing() is outer
        with pytest.raises(ZeroDivisionError), RoutingContext():
            1 / 0
        assert active_routing() is outer
    assert active_routing() is None


def test_a_stale_mask_cannot_reach_the_next_forward():
    """A mask of one batch fits neither a batch of another size (an error) nor any forward
    after its block (it is gone): the next forward sees only what its own context carries."""
    layer = make_layer()
    stats = GateStats()
    with RoutingContext(token_mask=torch.tensor([[True, False, True]]), stats=stats):
        layer(torch.randn(1, 3, 16))
        with pytest.raises(RoutingError, match=r"token_mask \(1, 3\) does not fit a forward over 8 tokens"):
            layer(torch.randn(2, 4, 16))
    assert stats.by_layer[layer].tokens == 2
    layer(torch.randn(2, 4, 16))  # no context: nothing of the old batch applies
    assert stats.by_layer[layer].tokens == 2


@pytest.mark.parametrize("bad,match", [
    (dict(forced_gates=torch.tensor([[0.5, 0.5]])), r"forced_gates \(1, 2\) does not fit a layer of 3 heads"),
    (dict(forced_gates=torch.tensor([[0.2, 0.2, 0.6], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])),
     "in a batch of 2"),
    (dict(prompt_mask=torch.ones(2, 9, dtype=torch.bool)), r"prompt_mask \(2, 9\) does not fit"),
    (dict(labels=torch.tensor([0, 1, 2])), "3 labels for a batch of 2"),
])
def test_inputs_that_do_not_fit_the_forward_are_errors(bad, match):
    routing = "oracle" if "labels" in bad else "sequence" if "prompt_mask" in bad else "token"
    layer = make_layer(routing=routing).eval()
    with pytest.raises(RoutingError, match=match), RoutingContext(**bad):
        layer(torch.randn(2, 4, 16))


@pytest.mark.parametrize("gates,match", [
    ([[float("nan"), 0.5, 0.5]], "finite, non-negative and sum to 1"),
    ([[0.5, 0.5, 0.5]], "finite, non-negative and sum to 1"),
    ([[-0.5, 1.0, 0.5]], "finite, non-negative and sum to 1"),
    ([[1, 0, 0]], "float"),
])
def test_forced_gates_are_checked_when_given(gates, match):
    with pytest.raises(RoutingError, match=match):
        RoutingContext(forced_gates=torch.tensor(gates))


def test_inputs_must_agree_on_the_batch():
    with pytest.raises(RoutingError, match="disagree on the batch size"):
        RoutingContext(token_mask=torch.ones(2, 3, dtype=torch.bool), labels=torch.tensor([0, 1, 2]))
    with pytest.raises(RoutingError, match="labels"):
        RoutingContext(labels=torch.tensor([0.5]))


def test_threads_do_not_see_each_others_context():
    seen = {}
    ready, done = threading.Event(), threading.Event()

    def other():
        ready.wait()
        seen["other"] = active_routing()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with RoutingContext():
        ready.set()
        done.wait()
    thread.join()
    assert seen["other"] is None


def test_a_custom_training_loop_through_the_public_context():
    """The README's loop: nothing but RoutingContext between the batch and the loss."""
    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=4, num_heads=3, balance_loss_weight=0.1,
                                                             target_modules=["q_proj", "v_proj", "up_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    batch["attention_mask"][0, -3:] = 0  # padding the balance loss must not count
    losses, stats = [], GateStats()
    for _ in range(20):
        with RoutingContext.from_batch(batch, stats=stats) as routing:
            out = model(**batch)
        loss = out.loss + routing.aux_loss()
        assert len(routing.balance_terms) == 6  # one per adapted layer
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    summary = stats.summary(model)
    assert set(summary) == set(hydralora_layers(model))
    assert all(s["tokens"] == 20 * (40 - 3) for s in summary.values())


@pytest.mark.parametrize("options", [{"routing": "sequence"}, {"balance_loss_weight": 0.5},
                                     {"routing": "oracle"}], ids=["sequence", "balance", "oracle"])
def test_checkpointing_repeats_the_forward_in_its_context(options):
    """Gradients with activation checkpointing (the recomputation runs in backward, after the
    `with` block) equal those without; without the context they would differ or fail."""
    def run(checkpointing: bool, route: bool = True):
        torch.manual_seed(0)
        model = add_hydralora(make_tiny_llama(), HydraLoraConfig(
            r=4, num_heads=2, dropout=0.0, init_heads="random", target_modules=["q_proj", "up_proj"], **options))
        model.train()
        if checkpointing:
            kwargs = checkpoint_kwargs() if route else {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[:, :3] = -100  # the prompt: what sequence routing pools
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "route_labels": torch.tensor([0, 1])}
        with RoutingContext.from_batch(batch) as routing:
            out = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
        (out.loss + routing.aux_loss()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(RoutingError, match="activation checkpointing repeats this forward"):
        run(True, route=False)


def test_route_checkpointing_adds_the_context_to_checkpointing_set_up_elsewhere():
    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=4, num_heads=2, routing="sequence",
                                                             target_modules=["q_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert route_checkpointing(model) >= 2  # each decoder layer's checkpoint function
    assert route_checkpointing(model) == 0  # idempotent


def test_the_trainer_mixin_routes_checkpointing_again_when_it_is_set_up_again():
    """Each Trainer.train() installs new checkpoint functions: the mixin walks the model again
    then (and only then), so a second train() also recomputes inside the routing context."""
    from types import SimpleNamespace

    from hydralora.train.integration import HydraLoraTrainerMixin

    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=4, num_heads=2, target_modules=["q_proj"]))
    trainer = SimpleNamespace(_checkpoint_seen=None)

    def routed():
        return [getattr(m._gradient_checkpointing_func, "hydralora_routing", False)
                for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None)]

    for _ in range(2):  # as two train() calls do
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert routed() and not any(routed())
        HydraLoraTrainerMixin._route_checkpointing(trainer, model)
        assert all(routed())
        first = trainer._checkpoint_seen
        HydraLoraTrainerMixin._route_checkpointing(trainer, model)  # nothing new: no walk
        assert trainer._checkpoint_seen is first
