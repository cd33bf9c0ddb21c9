"""Training-step time and peak memory on SmolLM2-135M: HydraLoRA against PEFT LoRA, side by side.

Each measurement runs in a fresh child process (so peak memory belongs to one variant), and the
variants alternate round by round so that machine noise hits them alike. Every step is a real
optimizer step (forward, backward on the response-free full-sequence loss, AdamW) on random
token batches of the same shape for every variant, with the same target modules.

    python benchmarks/train_speed.py                          # HydraLoRA k=4 r=8 vs LoRA r=8
    python benchmarks/train_speed.py --variants lora:8 lora:16 lora:32 hydra:8:4 --rounds 3
    python benchmarks/train_speed.py --variants lora:8 lora:16 lora:32 split:32:4 hydra:8:4  # Fig. 5
    python benchmarks/train_speed.py --precision bf16         # bf16 autocast

Variant syntax: lora:R, hydra:R:K, split:R:K (LoRA-Split as `--method lora-split` trains it: K
PEFT LoRAs of rank R/K in one model, one active and trained per step, here in turn). Printed: median step seconds, peak RSS (whole process) and
the training overhead above the loaded model (peak RSS minus RSS before the first step), each
also as a ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(variant: str, args: dict, queue: mp.Queue) -> None:
    import torch

    from hydralora import HydraLoraConfig, add_hydralora
    from hydralora.base_models import load_model

    torch.manual_seed(0)
    model, _ = load_model(args["model"])
    kind, *nums = variant.split(":")
    targets = args["targets"]
    if kind == "hydra":
        r, k = int(nums[0]), int(nums[1])
        add_hydralora(model, HydraLoraConfig(r=r, alpha=2 * r, num_heads=k, target_modules=targets))
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        r = int(nums[0])
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                 target_modules=targets))
    elif kind == "split":
        from peft import LoraConfig, get_peft_model

        r, k = int(nums[0]), int(nums[1])
        lora = LoraConfig(r=r // k, lora_alpha=2 * (r // k), lora_dropout=0.05, target_modules=targets)
        model = get_peft_model(model, lora, adapter_name="cluster_0")
        for i in range(1, k):
            model.add_adapter(f"cluster_{i}", lora)
    else:
        raise SystemExit(f"unknown variant {variant!r}: use lora:R, hydra:R:K or split:R:K")
    model.train()
    if kind == "split":  # every adapter's parameters are trainable across the run
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args["batch"], args["seq"]), generator=gen)
    bf16 = args["precision"] == "bf16"
    start_rss = rss_mb()
    times = []
    for step in range(args["steps"] + 1):  # the first step warms up
        if kind == "split":  # one cluster's adapter active and trainable per step
            model.set_adapter(f"cluster_{step % k}")
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"variant": variant, "times": times, "peak_mb": peak, "overhead_mb": peak - start_rss,
               "trainable": sum(p.numel() for p in params)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["hydra:8:4", "lora:8"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--json", help="write the raw measurements here")
    args = parser.parse_args()
    for variant in args.variants:  # checked here: an error inside a child would hang the queue
        kind, *nums = variant.split(":")
        ok = (kind == "lora" and len(nums) == 1) or (kind in ("hydra", "split") and len(nums) == 2)
        if not ok or not all(n.isdigit() and int(n) > 0 for n in nums):
            parser.error(f"variant {variant!r}: use lora:R, hydra:R:K or split:R:K (positive integers)")
        if kind == "split" and int(nums[0]) < int(nums[1]):
            parser.error(f"variant {variant!r}: R must be at least K (each adapter has rank R // K)")
    cfg = vars(args)
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(variant, cfg, queue))
            proc.start()
            results[variant].append(queue.get())
            proc.join()
    import torch

    print(f"# SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {args.precision}, targets "
          f"{'/'.join(args.targets)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; {args.rounds} rounds x {args.steps} steps (median)")
    print("| variant | trainable | step s | x first | peak RSS MiB | x first | training overhead MiB | x first |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for variant, runs in results.items():
        step = statistics.median(t for r in runs for t in r["times"])
        peak = statistics.median(r["peak_mb"] for r in runs)
        over = statistics.median(r["overhead_mb"] for r in runs)
        first = first or (step, peak, over)
        print(f"| {variant} | {runs[0]['trainable']:,} | {step:.2f} | {step / first[0]:.3f} | "
              f"{peak:.0f} | {peak / first[1]:.3f} | {over:.0f} | {over / first[2]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
