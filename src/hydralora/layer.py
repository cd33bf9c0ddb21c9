"""HydraLoraLinear: a frozen linear layer plus a shared A, k B heads and a per-token router.

              +-- W0 (frozen) ---------------------------------------------+
    x --------+                                                            (+)--> y
              +-- dropout --> A (r x in) --> h ----(g (outer) h)--> B_cat --+
              +-- W_g (k x in) --> softmax --> g --^         (out x k*r)

    y = W0 x + (alpha / r) * sum_i g_i(x) * B_i A dropout(x),   g(x) = softmax(W_g x / T)

The heads are not looped over. With B_cat = [B_1 ... B_k] (out x k*r) and
z = (g (outer) A x) flattened to k*r values per token, sum_i g_i B_i A x = B_cat z: one GEMM
for all heads, and A x is computed once (together with the router logits when dropout is off).
No (tokens x k x out) tensor is ever formed; the scaling alpha/r is folded into the k gates
rather than applied to the (tokens x out) output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import HydraLoraConfig
from .errors import ConfigError
from .router import (
    RouterStats,
    balance_loss,
    example_means,
    gates_from_logits,
    pool_sequence,
)

try:  # GPT-2 style Conv1D (y = x W + b with W stored as in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

SUPPORTED_BASE_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


class HydraLoraLinear(nn.Module):
    """Drop-in replacement for a frozen `nn.Linear` (or GPT-2 `Conv1D`) with HydraLoRA heads.

    Parameters (names shared with the files on disk):
      lora_A: (r, in), or (k*r, in) with `shared_a=False` (head h owns rows h*r..(h+1)*r-1)
      lora_B: (out, k*r); columns h*r..(h+1)*r-1 are head B_h
      router: (k, in) routing on x, or (k, r) / (k, k*r) routing on A x; absent when k = 1 or
              the router is 'uniform'

    Side values stay on the module: `aux_loss` (balance loss of the last training forward when
    balance_loss_weight > 0), `stats` (RouterStats while recording), `last_gates` (when
    `keep_gates` is set), `example_gates` (per-example mean router probabilities (B, k) of the
    last forward, with gradient, when `track_example_gates` is set: what the guide loss pulls).
    Inputs set by the caller for the next forwards: `token_mask` (bool, the leading shape: real
    tokens, so padding is left out of the balance loss and statistics), `prompt_mask` ((B, T)
    bool: the tokens that sequence routing pools), `forced_gates` ((B, k): every token of
    example b gets these gates; oracle routing).
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
        w = base.weight
        # nn.Linear's own sizes: bitsandbytes Linear4bit/Linear8bitLt subclass it with packed weights
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (base.in_features, base.out_features)
        )
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
        self.aux_loss: torch.Tensor | None = None
        self.stats: RouterStats | None = None
        self.keep_gates = False
        self.last_gates: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self.forced_gates: torch.Tensor | None = None
        self.track_example_gates = False
        self.example_gates: torch.Tensor | None = None
        self._sequence_gates: torch.Tensor | None = None  # (B, k) of the prompt, for decoding
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

    # ------------------------------------------------------------------ routing
    def _weight(self, n: int) -> torch.Tensor | None:
        """(N,) 1 for real tokens, 0 for padding; None when no token mask fits."""
        m = self.token_mask
        if m is None or m.numel() != n:
            return None
        return m.reshape(n)

    def _logits(self, x: torch.Tensor, h: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """Router logits: per token (N, k), or per example (B, k) with sequence routing."""
        source = x if self.config.router_input == "x" else h
        if self.config.routing == "sequence":
            source = pool_sequence(source, lead, self.prompt_mask)  # (B, d)
        return F.linear(source.to(self.router.dtype), self.router)

    def _sequence_to_tokens(self, gates: torch.Tensor, n: int) -> torch.Tensor:
        """Expand per-example gates (B, k) to every token (N, k), N = B*T."""
        return gates.repeat_interleave(n // gates.shape[0], dim=0)

    def _gates(self, x: torch.Tensor, h: torch.Tensor, lead: tuple[int, ...],
               logits: torch.Tensor | None) -> torch.Tensor:
        """Per-token head weights in float32, (N, k); each row sums to 1."""
        cfg, k, n = self.config, self.num_heads, x.shape[0]
        forced = self.forced_gates
        if forced is not None and forced.shape[0] * (n // max(forced.shape[0], 1)) == n:
            return self._sequence_to_tokens(forced.to(h.device, torch.float32), n)
        if not cfg.has_router:  # k == 1, uniform router, or oracle without labels
            return torch.full((n, k), 1.0 / k, device=h.device, dtype=torch.float32)
        cached = self._sequence_gates
        if cfg.routing == "sequence" and not self.training and len(lead) > 1 and lead[-1] == 1 \
                and cached is not None and cached.shape[0] == lead[0]:
            return self._sequence_to_tokens(cached, n)  # a decoding step: the prompt's gates
        if logits is None:
            logits = self._logits(x, h, lead)
        gates = gates_from_logits(logits, cfg, self.training)  # (N, k) or (B, k)
        weight = self._weight(n)
        if self.track_example_gates:  # the router's probabilities, before top-k and head dropout
            probs = (logits.float() / cfg.router_temperature).softmax(-1)
            sequence = cfg.routing == "sequence"
            self.example_gates = probs if sequence else example_means(probs, lead, weight)
        if self.training and cfg.balance_loss_weight > 0:
            self.aux_loss = balance_loss(logits, cfg, None if cfg.routing == "sequence" else weight)
        if cfg.routing == "sequence":
            self._sequence_gates = None if self.training else gates.detach()
            gates = self._sequence_to_tokens(gates, n)
        return gates

    def _record(self, gates: torch.Tensor) -> None:
        weight = self._weight(gates.shape[0])
        if self.stats is not None:
            self.stats.add(gates, weight)
        if self.keep_gates:  # an inspection aid, off the training path
            g = gates.detach()
            self.last_gates = (g if weight is None else g[weight.bool()]).float().cpu()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled or self.merged_gates is not None:
            return result
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if x2.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x2.device.type):
            x2 = x2.to(self.lora_A.dtype)
        delta = self._delta(x2, lead)  # (N, out)
        return result + delta.view(*lead, self.out_features).to(result.dtype)

    def _delta(self, x: torch.Tensor, lead: tuple[int, ...] = ()) -> torch.Tensor:
        """(alpha/r) * sum_i g_i B_i A dropout(x) for x of shape (N, in); returns (N, out)."""
        cfg, k, r = self.config, self.num_heads, self.r
        n = x.shape[0]
        lead = lead or (n,)
        fuse = (self.router is not None and cfg.router_input == "x" and cfg.routing == "token"
                and self.forced_gates is None and not (self.training and cfg.dropout > 0))
        logits = None
        if fuse:  # one GEMM for A and the router: (N, in) @ (in, a_rows + k)
            ha = F.linear(x, torch.cat([self.lora_A, self.router]))
            h, logits = ha.split([self.a_rows, k], dim=-1)  # (N, a_rows), (N, k)
        else:
            h = F.linear(self.dropout(x), self.lora_A)  # (N, a_rows)
        gates = self._gates(x, h, lead, logits)  # (N, k) float32
        self._record(gates)
        scaled = (gates * self.scaling).to(h.dtype)  # fold alpha/r into the k gates
        if k == 1:
            z = h * scaled  # (N, r)
        else:
            # z[n, i*r + j] = g_i(x_n) * h[n, j] (shared A) or h[n, i*r + j] (one A per head)
            z = (scaled.unsqueeze(-1) * h.view(n, -1, r)).view(n, k * r)  # (N, k*r)
        return F.linear(z, self.lora_B)  # (N, out)

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
        if not torch.isfinite(g).all():
            raise ConfigError(f"gate values must be finite, got {g.tolist()}")
        return g

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, r={c.r}, heads={c.num_heads}, "
            f"router={c.router if c.has_router else 'none'}, shared_a={c.shared_a}, "
            f"merged={self.merged}"
        )
