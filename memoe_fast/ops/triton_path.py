"""Triton path of the bypass MoE: launchers, autograd Functions and ``moe_bypass_triton``.

The kernels are in ``memoe_fast/kernels/{gating,grouped_ffn}.py``. Nothing here syncs with the host:
routing metadata (counts from the gate kernel's atomics, offsets by ``cumsum``, the expert-sorted slot
order by a stable ``argsort``) stays on the device, and the row-tile grids are upper bounds.

Environment:
    MEMOE_TRITON_CONFIG  pins one config for every grouped kernel, e.g.
                         ``BLOCK_M=64,BLOCK_N=128,BLOCK_K=32,num_warps=4,num_stages=3``.
    TRITON_INTERPRET=1   runs the kernels on CPU tensors (tests; slow, fp32/fp16 only).
"""
from __future__ import annotations

import os

import torch
import triton

from memoe_fast.kernels.gating import _gate_bwd_kernel, _gate_fwd_kernel
from memoe_fast.kernels.grouped_ffn import (
    _grouped_down_kernel,
    _grouped_up_bwd_kernel,
    _grouped_up_fwd_kernel,
    _grouped_wgrad_kernel,
)

# Activation codes of the kernels' ACT constexpr.
ACT_CODES = {"silu_glu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

CONFIG_ENV = "MEMOE_TRITON_CONFIG"

# Tests set this to fill every kernel output with NaN (-1 for integers) before launch, so that an
# unwritten tile cannot pass unnoticed.
POISON = False


def _empty(*shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parse_config(spec: str) -> triton.Config:
    kv = dict(item.split("=") for item in spec.replace(" ", "").split(",") if item)
    launch = {k: int(kv.pop(k)) for k in ("num_warps", "num_stages") if k in kv}
    return triton.Config({k: int(v) for k, v in kv.items()}, **launch)


def grouped_configs() -> list[triton.Config]:
    """Autotune space of the grouped GEMM kernels; ``MEMOE_TRITON_CONFIG`` pins one config."""
    spec = os.environ.get(CONFIG_ENV)
    if spec:
        return [_parse_config(spec)]
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 32, 8, 4), (32, 64, 32, 4, 4),
        ]
    ]


# The launchers below wrap the kernels with autotuning; the grids are upper bounds (see grouped_ffn).
_up_fwd = triton.autotune(grouped_configs(), key=["D", "F"])(_grouped_up_fwd_kernel)
# The atomic variant accumulates into out_ptr: autotuning must restore it between trials.
_down = triton.autotune(grouped_configs(), key=["N", "K", "ATOMIC"], restore_value=["out_ptr"])(_grouped_down_kernel)
_up_bwd = triton.autotune(grouped_configs(), key=["D", "F"])(_grouped_up_bwd_kernel)
_wgrad = triton.autotune(grouped_configs(), key=["M", "N"])(_grouped_wgrad_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 (no tf32 rounding) so the fp32 path matches the reference to 1e-4.
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_grid(nslots: int, num_experts: int, n: int):
    return lambda meta: (triton.cdiv(nslots, meta["BLOCK_M"]) + num_experts, triton.cdiv(n, meta["BLOCK_N"]))


def gate_fwd(x, anchor, seq_idx, w_gate, top_k: int, noise=None, renormalize: bool = True, router_bias=None):
    """Gate forward: ``(probs (T, E) fp32, weights (T, k) fp32, experts (T, k) int64, counts (E,) int32)``."""
    t, d = x.shape
    s, a = anchor.shape
    e = w_gate.shape[0]
    dev = x.device
    block_e = max(16, triton.next_power_of_2(e))
    table = _empty(s, e, device=dev, dtype=torch.float32)
    probs = _empty(t, e, device=dev, dtype=torch.float32)
    weights = _empty(t, top_k, device=dev, dtype=torch.float32)
    experts = _empty(t, top_k, device=dev, dtype=torch.int64)
    counts = torch.zeros(e, device=dev, dtype=torch.int32)
    w_x, w_a = w_gate[:, :d], w_gate[:, d:]
    block_n, block_k = 32, 64 if not _interpreting() else 32
    if s > 0 and a > 0:
        _gate_fwd_kernel[(triton.cdiv(s, block_n),)](
            anchor, w_a, table, seq_idx, table, table, table, table, table, counts,
            s, a, e, anchor.stride(0), anchor.stride(1), w_a.stride(0), w_a.stride(1), 0, 0, 0, 0,
            HAS_TABLE=False, HAS_NOISE=False, FINALIZE=False, RENORM=False, TOP_K=top_k,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=block_e,
        )
    else:
        table.zero_()
    if router_bias is not None:
        table += router_bias.float()  # the bias is per sequence like the anchor term: (S, E) small
    if t > 0:
        nz = noise if noise is not None else probs
        _gate_fwd_kernel[(triton.cdiv(t, block_n),)](
            x, w_x, table, seq_idx, nz, probs, probs, weights, experts, counts,
            t, d, e, x.stride(0), x.stride(1), w_x.stride(0), w_x.stride(1), table.stride(0), table.stride(1),
            nz.stride(0), nz.stride(1),
            HAS_TABLE=True, HAS_NOISE=noise is not None, FINALIZE=True, RENORM=renormalize, TOP_K=top_k,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=block_e,
        )
    return probs, weights, experts, counts


def gate_bwd(dprobs, dweights, probs, weights, experts, x, anchor, seq_idx, w_gate, renormalize: bool,
             need_x: bool = True):
    """Gate backward: ``(dx (T, D) or None, danchor (S, A), dw_gate (E, D + A), dbias (E,) fp32)``.

    The kernel produces dlogits and dx = dlogits · W_x; the E-row reductions over tokens (dW_x, and the
    per-sequence sum feeding dW_a and danchor) are small GEMMs left to torch.
    """
    t, d = x.shape
    e = probs.shape[1]
    top_k = experts.shape[1]
    dlogits = _empty(t, e, device=x.device, dtype=torch.float32)
    dx = _empty(t, d, device=x.device, dtype=x.dtype) if need_x else None
    w_x = w_gate[:, :d]
    block_t = 32
    if t > 0:
        dp = dprobs if dprobs is not None else probs
        dw = dweights if dweights is not None else weights
        _gate_bwd_kernel[(triton.cdiv(t, block_t),)](
            probs, weights, experts, dp, dw, w_x, dlogits, dx if need_x else dlogits,
            t, d, e, dp.stride(0), dp.stride(1), dw.stride(0), dw.stride(1), w_x.stride(0), w_x.stride(1),
            dx.stride(0) if need_x else 0, dx.stride(1) if need_x else 0,
            HAS_DPROBS=dprobs is not None, HAS_DWEIGHTS=dweights is not None, RENORM=renormalize,
            NEED_DX=need_x, TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=64 if not _interpreting() else 32,
            BLOCK_E=max(16, triton.next_power_of_2(e)),
        )
    dw_x = dlogits.t() @ x.float()
    dseq = torch.zeros(anchor.shape[0], e, device=x.device, dtype=torch.float32).index_add_(0, seq_idx, dlogits)
    dw_a = dseq.t() @ anchor.float()
    danchor = (dseq @ w_gate[:, d:].float()).to(anchor.dtype)
    return dx, danchor, torch.cat([dw_x, dw_a], dim=1).to(w_gate.dtype), dseq.sum(0)


def route_fwd(experts: torch.Tensor, counts: torch.Tensor):
    """Expert-sorted slots on the device: ``(order (T·k,), tok (T·k,), offs (E + 1,) int64)``."""
    k = experts.shape[1]
    order = torch.argsort(experts.reshape(-1), stable=True)
    tok = order // k if k > 1 else order
    offs = torch.zeros(counts.numel() + 1, device=counts.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offs[1:])
    return order, tok, offs


def grouped_ffn_fwd(x, tok, offs, coef, w1, w2, w3, b1, b2, b3, host_out, top_k: int, activation: str,
                    save: bool, save_y: bool):
    """Expert FFN forward on expert-sorted slots, combined into ``host_out``.

    Returns ``(out (T, D), a (T·k, F), h, u, y)``; h/u are saved only with ``save``, y with ``save_y``.
    """
    t, d = x.shape
    e, f, _ = w1.shape
    nslots = tok.numel()
    glu = w3 is not None
    prec = _dot_precision(x.dtype)
    a = _empty(nslots, f, device=x.device, dtype=x.dtype)
    h = _empty(nslots, f, device=x.device, dtype=x.dtype) if save else a
    u = _empty(nslots, f, device=x.device, dtype=x.dtype) if (save and glu) else a
    w3_ = w3 if glu else w1
    b1_ = b1 if b1 is not None else w1
    b3_ = b3 if b3 is not None else w1
    _up_fwd[_row_grid(nslots, e, f)](
        x, tok, offs, w1, w3_, b1_, b3_, h, u, a, d, f, e,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
        w3_.stride(0), w3_.stride(1), w3_.stride(2),
        b1_.stride(0) if b1 is not None else 0, b1_.stride(1) if b1 is not None else 0,
        b3_.stride(0) if b3 is not None else 0, b3_.stride(1) if b3 is not None else 0,
        GLU=glu, ACT=ACT_CODES[activation], HAS_B1=b1 is not None, HAS_B3=b3 is not None, SAVE=save,
        DOT_PRECISION=prec,
    )
    y = _empty(nslots, d, device=x.device, dtype=x.dtype) if save_y else a
    atomic = top_k > 1
    if atomic:
        out = host_out.float().clone() if host_out is not None else torch.zeros(t, d, device=x.device, dtype=torch.float32)
    else:
        out = _empty(t, d, device=x.device, dtype=x.dtype)
    host = host_out if host_out is not None else out
    b2_ = b2 if b2 is not None else w2
    _down[_row_grid(nslots, e, d)](
        a, a, tok, offs, w2, w2, b2_, coef, y, host, out, d, f, e,
        w2.stride(0), w2.stride(1), w2.stride(2), 0, 0, 0,
        b2_.stride(0) if b2 is not None else 0, b2_.stride(1) if b2 is not None else 0,
        host.stride(0), host.stride(1), out.stride(0), out.stride(1),
        HAS_SECOND=False, HAS_BIAS=b2 is not None, HAS_COEF=True, SAVE_Y=save_y,
        HAS_HOST=host_out is not None and not atomic, ATOMIC=atomic, DOT_PRECISION=prec,
    )
    if atomic and out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out, a, (h if save else None), (u if (save and glu) else None), (y if save_y else None)


def grouped_ffn_bwd(g, x, tok, offs, coef, w1, w2, w3, a, h, u, y, top_k: int, activation: str,
                    need_x: bool, need_w1: bool, need_w2: bool, need_w3: bool, need_b1: bool, need_b2: bool,
                    need_b3: bool, need_coef: bool):
    """Expert FFN backward: ``(dx, dw1, dw2, dw3, db1, db2, db3, dcoef)``; unrequested entries are None."""
    t, d = x.shape
    e, f, _ = w1.shape
    nslots = tok.numel()
    glu = w3 is not None
    prec = _dot_precision(x.dtype)
    dh = _empty(nslots, f, device=x.device, dtype=x.dtype)
    du = _empty(nslots, f, device=x.device, dtype=x.dtype) if glu else dh
    dcoef = _empty(nslots, device=x.device, dtype=torch.float32) if need_coef else coef
    _up_bwd[_row_grid(nslots, e, f)](
        g, tok, offs, coef, w2, h, u if glu else h, y if need_coef else g, dh, du, dcoef, d, f, e,
        g.stride(0), g.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        GLU=glu, ACT=ACT_CODES[activation], NEED_DCOEF=need_coef, DOT_PRECISION=prec,
    )
    dx = None
    if need_x:
        atomic = top_k > 1
        dx = torch.zeros(t, d, device=x.device, dtype=torch.float32) if atomic else _empty(t, d, device=x.device, dtype=x.dtype)
        w3_ = w3 if glu else w1
        # dx = dh @ W1[e] (+ du @ W3[e]): W1 (E, F, D) read as (E, N=D, K=F) through its strides.
        _down[_row_grid(nslots, e, d)](
            dh, du, tok, offs, w1, w3_, w1, coef, dh, dx, dx, d, f, e,
            w1.stride(0), w1.stride(2), w1.stride(1), w3_.stride(0), w3_.stride(2), w3_.stride(1), 0, 0,
            dx.stride(0), dx.stride(1), dx.stride(0), dx.stride(1),
            HAS_SECOND=glu, HAS_BIAS=False, HAS_COEF=False, SAVE_Y=False, HAS_HOST=False, ATOMIC=atomic,
            DOT_PRECISION=prec,
        )
        if atomic and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)

    def wgrad(left, right, m, n, l_gather, r_gather, l_scale, want_db, like):
        dw = _empty(e, m, n, device=x.device, dtype=like.dtype)
        db = _empty(e, m, device=x.device, dtype=like.dtype) if want_db else dw
        _wgrad[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), e)](
            left, right, tok, offs, coef, dw, db, m, n,
            left.stride(0), left.stride(1), right.stride(0), right.stride(1),
            L_GATHER=l_gather, R_GATHER=r_gather, L_SCALE=l_scale, HAS_DB=want_db, DOT_PRECISION=prec,
        )
        return dw, (db if want_db else None)

    dw1 = db1 = dw3 = db3 = dw2 = db2 = None
    if need_w1 or need_b1:
        dw1, db1 = wgrad(dh, x, f, d, False, True, False, need_b1, w1)
    if glu and (need_w3 or need_b3):
        dw3, db3 = wgrad(du, x, f, d, False, True, False, need_b3, w3)
    if need_w2 or need_b2:
        dw2, db2 = wgrad(g, a, d, f, True, False, True, need_b2, w2)
    return dx, dw1, dw2, dw3, db1, db2, db3, (dcoef if need_coef else None)


class _TritonGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, w_gate, router_bias, seq_idx, noise, top_k, renormalize):
        probs, weights, experts, counts = gate_fwd(x, anchor, seq_idx, w_gate, top_k, noise, renormalize, router_bias)
        ctx.save_for_backward(x, anchor, w_gate, seq_idx, probs, weights, experts)
        ctx.renormalize = renormalize
        ctx.bias_dtype = None if router_bias is None else router_bias.dtype
        ctx.mark_non_differentiable(experts, counts)
        return probs, weights, experts, counts

    @staticmethod
    def backward(ctx, dprobs, dweights, _dexperts, _dcounts):
        x, anchor, w_gate, seq_idx, probs, weights, experts = ctx.saved_tensors
        dx, danchor, dw_gate, dbias = gate_bwd(dprobs, dweights, probs, weights, experts, x, anchor, seq_idx, w_gate,
                                               ctx.renormalize, need_x=ctx.needs_input_grad[0])
        dbias = dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return dx, danchor, dw_gate, dbias, None, None, None, None


class _TritonExperts(torch.autograd.Function):
    """Inputs in kernel terms: w1 is the first projection read by the activation (gate_proj for GLU, else
    up_proj), w3 the GLU up projection; b1, b3 their biases; w2, b2 the down projection."""

    @staticmethod
    def forward(ctx, x, weights, w1, w2, w3, b1, b2, b3, host_out, token_scale, experts, counts, activation):
        t, k = experts.shape
        order, tok, offs = route_fwd(experts, counts)
        coef = weights.reshape(-1).index_select(0, order)
        if token_scale is not None:
            coef = coef * token_scale.float().index_select(0, tok)
        need = ctx.needs_input_grad
        save = any(need[i] for i in range(8))
        out, a, h, u, y = grouped_ffn_fwd(x, tok, offs, coef, w1, w2, w3, b1, b2, b3, host_out, k, activation,
                                          save=save, save_y=need[1])
        ctx.save_for_backward(x, w1, w2, w3, a, h, u, y, order, tok, offs, coef, token_scale)
        ctx.top_k = k
        ctx.activation = activation
        ctx.has_host = host_out is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, w3, a, h, u, y, order, tok, offs, coef, token_scale = ctx.saved_tensors
        k = ctx.top_k
        need = ctx.needs_input_grad
        dx, dw1, dw2, dw3, db1, db2, db3, dcoef = grouped_ffn_bwd(
            g, x, tok, offs, coef, w1, w2, w3, a, h, u, y, k, ctx.activation,
            need_x=need[0], need_w1=need[2], need_w2=need[3], need_w3=need[4], need_b1=need[5],
            need_b2=need[6], need_b3=need[7], need_coef=need[1],
        )
        dweights = None
        if need[1]:
            if token_scale is not None:
                dcoef = dcoef * token_scale.float().index_select(0, tok)
            dweights = torch.empty_like(dcoef).index_copy_(0, order, dcoef).view(-1, k)
        return (dx, dweights, dw1 if need[2] else None, dw2 if need[3] else None, dw3 if need[4] else None,
                db1 if need[5] else None, db2 if need[6] else None, db3 if need[7] else None,
                g if (ctx.has_host and need[8]) else None, None, None, None, None)


def moe_bypass_triton(
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
    """The bypass MoE by the fused Triton kernels, with the contract of :func:`memoe_fast.ops.moe_bypass`
    (which validates the arguments; this function trusts them). CUDA tensors, or CPU tensors with
    ``TRITON_INTERPRET=1`` set before triton is imported."""
    glu = activation == "silu_glu"
    w1, b1 = (gate_proj, gate_bias) if glu else (up_proj, up_bias)
    w3, b3 = (up_proj, up_bias) if glu else (None, None)
    probs, weights, experts, counts = _TritonGate.apply(x, anchor, router_weight, router_bias, seq_idx, noise, top_k,
                                                        renormalize)
    if x.shape[0] == 0:
        out = host_out.clone() if host_out is not None else torch.zeros_like(x)
        return out, probs, experts
    out = _TritonExperts.apply(x, weights, w1, down_proj, w3, b1, down_bias, b3, host_out, token_scale, experts,
                               counts, activation)
    return out, probs, experts


__all__ = ["ACT_CODES", "gate_bwd", "gate_fwd", "grouped_configs", "grouped_ffn_bwd", "grouped_ffn_fwd",
           "moe_bypass_triton", "route_fwd"]
