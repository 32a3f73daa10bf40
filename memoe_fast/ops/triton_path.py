"""Triton path of the bypass MoE: launchers, autograd Functions and ``moe_bypass_triton``.

The kernels are in ``memoe_fast/kernels/{gating,grouped_ffn}.py``, the launch sites (autotune spaces,
per-device pruning, pinning) in ``triton_tuning.py``. Nothing here syncs with the host: routing
metadata (counts from the gate kernel's atomics, offsets by ``cumsum``, the expert-sorted slot order by
a stable ``argsort``) stays on the device, and the row-tile grids are upper bounds. Every launch passes
its arguments by keyword.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from memoe_fast.kernels.gating import _gate_anchor_kernel, _gate_bwd_kernel, _gate_fwd_kernel, _gate_wgrad_kernel
from memoe_fast.kernels.grouped_ffn import (
    _expert_down_fwd_kernel,
    _expert_dx_kernel,
    _expert_up_bwd_kernel,
    _expert_up_fwd_kernel,
    _expert_wgrad_down_kernel,
    _expert_wgrad_in_kernel,
)

from .triton_tuning import Footprint, LaunchSite, gate_candidates, gate_cost, gemm_site, interpreting, t_bucket

# Activation codes of the kernels' ACT constexpr (0: the GLU, whose kernels also get w3/u pointers).
ACT_CODES = {"silu_glu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# Tests set this to fill every kernel output with NaN (-1 for integers) before launch, so that an
# unwritten tile cannot pass unnoticed.
POISON = False

# One launch site, hence one autotune cache, per job and operand layout. The GLU variants load two
# weight tiles per K step (and the forward keeps two accumulators), so they prune differently; the
# down-projection weight gradient scales its gathered rows in fp32 and sums the bias beside the
# accumulator, which costs registers (2.5 per accumulator element, from ptxas on sm_89).
SITES = {
    "expert_up_fwd_glu": gemm_site("expert_up_fwd_glu", _expert_up_fwd_kernel, Footprint(n_a=1, n_b=2, n_acc=2, acc_cost=1.5),
                                   ["D", "F"], "x_ptr"),
    "expert_up_fwd": gemm_site("expert_up_fwd", _expert_up_fwd_kernel, Footprint(acc_cost=1.5), ["D", "F", "ACT"], "x_ptr"),
    "expert_down_fwd": gemm_site("expert_down_fwd", _expert_down_fwd_kernel, Footprint(), ["D", "F", "ATOMIC"],
                                 "a_ptr", restore=("out_ptr",)),
    "expert_up_bwd_glu": gemm_site("expert_up_bwd_glu", _expert_up_bwd_kernel, Footprint(), ["D", "F"], "w2_ptr"),
    "expert_up_bwd": gemm_site("expert_up_bwd", _expert_up_bwd_kernel, Footprint(), ["D", "F", "ACT"], "w2_ptr"),
    "expert_dx_glu": gemm_site("expert_dx_glu", _expert_dx_kernel, Footprint(n_a=2, n_b=2, n_acc=1),
                               ["D", "F", "ATOMIC"], "dh_ptr", restore=("dx_ptr",)),
    "expert_dx": gemm_site("expert_dx", _expert_dx_kernel, Footprint(), ["D", "F", "ATOMIC"], "dh_ptr",
                           restore=("dx_ptr",)),
    "expert_wgrad_first": gemm_site("expert_wgrad_first", _expert_wgrad_in_kernel, Footprint(acc_cost=1.5), ["F", "D"], "x_ptr"),
    "expert_wgrad_up": gemm_site("expert_wgrad_up", _expert_wgrad_in_kernel, Footprint(acc_cost=1.5), ["F", "D"], "x_ptr"),
    "expert_wgrad_down": gemm_site("expert_wgrad_down", _expert_wgrad_down_kernel, Footprint(acc_cost=2.5),
                                   ["D", "F"], "a_ptr"),
    "gate_anchor": LaunchSite(
        "gate_anchor", _gate_anchor_kernel, [triton.Config({"BLOCK_S": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2)],
        ["A", "E"], gate_cost("BLOCK_K"), "anchor_ptr",
        interpret_config=triton.Config({"BLOCK_S": 16, "BLOCK_K": 32}), gemm=False),
    # fp32 tokens: ptxas spills the gate forward at 128 elements of the product per thread (64x32, 4
    # warps, E=8 on sm_89), which the 16-bit tokens do not; 1.25 prunes that size for fp32 only.
    "gate_fwd": LaunchSite("gate_fwd", _gate_fwd_kernel, gate_candidates("BLOCK_K"), ["D", "E", "TOP_K", "T_BUCKET"],
                           gate_cost("BLOCK_K", fp32_product=1.25), "x_ptr", interpret_config=triton.Config({"BLOCK_T": 16, "BLOCK_K": 32}),
                           restore=("counts_ptr",), gemm=False),
    "gate_bwd": LaunchSite("gate_bwd", _gate_bwd_kernel, gate_candidates("BLOCK_D"), ["D", "E", "TOP_K", "T_BUCKET"],
                           gate_cost("BLOCK_D"), "w_ptr", interpret_config=triton.Config({"BLOCK_T": 16, "BLOCK_D": 32}),
                           gemm=False),
    "gate_wgrad": LaunchSite("gate_wgrad", _gate_wgrad_kernel, gate_candidates("BLOCK_D"), ["D", "E", "T_BUCKET"],
                             gate_cost("BLOCK_D"), "x_ptr",
                             interpret_config=triton.Config({"BLOCK_T": 16, "BLOCK_D": 32}), restore=("dw_ptr",),
                             gemm=False),
}


def _empty(*shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 experts: three tf32 MMAs per product (tensor cores, ~fp32 accuracy); 16-bit operands are exact.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _block_e(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts))


def _row_grid(nslots: int, num_experts: int, n: int):
    return lambda meta: ((triton.cdiv(nslots, meta["BLOCK_M"]) + num_experts) * triton.cdiv(n, meta["BLOCK_N"]),)


def _weight_grid(m: int, n: int, num_experts: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), num_experts)


@dataclass
class GateResult:
    probs: torch.Tensor  # (T, E) fp32
    weights: torch.Tensor  # (T, k) fp32
    experts: torch.Tensor  # (T, k) int64
    counts: torch.Tensor  # (E,) int32


def gate_fwd(x, anchor, seq_idx, router_weight, top_k: int, noise=None, renormalize: bool = True,
             router_bias=None) -> GateResult:
    """Gate forward: per-sequence logits of the anchors (and the bias), then the token kernel."""
    t, d = x.shape
    s, a = anchor.shape
    e = router_weight.shape[0]
    dev = x.device
    block_e = _block_e(e)
    w_x, w_a = router_weight[:, :d], router_weight[:, d:]
    table = _empty(s, e, device=dev, dtype=torch.float32)
    if s > 0:
        SITES["gate_anchor"].launch(
            lambda meta: (triton.cdiv(s, meta["BLOCK_S"]),),
            anchor_ptr=anchor, w_ptr=w_a, bias_ptr=router_bias, table_ptr=table, S=s, A=a, E=e,
            stride_as=anchor.stride(0), stride_aa=anchor.stride(1), stride_we=w_a.stride(0), stride_wa=w_a.stride(1),
            BLOCK_E=block_e,
        )
    probs = _empty(t, e, device=dev, dtype=torch.float32)
    weights = _empty(t, top_k, device=dev, dtype=torch.float32)
    experts = _empty(t, top_k, device=dev, dtype=torch.int64)
    counts = torch.zeros(e, device=dev, dtype=torch.int32)
    if t > 0:
        SITES["gate_fwd"].launch(
            lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),),
            x_ptr=x, w_ptr=w_x, table_ptr=table, seq_ptr=seq_idx, noise_ptr=noise, probs_ptr=probs,
            weights_ptr=weights, experts_ptr=experts, counts_ptr=counts, T=t, D=d, E=e, T_BUCKET=t_bucket(t),
            stride_xt=x.stride(0), stride_xd=x.stride(1), stride_we=w_x.stride(0), stride_wd=w_x.stride(1),
            stride_nt=noise.stride(0) if noise is not None else 0, stride_ne=noise.stride(1) if noise is not None else 0,
            RENORM=renormalize, TOP_K=top_k, BLOCK_E=block_e,
        )
    return GateResult(probs, weights, experts, counts)


def gate_bwd(dprobs, dweights, gate: GateResult, x, anchor, seq_idx, router_weight, renormalize: bool,
             need_x: bool = True):
    """Gate backward: ``(dx (T, D) or None, danchor (S, A), drouter_weight (E, D + A), drouter_bias (E,) fp32)``.

    The token kernel produces dlogits and dx = dlogits · W_x; dW_x is reduced over the tokens by its own
    kernel in fp32 without an fp32 copy of x; the per-sequence sums (dW_a, danchor, the bias) are (S, E)
    small and left to torch.
    """
    t, d = x.shape
    e = gate.probs.shape[1]
    top_k = gate.experts.shape[1]
    dev = x.device
    dlogits = _empty(t, e, device=dev, dtype=torch.float32)
    dx = _empty(t, d, device=dev, dtype=x.dtype) if need_x else None
    w_x = router_weight[:, :d]
    dw_x = torch.zeros(e, d, device=dev, dtype=torch.float32)
    if t > 0:
        SITES["gate_bwd"].launch(
            lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),),
            probs_ptr=gate.probs, weights_ptr=gate.weights, experts_ptr=gate.experts, dprobs_ptr=dprobs,
            dweights_ptr=dweights, w_ptr=w_x, dlogits_ptr=dlogits, dx_ptr=dx, T=t, D=d, E=e, T_BUCKET=t_bucket(t),
            stride_dpt=dprobs.stride(0) if dprobs is not None else 0,
            stride_dpe=dprobs.stride(1) if dprobs is not None else 0,
            stride_dwt=dweights.stride(0) if dweights is not None else 0,
            stride_dwk=dweights.stride(1) if dweights is not None else 0,
            stride_we=w_x.stride(0), stride_wd=w_x.stride(1),
            stride_dxt=dx.stride(0) if need_x else 0, stride_dxd=dx.stride(1) if need_x else 0,
            RENORM=renormalize, TOP_K=top_k, BLOCK_E=_block_e(e),
        )
        per_program = 1024  # tokens reduced by one program before its atomic add
        SITES["gate_wgrad"].launch(
            lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(t, per_program)),
            dlogits_ptr=dlogits, x_ptr=x, dw_ptr=dw_x, T=t, D=d, E=e, tokens_per_program=per_program,
            T_BUCKET=t_bucket(t), stride_xt=x.stride(0), stride_xd=x.stride(1), BLOCK_E=_block_e(e),
        )
    dseq = torch.zeros(anchor.shape[0], e, device=dev, dtype=torch.float32).index_add_(0, seq_idx, dlogits)
    dw_a = dseq.t() @ anchor.float()
    danchor = (dseq @ router_weight[:, d:].float()).to(anchor.dtype)
    return dx, danchor, torch.cat([dw_x, dw_a], dim=1).to(router_weight.dtype), dseq.sum(0)


def route_fwd(experts: torch.Tensor, counts: torch.Tensor):
    """Expert-sorted slots on the device: ``(order (T·k,), tok (T·k,), offs (E + 1,) int64)``."""
    k = experts.shape[1]
    order = torch.argsort(experts.reshape(-1), stable=True)
    tok = order // k if k > 1 else order
    offs = torch.zeros(counts.numel() + 1, device=counts.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offs[1:])
    return order, tok, offs


@dataclass
class ExpertWeights:
    """The experts in kernel terms: ``w1`` feeds the activation (gate_proj for the GLU, up_proj for
    2-layer experts), ``w3`` is the GLU's up_proj (None otherwise); ``b1``/``b3`` their biases; ``w2``/``b2``
    the down projection."""

    w1: torch.Tensor  # (E, F, D)
    w2: torch.Tensor  # (E, D, F)
    w3: torch.Tensor | None  # (E, F, D)
    b1: torch.Tensor | None  # (E, F)
    b2: torch.Tensor | None  # (E, D)
    b3: torch.Tensor | None  # (E, F)

    @property
    def glu(self) -> bool:
        return self.w3 is not None


@dataclass
class Slots:
    tok: torch.Tensor  # (T·k,) int64 token of each expert-sorted slot
    offs: torch.Tensor  # (E + 1,) int64
    coef: torch.Tensor  # (T·k,) fp32 routing weight x token scale


def grouped_ffn_fwd(x, slots: Slots, w: ExpertWeights, host_out, top_k: int, activation: str, save: bool,
                    save_y: bool):
    """Expert FFN forward on expert-sorted slots, combined into ``host_out``.

    Returns ``(out (T, D), a (T·k, F), h, u, y)``; h/u are saved only with ``save``, y with ``save_y``.
    """
    t, d = x.shape
    e, f, _ = w.w1.shape
    nslots = slots.tok.numel()
    prec = _dot_precision(x.dtype)
    dev = x.device
    a = _empty(nslots, f, device=dev, dtype=x.dtype)
    h = _empty(nslots, f, device=dev, dtype=x.dtype) if save else None
    u = _empty(nslots, f, device=dev, dtype=x.dtype) if (save and w.glu) else None
    w3 = w.w3 if w.glu else w.w1  # strides only; the kernel reads w3 when its pointer is not None
    SITES["expert_up_fwd_glu" if w.glu else "expert_up_fwd"].launch(
        _row_grid(nslots, e, f),
        x_ptr=x, tok_ptr=slots.tok, offs_ptr=slots.offs, w1_ptr=w.w1, w3_ptr=w.w3, b1_ptr=w.b1, b3_ptr=w.b3,
        h_ptr=h, u_ptr=u, a_ptr=a, D=d, F=f, E=e, num_slots=nslots, T_BUCKET=t_bucket(nslots),
        stride_xt=x.stride(0), stride_xd=x.stride(1),
        stride_w1e=w.w1.stride(0), stride_w1f=w.w1.stride(1), stride_w1d=w.w1.stride(2),
        stride_w3e=w3.stride(0), stride_w3f=w3.stride(1), stride_w3d=w3.stride(2),
        stride_b1e=w.b1.stride(0) if w.b1 is not None else 0, stride_b3e=w.b3.stride(0) if w.b3 is not None else 0,
        ACT=ACT_CODES[activation], DOT_PRECISION=prec,
    )
    y = _empty(nslots, d, device=dev, dtype=x.dtype) if save_y else None
    atomic = top_k > 1
    if atomic:
        # fp32 accumulator holding the host output: one copy (and one cast back), never two.
        out = host_out.to(torch.float32, copy=True) if host_out is not None else torch.zeros(
            t, d, device=dev, dtype=torch.float32)
    else:
        out = _empty(t, d, device=dev, dtype=x.dtype)
    host = host_out if (host_out is not None and not atomic) else None
    SITES["expert_down_fwd"].launch(
        _row_grid(nslots, e, d),
        a_ptr=a, tok_ptr=slots.tok, offs_ptr=slots.offs, w2_ptr=w.w2, b2_ptr=w.b2, coef_ptr=slots.coef, y_ptr=y,
        host_ptr=host, out_ptr=out, D=d, F=f, E=e, num_slots=nslots, T_BUCKET=t_bucket(nslots),
        stride_w2e=w.w2.stride(0), stride_w2d=w.w2.stride(1), stride_w2f=w.w2.stride(2),
        stride_b2e=w.b2.stride(0) if w.b2 is not None else 0,
        stride_ht=host.stride(0) if host is not None else 0, stride_hd=host.stride(1) if host is not None else 0,
        stride_ot=out.stride(0), stride_od=out.stride(1), ATOMIC=atomic, DOT_PRECISION=prec,
    )
    if atomic and out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out, a, h, u, y


@dataclass
class ExpertGrads:
    dx: torch.Tensor | None = None
    dw1: torch.Tensor | None = None
    dw2: torch.Tensor | None = None
    dw3: torch.Tensor | None = None
    db1: torch.Tensor | None = None
    db2: torch.Tensor | None = None
    db3: torch.Tensor | None = None
    dcoef: torch.Tensor | None = None


def grouped_ffn_bwd(g, x, slots: Slots, w: ExpertWeights, a, h, u, y, top_k: int, activation: str, *,
                    need_x: bool, need_w1: bool, need_w2: bool, need_w3: bool, need_b1: bool, need_b2: bool,
                    need_b3: bool, need_coef: bool) -> ExpertGrads:
    """Expert FFN backward; unrequested gradients stay None."""
    t, d = x.shape
    e, f, _ = w.w1.shape
    nslots = slots.tok.numel()
    prec = _dot_precision(x.dtype)
    dev = x.device
    grads = ExpertGrads()
    dh = _empty(nslots, f, device=dev, dtype=x.dtype)
    du = _empty(nslots, f, device=dev, dtype=x.dtype) if w.glu else None
    dcoef = _empty(nslots, device=dev, dtype=torch.float32) if need_coef else None
    SITES["expert_up_bwd_glu" if w.glu else "expert_up_bwd"].launch(
        _row_grid(nslots, e, f),
        g_ptr=g, tok_ptr=slots.tok, offs_ptr=slots.offs, coef_ptr=slots.coef, w2_ptr=w.w2, h_ptr=h, u_ptr=u,
        y_ptr=y if need_coef else None, dh_ptr=dh, du_ptr=du, dcoef_ptr=dcoef, D=d, F=f, E=e, num_slots=nslots,
        T_BUCKET=t_bucket(nslots), stride_gt=g.stride(0), stride_gd=g.stride(1),
        stride_w2e=w.w2.stride(0), stride_w2d=w.w2.stride(1), stride_w2f=w.w2.stride(2),
        ACT=ACT_CODES[activation], DOT_PRECISION=prec,
    )
    grads.dcoef = dcoef
    if need_x:
        atomic = top_k > 1
        dx = torch.zeros(t, d, device=dev, dtype=torch.float32) if atomic else _empty(t, d, device=dev, dtype=x.dtype)
        w3 = w.w3 if w.glu else w.w1
        SITES["expert_dx_glu" if w.glu else "expert_dx"].launch(
            _row_grid(nslots, e, d),
            dh_ptr=dh, du_ptr=du, tok_ptr=slots.tok, offs_ptr=slots.offs, w1_ptr=w.w1, w3_ptr=w.w3, dx_ptr=dx,
            D=d, F=f, E=e, num_slots=nslots, T_BUCKET=t_bucket(nslots),
            stride_w1e=w.w1.stride(0), stride_w1f=w.w1.stride(1), stride_w1d=w.w1.stride(2),
            stride_w3e=w3.stride(0), stride_w3f=w3.stride(1), stride_w3d=w3.stride(2),
            stride_dxt=dx.stride(0), stride_dxd=dx.stride(1), ATOMIC=atomic, DOT_PRECISION=prec,
        )
        grads.dx = dx.to(x.dtype) if dx.dtype != x.dtype else dx

    def wgrad_in(site: str, dy, like_w, want_db: bool):
        dw = _empty(e, f, d, device=dev, dtype=like_w.dtype)
        db = _empty(e, f, device=dev, dtype=like_w.dtype) if want_db else None
        SITES[site].launch(
            _weight_grid(f, d, e),
            dy_ptr=dy, x_ptr=x, tok_ptr=slots.tok, offs_ptr=slots.offs, dw_ptr=dw, db_ptr=db, F=f, D=d,
            T_BUCKET=t_bucket(nslots), stride_xt=x.stride(0), stride_xd=x.stride(1), DOT_PRECISION=prec,
        )
        return dw, db

    if need_w1 or need_b1:
        grads.dw1, grads.db1 = wgrad_in("expert_wgrad_first", dh, w.w1, need_b1)
    if w.glu and (need_w3 or need_b3):
        grads.dw3, grads.db3 = wgrad_in("expert_wgrad_up", du, w.w3, need_b3)
    if need_w2 or need_b2:
        dw2 = _empty(e, d, f, device=dev, dtype=w.w2.dtype)
        db2 = _empty(e, d, device=dev, dtype=w.w2.dtype) if need_b2 else None
        SITES["expert_wgrad_down"].launch(
            _weight_grid(d, f, e),
            g_ptr=g, a_ptr=a, tok_ptr=slots.tok, offs_ptr=slots.offs, coef_ptr=slots.coef, dw_ptr=dw2, db_ptr=db2,
            D=d, F=f, T_BUCKET=t_bucket(nslots), stride_gt=g.stride(0), stride_gd=g.stride(1), DOT_PRECISION=prec,
        )
        grads.dw2, grads.db2 = dw2, db2
    return grads


class _TritonGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, router_weight, router_bias, seq_idx, noise, top_k, renormalize):
        gate = gate_fwd(x, anchor, seq_idx, router_weight, top_k, noise, renormalize, router_bias)
        ctx.save_for_backward(x, anchor, router_weight, seq_idx, gate.probs, gate.weights, gate.experts)
        ctx.renormalize = renormalize
        ctx.bias_dtype = None if router_bias is None else router_bias.dtype
        ctx.mark_non_differentiable(gate.experts, gate.counts)
        return gate.probs, gate.weights, gate.experts, gate.counts

    @staticmethod
    def backward(ctx, dprobs, dweights, _dexperts, _dcounts):
        x, anchor, router_weight, seq_idx, probs, weights, experts = ctx.saved_tensors
        gate = GateResult(probs, weights, experts, None)
        dx, danchor, drouter, dbias = gate_bwd(dprobs, dweights, gate, x, anchor, seq_idx, router_weight,
                                               ctx.renormalize, need_x=ctx.needs_input_grad[0])
        dbias = dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return dx, danchor, drouter, dbias, None, None, None, None


class _TritonExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, w3, b1, b2, b3, host_out, token_scale, experts, counts, activation):
        t, k = experts.shape
        order, tok, offs = route_fwd(experts, counts)
        coef = weights.reshape(-1).index_select(0, order)
        if token_scale is not None:
            coef = coef * token_scale.float().index_select(0, tok)
        slots = Slots(tok, offs, coef)
        w = ExpertWeights(w1, w2, w3, b1, b2, b3)
        need = ctx.needs_input_grad
        save = any(need[i] for i in range(8))
        out, a, h, u, y = grouped_ffn_fwd(x, slots, w, host_out, k, activation, save=save, save_y=need[1])
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
        grads = grouped_ffn_bwd(
            g, x, Slots(tok, offs, coef), ExpertWeights(w1, w2, w3, None, None, None), a, h, u, y, k,
            ctx.activation, need_x=need[0], need_w1=need[2], need_w2=need[3], need_w3=need[4], need_b1=need[5],
            need_b2=need[6], need_b3=need[7], need_coef=need[1],
        )
        dweights = None
        if need[1]:
            dcoef = grads.dcoef
            if token_scale is not None:
                dcoef = dcoef * token_scale.float().index_select(0, tok)
            dweights = torch.empty_like(dcoef).index_copy_(0, order, dcoef).view(-1, k)
        return (grads.dx, dweights, grads.dw1 if need[2] else None, grads.dw2 if need[3] else None,
                grads.dw3 if need[4] else None, grads.db1 if need[5] else None, grads.db2 if need[6] else None,
                grads.db3 if need[7] else None, g if (ctx.has_host and need[8]) else None, None, None, None, None)


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
    # The kernels index the biases with a unit column stride: (E, F) / (E, D) are small, copy if needed.
    b1, b2, b3 = (b.contiguous() if b is not None else None for b in (b1, down_bias, b3))
    if router_bias is not None:
        router_bias = router_bias.contiguous()
    probs, weights, experts, counts = _TritonGate.apply(x, anchor, router_weight, router_bias, seq_idx, noise, top_k,
                                                        renormalize)
    if x.shape[0] == 0:
        out = host_out.clone() if host_out is not None else torch.zeros_like(x)
        return out, probs, experts
    out = _TritonExperts.apply(x, weights, w1, down_proj, w3, b1, b2, b3, host_out, token_scale, experts, counts,
                               activation)
    return out, probs, experts


__all__ = ["ACT_CODES", "SITES", "ExpertWeights", "GateResult", "Slots", "gate_bwd", "gate_fwd", "grouped_ffn_bwd",
           "grouped_ffn_fwd", "interpreting", "moe_bypass_triton", "route_fwd"]
