"""Generation speed with dynamic routing: base model, PEFT LoRA r=8, HydraLoRA r=8 k=4 (fused)
and HydraLoRA with a "mix the heads first" decode path, side by side, batch 1 and batch 8.

The mixed-heads path computes B_mix = sum_i g_i B_i per token and then B_mix (A x); it is the
obvious alternative for one-token decode steps. Both paths read every B_i once per token; the
fused path needs out*k*r multiply-adds per token, the mixed path out*k*r + out*r. The script
measures rather than assumes.

    python benchmarks/generate_speed.py [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def mixed_heads_delta(self, x: torch.Tensor) -> torch.Tensor:
    """Per token: B_mix = sum_i g_i B_i (out x r), then B_mix (A x)."""
    n, k, r = x.shape[0], self.num_heads, self.r
    ha = F.linear(x, torch.cat([self.lora_A, self.router]))
    h, logits = ha.split([self.a_rows, k], dim=-1)
    gates = (self._gates(logits, n, h) * self.scaling).to(h.dtype)  # (N, k)
    b_mix = torch.einsum("okr,nk->nor", self.lora_B.view(self.out_features, k, r), gates)  # (N, out, r)
    return torch.bmm(b_mix, h.unsqueeze(-1)).squeeze(-1)  # (N, out)


def build(variant: str):
    from hydralora import HydraLoraConfig, HydraLoraLinear, add_hydralora, hydralora_layers
    from hydralora.base_models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    if variant == "PEFT LoRA r8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
    elif variant.startswith("HydraLoRA"):
        add_hydralora(model, HydraLoraConfig(r=8, alpha=16, num_heads=4, target_modules=TARGETS))
        for layer in hydralora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)
            if "mixed" in variant:
                layer._delta = mixed_heads_delta.__get__(layer, HydraLoraLinear)
    model.eval()
    return model, tok


@torch.no_grad()
def tokens_per_second(model, tok, batch: int, new_tokens: int) -> float:
    prompt = ["Write a short story about a robot who learns to paint."] * batch
    enc = tok(prompt, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - t0
    return batch * (out.shape[1] - enc["input_ids"].shape[1]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args()
    names = ["base", "PEFT LoRA r8", "HydraLoRA r8 k4 (fused)", "HydraLoRA r8 k4 (mixed heads)"]
    models = {name: build(name) for name in names}
    # the two HydraLoRA paths must agree before they are compared
    ids = torch.randint(0, 1000, (2, 16))
    a = models[names[2]][0](ids).logits
    b = models[names[3]][0](ids).logits
    assert torch.allclose(a, b, atol=1e-4), "the mixed-heads path disagrees with the fused path"
    print(f"# SmolLM2-135M, greedy, {args.new_tokens} new tokens, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds")
    print("| variant | " + " | ".join(f"batch {b} tok/s | x base" for b in args.batches) + " |")
    print("|---" * (1 + 2 * len(args.batches)) + "|")
    results = {name: {b: [] for b in args.batches} for name in names}
    for batch in args.batches:
        for name in names:  # warm-up
            tokens_per_second(*models[name], batch, 4)
        for _ in range(args.rounds):
            for name in names:
                results[name][batch].append(tokens_per_second(*models[name], batch, args.new_tokens))
    for name in names:
        cells = []
        for batch in args.batches:
            med = statistics.median(results[name][batch])
            cells.append(f"{med:.1f} | {med / statistics.median(results['base'][batch]):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
