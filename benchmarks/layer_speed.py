"""Forward+backward time of one adapted linear layer, every variant side by side in one run.

Variants: the frozen base nn.Linear; PEFT LoRA r=8; HydraLoRA r=8 with k=4 and k=8 (fused);
the authors' per-head loop (recomputes A x and a dropout mask per head) with k=4 and k=8.
Rounds alternate the variants so that machine noise hits them alike; medians are printed as
ratios to the base layer and to PEFT LoRA.

    python benchmarks/layer_speed.py                  # the three shapes of the issue
    python benchmarks/layer_speed.py --shapes 576x1536x2048 --rounds 30 --dropout 0.05
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from hydralora import HydraLoraConfig, HydraLoraLinear


class PerHeadLoop(nn.Module):
    """The authors' computation: a Python loop over heads, A x and dropout recomputed per head."""

    def __init__(self, base: nn.Linear, r: int, k: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.k, self.scaling = base, k, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(k))
        self.route = nn.Linear(base.in_features, k, bias=False)
        self.dropout = nn.Dropout(dropout)
        for b in self.lora_B:
            nn.init.normal_(b.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        gates = F.softmax(self.route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.k):
            head = self.lora_B[i](self.lora_A(self.dropout(x)))
            result = result + gates[..., i : i + 1] * head * self.scaling
        return result


def build_variants(d_in: int, d_out: int, dropout: float) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    variants: dict[str, nn.Module] = {}
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    variants["base Linear"] = base

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(d_in, d_out, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    holder = Holder()
    holder.proj.weight.data.copy_(base.weight)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"])
    peft_model = get_peft_model(holder, peft_cfg)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.01)  # nonzero B, as after some training
    variants["PEFT LoRA r8"] = peft_model
    for k in (4, 8):
        cfg = HydraLoraConfig(r=8, alpha=16, num_heads=k, dropout=dropout, target_modules=["x"])
        layer = HydraLoraLinear(nn.Linear(d_in, d_out, bias=False).requires_grad_(False), cfg)
        layer.base.weight.data.copy_(base.weight)
        nn.init.normal_(layer.lora_B, std=0.01)
        variants[f"HydraLoRA r8 k{k}"] = layer
    for k in (4, 8):
        loop_base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        loop_base.weight.data.copy_(base.weight)
        variants[f"per-head loop r8 k{k}"] = PerHeadLoop(loop_base, 8, k, 16, dropout)
    for m in variants.values():
        m.train()
    return variants


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    out = module(x)
    out.backward(grad)
    for p in module.parameters():
        p.grad = None


def time_shape(d_in: int, d_out: int, tokens: int, rounds: int, dropout: float) -> dict:
    variants = build_variants(d_in, d_out, dropout)
    x = torch.randn(tokens, d_in, requires_grad=True)
    grad = torch.randn(tokens, d_out)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for module in variants.values():  # warm-up
        for _ in range(3):
            step(module, x, grad)
    for _ in range(rounds):
        for name, module in variants.items():
            t0 = time.perf_counter()
            step(module, x, grad)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"shape": f"{d_in}->{d_out} x {tokens} tokens", "median_s": med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["576x1536x2048", "4096x4096x1024", "4096x11008x1024"],
        help="IN x OUT x TOKENS",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the medians to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, fp32, dropout={args.dropout}, "
        f"{args.rounds} rounds (median)"
    )
    results = []
    for spec in args.shapes:
        d_in, d_out, tokens = (int(v) for v in spec.split("x"))
        res = time_shape(d_in, d_out, tokens, args.rounds, args.dropout)
        results.append(res)
        med = res["median_s"]
        base, lora = med["base Linear"], med["PEFT LoRA r8"]
        print(f"\n## {res['shape']}")
        print("| variant | ms | x base | x PEFT LoRA r8 |")
        print("|---|---|---|---|")
        for name, t in med.items():
            print(f"| {name} | {t * 1e3:.2f} | {t / base:.3f} | {t / lora:.3f} |")
        for k in (4, 8):
            ratio = med[f"per-head loop r8 k{k}"] / med[f"HydraLoRA r8 k{k}"]
            print(f"fused k{k} is {ratio:.2f}x faster than the per-head loop")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    assert all(math.isfinite(t) for r in results for t in r["median_s"].values())


if __name__ == "__main__":
    main()
