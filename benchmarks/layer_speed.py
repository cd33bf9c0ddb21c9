"""Forward+backward time of one adapted linear layer, every variant side by side in one run,
with the number of operations each launches.

Variants: the frozen base nn.Linear; PEFT LoRA r=8; HydraLoRA r=8 with k=4 and k=8 (the fused
autograd Function, and k=4 through plain autograd, the path every other mode takes); the
authors' per-head loop (recomputes A x and a dropout mask per head) with k=4 and k=8.
Rounds alternate the variants so that machine noise hits them alike; medians are printed as
ratios to the base layer and to PEFT LoRA. "ops" is the number of aten operations one
forward+backward dispatches (views left out; counted on the CPU path of the same code): on a
GPU at these sizes the time follows the operations, so it is the figure to watch on a machine
without one.

    python benchmarks/layer_speed.py                  # the three shapes of the issue
    python benchmarks/layer_speed.py --shapes 576x1536x2048 --rounds 30 --dropout 0.05
    python benchmarks/layer_speed.py --device cuda --dtype bfloat16 \
        --shapes 4096x4096x1024 4096x4096x4096 4096x4096x16384            # on a GPU
    python benchmarks/layer_speed.py --compile        # torch.compile each variant (inductor)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hydralora import HydraLoraConfig, HydraLoraLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_count import OpCounter  # noqa: E402


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
        layer.fuse_when_compiled = True  # --compile: the Function, traced (the twin: plain autograd)
        variants[f"HydraLoRA r8 k{k}"] = layer
        if k == 4:  # the same layer through plain autograd (what every other mode takes)
            twin = HydraLoraLinear(nn.Linear(d_in, d_out, bias=False).requires_grad_(False), cfg)
            twin.load_state_dict(layer.state_dict())
            twin.fusable = False
            variants["HydraLoRA r8 k4 (autograd)"] = twin
        if k == 4 and dropout > 0:  # the authors' training noise: a dropout mask per head
            heads_cfg = HydraLoraConfig(r=8, alpha=16, num_heads=k, dropout=dropout,
                                        dropout_masks="per_head", target_modules=["x"])
            per_head = HydraLoraLinear(nn.Linear(d_in, d_out, bias=False).requires_grad_(False), heads_cfg)
            per_head.load_state_dict(layer.state_dict())
            variants["HydraLoRA r8 k4 (per-head masks)"] = per_head
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


def count_ops(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Operations of one forward+backward (weights' gradients and the input's)."""
    with OpCounter() as counter:
        step(module, x, grad)
    return sum(counter.ops.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(d_in: int, d_out: int, tokens: int, rounds: int, dropout: float,
               device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
               compiled: bool = False) -> dict:
    variants = build_variants(d_in, d_out, dropout)
    small = torch.randn(8, d_in, requires_grad=True)
    ops = {name: count_ops(module, small, torch.randn(8, d_out)) for name, module in variants.items()}
    for module in variants.values():  # the base in `dtype`, adapters in float32 (as training has it)
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        module.to(device)
    runs = {name: torch.compile(m) if compiled else m for name, m in variants.items()}
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
    autocast = dtype != torch.float32
    times: dict[str, list[float]] = {name: [] for name in variants}

    def timed(module: nn.Module) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            step(module, x, grad)
        sync(device)
        return time.perf_counter() - t0

    for module in runs.values():  # warm-up (and compilation)
        for _ in range(3):
            timed(module)
    for _ in range(rounds):
        for name, module in runs.items():
            times[name].append(timed(module))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"shape": f"{d_in}->{d_out} x {tokens} tokens", "median_s": med, "ops": ops}


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the base layer's dtype; bfloat16 also runs under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--json", help="also write the medians to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(f"# torch {torch.__version__}, {where}, {args.dtype}, dropout={args.dropout}, "
          f"{'compiled, ' if args.compile else ''}{args.rounds} rounds (median)")
    results = []
    for spec in args.shapes:
        d_in, d_out, tokens = (int(v) for v in spec.split("x"))
        res = time_shape(d_in, d_out, tokens, args.rounds, args.dropout, device, dtype, args.compile)
        results.append(res)
        med = res["median_s"]
        base, lora = med["base Linear"], med["PEFT LoRA r8"]
        print(f"\n## {res['shape']}")
        print("| variant | ms | x base | x PEFT LoRA r8 | ops |")
        print("|---|---|---|---|---|")
        for name, t in med.items():
            print(f"| {name} | {t * 1e3:.2f} | {t / base:.3f} | {t / lora:.3f} | {res['ops'][name]} |")
        for k in (4, 8):
            ratio = med[f"per-head loop r8 k{k}"] / med[f"HydraLoRA r8 k{k}"]
            print(f"fused k{k} is {ratio:.2f}x faster than the per-head loop")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    assert all(math.isfinite(t) for r in results for t in r["median_s"].values())


if __name__ == "__main__":
    main()
