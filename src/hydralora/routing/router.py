"""The router's math: gates from logits, the balance and guide losses, running statistics.

Written for the training path of `HydraLoraLinear`: no host synchronization, no operation
whose output shape depends on the data (no `.item()`, `.cpu()`, `nonzero` or boolean-mask
indexing). Padding is excluded by weighting with the token mask instead of indexing with it,
and the statistics accumulate in tensors on the layer's device that are read only when
someone asks for a summary.

Shapes: N tokens, B examples, k heads.
"""

from __future__ import annotations

import torch

from ..config import HydraLoraConfig


def probabilities(logits: torch.Tensor, cfg: HydraLoraConfig) -> torch.Tensor:
    """The router's softmax in float32, (N, k) from (N, k) logits of any float dtype (one
    operation: the cast happens inside the softmax; the temperature only when it is not 1)."""
    if cfg.router_temperature != 1.0:
        logits = logits / cfg.router_temperature
    return logits.softmax(-1, dtype=torch.float32)


def gates_from_logits(logits: torch.Tensor, cfg: HydraLoraConfig, training: bool,
                      probs: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax (or top-k renormalized) gates in float32, (N, k) from (N, k) logits; with
    head dropout in training, whole heads are dropped per token and the rest renormalized.
    `probs`: `probabilities(logits, cfg)` where the caller has it already."""
    k = logits.shape[-1]
    if cfg.router == "topk" and cfg.top_k < k:
        scaled = logits.float() / cfg.router_temperature
        top_vals, top_idx = scaled.topk(cfg.top_k, dim=-1)  # (N, top_k)
        gates = torch.zeros_like(scaled).scatter(-1, top_idx, top_vals.softmax(-1))
    else:
        gates = probabilities(logits, cfg) if probs is None else probs
    if training and cfg.head_dropout > 0:
        keep = torch.rand_like(gates) >= cfg.head_dropout  # (N, k)
        kept = gates * keep
        total = kept.sum(-1, keepdim=True)
        # a token that lost all its selected heads keeps its original gates
        gates = torch.where(total > 0, kept / total.clamp_min(1e-12), gates)
    return gates


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of (N, ...) values, each row weighted by weight (N,) (None: all 1)."""
    if weight is None:
        return values.mean(0)
    w = weight.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(0) / w.sum().clamp_min(1.0)


def balance_loss(logits: torch.Tensor, cfg: HydraLoraConfig, weight: torch.Tensor | None,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance loss k * sum_i f_i P_i over the real tokens; 1 for even usage.

    f_i: share of tokens whose top-`top_k` selection includes head i (divided by top_k);
    P_i: mean router probability of head i. Only P carries a gradient. `probs`: as in
    `gates_from_logits`.
    """
    probs = probabilities(logits, cfg) if probs is None else probs  # (N, k)
    k = probs.shape[-1]
    top_k = cfg.top_k if cfg.router == "topk" else 1
    chosen = probs.topk(top_k, dim=-1).indices  # (N, top_k)
    f = weighted_mean(torch.zeros_like(probs).scatter(-1, chosen, 1.0), weight) / top_k  # (k,)
    return k * (f * weighted_mean(probs, weight)).sum()


def examples_in(lead: tuple[int, ...]) -> int:
    """Examples in a forward whose input has leading shape `lead`: B of (B, T); with a 2-D
    input (N, in) each of the N rows is one."""
    return lead[0] if lead else 1


def example_means(gates: torch.Tensor, lead: tuple[int, ...], weight: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean gates (B, k) from per-token gates (N, k) with N = B*T (lead = (B, T));
    padding (weight 0) excluded. A 2-D input (N, in) counts each token as an example."""
    b = examples_in(lead)
    g = gates.view(b, -1, gates.shape[-1])  # (B, T, k)
    if weight is None:
        return g.mean(1)
    w = weight.to(g.dtype).view(b, -1, 1)  # (B, T, 1)
    return (g * w).sum(1) / w.sum(1).clamp_min(1.0)


def guide_loss(example_gates: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy pulling each example's mean gates (B, k) toward its label's head (B,)."""
    picked = example_gates.gather(-1, labels.view(-1, 1)).squeeze(-1)  # (B,)
    return -picked.clamp_min(1e-8).log().mean()


def pool_sequence(x: torch.Tensor, lead: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the (N, d) rows of each example over its masked positions -> (B, d). `mask`
    (B, T0) marks the tokens to pool (the prompt; T0 <= T, later tokens are not pooled; the
    routing context checks its shape); an example with no masked token pools all of them."""
    b = examples_in(lead)
    rows = x.view(b, -1, x.shape[-1])  # (B, T, d)
    if mask is None:
        return rows.mean(1)
    t = rows.shape[1]
    if mask.shape[1] < t:  # tokens generated after the prompt are not pooled
        mask = torch.nn.functional.pad(mask, (0, t - mask.shape[1]), value=False)
    w = mask.reshape(b, t, 1).to(rows.dtype)  # (B, T, 1)
    count = w.sum(1)  # (B, 1)
    pooled = (rows * w).sum(1) / count.clamp_min(1.0)
    return torch.where(count > 0, pooled, rows.mean(1))


class RouterStats:
    """Running sums of one layer's router statistics over the tokens it was given.

    The sums live in one tensor on the gates' device, updated by one in-place add without
    reading anything back; `summary()` copies them to the host (call it when logging).
    Layout of `sums`: k gate sums, k top-1 counts, the entropy sum, the token count.
    """

    def __init__(self, num_heads: int, device: torch.device | str | None = None):
        self.num_heads = num_heads
        self.sums = torch.zeros(2 * num_heads + 2, dtype=torch.float64, device=device)

    def add(self, gates: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add (N, k) gates; `weight` (N,) is 1 for real tokens and 0 for padding."""
        g = gates.detach().float()
        if g.device != self.sums.device:  # first use on another device: follow the gates
            self.sums = torch.zeros_like(self.sums, device=g.device)
        top1 = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0)  # (N, k); one_hot syncs
        entropy = torch.special.entr(g).sum(-1, keepdim=True)  # (N, 1): -sum_i g_i log g_i
        per_token = torch.cat([g, top1, entropy, g.new_ones(g.shape[0], 1)], -1)  # (N, 2k + 2)
        if weight is None:
            self.sums.add_(per_token.sum(0))
        else:
            self.sums.add_(weight.detach().to(g.dtype) @ per_token)  # padding weighs 0

    @property
    def tokens(self) -> int:
        return int(self.sums[-1].item())

    def summary(self) -> dict[str, list[float] | float]:
        k, sums = self.num_heads, self.sums.cpu()
        n = max(float(sums[-1]), 1.0)
        return {
            "mean_gate": (sums[:k] / n).tolist(),
            "top1_share": (sums[k : 2 * k] / n).tolist(),
            "entropy": float(sums[2 * k] / n),
            "tokens": int(sums[-1]),
        }
