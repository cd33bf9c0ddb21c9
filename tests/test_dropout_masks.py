"""Per-head dropout masks (`dropout_masks="per_head"`): the authors' computation, equal to their
per-head loop given the same masks, in outputs and every gradient; and the adapter file format
that records the choice."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hydralora import HydraLoraConfig, HydraLoraLinear, RoutingContext, add_hydralora, load_adapter, save_adapter


def make_layer(**options):
    torch.manual_seed(0)
    cfg = HydraLoraConfig(**{"r": 4, "alpha": 8, "num_heads": 3, "dropout": 0.3, "dropout_masks": "per_head",
                             "target_modules": ["x"], **options})
    layer = HydraLoraLinear(nn.Linear(20, 16).requires_grad_(False), cfg)
    nn.init.normal_(layer.lora_B, std=0.5)
    nn.init.normal_(layer.lora_A, std=0.3)
    return layer.train()


def authors_loop(layer: HydraLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """Their layer: gates from the clean x, then for each head a fresh dropout of x, A, B_i."""
    k, r, cfg = layer.num_heads, layer.r, layer.config
    out = layer.base(x)
    source = x if cfg.router_input == "x" else x @ layer.lora_A.T
    gates = torch.softmax(source @ layer.router.T, dim=-1)
    for i in range(k):
        a = layer.lora_A if cfg.shared_a else layer.lora_A[i * r : (i + 1) * r]
        head = F.dropout(x, cfg.dropout, training=True) @ a.T @ layer.lora_B[:, i * r : (i + 1) * r].T
        out = out + layer.scaling * gates[..., i : i + 1] * head
    return out


@pytest.mark.parametrize("options", [{}, {"shared_a": False}, {"router_input": "a"}],
                         ids=["shared-a", "one-a-per-head", "route-on-a"])
def test_per_head_masks_equal_the_authors_loop(options):
    layer = make_layer(**options)
    x = torch.randn(2, 6, 20, requires_grad=True)
    grad_out = torch.randn(2, 6, 16)

    def run(fn):
        torch.manual_seed(11)  # the same masks: both draw k dropouts of x, in head order
        out = fn(x)
        out.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in layer.adapter_params().items()}
        grads["x"] = x.grad.clone()
        for p in [*layer.adapter_params().values(), x]:
            p.grad = None
        return out.detach(), grads

    with RoutingContext():
        ours, ours_grads = run(layer)
    theirs, their_grads = run(lambda t: authors_loop(layer, t))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for name in their_grads:
        torch.testing.assert_close(ours_grads[name], their_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    shared = make_layer(dropout_masks="shared", **options)
    torch.manual_seed(11)
    assert not torch.allclose(shared(x), theirs)  # one mask for all heads is another computation


def test_per_head_masks_only_change_training():
    layer = make_layer().eval()
    twin = make_layer(dropout_masks="shared").eval()
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), twin(x))


def test_the_choice_is_saved_and_older_files_read_as_shared(tmp_path):
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    add_hydralora(model, HydraLoraConfig(r=2, num_heads=2, dropout_masks="per_head", target_modules=["proj"]))
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["dropout_masks"] == "per_head" and saved["format_version"] == 3
    fresh = nn.Sequential()
    fresh.add_module("proj", nn.Linear(8, 8))
    assert load_adapter(fresh, tmp_path / "a").hydralora_config.dropout_masks == "per_head"
    for version in (2, None):  # written before the option existed: trained with one shared mask
        old = {k: v for k, v in saved.items() if k != "dropout_masks"}
        if version is None:
            old.pop("format_version")
        else:
            old["format_version"] = version
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(old))
        assert HydraLoraConfig.from_json_file(tmp_path / "a" / "adapter_config.json").dropout_masks == "shared"
    del saved["dropout_masks"]  # a format-3 file must say
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="missing key.*dropout_masks"):
        HydraLoraConfig.from_json_file(tmp_path / "a" / "adapter_config.json")
