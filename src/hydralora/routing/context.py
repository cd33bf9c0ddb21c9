"""RoutingContext: what one forward of a HydraLoRA model needs from its batch, and what it
yields besides the output.

HydraLoRA layers hold parameters and configuration only. What changes from batch to batch
travels in one explicit object, installed for the duration of a forward (or of one `generate`
call) by a `with` block that always removes it again:

    with RoutingContext.from_batch(batch) as routing:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = my_loss(out) + routing.aux_loss()     # balance (and guide) loss terms, if any

Inputs (all optional; B examples, T tokens, k heads):
  token_mask    (B, T) bool: the real tokens; padding is left out of the balance loss and the
                statistics (the output itself never depends on it)
  prompt_mask   (B, T0) bool, T0 <= T: the tokens that sequence routing pools
  forced_gates  (B, k): every token of example b gets these gates, in every layer
  labels        (B,) int: each example's head; oracle layers route by it, the guide loss
                pulls the router toward it
Outputs, filled by the layers during the forward:
  balance-loss terms (already weighted), per-example router probabilities (guide loss),
  statistics (a `GateStats` given by the caller, accumulated across forwards), kept gates.
Generation scope: with `generation=True` the context also keeps, per layer, the gates that
sequence routing computed from the prompt; every later forward of the same `generate` call
(one decoding step each) reuses them.

A mask, gate matrix or label vector that does not fit the forward it meets is an error
(`RoutingError`), never ignored, and nothing outlives the `with` block.

Where the context lives: a thread-local slot. Not a `contextvars.ContextVar`, because
`torch.compile(fullgraph=True)` cannot trace `ContextVar.get`, while a thread-local read is
traced with a guard (two graphs at most: with and without a context; a new context per batch
does not recompile). Two threads (two requests served at once) never see each other's
context. Backward runs outside the `with` block, and gradient checkpointing repeats the
forward there (on CUDA in another thread): `checkpoint_kwargs()` gives torch.utils.checkpoint
a `context_fn` that re-installs the forward's context for the recomputation, with recording
off so that nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .router import RouterStats, examples_in, guide_loss

IGNORE_INDEX = -100  # labels of the prompt tokens (transformers' convention)

_SLOT = threading.local()


class RoutingError(UserError, ValueError):
    """A routing input does not fit the forward it was given to."""


def active_routing() -> RoutingContext | None:
    """The routing context installed in this thread, or None."""
    return getattr(_SLOT, "context", None)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


class GateStats:
    """Router statistics per layer (mean gate, top-1 share, entropy over the real tokens),
    accumulated on the gates' device over every forward whose routing context carries this
    object; read with `summary(model)` (one host read per layer), then `reset()`."""

    def __init__(self) -> None:
        self.by_layer: dict[nn.Module, RouterStats] = {}

    def add(self, layer: nn.Module, gates: torch.Tensor, weight: torch.Tensor | None) -> None:
        stats = self.by_layer.get(layer)
        if stats is None:
            stats = self.by_layer[layer] = RouterStats(gates.shape[-1], gates.device)
        stats.add(gates, weight)

    def summary(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """{layer path in `model`: summary} for the layers that saw tokens."""
        found = ((name, self.by_layer[m].summary()) for name, m in model.named_modules() if m in self.by_layer)
        return {name: summary for name, summary in found if summary["tokens"]}  # one host read a layer

    def reset(self) -> None:
        self.by_layer.clear()

    def __bool__(self) -> bool:
        return bool(self.by_layer)


class RoutingContext:
    """One batch's routing inputs and outputs; see the module docstring."""

    def __init__(self, *, token_mask: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None,
                 forced_gates: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None,
                 stats: GateStats | None = None,
                 keep_gates: bool = False,
                 example_gates: bool = False,
                 generation: bool = False,
                 check_gates: bool = True):
        for name, mask in (("token_mask", token_mask), ("prompt_mask", prompt_mask)):
            if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
                raise RoutingError(f"RoutingContext {name}: give a (batch, tokens) tensor, got "
                                   f"{_shape(mask) if torch.is_tensor(mask) else type(mask).__name__}")
        if forced_gates is not None:
            if not torch.is_tensor(forced_gates) or forced_gates.dim() != 2 \
                    or not forced_gates.is_floating_point():
                raise RoutingError("RoutingContext forced_gates: give a float (batch, heads) tensor")
            if check_gates:  # one host read per context; gates built by this package skip it
                g = forced_gates.detach().float()
                if not bool(torch.isfinite(g).all()) or bool((g < 0).any()) \
                        or not torch.allclose(g.sum(-1), torch.ones(g.shape[0], device=g.device), atol=1e-3):
                    raise RoutingError("RoutingContext forced_gates: every row must be finite, "
                                       "non-negative and sum to 1 (as the router's gates do)")
        if labels is not None and (not torch.is_tensor(labels) or labels.dim() != 1
                                   or labels.is_floating_point() or labels.dtype == torch.bool):
            raise RoutingError("RoutingContext labels: give a (batch,) integer tensor of head indices")
        sizes = {n: t.shape[0] for n, t in (("token_mask", token_mask), ("prompt_mask", prompt_mask),
                                            ("forced_gates", forced_gates), ("labels", labels))
                 if t is not None}
        if len(set(sizes.values())) > 1:
            raise RoutingError(f"RoutingContext: the inputs disagree on the batch size {sizes}")
        self.token_mask, self.prompt_mask = token_mask, prompt_mask
        self.forced_gates, self.labels = forced_gates, labels
        self.stats, self.keep_gates, self.example_gates = stats, keep_gates, example_gates
        self.generation = generation
        self.recording = True  # off while gradient checkpointing repeats a forward
        self.balance_terms: list[torch.Tensor] = []
        self.example_probs: list[torch.Tensor] = []
        self.gates: dict[nn.Module, torch.Tensor] = {}  # keep_gates: the real tokens' gates
        self.sequence_gates: dict[nn.Module, torch.Tensor] = {}  # generation: the prompt's
        self._previous: list[RoutingContext | None] = []

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], **kwargs: Any) -> RoutingContext:
        """The context of a tokenized batch: real tokens from `attention_mask` (all, when it
        has none), the prompt from `labels == -100` (the whole input when unlabeled), head
        labels from `route_labels` when present. `kwargs`: the other constructor arguments."""
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        if mask is None and ids is not None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        real = None if mask is None else mask.bool()
        labels = batch.get("labels")
        prompt = real
        if real is not None and labels is not None and labels.shape == real.shape:
            prompt = real & (labels == IGNORE_INDEX)
        kwargs.setdefault("labels", batch.get("route_labels"))
        return cls(token_mask=real, prompt_mask=prompt, **kwargs)

    # ------------------------------------------------------------------ installing
    def __enter__(self) -> RoutingContext:
        self._previous.append(active_routing())
        _SLOT.context = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _SLOT.context = self._previous.pop()

    def for_recompute(self) -> RoutingContext:
        """The same inputs with recording off: what a checkpointed forward sees again."""
        twin = copy.copy(self)
        twin.recording = False
        twin._previous = []
        return twin

    # ------------------------------------------------------------------ read by the layers
    def token_weight(self, n: int) -> torch.Tensor | None:
        """(N,) 1 for real tokens, 0 for padding, for a forward over N tokens; None: all real."""
        m = self.token_mask
        if m is None:
            return None
        if m.numel() != n:
            raise RoutingError(f"routing context: token_mask {_shape(m)} does not fit a forward over "
                               f"{n} tokens; build the context from the batch given to this forward")
        return m.reshape(n)

    def pooling_mask(self, lead: tuple[int, ...]) -> torch.Tensor | None:
        """prompt_mask (B, T0), checked against a forward of leading shape (B, T)."""
        m = self.prompt_mask
        if m is None:
            return None
        t = lead[1] if len(lead) > 1 else 1
        if m.shape[0] != examples_in(lead) or m.shape[1] > t:
            raise RoutingError(f"routing context: prompt_mask {_shape(m)} does not fit a forward of "
                               f"shape ({', '.join(map(str, lead))}, ...); it marks the prompt of "
                               "each example of this batch")
        return m

    def given_gates(self, k: int, oracle: bool, lead: tuple[int, ...]) -> torch.Tensor | None:
        """(B, k) gates fixed from outside for a forward of leading shape `lead`: forced gates,
        or (for an oracle layer) the one-hot of each example's label; None: the router decides."""
        b = examples_in(lead)
        if self.forced_gates is not None:
            g = self.forced_gates
            if g.shape != (b, k):
                raise RoutingError(f"routing context: forced_gates {_shape(g)} does not fit a layer of "
                                   f"{k} heads in a batch of {b}; give one row of {k} gates per example")
            return g.float()
        if oracle and self.labels is not None:
            if self.labels.shape[0] != b:
                raise RoutingError(f"routing context: {self.labels.shape[0]} labels for a batch of {b}")
            # scatter rather than one_hot: no host read (an out-of-range label still raises)
            return torch.zeros(b, k, device=self.labels.device).scatter_(1, self.labels.view(b, 1), 1.0)
        return None

    def cached_sequence_gates(self, layer: nn.Module, b: int) -> torch.Tensor | None:
        """The prompt's gates of `layer` in this generation, for a later forward of b examples."""
        cached = self.sequence_gates.get(layer) if self.generation else None
        if cached is not None and cached.shape[0] != b:
            raise RoutingError(f"routing context: a generation step of {b} sequences after a prompt "
                               f"of {cached.shape[0]}; use one context per generate call")
        return cached

    # ------------------------------------------------------------------ written by the layers
    def add_balance_term(self, term: torch.Tensor) -> None:
        if self.recording:
            self.balance_terms.append(term)

    def add_example_probs(self, probs: torch.Tensor) -> None:
        if self.recording and self.example_gates:
            self.example_probs.append(probs)

    def record(self, layer: nn.Module, gates: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Statistics and kept gates of one layer's forward ((N, k) float gates)."""
        if not self.recording:
            return
        if self.stats is not None:
            self.stats.add(layer, gates, weight)
        if self.keep_gates:  # an inspection aid, off the training path (reads to the host)
            g = gates.detach()
            self.gates[layer] = (g if weight is None else g[weight.bool()]).float().cpu()

    def keep_sequence_gates(self, layer: nn.Module, gates: torch.Tensor) -> None:
        if self.generation and self.recording:
            self.sequence_gates[layer] = gates.detach()

    # ------------------------------------------------------------------ read by the caller
    def balance_loss(self) -> torch.Tensor | None:
        """Sum over layers of balance_loss_weight * balance loss; None when no layer has one."""
        return torch.stack(self.balance_terms).sum() if self.balance_terms else None

    def guide_loss(self, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """Mean over layers of the cross-entropy between each example's mean router
        probabilities and the head of its label (`labels`, default: the context's); None when
        no layer kept them (the context needs example_gates=True)."""
        labels = self.labels if labels is None else labels
        if not self.example_probs or labels is None:
            return None
        return torch.stack([guide_loss(p, labels) for p in self.example_probs]).mean()

    def aux_loss(self, guide_weight: float = 0.0) -> torch.Tensor | float:
        """What training adds to the language-model loss: the balance loss, plus
        `guide_weight` times the guide loss; 0.0 when there is neither."""
        total: torch.Tensor | float = 0.0
        balance = self.balance_loss()
        if balance is not None:
            total = balance
        if guide_weight > 0:
            guide = self.guide_loss()
            if guide is not None:
                total = total + guide_weight * guide
        return total


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of torch.utils.checkpoint: the forward runs as it is; its recomputation in
    backward runs inside the same routing context, recording nothing."""
    ctx = active_routing()
    if ctx is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), ctx.for_recompute()


def checkpoint_kwargs() -> dict[str, Any]:
    """`gradient_checkpointing_kwargs` for a model with HydraLoRA layers (non-reentrant
    checkpointing, which alone can re-install the routing context for the recomputation)."""
    return {"use_reentrant": False, "context_fn": checkpoint_context}


def route_checkpointing(model: nn.Module) -> int:
    """Make the activation checkpointing that transformers set up on `model` (however it was
    enabled: the Trainer, TRL, by hand) repeat each forward inside its routing context: the
    checkpoint function of every module that has one gets `context_fn=checkpoint_context`.
    Idempotent; reentrant checkpointing cannot take a context_fn and is left as it is (the
    layers then refuse what they cannot recompute). Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or getattr(func, "hydralora_routing", False):
            continue
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant", True) or "context_fn" in keywords:
            continue

        def routed(function, *args, _func=func, **kwargs):
            return _func(function, *args, context_fn=checkpoint_context, **kwargs)

        routed.hydralora_routing = True  # type: ignore[attr-defined]
        module._gradient_checkpointing_func = routed
        changed += 1
    return changed


def in_backward() -> bool:
    """Whether this code runs inside a backward pass (a checkpointed forward being repeated)."""
    return torch._C._current_graph_task_id() != -1
