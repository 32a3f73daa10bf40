"""Pure-PyTorch reference of the MEMoE bypass: the oracle every fast path is tested against.

Written for clarity, not speed: every expert runs densely on every token, and the routing weights
pick the result. Nothing here may be optimised; the fused paths live in ``torch_path.py`` and
``triton_path.py`` and are compared to these functions in the tests.

Shapes (flattened over batch and sequence):
    T tokens, D hidden, A anchor width, S sequences, E experts, F expert FFN width, k top-k.

Experts: ``silu_glu`` (LLaMA) is ``down(silu(gate_proj x + gate_bias) * (up_proj x + up_bias)) + down_bias``;
the 2-layer experts (GPT-2 and friends) are ``down(act(up_proj x + up_bias)) + down_bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu_glu", "gelu", "gelu_tanh", "relu")


def activate(h: torch.Tensor, activation: str, up: torch.Tensor | None = None) -> torch.Tensor:
    """The expert's hidden activation. ``silu_glu`` is LLaMA's ``silu(gate) * up``."""
    if activation == "silu_glu":
        return F.silu(h) * up
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def gate_logits_reference(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,) int64 in [0, S)
    router_weight: torch.Tensor,  # (E, D + A)
    router_bias: torch.Tensor | None = None,  # (E,)
) -> torch.Tensor:
    """Gate logits ``W_g · concat(x_t, a_s(t)) + b_g`` in fp32, materialising the concatenation."""
    z = torch.cat([x, anchor[seq_idx].to(x.dtype)], dim=-1).float()
    logits = z @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias.float()
    return logits


def gate_topk_reference(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,)
    router_weight: torch.Tensor,  # (E, D + A)
    top_k: int,
    noise: torch.Tensor | None = None,  # (T, E), added to the logits (training-time gate noise)
    renormalize: bool = True,
    router_bias: torch.Tensor | None = None,  # (E,)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax gating with top-k selection.

    Returns ``(weights (T, k) fp32, experts (T, k) int64, probs (T, E) fp32)``; ``probs`` is the full
    softmax, used by the load-balancing loss. With ``renormalize`` the k weights sum to one.
    """
    logits = gate_logits_reference(x, anchor, seq_idx, router_weight, router_bias)
    if noise is not None:
        logits = logits + noise.float()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def expert_ffn_reference(
    x: torch.Tensor,  # (T, D)
    weights: torch.Tensor,  # (T, k) routing weights
    experts: torch.Tensor,  # (T, k) int64 expert ids
    *,
    up_proj: torch.Tensor,  # (E, F, D) as (out, in)
    down_proj: torch.Tensor,  # (E, D, F)
    gate_proj: torch.Tensor | None = None,  # (E, F, D), silu_glu only
    up_bias: torch.Tensor | None = None,  # (E, F)
    gate_bias: torch.Tensor | None = None,  # (E, F), silu_glu only
    down_bias: torch.Tensor | None = None,  # (E, D)
    token_scale: torch.Tensor | None = None,  # (T,) λ times the anchor scope of the token's sequence
    activation: str,
) -> torch.Tensor:
    """``y_t = s_t · Σ_j weights[t, j] · expert_{experts[t, j]}(x_t)``, computed densely for every expert."""
    num_experts = up_proj.shape[0]
    y = torch.zeros(x.shape[0], down_proj.shape[1], dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        up = x @ up_proj[e].t()
        if up_bias is not None:
            up = up + up_bias[e]
        if activation == "silu_glu":
            h = x @ gate_proj[e].t()
            if gate_bias is not None:
                h = h + gate_bias[e]
            a = activate(h, activation, up)
        else:
            a = activate(up, activation)
        out = a @ down_proj[e].t()
        if down_bias is not None:
            out = out + down_bias[e]
        coef = (weights * (experts == e)).sum(dim=-1, keepdim=True)  # (T, 1): 0 where e is not chosen
        y = y + coef * out.float()
    if token_scale is not None:
        y = y * token_scale.float().unsqueeze(-1)
    return y.to(x.dtype)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss ``E · Σ_e f_e · P_e`` (1.0 when perfectly balanced)."""
    if probs.shape[0] == 0:
        return probs.sum()
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, experts.reshape(-1), torch.ones(experts.numel(), device=probs.device))
    frac = counts / experts.numel()
    return num_experts * (frac * probs.mean(dim=0)).sum()


def moe_bypass_reference(
    x: torch.Tensor,  # (T, D)
    anchor: torch.Tensor,  # (S, A)
    seq_idx: torch.Tensor,  # (T,)
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
    host_out: torch.Tensor | None = None,  # (T, D) the host MLP's output the bypass is added to
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole bypass: ``host_out + s_t · Σ_topk g_e · expert_e(x_t)``.

    Returns ``(out (T, D), probs (T, E) fp32, experts (T, k))``. This is the contract every
    implementation behind :func:`memoe_fast.ops.moe_bypass` meets with the same arguments; it trusts
    them (``moe_bypass`` validates).
    """
    weights, experts, probs = gate_topk_reference(x, anchor, seq_idx, router_weight, top_k, noise, renormalize,
                                                  router_bias)
    y = expert_ffn_reference(
        x, weights, experts, up_proj=up_proj, down_proj=down_proj, gate_proj=gate_proj, up_bias=up_bias,
        gate_bias=gate_bias, down_bias=down_bias, token_scale=token_scale, activation=activation,
    )
    if host_out is not None:
        y = host_out + y
    return y, probs, experts


def moe_flops(tokens: int, hidden: int, ffn: int, top_k: int, glu: bool, backward: bool = False) -> float:
    """Matmul FLOPs of the routed experts (for TFLOP/s figures); backward counts twice the forward."""
    mats = 3 if glu else 2
    fwd = 2.0 * tokens * top_k * hidden * ffn * mats
    return fwd * 3 if backward else fwd


__all__ = [
    "ACTIVATIONS",
    "activate",
    "gate_logits_reference",
    "gate_topk_reference",
    "expert_ffn_reference",
    "load_balance_loss",
    "moe_bypass_reference",
    "moe_flops",
]
