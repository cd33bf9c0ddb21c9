"""HydraLoRA's common configuration as one autograd Function with a hand-written backward.

The configuration: a dense softmax router on the layer input x, per-token routing, one shared
A, no forced gates, no balance or guide loss term. For it the whole layer is

    h = A drop(x)                  (N, r)       the shared down-projection
    g = softmax(W_g x)             (N, k)       the router reads the clean x (authors' code)
    z = g (outer) h                (N, k*r)     flattened, head-major: z[n, i*r + j] = g_i h_j
    y = W0 x + b + s * B_cat z     (N, out)     s = alpha / r, B_cat = [B_1 ... B_k]

and autograd would spend more kernels on it than the arithmetic needs (separate casts, the
scaling multiply, the final add, a four-kernel broadcast backward for the outer product).
Here every step is the one kernel that does it:

  forward   dropout; A x (and W_g x: one GEMM over x when dropout is off); the softmax;
            the outer product; then y = addmm(W0 x + b, z, B_cat^T, alpha=s), which scales and
            adds inside the GEMM (`owns_base`: the frozen W0 x + b is computed here too, so the
            input is cast once and the base output needs no separate add)
  backward  dB = s dy^T z and dz = s dy B_cat (addmm with beta=0: no scaling kernel);
            dh = g dz and dg = dz h as two batched matmuls; the softmax backward; dA, dW_g and
            dx, the last accumulated into one buffer with in-place addmm (dropout's mask
            applied before the router's and the base's terms are added)

Dtypes: under autocast everything runs in the autocast dtype c (adapters are float32 and are
cast once per forward, as autocast itself would); without autocast in the adapters' dtype.
The softmax runs on the c-dtype logits with float32 accumulation inside the kernel and gives
gates in c: the z GEMM consumes them in c anyway, and the logits themselves come from a GEMM
in c, so a float32 softmax followed by a cast to c gives the same gates (tests compare with
the float32 reference under bf16 autocast). The gates are returned (not differentiable) for
router statistics.
"""

from __future__ import annotations

import torch


class HydraFused(torch.autograd.Function):
    """y, gates = HydraFused.apply(x, base_out, weight, bias, A, W_g, B, scaling, p, c).

    x (N, in); base_out (N, out) the frozen layer's output, or None when `weight` (out, in)
    and `bias` (out,) or None are given (then this function computes W0 x + b itself);
    A (r, in), W_g (k, in), B (out, k*r); p the dropout probability (0: none); c the compute
    dtype. Returns y (N, out) in c and the gates (N, k) in c (no gradient).
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, bias, lora_a, router, lora_b, scaling, p, c):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            return HydraFused._forward(ctx, x, base_out, weight, bias, lora_a, router, lora_b, scaling, p, c)

    @staticmethod
    def _forward(ctx, x, base_out, weight, bias, lora_a, router, lora_b, scaling, p, c):
        k, r = router.shape[0], lora_a.shape[0]
        n = x.shape[0]
        xc = x.to(c)  # no kernel when x is already in c
        a, wg, b = lora_a.to(c), router.to(c), lora_b.to(c)
        mask = None
        if p > 0:
            xd, mask = torch.native_dropout(xc, p, True)
            h = xd @ a.t()  # (N, r)
            logits = xc @ wg.t()  # (N, k): the router reads the clean x
            a_wg = None
        else:
            xd = xc
            a_wg = torch.cat([a, wg])  # (r + k, in): one pass over x for both
            h, logits = (xc @ a_wg.t()).split([r, k], dim=1)
        gates = torch.softmax(logits, -1)  # (N, k) in c, float32 accumulation in the kernel
        z = (gates.unsqueeze(2) * h.unsqueeze(1)).view(n, k * r)  # (N, k*r)
        if weight is not None:
            w0 = weight.to(c)
            y = torch.addmm(bias.to(c), xc, w0.t()) if bias is not None else xc @ w0.t()
            y.addmm_(z, b.t(), alpha=scaling)  # y is ours: accumulate in place
        else:
            w0 = None
            y = torch.addmm(base_out, z, b.t(), alpha=scaling)
        ctx.save_for_backward(xc, xd if mask is not None else None, mask, h, gates, z, a, wg, a_wg, b, w0)
        ctx.scaling, ctx.p, ctx.x_dtype = scaling, p, x.dtype
        ctx.owns_base = weight is not None
        ctx.mark_non_differentiable(gates)
        ctx.set_materialize_grads(False)  # no zeros are made for the gates' (absent) gradient
        return y, gates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dgates):
        with torch.autocast(dy.device.type, enabled=False):
            return HydraFused._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        need_x, need_base, _, _, need_a, need_wg, need_b = ctx.needs_input_grad[:7]
        if dy is None:  # nothing downstream used y
            return (None,) * 10
        xc, xd, mask, h, gates, z, a, wg, a_wg, b, w0 = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        n, k, r = xc.shape[0], gates.shape[1], h.shape[1]
        dy = dy.to(xc.dtype)
        db = torch.addmm(b, dy.t(), z, beta=0, alpha=s) if need_b else None  # (out, k*r) = s dy^T z
        dz = torch.addmm(z, dy, b, beta=0, alpha=s).view(n, k, r)  # s dy B_cat
        dh = torch.bmm(gates.view(n, 1, k), dz).view(n, r)  # sum_i g_i dz_i
        dg = torch.bmm(dz, h.view(n, r, 1)).view(n, k)  # dz_i . h
        dlogits = torch._softmax_backward_data(dg, gates, 1, gates.dtype)  # (N, k)
        da = dwg = dx = None
        if mask is None:
            dhl = torch.cat([dh, dlogits], 1)  # (N, r + k)
            if need_a or need_wg:
                da_wg = dhl.t() @ xc  # (r + k, in)
                da, dwg = da_wg[:r], da_wg[r:]
            if need_x:
                dx = dhl @ a_wg
        else:
            if need_a:
                da = dh.t() @ xd
            if need_wg:
                dwg = dlogits.t() @ xc
            if need_x:
                dx = torch.ops.aten.native_dropout_backward(dh @ a, mask, 1.0 / (1.0 - p))
                dx.addmm_(dlogits, wg)
        if need_x and ctx.owns_base:
            dx.addmm_(dy, w0)
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        return (dx, dy if need_base else None, None, None, da, dwg, db, None, None, None)


def fused_forward(x: torch.Tensor, base_out: torch.Tensor | None, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, lora_a: torch.Tensor, router: torch.Tensor,
                  lora_b: torch.Tensor, scaling: float, p: float, c: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, out), gates (N, k)) of the common configuration; see HydraFused."""
    return HydraFused.apply(x, base_out, weight, bias, lora_a, router, lora_b, scaling, p, c)
