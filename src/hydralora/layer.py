"""HydraLoraLinear: a frozen linear layer plus a shared A, k B heads and a per-token router.

              +-- W0 (frozen) ---------------------------------------------+
    x --------+                                                            (+)--> y
              +-- dropout --> A (r x in) --> h ----(g (outer) h)--> B_cat --+
              +-- W_g (k x in) --> softmax --> g --^         (out x k*r)

    y = W0 x + (alpha / r) * sum_i g_i(x) * B_i A dropout(x),   g(x) = softmax(W_g x / T)

The heads are not looped over. With B_cat = [B_1 ... B_k] (out x k*r) and
z = (g (outer) A x) flattened to k*r values per token, sum_i g_i B_i A x = B_cat z: one GEMM
for all heads, and A x is computed once. No (tokens x k x out) tensor is ever formed.

Two paths compute it. The common configuration (softmax router on x, per-token routing, one
shared A, nothing forced, no loss term from the router) runs as one autograd Function with a
hand-written backward (`fused.HydraFused`: the fewest kernels, the frozen W0 x included when
the base is a plain nn.Linear). Every other mode (top-k, uniform, sequence and oracle routing,
routing on A x, one A per head, head dropout, a router temperature other than 1, one dropout
mask per head, balance and guide losses, forced gates) runs through plain autograd below; both equal the per-head formula (tests/test_layer.py).

A layer holds parameters and configuration only. What a forward needs from its batch (masks,
forced gates, labels) and what it yields besides the output (loss terms, statistics, gates)
travel in the routing context installed around the forward (`routing.context`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .config import HydraLoraConfig
from .errors import AdapterError, ConfigError
from .fused import fused_forward
from .routing.context import RoutingContext, RoutingError, active_routing, in_backward
from .routing.router import (
    balance_loss,
    example_means,
    examples_in,
    gates_from_logits,
    pool_sequence,
    probabilities,
)

try:  # GPT-2 style Conv1D (y = x W + b with W stored as in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

SUPPORTED_BASE_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

FUSED_UNDER_COMPILE = False
"""Whether torch.compile traces the fused Function (True) or the plain autograd path (False),
for layers built from now on (each keeps its own `fuse_when_compiled`). Chosen by measurement
(docs/benchmarks.md): on the CPU, inductor fuses the plain path's elementwise operations itself
and the compiled layer was 3-20% faster that way; benchmarks/gpu_check.py measures both on a GPU."""


def _autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled for the devices autocast knows (the meta device is not one)."""
    return device_type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device_type)


def base_io(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of a base layer: nn.Linear's own sizes (bitsandbytes Linear4bit and
    Linear8bitLt subclass it with packed weights), else the weight's (GPT-2 Conv1D stores W as
    (in, out))."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return int(base.weight.shape[0]), int(base.weight.shape[1])


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks (DeepSpeed ZeRO-3 gathers weights in them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class HydraLoraLinear(nn.Module):
    """Drop-in replacement for a frozen `nn.Linear` (or GPT-2 `Conv1D`) with HydraLoRA heads.

    Parameters (names shared with the files on disk):
      lora_A: (r, in), or (k*r, in) with `shared_a=False` (head h owns rows h*r..(h+1)*r-1)
      lora_B: (out, k*r); columns h*r..(h+1)*r-1 are head B_h
      router: (k, in) routing on x, or (k, r) / (k, k*r) routing on A x; absent when k = 1 or
              the router is 'uniform'

    Batch inputs and side outputs (masks, forced gates, balance loss terms, statistics) are
    not attributes: they travel in the routing context (`hydralora.RoutingContext`).
    """

    def __init__(self, base: nn.Module, config: HydraLoraConfig):
        super().__init__()
        if not isinstance(base, SUPPORTED_BASE_TYPES):
            raise TypeError(
                f"HydraLoraLinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}"
            )
        self.base = base
        self.config = config
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores W as (in, out)
        self.in_features, self.out_features = base_io(base)
        w = base.weight
        k, r = config.num_heads, config.r
        self.num_heads, self.r, self.scaling = k, r, config.scaling
        self.a_rows = r if config.shared_a else k * r
        # Adapter weights stay in float32 over a half-precision base (as PEFT does): updates of
        # small adapter weights in bf16 would round away. Inputs are cast for the adapter path.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": w.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(self.a_rows, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, k * r, **factory))
        if config.has_router:
            router_in = self.in_features if config.router_input == "x" else self.a_rows
            self.router = nn.Parameter(torch.empty(k, router_in, **factory))
        else:
            self.register_parameter("router", None)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged_gates: torch.Tensor | None = None
        self._original_weight: torch.Tensor | None = None
        self.disabled = False
        cfg = config
        # the common configuration, computed by the fused Function (see the module docstring)
        self.fusable = (config.has_router and cfg.router == "softmax" and cfg.router_input == "x"
                        and cfg.routing == "token" and cfg.shared_a and cfg.head_dropout == 0
                        and cfg.router_temperature == 1.0
                        and (cfg.dropout_masks == "shared" or cfg.dropout == 0))
        self.fuse_when_compiled = FUSED_UNDER_COMPILE
        self.reset_parameters()

    @classmethod
    def from_base(cls, base: nn.Module, config: HydraLoraConfig) -> HydraLoraLinear:
        return cls(base, config)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """LoRA init (A Kaiming-uniform, B = 0) or, with init_heads='random', A = 0, B random.

        Either way B A = 0, so the layer starts exactly at the base layer.
        """
        cfg = self.config
        with torch.no_grad():
            if cfg.init_heads == "zero":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            else:
                nn.init.zeros_(self.lora_A)
                bound = 1.0 / math.sqrt(self.r)  # Kaiming-uniform bound of one (out x r) head
                self.lora_B.uniform_(-bound, bound)
            if self.router is not None:
                if cfg.router_init == "kaiming":
                    nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
                else:
                    nn.init.zeros_(self.router)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters of this layer by their on-disk names."""
        names = ("lora_A", "lora_B", "router")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_gates is not None and self.training and torch.is_grad_enabled() \
                and not self.disabled and self.lora_B.requires_grad:
            raise AdapterError("training a merged HydraLoRA layer: its update is folded into the base "
                               "weight and would get no gradient; call unmerge() on the merged layers "
                               "(hydralora.export.unmerge_all(model)) first, or model.eval() for inference")
        if self.disabled or self.merged_gates is not None:
            return self.base(x)
        ctx = active_routing()
        if ctx is None and self._needs_context() and in_backward():
            raise RoutingError(
                "activation checkpointing repeats this forward in backward without its routing "
                "context: enable it with gradient_checkpointing_kwargs="
                "hydralora.routing.context.checkpoint_kwargs(), or call "
                "hydralora.routing.context.route_checkpointing(model) after enabling it")
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        weight = ctx.token_weight(x2.shape[0]) if ctx is not None else None  # checks its size
        autocast = _autocast_on(x2.device.type)
        if self._use_fused(ctx, x2, autocast):
            c = torch.get_autocast_dtype(x2.device.type) if autocast else x2.dtype
            p = self.config.dropout if self.training else 0.0
            own = self._owns_base()
            base_out = None if own else self.base(x).reshape(-1, self.out_features).to(c)
            y, gates = fused_forward(x2, base_out, self.base.weight if own else None,
                                     self.base.bias if own else None, self.lora_A, self.router,
                                     self.lora_B, self.scaling, p, c)
            if ctx is not None:
                ctx.record(self, gates, weight)
            return y.view(*lead, self.out_features)
        result = self.base(x)
        if x2.dtype != self.lora_A.dtype and not autocast:
            x2 = x2.to(self.lora_A.dtype)
        delta = self._delta(x2, lead, ctx, weight)  # (N, out)
        return result + delta.view(*lead, self.out_features).to(result.dtype)

    def _needs_context(self) -> bool:
        """Whether a training forward's output or loss terms depend on the routing context."""
        cfg = self.config
        return cfg.routing != "token" or (self.training and cfg.balance_loss_weight > 0)

    def _use_fused(self, ctx: RoutingContext | None, x: torch.Tensor, autocast: bool) -> bool:
        """The common configuration, and a batch that asks nothing else of the router."""
        if not self.fusable or (self.training and self.config.balance_loss_weight > 0):
            return False
        if ctx is not None and (ctx.forced_gates is not None or ctx.example_gates):
            return False
        if not self.fuse_when_compiled and torch.compiler.is_compiling():
            return False
        return autocast or x.dtype == self.lora_A.dtype

    def _owns_base(self) -> bool:
        """Whether the fused Function may compute W0 x + b itself: a plain frozen nn.Linear
        whose call runs no hooks (ZeRO-3 and others gather or change weights in them)."""
        base = self.base
        return (type(base) is nn.Linear and not base.weight.requires_grad
                and base.weight.dtype.is_floating_point and not _hooked(base)
                and not hasattr(base.weight, "ds_id"))

    def _delta(self, x: torch.Tensor, lead: tuple[int, ...], ctx: RoutingContext | None,
               weight: torch.Tensor | None) -> torch.Tensor:
        """(alpha/r) * sum_i g_i B_i A dropout(x) for x of shape (N, in); returns (N, out)."""
        cfg, k, r, n = self.config, self.num_heads, self.r, x.shape[0]
        per_head = self.training and cfg.dropout > 0 and cfg.dropout_masks == "per_head" and k > 1
        if per_head:  # the authors' loop: head i sees its own mask, drawn in head order
            dropped = torch.stack([self.dropout(x) for _ in range(k)], 1)  # (N, k, in)
            a = self.lora_A.view(-1, r, self.in_features).expand(k, r, self.in_features)  # (k, r, in)
            h = torch.einsum("nki,kri->nkr", dropped, a)  # (N, k, r): h_i = A_i drop_i(x)
        else:
            h = F.linear(self.dropout(x), self.lora_A)  # (N, a_rows)
        given = ctx.given_gates(k, cfg.routing == "oracle", lead) if ctx is not None else None
        if given is not None:  # (B, k): forced gates, or the oracle's one-hot labels
            gates = self._per_token(given.to(h.device), n)
        elif cfg.has_router:  # routing on A x reads the clean x when every head has its own mask
            gates = self._route(x, F.linear(x, self.lora_A) if per_head else h, lead, ctx, weight)
        else:  # k == 1, uniform router, or oracle routing of unlabeled data
            if cfg.routing == "oracle" and self.training and torch.is_grad_enabled():
                raise RoutingError("oracle routing trains each head on its own examples: give each "
                                   "example's head as labels in the routing context "
                                   "(RoutingContext(labels=...), or route_labels in the batch)")
            gates = torch.full((n, k), 1.0 / k, device=h.device, dtype=torch.float32)
        if ctx is not None:
            ctx.record(self, gates, weight)
        scaled = (gates * self.scaling).to(h.dtype)  # fold alpha/r into the k gates
        if k == 1:
            z = h * scaled  # (N, r)
        else:
            # z[n, i*r + j] = g_i(x_n) * h[n, j] (shared A) or h[n, i*r + j] (one A per head)
            z = (scaled.unsqueeze(-1) * h.reshape(n, -1, r)).reshape(n, k * r)  # (N, k*r)
        return F.linear(z, self.lora_B)  # (N, out)

    def _per_token(self, gates: torch.Tensor, n: int) -> torch.Tensor:
        """Expand per-example gates (B, k) to every token (N, k), N = B*T."""
        return gates.repeat_interleave(n // gates.shape[0], dim=0)

    def _route(self, x: torch.Tensor, h: torch.Tensor, lead: tuple[int, ...],
               ctx: RoutingContext | None, weight: torch.Tensor | None) -> torch.Tensor:
        """The router's gates (N, k) in float32; loss terms and kept gates go to `ctx`."""
        cfg, n = self.config, x.shape[0]
        sequence = cfg.routing == "sequence"
        if sequence and ctx is not None:  # a decoding step of a generation: the prompt's gates
            cached = ctx.cached_sequence_gates(self, examples_in(lead))
            if cached is not None:
                return self._per_token(cached, n)
        source = x if cfg.router_input == "x" else h
        if sequence:
            source = pool_sequence(source, lead, ctx.pooling_mask(lead) if ctx else None)  # (B, d)
        logits = F.linear(source, self.router)  # (N, k), or (B, k) with sequence routing
        balance = self.training and cfg.balance_loss_weight > 0 and torch.is_grad_enabled()
        keep_probs = ctx is not None and ctx.example_gates
        # the softmax once for the gates, the balance term and the kept probabilities
        probs = probabilities(logits, cfg) if balance or keep_probs else None
        gates = gates_from_logits(logits, cfg, self.training, probs)
        if balance:
            if ctx is None:
                raise RoutingError("balance_loss_weight > 0: run training forwards inside a routing "
                                   "context and add its loss: `with RoutingContext.from_batch(batch) "
                                   "as routing: ...` then `loss + routing.aux_loss()`")
            term = balance_loss(logits, cfg, None if sequence else weight, probs)
            ctx.add_balance_term(cfg.balance_loss_weight * term)
        if keep_probs:  # the router's probabilities, before top-k
            ctx.add_example_probs(probs if sequence else example_means(probs, lead, weight))
        if sequence:
            if ctx is not None:
                ctx.keep_sequence_gates(self, gates)
            gates = self._per_token(gates, n)
        return gates

    # ------------------------------------------------------------------ merge
    def fixed_gate_factors(
        self, gates: Sequence[float] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_eff, A_eff) with alpha/r * B_eff A_eff = alpha/r * sum_i g_i B_i A_i.

        Shared A: B_eff = sum_i g_i B_i (out x r), A_eff = A (r x in): a rank-r LoRA.
        One A per head: B_eff = [g_1 B_1 ... g_k B_k] (out x k*r), A_eff = A (k*r x in).
        """
        g = self._check_gates(gates).to(self.lora_B)
        k, r = self.num_heads, self.r
        with torch.no_grad():
            b_heads = self.lora_B.view(self.out_features, k, r) * g.view(1, k, 1)
            if self.config.shared_a:
                return b_heads.sum(1), self.lora_A.detach().clone()
            return b_heads.reshape(self.out_features, k * r), self.lora_A.detach().clone()

    def delta_weight(self, gates: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """alpha/r * sum_i g_i B_i A in the base weight's layout and dtype."""
        b_eff, a_eff = self.fixed_gate_factors(gates)
        delta = (b_eff.float() @ a_eff.float()) * self.scaling  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base.weight.dtype)

    def merge(self, gates: Sequence[float] | torch.Tensor | None = None) -> None:
        """Fold alpha/r * sum_i g_i B_i A into the base weight for a fixed gate vector.

        Exact for k = 1 or when every token would get these gates. `gates` defaults to uniform.
        The original weight is kept so that `unmerge` restores it bit for bit.
        """
        if self.merged_gates is not None:
            raise RuntimeError("this HydraLoraLinear is already merged; call unmerge() first")
        if not self.base.weight.dtype.is_floating_point:  # bitsandbytes 4-bit / 8-bit packed
            raise ConfigError("cannot merge into a quantized base (--quantize): load the base "
                              "unquantized to merge, or export --format peft-lora")
        g = self._check_gates(gates)
        weight = self.base.weight
        self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight.add_(self.delta_weight(g))
        self.merged_gates = g

    def unmerge(self) -> None:
        if self.merged_gates is None or self._original_weight is None:
            raise RuntimeError("this HydraLoraLinear is not merged")
        with torch.no_grad():
            self.base.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_gates = None

    @property
    def merged(self) -> bool:
        return self.merged_gates is not None

    def _check_gates(self, gates: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
        k = self.num_heads
        if gates is None:
            return torch.full((k,), 1.0 / k)
        g = torch.as_tensor(gates, dtype=torch.float32).detach().cpu().flatten()
        if g.numel() != k:
            raise ConfigError(f"expected {k} gate values (one per head), got {g.numel()}")
        if not torch.isfinite(g).all() or (g < 0).any():
            raise ConfigError(f"gate values must be finite and non-negative, got {g.tolist()}")
        if abs(float(g.sum()) - 1.0) > 1e-3:  # as the router's: a larger sum scales the update
            raise ConfigError(f"gate values must sum to 1 (as the router's do), they sum to {float(g.sum()):.4f}")
        return g

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, r={c.r}, heads={c.num_heads}, "
            f"router={c.router if c.has_router else 'none'}, shared_a={c.shared_a}, "
            f"merged={self.merged}"
        )
