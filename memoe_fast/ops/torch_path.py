"""Grouped pure-PyTorch bypass MoE: the fast path on CPU, also valid on CUDA.

Tokens are sorted by expert once; each expert runs its FFN on one contiguous slice of the sorted
rows (a loop over the E experts, never a dense all-experts compute). The expert FFN is one
``torch.autograd.Function`` with a hand-written backward so that nothing is copied twice: grouped
buffers are written in place by ``torch.mm(..., out=slice)``, weight gradients are written straight
into the buffers autograd receives, the combine is a single ``index_add_`` (or ``index_copy_`` when
every token has one slot), and the input gradient is one ``index_copy_`` / ``index_add_``. Gating stays
in plain autograd: it is (T, E) small.

On CUDA the per-expert slicing needs the counts on the host (one sync per call); the Triton path
avoids it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gate_topk_torch(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,)
    router_weight: torch.Tensor,  # (E, D + A)
    top_k: int,
    noise: torch.Tensor | None = None,  # (T, E)
    renormalize: bool = True,
    router_bias: torch.Tensor | None = None,  # (E,)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gating without the concatenation: ``W_x x_t + (W_a a + b)[s(t)]``, the anchor term once per sequence."""
    d = x.shape[1]
    wg = router_weight.float()
    per_seq = F.linear(anchor.float(), wg[:, d:], None if router_bias is None else router_bias.float())
    logits = F.linear(x.float(), wg[:, :d]) + per_seq.index_select(0, seq_idx)
    if noise is not None:
        logits = logits + noise.float()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def _act_fwd(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu_glu":
        return F.silu(h)
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_bwd(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu_glu":
        return torch.ops.aten.silu_backward(grad, h)
    if activation == "relu":
        return grad * (h > 0).to(grad.dtype)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if activation == "gelu_tanh" else "none")


@dataclass
class Routing:
    """Expert-sorted slots. ``order`` (T·k,) maps a sorted slot to its flat (token, choice) index, ``tok``
    to its token; ``bounds`` (E + 1 host ints) delimit each expert's slots; ``identity`` means the sorted
    slots are the tokens in order (k = 1 and at most one expert used), so gathers and scatters are skipped."""

    order: torch.Tensor
    tok: torch.Tensor
    bounds: list
    identity: bool

    def experts_with_slots(self):
        return [(e, self.bounds[e], self.bounds[e + 1]) for e in range(len(self.bounds) - 1)
                if self.bounds[e + 1] > self.bounds[e]]


def route_by_expert(experts: torch.Tensor, num_experts: int) -> Routing:
    """Sort the T·k slots by expert (a stable sort, so each expert's slots keep token order)."""
    t, k = experts.shape
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    if k == 1 and int((counts > 0).sum()) <= 1:
        order = torch.arange(t, device=experts.device)
        return Routing(order, order, bounds, True)
    order = torch.argsort(flat, stable=True)
    tok = order // k if k > 1 else order
    return Routing(order, tok, bounds, False)


def _grad_buffer(w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """An (E, ...) gradient buffer: every expert with slots is overwritten by ``mm(out=)``; only the
    experts without slots are zeroed (a full zero fill would cost one more pass over the weights)."""
    buf = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    bounds = routing.bounds
    for e in range(w.shape[0]):
        if bounds[e + 1] == bounds[e]:
            buf[e].zero_()
    return buf


def _segment_sums(rows: torch.Tensor, routing: Routing, num_experts: int) -> torch.Tensor:
    """(E, N) per-expert column sums of the expert-sorted ``rows`` (T·k, N); zero for an expert without slots."""
    b = routing.bounds
    return torch.stack([rows[b[e]:b[e + 1]].sum(0) for e in range(num_experts)])


def _linear_into(out: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(rows, w.t(), out=out)
    else:
        torch.addmm(bias, rows, w.t(), out=out)


class _GroupedExperts(torch.autograd.Function):
    """``out = host_out + Σ_slots coef_slot · expert_e(x_tok)`` on expert-sorted slots, ``coef = weight · token_scale``."""

    @staticmethod
    def forward(ctx, x, weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias, host_out, token_scale,
                routing: Routing, activation: str):
        t, d = x.shape
        k = weights.shape[1]
        nslots = t * k
        ffn = up_proj.shape[1]
        glu = activation == "silu_glu"
        coef = weights.reshape(-1).index_select(0, routing.order)  # (T*k,) fp32
        if token_scale is not None:
            coef = coef * token_scale.float().index_select(0, routing.tok)
        xs = x if routing.identity else x.index_select(0, routing.tok)  # (T*k, D) grouped rows
        # silu_glu: h = gate_proj x (+ gate_bias), u = up_proj x (+ up_bias); 2-layer: h = up_proj x (+ up_bias).
        h = x.new_empty(nslots, ffn)
        u = x.new_empty(nslots, ffn) if glu else None
        y = x.new_empty(nslots, d)
        slices = routing.experts_with_slots()
        for e, lo, hi in slices:
            xe = xs[lo:hi]
            if glu:
                _linear_into(h[lo:hi], xe, gate_proj[e], None if gate_bias is None else gate_bias[e])
                _linear_into(u[lo:hi], xe, up_proj[e], None if up_bias is None else up_bias[e])
            else:
                _linear_into(h[lo:hi], xe, up_proj[e], None if up_bias is None else up_bias[e])
        s = _act_fwd(h, activation)  # GLU: kept for du = da · silu(h) instead of recomputed
        a = s * u if glu else s
        for e, lo, hi in slices:
            _linear_into(y[lo:hi], a[lo:hi], down_proj[e], None if down_bias is None else down_bias[e])
        low_precision = x.dtype not in (torch.float32, torch.float64)
        if routing.identity or k == 1:
            # k = 1: slots are a permutation of the tokens, so the combine is a parallel index_copy_
            # (not a serial scatter-add) followed by one fused multiply-add with the host output.
            tok = routing.tok
            y_tok = y if routing.identity else torch.empty_like(y).index_copy_(0, tok, y)
            coef_tok = coef if routing.identity else torch.empty_like(coef).index_copy_(0, tok, coef)
            if low_precision:
                acc = y_tok.float() * coef_tok.unsqueeze(1)
                out = acc.to(x.dtype) if host_out is None else host_out + acc.to(x.dtype)
            elif host_out is None:
                out = y_tok * coef_tok.unsqueeze(1).to(y.dtype)
            else:
                out = torch.addcmul(host_out, y_tok, coef_tok.unsqueeze(1).to(y.dtype))
        else:
            acc = torch.zeros(t, d, dtype=torch.float32 if low_precision else x.dtype, device=x.device)
            acc.index_add_(0, routing.tok, (y.float() if low_precision else y) * coef.unsqueeze(1).to(acc.dtype))
            out = acc.to(x.dtype) if host_out is None else host_out + acc.to(x.dtype)
        ctx.save_for_backward(xs, h, u, s if glu else None, a, y if ctx.needs_input_grad[1] else None, coef,
                              token_scale, gate_proj, up_proj, down_proj)
        ctx.routing = routing
        ctx.activation = activation
        ctx.top_k = k
        ctx.num_tokens = t
        ctx.has_host = host_out is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, u, s, a, y, coef, token_scale, gate_proj, up_proj, down_proj = ctx.saved_tensors
        routing: Routing = ctx.routing
        glu = ctx.activation == "silu_glu"
        (need_x, need_weights, need_gate, need_up, need_down, need_gate_b, need_up_b, need_down_b,
         need_host) = ctx.needs_input_grad[:9]
        num_experts = up_proj.shape[0]
        t, k = ctx.num_tokens, ctx.top_k
        d = grad_out.shape[1]
        slices = routing.experts_with_slots()
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()
        gs = g if routing.identity else g.index_select(0, routing.tok)  # (T*k, D) unscaled, grouped
        dweights = None
        if need_weights:
            dcoef = (gs.float() * y.float()).sum(dim=1)
            if token_scale is not None:
                dcoef = dcoef * token_scale.float().index_select(0, routing.tok)
            dweights = torch.empty(t * k, dtype=torch.float32, device=g.device)
            dweights.index_copy_(0, routing.order, dcoef)
            dweights = dweights.view(t, k)
        scale = coef.unsqueeze(1).to(gs.dtype)
        gsc = gs * scale if routing.identity else gs.mul_(scale)  # (T*k, D) scaled; gs is a fresh gather unless identity
        da = torch.empty_like(a)
        ddown = _grad_buffer(down_proj, routing) if need_down else None
        for e, lo, hi in slices:
            torch.mm(gsc[lo:hi], down_proj[e], out=da[lo:hi])
            if need_down:
                torch.mm(gsc[lo:hi].t(), a[lo:hi], out=ddown[e])
        ddown_b = _segment_sums(gsc, routing, num_experts) if need_down_b else None
        del a
        if glu:
            du = s * da  # not in place: a second backward (retain_graph) reuses s
            dh = torch.ops.aten.silu_backward(da.mul_(u), h)
        else:
            du = None
            dh = _act_bwd(da, h, ctx.activation)
        del da
        # 2-layer experts: up_proj is the first layer, so its gradient is the one of h.
        d_first = du if glu else dh
        dgate = _grad_buffer(gate_proj, routing) if (glu and need_gate) else None
        dup = _grad_buffer(up_proj, routing) if need_up else None
        dxs = torch.empty_like(xs) if need_x else None
        for e, lo, hi in slices:
            if dgate is not None:
                torch.mm(dh[lo:hi].t(), xs[lo:hi], out=dgate[e])
            if dup is not None:
                torch.mm(d_first[lo:hi].t(), xs[lo:hi], out=dup[e])
            if need_x:
                if glu:
                    torch.mm(dh[lo:hi], gate_proj[e], out=dxs[lo:hi])
                    dxs[lo:hi].addmm_(du[lo:hi], up_proj[e])
                else:
                    torch.mm(dh[lo:hi], up_proj[e], out=dxs[lo:hi])
        dgate_b = _segment_sums(dh, routing, num_experts) if (glu and need_gate_b) else None
        dup_b = _segment_sums(d_first, routing, num_experts) if need_up_b else None
        dx = None
        if need_x:
            if routing.identity:
                dx = dxs
            elif k == 1:
                dx = torch.empty(t, d, dtype=dxs.dtype, device=dxs.device).index_copy_(0, routing.tok, dxs)
            else:
                dx = torch.zeros(t, d, dtype=dxs.dtype, device=dxs.device).index_add_(0, routing.tok, dxs)
        dhost = grad_out if (ctx.has_host and need_host) else None
        return dx, dweights, dgate, dup, ddown, dgate_b, dup_b, ddown_b, dhost, None, None, None


def moe_bypass_torch(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,) int64
    *,
    router_weight: torch.Tensor,  # (E, D + A)
    router_bias: torch.Tensor | None = None,  # (E,)
    up_proj: torch.Tensor,  # (E, F, D)
    down_proj: torch.Tensor,  # (E, D, F)
    gate_proj: torch.Tensor | None = None,  # (E, F, D)
    up_bias: torch.Tensor | None = None,  # (E, F)
    gate_bias: torch.Tensor | None = None,  # (E, F)
    down_bias: torch.Tensor | None = None,  # (E, D)
    activation: str,
    top_k: int,
    renormalize: bool = True,
    token_scale: torch.Tensor | None = None,  # (T,)
    noise: torch.Tensor | None = None,  # (T, E)
    host_out: torch.Tensor | None = None,  # (T, D)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bypass MoE grouped by expert, with the contract of :func:`memoe_fast.ops.moe_bypass` (which
    validates the arguments; this function trusts them)."""
    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, router_weight, top_k, noise, renormalize, router_bias)
    routing = route_by_expert(experts, up_proj.shape[0])
    out = _GroupedExperts.apply(x, weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias, host_out,
                                token_scale, routing, activation)
    return out, probs, experts


__all__ = ["Routing", "gate_topk_torch", "moe_bypass_torch", "route_by_expert"]
