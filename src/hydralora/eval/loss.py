"""Held-out loss: cross-entropy on the response tokens only, per domain.

Response-only training leaves most positions unlabeled (a topic label is 4 tokens after a
200-token article), yet a causal LM computes vocabulary logits for every position: with
SmolLM2's 49,152-token vocabulary that is a large share of the step. Passing a boolean
`logits_to_keep` mask projects only the labeled positions through the LM head; the result
is the same loss. transformers releases before the boolean mask (5.17 has none; 5.24 has it,
in `modeling_utils.slice_logits_to_keep`) take a 1-D tensor of positions instead: there we
keep the positions labeled in any row of the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import modeling_utils

from ..data import IGNORE_INDEX, Collator
from ..dist import progress
from ..routing.context import RoutingContext


# transformers' causal LMs take a (B, T) boolean logits_to_keep from the release that added this
BOOLEAN_LOGITS_MASK = hasattr(modeling_utils, "slice_logits_to_keep")


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, rows): per-token negative log-likelihood of every labeled token, (M,) float32,
    and the batch row each belongs to, (M,)."""
    labels = batch["labels"]  # (B, T)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    extra = {"adapter_names": batch["adapter_names"]} if "adapter_names" in batch else {}
    targets = labels[:, 1:][keep[:, :-1]]  # (M,)
    if BOOLEAN_LOGITS_MASK:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=keep, **extra)
        logits = out.logits.reshape(-1, out.logits.shape[-1])  # (M, V)
        if logits.shape[0] != targets.shape[0]:  # a model that ignores logits_to_keep: (B, T, V)
            logits = out.logits[keep]
    else:
        positions = keep.any(0).nonzero()[:, 0]  # (P,): labeled in some row; P < T
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=positions, **extra)  # logits (B, P, V)
        logits = out.logits[keep[:, positions] if out.logits.shape[1] == len(positions) else keep]
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits.float(), targets, reduction="none"), rows


def autocast_context(model: torch.nn.Module, bf16: bool):
    device = next(model.parameters()).device.type
    if bf16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
) -> dict[str, dict[str, float]]:
    """{domain: {"loss", "ppl", "tokens", "examples"}} plus "mean": the macro mean over domains.

    Loss is the mean cross-entropy per response token of each domain (examples without a
    domain are grouped as "all").
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(pad_token_id)
    sums: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    examples: dict[str, int] = defaultdict(int)
    # longest first so padding waste is small and memory peaks early
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    for start in progress(range(0, len(order), batch_size), "held-out loss", unit="batch"):
        chunk = [features[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
        # padding, prompt and oracle labels for the HydraLoRA layers
        with RoutingContext.from_batch(batch), autocast_context(model, bf16):
            nll, rows = response_nll(model, batch)
        per_row = torch.zeros(len(chunk)).index_add_(0, rows.cpu(), nll.cpu())
        counts = torch.bincount(rows.cpu(), minlength=len(chunk))
        for f, total, n in zip(chunk, per_row.tolist(), counts.tolist()):
            domain = f.get("domain") or "all"
            sums[domain] += total
            tokens[domain] += n
            examples[domain] += 1
    model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for domain in sorted(sums):
        loss = sums[domain] / max(tokens[domain], 1)
        out[domain] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": tokens[domain],
                       "examples": examples[domain]}
    if out:
        mean = sum(v["loss"] for v in out.values()) / len(out)
        out["mean"] = {"loss": mean, "ppl": math.exp(min(mean, 50)),
                       "tokens": sum(tokens.values()), "examples": sum(examples.values())}
    return out


def loss_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per model/run, one column per domain (held-out loss)."""
    domains = sorted({d for r in results.values() for d in r if d != "mean"})
    cols = domains + ["mean"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        cells = [f"{res[d]['loss']:.3f}" if d in res else "-" for d in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
