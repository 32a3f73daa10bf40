"""Grouped pure-PyTorch bypass MoE: the fast path on CPU, also valid on CUDA.

Tokens are sorted by expert once; each expert runs its FFN on one contiguous slice of the sorted
rows (a loop over the E experts, never a dense all-experts compute). The expert FFN is one
``torch.autograd.Function`` with a hand-written backward so that nothing is copied twice: grouped
buffers are written in place by ``torch.mm(..., out=slice)``, the combine is a single ``index_add_``
(or ``addcmul`` when one expert takes every token), and the input gradient is one ``index_copy_`` /
``index_add_``. Gating stays in plain autograd: it is (T, E) small.

On CUDA the per-expert slicing needs the counts on the host (one sync per call); the Triton path
avoids it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import ACTIVATIONS


def gate_topk_torch(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,)
    w_gate: torch.Tensor,  # (E, D + A)
    top_k: int,
    noise: torch.Tensor | None = None,  # (T, E)
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gating without the concatenation: ``W_x x_t + (W_a a)[s(t)]``, the anchor term once per sequence."""
    d = x.shape[1]
    wg = w_gate.float()
    logits = F.linear(x.float(), wg[:, :d])
    logits = logits + F.linear(anchor.float(), wg[:, d:]).index_select(0, seq_idx)
    if noise is not None:
        logits = logits + noise.float()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def _act_fwd(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in ("silu_glu",):
        return F.silu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_bwd(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu_glu":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _grad_buffer(w: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """An (E, ...) gradient buffer: every expert with tokens is overwritten by ``mm(out=)``; only the
    experts without tokens are zeroed (a full zero fill would cost one more pass over the weights)."""
    buf = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    for e in range(w.shape[0]):
        if bounds[e + 1] == bounds[e]:
            buf[e].zero_()
    return buf


class _GroupedExperts(torch.autograd.Function):
    """``out = host_out + Σ_slots coef_slot · expert_e(x_tok)`` on expert-sorted slots.

    Slots are the T·k (token, choice) pairs sorted by expert; ``tok`` (T·k,) maps a slot to its
    token, ``bounds`` (python ints, E + 1) delimit each expert's slots, ``coef = weight · token_scale``.
    """

    @staticmethod
    def forward(ctx, x, weights, w1, w2, w3, b1, b2, host_out, token_scale, order, tok, bounds, activation, identity):
        t, d = x.shape
        k = weights.shape[1]
        num_experts = w1.shape[0]
        nslots = t * k
        ffn = w1.shape[1]
        glu = w3 is not None
        coef = weights.reshape(-1).index_select(0, order)  # (T*k,) fp32
        if token_scale is not None:
            coef = coef * token_scale.float().index_select(0, tok)
        xs = x if identity else x.index_select(0, tok)  # (T*k, D) grouped rows
        # GLU: gate and up projections as one GEMM per expert against [w1; w3] (2F x D): fewer, wider
        # GEMMs are faster than two narrow ones on small per-expert slices.
        w13 = torch.cat([w1, w3], dim=1) if glu else None  # (E, 2F, D)
        hu = x.new_empty(nslots, 2 * ffn if glu else ffn)
        y = x.new_empty(nslots, d)
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            xe = xs[lo:hi]
            if glu:
                torch.mm(xe, w13[e].t(), out=hu[lo:hi])
            elif b1 is not None:
                torch.addmm(b1[e], xe, w1[e].t(), out=hu[lo:hi])
            else:
                torch.mm(xe, w1[e].t(), out=hu[lo:hi])
        h = hu[:, :ffn]
        u = hu[:, ffn:] if glu else None
        s = _act_fwd(h, activation)  # saved for the GLU backward (du = da · act(h)) instead of recomputed
        a = s * u if glu else s
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            if b2 is not None:
                torch.addmm(b2[e], a[lo:hi], w2[e].t(), out=y[lo:hi])
            else:
                torch.mm(a[lo:hi], w2[e].t(), out=y[lo:hi])
        low_precision = x.dtype not in (torch.float32, torch.float64)
        if identity or k == 1:
            # k = 1: slots are a permutation of the tokens, so the combine is a parallel index_copy_
            # (not a serial scatter-add) followed by one fused multiply-add with the host output.
            y_tok = y if identity else torch.empty_like(y).index_copy_(0, tok, y)
            coef_tok = coef if identity else torch.empty_like(coef).index_copy_(0, tok, coef)
            if low_precision:
                acc = y_tok.float() * coef_tok.unsqueeze(1)
                out = acc.to(x.dtype) if host_out is None else host_out + acc.to(x.dtype)
            elif host_out is None:
                out = y_tok * coef_tok.unsqueeze(1).to(y.dtype)
            else:
                out = torch.addcmul(host_out, y_tok, coef_tok.unsqueeze(1).to(y.dtype))
        else:
            acc = torch.zeros(t, d, dtype=torch.float32 if low_precision else x.dtype, device=x.device)
            acc.index_add_(0, tok, (y.float() if low_precision else y) * coef.unsqueeze(1).to(acc.dtype))
            out = acc.to(x.dtype) if host_out is None else host_out + acc.to(x.dtype)
        ctx.save_for_backward(
            xs, hu, s if glu else None, a, y if ctx.needs_input_grad[1] else None, coef, order, tok,
            token_scale, w13 if glu else w1, w2,
        )
        ctx.meta = (bounds, activation, identity, k, b1 is not None, b2 is not None, host_out is not None, glu)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, hu, s, a, y, coef, order, tok, token_scale, w13, w2 = ctx.saved_tensors
        bounds, activation, identity, k, has_b1, has_b2, has_host, glu = ctx.meta
        need_x, need_w, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:5]
        num_experts = w13.shape[0]
        ffn = w2.shape[2]
        t, d = grad_out.shape[0], grad_out.shape[1]
        h = hu[:, :ffn]
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()
        gs = g if identity else g.index_select(0, tok)  # (T*k, D) unscaled, grouped
        dweights = None
        if need_w:
            dcoef = (gs.float() * y.float()).sum(dim=1)
            if token_scale is not None:
                dcoef = dcoef * token_scale.float().index_select(0, tok)
            dweights = torch.empty(t * k, dtype=torch.float32, device=g.device)
            dweights.index_copy_(0, order, dcoef)
            dweights = dweights.view(t, k)
        scale = coef.unsqueeze(1).to(gs.dtype)
        gsc = gs * scale if identity else gs.mul_(scale)  # (T*k, D) scaled; gs is a fresh gather unless identity
        da = torch.empty_like(a)
        dw2 = _grad_buffer(w2, bounds) if need_w2 else None
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            torch.mm(gsc[lo:hi], w2[e], out=da[lo:hi])
            if need_w2:
                torch.mm(gsc[lo:hi].t(), a[lo:hi], out=dw2[e])
        db2 = None
        if has_b2 and ctx.needs_input_grad[6]:
            db2 = torch.stack([gsc[bounds[e]:bounds[e + 1]].sum(0) for e in range(num_experts)])
        del a
        if glu:
            # [dh, du] side by side, so that dx and d[w1; w3] are one GEMM per expert each
            dhu = torch.empty_like(hu)
            dh, du = dhu[:, :ffn], dhu[:, ffn:]
            torch.mul(s, da, out=du)
            torch.ops.aten.silu_backward.grad_input(da.mul_(hu[:, ffn:]), h, grad_input=dh)
        else:
            dhu = dh = _act_bwd(da, h, activation)
        del da
        dw1 = dw3 = None
        if need_w1 or (glu and need_w3):
            dw13 = _grad_buffer(w13, bounds)
            dw1 = dw13[:, :ffn] if need_w1 else None
            dw3 = dw13[:, ffn:] if (glu and need_w3) else None
        dxs = torch.empty_like(xs) if need_x else None
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            if dw1 is not None or dw3 is not None:
                torch.mm(dhu[lo:hi].t(), xs[lo:hi], out=dw13[e])
            if need_x:
                torch.mm(dhu[lo:hi], w13[e], out=dxs[lo:hi])
        db1 = None
        if has_b1 and ctx.needs_input_grad[5]:
            db1 = torch.stack([dh[bounds[e]:bounds[e + 1]].sum(0) for e in range(num_experts)])
        dx = None
        if need_x:
            if identity:
                dx = dxs
            elif k == 1:
                dx = torch.empty(t, d, dtype=dxs.dtype, device=dxs.device).index_copy_(0, tok, dxs)
            else:
                dx = torch.zeros(t, d, dtype=dxs.dtype, device=dxs.device).index_add_(0, tok, dxs)
        dhost = grad_out if (has_host and ctx.needs_input_grad[7]) else None
        return dx, dweights, dw1, dw2, dw3, db1, db2, dhost, None, None, None, None, None, None


def route_by_expert(experts: torch.Tensor, num_experts: int):
    """Sort the T·k slots by expert: ``(order, tok, bounds, identity)``; ``bounds`` are host ints.

    ``order`` (T·k,) maps a sorted slot to its flat (token, choice) index, ``tok`` to its token;
    ``identity`` is True when the sorted slots are the tokens in order (k = 1 and one expert, or
    already sorted), so gathers and scatters can be skipped.
    """
    t, k = experts.shape
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    nonempty = int((counts > 0).sum())
    if k == 1 and nonempty <= 1:
        order = torch.arange(t, device=experts.device)
        return order, order, bounds, True
    order = torch.argsort(flat, stable=True)
    tok = order // k if k > 1 else order
    return order, tok, bounds, False


def moe_bypass_torch(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,)
    w_gate: torch.Tensor,  # (E, D + A)
    w1: torch.Tensor,  # (E, F, D)
    w2: torch.Tensor,  # (E, D, F)
    w3: torch.Tensor | None = None,  # (E, F, D)
    b1: torch.Tensor | None = None,  # (E, F)
    b2: torch.Tensor | None = None,  # (E, D)
    token_scale: torch.Tensor | None = None,  # (T,)
    noise: torch.Tensor | None = None,  # (T, E)
    top_k: int = 1,
    renormalize: bool = True,
    activation: str = "silu_glu",
    host_out: torch.Tensor | None = None,  # (T, D)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bypass MoE, grouped by expert, with the contract of ``moe_bypass_reference``.

    Args:
        x: (T, D) tokens. anchor: (S, A) per-sequence anchors; seq_idx: (T,) sequence of each token.
        w_gate: (E, D + A). w1/w3: (E, F, D), w2: (E, D, F); b1 (E, F), b2 (E, D) for GELU experts.
        token_scale: (T,) or None; noise: (T, E) or None (no gradient to either).
        host_out: (T, D) added to the result (gradient passes through).

    Returns:
        ``(out (T, D), probs (T, E) fp32, experts (T, k) int64)``.

    Example:
        >>> import torch
        >>> T, D, F_, E = 8, 16, 32, 4
        >>> out, probs, experts = moe_bypass_torch(
        ...     torch.randn(T, D), torch.randn(1, 8), torch.zeros(T, dtype=torch.long),
        ...     torch.randn(E, D + 8), torch.randn(E, F_, D), torch.randn(E, D, F_), torch.randn(E, F_, D))
        >>> out.shape, probs.shape, experts.shape
        (torch.Size([8, 16]), torch.Size([8, 4]), torch.Size([8, 1]))
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if (activation == "silu_glu") != (w3 is not None):
        raise ValueError("activation 'silu_glu' needs w3, and the GELU activations take no w3")
    num_experts = w1.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, w_gate, top_k, noise, renormalize)
    order, tok, bounds, identity = route_by_expert(experts, num_experts)
    out = _GroupedExperts.apply(
        x, weights, w1, w2, w3, b1, b2, host_out, token_scale, order, tok, bounds, activation, identity
    )
    return out, probs, experts


__all__ = ["gate_topk_torch", "moe_bypass_torch", "route_by_expert"]
