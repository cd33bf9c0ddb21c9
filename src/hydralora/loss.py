"""Cross-entropy on the response tokens only, computing logits only where there is a label.

Response-only training leaves most positions unlabeled (a topic label is 4 tokens after a
200-token article), yet a causal LM computes vocabulary logits for every position: with
SmolLM2's 49,152-token vocabulary that is a large share of the step. Passing a boolean
`logits_to_keep` mask (supported by transformers' causal LMs) projects only the labeled
positions through the LM head; the result is the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, rows): per-token negative log-likelihood of every labeled token, (M,) float32,
    and the batch row each belongs to, (M,)."""
    labels = batch["labels"]  # (B, T)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    extra = {"adapter_names": batch["adapter_names"]} if "adapter_names" in batch else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=keep, **extra)
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # (M, V)
    targets = labels[:, 1:][keep[:, :-1]]  # (M,)
    if logits.shape[0] != targets.shape[0]:  # a model that ignores the boolean mask
        logits = out.logits[keep]
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits.float(), targets, reduction="none"), rows
