"""GPU end-to-end checks, pass or fail, no download: the paths the CPU tests cannot reach.

    python benchmarks/gpu_smoke.py                          # on a GPU: every check, ~2 minutes
    python benchmarks/gpu_smoke.py --device cpu --checks cli lora   # same code on a CPU

Checks (each independent; one failing does not stop the others):
  layer-no-sync  HydraLoRA layer forward+backward in training (statistics, token and prompt
                 masks, example gates; token, top-1 and sequence routing) under
                 torch.cuda.set_sync_debug_mode("error"): any host synchronization raises.
                 Also counts the synchronizations of a whole tiny-Llama training step (the
                 transformers code included), for information.
  layer-compile  torch.compile(layer, fullgraph=True) with the default (inductor) backend,
                 forward+backward, against eager.
  cli            `hydralora train` with --device/--dtype auto (a GPU: bfloat16 base, float32
                 adapters), then eval, generate and export on the device; the loss falls and
                 the reloaded adapter's held-out loss equals the one measured after training.
  sequence       train with --routing sequence, then generate (decoding reuses the gates).
  lora           the PEFT LoRA baseline on the device.
  qlora          --quantize 4bit (bitsandbytes), then eval on a freshly quantized base.
  fsdp           torchrun, one process, the Trainer's FSDP2 (--trainer-arg fsdp=...).
  deepspeed      torchrun, one process, ZeRO-2 (--trainer-arg deepspeed=examples/ds_zero2.json).
A check whose optional package is missing is reported as skipped, with the reason. The tiny
model and data come from tests/conftest.py. Writes every result to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tiny_llama, save_tiny_model, tiny_records, write_jsonl  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYER_OPTIONS = [{}, {"top_k": 1}, {"routing": "sequence"}, {"router_input": "a", "dropout": 0.1}]


class Skip(Exception):
    """The check cannot run here (a missing optional package, no GPU)."""


def hydralora(*argv: str, env: dict, cwd: Path, launcher: list[str] | None = None) -> str:
    cmd = [*(launcher or [sys.executable, "-m"]), "hydralora", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=150)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:1])} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def losses(out: Path) -> list[float]:
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


class Context:
    def __init__(self, device: str, work: Path):
        self.device, self.work = device, work
        self.model = save_tiny_model(work / "tiny-llama")
        self.train = write_jsonl(work / "train.jsonl", tiny_records(48))
        self.test = write_jsonl(work / "test.jsonl", tiny_records(12))
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def train_args(self, out: str, *extra: str, steps: int = 12) -> list[str]:
        return ["train", "--model", str(self.model), "--data", str(self.train), "--output", str(self.work / out),
                "--eval-data", str(self.test), "--max-steps", str(steps), "--batch-size", "4",
                "--lr", "5e-3", "--adapter-rank", "4",  # torchrun takes --r for its own flags
                "--target-modules", *TARGETS, "--logging-steps", "1",
                "--save-steps", str(steps), "--seed", "1", "--device", self.device, *extra]

    def run(self, *argv: str, launcher: list[str] | None = None) -> str:
        return hydralora(*argv, env=self.env, cwd=self.work, launcher=launcher)

    def summary(self, out: str) -> dict:
        return json.loads((self.work / out / "summary.json").read_text())


def check_trained(ctx: Context, out: str) -> dict:
    s = ctx.summary(out)
    curve = losses(ctx.work / out)
    assert curve[-1] < curve[0], f"loss did not fall: {curve}"
    base, tuned = s["eval"]["base"]["mean"]["loss"], s["eval"]["fine-tuned"]["mean"]["loss"]
    assert tuned < base, f"held-out loss {base} -> {tuned}"
    if ctx.device != "cpu":
        assert s["device"].startswith("cuda") and s["base_dtype"] in ("bfloat16", "4bit"), s
    return {"device": s["device"], "base_dtype": s["base_dtype"], "bf16": s["bf16"],
            "first_loss": curve[0], "last_loss": curve[-1], "held_out": [base, tuned],
            "peak_memory_mb": s["peak_memory_mb"]}


def cuda_only(ctx: Context) -> torch.device:
    if ctx.device == "cpu" or not torch.cuda.is_available():
        raise Skip("needs CUDA")
    return torch.device("cuda")


def layer_no_sync(ctx: Context) -> dict:
    from hydralora import GateStats, HydraLoraConfig, RoutingContext, add_hydralora
    from hydralora.layer import HydraLoraLinear

    dev = cuda_only(ctx)
    for options in LAYER_OPTIONS:
        cfg = HydraLoraConfig(r=8, num_heads=4, target_modules=["x"], **options)
        layer = HydraLoraLinear(torch.nn.Linear(256, 512, device=dev, dtype=torch.bfloat16), cfg).train()
        mask = torch.ones(4, 64, dtype=torch.bool, device=dev)
        x = torch.randn(4, 64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16), RoutingContext(
                    token_mask=mask, prompt_mask=mask, stats=GateStats(), example_gates=True) as routing:
                y = layer(x)
            loss = y.float().sum() + routing.aux_loss()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert layer.lora_B.grad is not None
    # a whole training step of a tiny Llama: count, do not fail (transformers may synchronize)
    model = make_tiny_llama(vocab_size=300).to(dev).train()
    add_hydralora(model, HydraLoraConfig(r=4, num_heads=3, target_modules=TARGETS))
    model.to(dev)
    ids = torch.randint(0, 300, (4, 64), device=dev)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]
    return {"layer_options": LAYER_OPTIONS, "model_step_syncs": len(syncs), "model_step_sync_kinds": sorted(set(syncs))}


def layer_compile(ctx: Context) -> dict:
    from hydralora import HydraLoraConfig
    from hydralora.layer import HydraLoraLinear

    dev = cuda_only(ctx)
    torch.manual_seed(0)
    cfg = HydraLoraConfig(r=8, num_heads=4, target_modules=["x"], dropout=0.0, init_heads="random")
    eager = HydraLoraLinear(torch.nn.Linear(512, 1024, device=dev, dtype=torch.bfloat16), cfg).to(dev).train()
    twin = HydraLoraLinear(torch.nn.Linear(512, 1024, device=dev, dtype=torch.bfloat16), cfg).to(dev).train()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(8, 128, 512, device=dev, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    outs = []
    for module in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(x)
        y.float().square().mean().backward()
        outs.append(y.float())
    torch.cuda.synchronize()
    out_err = (outs[0] - outs[1]).abs().max().item() / outs[0].abs().max().item()
    grads = {n: (p.grad, dict(twin.named_parameters())[n].grad) for n, p in eager.named_parameters()
             if p.grad is not None and p.grad.abs().max() > 0}  # B gets no gradient while A = 0
    assert grads, "no parameter received a gradient"
    grad_err = max(((a - b).abs().max() / a.abs().max()).item() for a, b in grads.values())
    assert out_err < 2e-2 and grad_err < 5e-2, (out_err, grad_err)
    return {"relative_output_error": out_err, "relative_grad_error": grad_err, "compared_grads": sorted(grads),
            "seconds_with_compile": round(time.perf_counter() - t0, 1)}


def cli(ctx: Context) -> dict:
    ctx.run(*ctx.train_args("hydra", "--num-heads", "3", "--dtype", "auto"))
    result = check_trained(ctx, "hydra")
    model = ["--model", str(ctx.model), "--adapter", str(ctx.work / "hydra"), "--device", ctx.device]
    ctx.run("eval", *model, "--data", str(ctx.test), "--no-generate", "--output", str(ctx.work / "eval.json"))
    reloaded = json.loads((ctx.work / "eval.json").read_text())["loss"]["mean"]["loss"]
    tuned = result["held_out"][1]
    assert abs(reloaded - tuned) <= 1e-2 * tuned, f"reloaded adapter: held-out loss {reloaded}, after training {tuned}"
    out = ctx.run("generate", *model, "--prompt", "What is 5 plus three?", "--max-new-tokens", "8")
    assert out.strip(), "generate printed nothing"
    ctx.run("export", *model, "--output", str(ctx.work / "merged"), "--format", "merged",
            "--data", str(ctx.test), "--gates", "mean")
    assert (ctx.work / "merged" / "config.json").exists()
    return {**result, "reloaded_held_out_loss": reloaded}


def sequence(ctx: Context) -> dict:
    ctx.run(*ctx.train_args("seq", "--num-heads", "3", "--routing", "sequence"))
    result = check_trained(ctx, "seq")
    out = ctx.run("generate", "--model", str(ctx.model), "--adapter", str(ctx.work / "seq"),
                  "--device", ctx.device, "--prompt", "What is 7 plus three?", "--max-new-tokens", "8")
    return {**result, "generated": out.strip()[-80:]}


def lora(ctx: Context) -> dict:
    ctx.run(*ctx.train_args("lora", "--method", "lora"))
    return check_trained(ctx, "lora")


def qlora(ctx: Context) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise Skip(f"bitsandbytes: {err}") from None
    ctx.run(*ctx.train_args("qlora", "--num-heads", "3", "--quantize", "4bit"))
    result = check_trained(ctx, "qlora")
    ctx.run("eval", "--model", str(ctx.model), "--adapter", str(ctx.work / "qlora"), "--quantize", "4bit",
            "--device", ctx.device, "--data", str(ctx.test), "--no-generate")
    return result


def torchrun(ctx: Context, out: str, *trainer_args: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", str(29500 + len(out)), "-m"]
    extra = [a for t in trainer_args for a in ("--trainer-arg", t)]
    ctx.run(*ctx.train_args(out, "--num-heads", "3", *extra), launcher=launcher)
    result = check_trained(ctx, out)
    from safetensors.torch import load_file

    keys = sorted(load_file(str(ctx.work / out / "adapter_model.safetensors")))
    assert keys and all("lora_" in k or "router" in k for k in keys), keys[:5]
    return {**result, "adapter_tensors": len(keys)}


def fsdp(ctx: Context) -> dict:
    cuda_only(ctx)
    return torchrun(ctx, "fsdp", "fsdp=true", f"fsdp_config={ROOT / 'examples' / 'fsdp2_trainer.json'}")


def deepspeed(ctx: Context) -> dict:
    cuda_only(ctx)
    try:
        import deepspeed as _  # noqa: F401
    except Exception as err:  # ImportError, or its own errors at import
        raise Skip(f"deepspeed: {type(err).__name__}: {err}") from None
    return torchrun(ctx, "ds", f"deepspeed={ROOT / 'examples' / 'ds_zero2.json'}")


CHECKS = {"layer-no-sync": layer_no_sync, "layer-compile": layer_compile, "cli": cli, "sequence": sequence,
          "lora": lora, "qlora": qlora, "fsdp": fsdp, "deepspeed": deepspeed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", nargs="+", choices=sorted(CHECKS), default=list(CHECKS))
    parser.add_argument("--json", default="gpu_smoke.json")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "checks": {}}
    with tempfile.TemporaryDirectory(prefix="hydralora-gpu-smoke-") as tmp:
        ctx = Context(args.device, Path(tmp))
        for name in args.checks:
            t0 = time.perf_counter()
            try:
                entry = {"status": "pass", **CHECKS[name](ctx)}
            except Skip as why:
                entry = {"status": "skipped", "reason": str(why)}
            except Exception as err:  # report and go on to the next check
                entry = {"status": "fail", "error": f"{type(err).__name__}: {err}"[-4000:],
                         "where": traceback.format_exc(limit=-3)[-2000:]}
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            report["checks"][name] = entry
            print(f"{name}: {entry['status']} ({entry['seconds']} s)"
                  + (f" {entry.get('error') or entry.get('reason')}"[:600] if entry["status"] != "pass" else ""),
                  flush=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [n for n, e in report["checks"].items() if e["status"] == "fail"]
    print(f"wrote {args.json}: {len(report['checks']) - len(failed)} of {len(report['checks'])} "
          f"checks passed or skipped" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return report


if __name__ == "__main__":
    sys.exit(1 if any(e["status"] == "fail" for e in main()["checks"].values()) else 0)
