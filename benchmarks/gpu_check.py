"""One-command GPU check: HydraLoRA k=4 r=8 vs PEFT LoRA r=8 on a randomly initialized Llama of
1B shape (no download), in bfloat16.

    python benchmarks/gpu_check.py                    # on a GPU: ~1B model, under 8 minutes
    python benchmarks/gpu_check.py --tiny --no-compile --json out.json   # same code, tiny, CPU

Measures (ratios HydraLoRA / PEFT LoRA): train step time and peak memory, eager and with
torch.compile, for HydraLoRA's fused autograd Function and for its plain-autograd path (which
one torch.compile should trace is `layer.FUSED_UNDER_COMPILE`, chosen from these figures);
the operations one training step launches per adapted layer (a CPU dispatch count of the same
step: the proxy a machine without a GPU can measure); one adapted layer's forward+backward at
the 4096 shapes and 1,024 / 4,096 / 16,384 tokens (layer_speed.py's variants); generation
tokens/s at batch 1 and 32. Without CUDA it runs the same code on the CPU with a tiny model
(--tiny is then the default) and float32. Prints the ratios and writes them to --json
(default gpu_check.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import build_variants, step  # noqa: E402
from op_count import OpCounter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # LlamaConfig values
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide on CPU


def build(method: str, shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: seconds, not a minute, for 1B on a GPU
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False))
    model.to(dtype=dtype)
    if method.startswith("hydra"):
        from hydralora import HydraLoraConfig, add_hydralora, hydralora_layers

        add_hydralora(model, HydraLoraConfig(r=8, alpha=16, num_heads=4, dropout=0.0,
                                             target_modules=TARGETS))
        for layer in hydralora_layers(model).values():
            layer.fuse_when_compiled = True  # "hydra": the Function, also when compiled
            if method == "hydra-autograd":  # the plain-autograd path of the same layers
                layer.fusable = False
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    for p in model.parameters():  # adapters in float32 over the half-precision base
        if p.requires_grad:
            p.data = p.data.float()
    return model.to(device)


def train_steps(method: str, args, device, dtype, compiled: bool) -> dict:
    reset_peak(device)
    model = build(method, args.shape, device, dtype)
    model.train()
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g).to(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times), "peak_mib": peak_mib(device), "loss": float(loss.detach())}
    del model, run, opt
    return out


def step_ops(method: str, args, device, dtype) -> int:
    """Operations one training step (forward, loss, backward) dispatches."""
    model = build(method, "tiny", torch.device("cpu"), torch.float32).train()
    ids = torch.randint(0, SHAPES["tiny"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with OpCounter() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(counter.ops.values())


def generation(method: str, args, device, dtype) -> dict:
    model = build(method, args.shape, device, dtype).eval()
    vocab = SHAPES[args.shape]["vocab_size"]
    out = {}
    for batch in args.gen_batches:
        ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(2)).to(device)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            sync(device)
        out[f"batch{batch}_tok_s"] = batch * args.new_tokens / (time.perf_counter() - t0)
    del model
    return out


def layer_bench(args, device, dtype) -> list[dict]:
    results = []
    for spec in args.layer_shapes:
        d_in, d_out, tokens = (int(v) for v in spec.split("x"))
        keep = ("base Linear", "PEFT LoRA r8", "HydraLoRA r8 k4", "HydraLoRA r8 k4 (autograd)")
        variants = {k: v.to(device=device, dtype=dtype) for k, v in build_variants(d_in, d_out, 0.0).items()
                    if k in keep}
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        times = {k: [] for k in variants}
        for module in variants.values():
            for _ in range(3):
                step(module, x, grad)
        for _ in range(args.layer_rounds):
            for name, module in variants.items():
                sync(device)
                t0 = time.perf_counter()
                step(module, x, grad)
                sync(device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append({"shape": spec, "median_s": med,
                        "hydra_k4_over_lora": med["HydraLoRA r8 k4"] / med["PEFT LoRA r8"],
                        "autograd_k4_over_lora": med["HydraLoRA r8 k4 (autograd)"] / med["PEFT LoRA r8"]})
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model (default without CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    args.shape = "tiny" if tiny else "1b"
    args.batch, args.seq = (2, 32) if tiny else (4, 1024)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = 1 if tiny else 3
    args.new_tokens = 4 if tiny else 64
    args.gen_batches = [1, 4] if tiny else [1, 32]
    args.layer_shapes = ["64x128x64"] if tiny else ["4096x4096x1024", "4096x4096x4096", "4096x4096x16384",
                                                     "4096x11008x1024"]
    args.layer_rounds = 3 if tiny else 20
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict = {"device": gpu, "torch": torch.__version__, "model": args.shape,
                    "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "seq": args.seq,
                    "date": time.strftime("%Y-%m-%d"), "train": {}, "generation": {}}
    t_start = time.time()
    out = Path(args.json)

    def section(name: str, run) -> None:
        """One part of the check; a failure is recorded and the next part still runs."""
        try:
            run()
        except Exception as err:  # e.g. a compiler error: keep the figures measured so far
            report.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[-3000:]
            print(f"{name}: failed: {type(err).__name__}: {str(err)[:500]}", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def ops() -> None:
        counts = {m: step_ops(m, args, device, dtype) for m in ("lora", "hydra", "hydra-autograd")}
        layers = 2 * len(TARGETS)  # the tiny shape's adapted layers
        report["ops_per_step"] = {**counts, "extra_per_layer": (counts["hydra"] - counts["lora"]) / layers,
                                  "autograd_extra_per_layer": (counts["hydra-autograd"] - counts["lora"]) / layers}
        print(f"ops per training step (tiny Llama, CPU dispatch count): LoRA {counts['lora']}, "
              f"HydraLoRA {counts['hydra']} ({report['ops_per_step']['extra_per_layer']:+.2f} per "
              f"adapted layer), plain autograd {counts['hydra-autograd']}", flush=True)

    def train(mode: str) -> None:
        runs = {m: train_steps(m, args, device, dtype, mode == "compile")
                for m in ("lora", "hydra", "hydra-autograd")}
        report["train"][mode] = {
            **runs,
            "step_ratio": runs["hydra"]["step_s"] / runs["lora"]["step_s"],
            "autograd_step_ratio": runs["hydra-autograd"]["step_s"] / runs["lora"]["step_s"],
            "memory_ratio": runs["hydra"]["peak_mib"] / runs["lora"]["peak_mib"],
        }
        print(f"train {mode}: HydraLoRA/LoRA step time x{report['train'][mode]['step_ratio']:.3f} "
              f"(plain autograd x{report['train'][mode]['autograd_step_ratio']:.3f}), "
              f"peak memory x{report['train'][mode]['memory_ratio']:.3f} "
              f"(LoRA {runs['lora']['step_s'] * 1e3:.1f} ms, {runs['lora']['peak_mib']:.0f} MiB; "
              f"HydraLoRA {runs['hydra']['step_s'] * 1e3:.1f} ms, {runs['hydra']['peak_mib']:.0f} MiB)",
              flush=True)

    def layer() -> None:
        report["layer"] = layer_bench(args, device, dtype)
        for res in report["layer"]:
            print(f"layer {res['shape']}: HydraLoRA k=4 / PEFT LoRA x{res['hydra_k4_over_lora']:.3f} "
                  f"(plain autograd x{res['autograd_k4_over_lora']:.3f})", flush=True)

    def generate() -> None:
        gen = {m: generation(m, args, device, dtype) for m in ("lora", "hydra")}
        report["generation"] = {**gen, **{f"{k}_ratio": gen["hydra"][k] / gen["lora"][k] for k in gen["lora"]}}
        for k in gen["lora"]:
            print(f"generation {k.removesuffix('_tok_s')}: HydraLoRA {gen['hydra'][k]:.1f} tok/s, "
                  f"LoRA {gen['lora'][k]:.1f} tok/s (x{report['generation'][k + '_ratio']:.3f})", flush=True)

    section("ops", ops)
    section("train eager", lambda: train("eager"))
    section("layer", layer)
    section("generation", generate)
    if not args.no_compile:  # last: the slowest part, and the one most likely to fail
        section("train compile", lambda: train("compile"))
    report["seconds"] = round(time.time() - t_start, 1)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} ({report['seconds']} s on {gpu})")
    return report


if __name__ == "__main__":
    main()
