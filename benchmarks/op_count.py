"""Operations a training step launches per adapted layer: HydraLoRA against PEFT LoRA r=8.

On a GPU at these sizes a step pays per kernel and per pass over the (tokens x in) input, not
per FLOP, so the count of operations is the proxy that a machine without a GPU can measure.
Counted with a TorchDispatchMode over one forward + loss + backward of a small Llama (views,
detach and the optimizer left out), as `hydralora train` runs it: the recommended preset, k=4,
r=8, dropout 0.05, on the seven projections, inside the routing context of the batch; a
"logging" step also gathers router statistics (only the steps that log do). The difference
to PEFT LoRA r=8 with the same targets and dropout, divided by the number of adapted layers,
is the figure the budget in docs/benchmarks.md is about.

    python benchmarks/op_count.py            # float32 and bf16 autocast, plain and logging steps
    python benchmarks/op_count.py --json ops.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIPPED = {"detach", "alias", "lift_fresh"}  # not kernels


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in SKIPPED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def build(method: str):
    """(model, number of adapted layers) for 'hydralora', 'lora' or 'base' (nothing adapted)."""
    model = tiny_llama()
    if method == "hydralora":
        from hydralora import HydraLoraConfig, add_hydralora

        add_hydralora(model, HydraLoraConfig.from_preset("recommended", r=8, num_heads=4, dropout=0.05,
                                                         target_modules=TARGETS))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=TARGETS))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.model.embed_tokens.weight.requires_grad_(True)
    model.train()
    return model, 2 * len(TARGETS)


def count_step(method: str, bf16: bool, logging: bool, tokens: tuple[int, int] = (2, 16)) -> collections.Counter:
    """The operations of one training step (forward, loss, backward)."""
    from hydralora import GateStats, RoutingContext

    model, _ = build(method)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, tokens, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    hydra = method == "hydralora"
    with OpCounter() as counter:
        routing = (RoutingContext.from_batch(batch, stats=GateStats() if logging else None)
                   if hydra else contextlib.nullcontext())
        with routing, autocast:
            loss = model(**batch).loss
        if hydra:
            loss = loss + routing.aux_loss()
        loss.backward()
    return counter.ops


def extra_per_layer(bf16: bool, logging: bool) -> tuple[float, dict[str, float]]:
    """(extra operations per adapted layer over PEFT LoRA, the per-operation difference)."""
    hydra, lora = count_step("hydralora", bf16, logging), count_step("lora", bf16, logging)
    layers = 2 * len(TARGETS)
    diff = {k: (hydra[k] - lora[k]) / layers for k in set(hydra) | set(lora) if hydra[k] != lora[k]}
    return (sum(hydra.values()) - sum(lora.values())) / layers, diff


def per_layer_counts(bf16: bool) -> dict[str, float]:
    """Operations per adapted layer over the frozen base model, for each method."""
    base = sum(count_step("base", bf16, False).values())
    layers = 2 * len(TARGETS)
    return {m: (sum(count_step(m, bf16, False).values()) - base) / layers for m in ("lora", "hydralora")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}; one training step of a 2-layer Llama, 14 adapted layers")
    results = {}
    for bf16 in (False, True):
        mode = "bf16 autocast" if bf16 else "float32"
        counts = per_layer_counts(bf16)
        plain, diff = extra_per_layer(bf16, logging=False)
        logged, _ = extra_per_layer(bf16, logging=True)
        per_step = plain + (logged - plain) / 10  # logging every 10 steps (train's default)
        results[mode] = {"lora_per_layer": counts["lora"], "hydralora_per_layer": counts["hydralora"],
                         "extra_plain_step": plain, "extra_logging_step": logged,
                         "extra_mean_logging_every_10": per_step, "difference_by_op": diff}
        print(f"\n## {mode}")
        print(f"ops per adapted layer over the frozen model: PEFT LoRA {counts['lora']:.1f}, "
              f"HydraLoRA {counts['hydralora']:.1f}")
        print(f"extra ops per adapted layer: {plain:.2f} (plain step), {logged:.2f} (logging step), "
              f"{per_step:.2f} (mean with logging every 10 steps)")
        print("by operation: " + ", ".join(f"{k} {v:+g}" for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
