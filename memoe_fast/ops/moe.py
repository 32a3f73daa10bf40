"""The public bypass-MoE op: one typed signature, validated once, dispatched to an implementation.

The implementations (``reference``, ``torch``, ``triton``) take the same keyword arguments and trust
them; every check on shapes, dtypes and options happens here.
"""
from __future__ import annotations

import os

import torch

from .reference import ACTIVATIONS, moe_bypass_reference
from .torch_path import moe_bypass_torch

IMPLEMENTATIONS = ("auto", "reference", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` picks the Triton kernels on CUDA and the grouped PyTorch path elsewhere."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"moe_bypass: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def _check(name: str, t, names: str, expected: tuple, *, dtype=None, device=None, floating=True) -> None:
    """Raises naming ``name`` when ``t`` is not a tensor of shape ``expected`` (``names`` spells it)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"moe_bypass: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        exp = "(" + ", ".join(str(s) for s in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"moe_bypass: {name} has shape {_shape(t)}, expected {names} = {exp}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"moe_bypass: {name} has dtype {t.dtype}, expected a floating dtype")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"moe_bypass: {name} has dtype {t.dtype} but x has {dtype}; the experts run in x's dtype")
    if device is not None and t.device != device:
        raise ValueError(f"moe_bypass: {name} is on {t.device} but x is on {device}")


def validate_moe_args(x, anchor, seq_idx, *, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias,
                      gate_bias, down_bias, activation, top_k, renormalize, token_scale, noise, host_out) -> None:
    """Every check of :func:`moe_bypass`; raises TypeError/ValueError naming the argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"moe_bypass: x must be a (T, D) tensor, got {_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"moe_bypass: x has dtype {x.dtype}, expected float32, bfloat16 or float16")
    t, d = x.shape
    dev = x.device
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 2:
        raise ValueError("moe_bypass: anchor must be an (S, A) tensor")
    s, a = anchor.shape
    _check("anchor", anchor, "(S, A)", (s, a), device=dev)
    _check("seq_idx", seq_idx, "(T,)", (t,), device=dev, floating=False)
    if seq_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"moe_bypass: seq_idx has dtype {seq_idx.dtype}, expected int64")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_bypass: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError("moe_bypass: router_weight must be an (E, D + A) tensor")
    e = router_weight.shape[0]
    _check("router_weight", router_weight, "(E, D + A)", (e, d + a), device=dev)
    if router_bias is not None:
        _check("router_bias", router_bias, "(E,)", (e,), device=dev)
    if not isinstance(up_proj, torch.Tensor) or up_proj.dim() != 3:
        raise ValueError("moe_bypass: up_proj must be an (E, F, D) tensor")
    f = up_proj.shape[1]
    _check("up_proj", up_proj, "(E, F, D)", (e, f, d), dtype=x.dtype, device=dev)
    _check("down_proj", down_proj, "(E, D, F)", (e, d, f), dtype=x.dtype, device=dev)
    glu = activation == "silu_glu"
    if glu and gate_proj is None:
        raise ValueError("moe_bypass: gate_proj is required for activation='silu_glu'")
    if not glu and gate_proj is not None:
        raise ValueError(f"moe_bypass: gate_proj must be None for activation={activation!r}")
    if not glu and gate_bias is not None:
        raise ValueError(f"moe_bypass: gate_bias must be None for activation={activation!r} (use up_bias)")
    if gate_proj is not None:
        _check("gate_proj", gate_proj, "(E, F, D)", (e, f, d), dtype=x.dtype, device=dev)
    for name, b, names, shape in (("up_bias", up_bias, "(E, F)", (e, f)), ("gate_bias", gate_bias, "(E, F)", (e, f)),
                                  ("down_bias", down_bias, "(E, D)", (e, d))):
        if b is not None:
            _check(name, b, names, shape, dtype=x.dtype, device=dev)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"moe_bypass: top_k must be an int in [1, E={e}], got {top_k!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"moe_bypass: renormalize must be a bool, got {type(renormalize).__name__}")
    if token_scale is not None:
        _check("token_scale", token_scale, "(T,)", (t,), device=dev)
    if noise is not None:
        _check("noise", noise, "(T, E)", (t, e), device=dev)
    if host_out is not None:
        _check("host_out", host_out, "(T, D)", (t, d), dtype=x.dtype, device=dev)


def moe_bypass(
    x: torch.Tensor,
    anchor: torch.Tensor,
    seq_idx: torch.Tensor,
    *,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None = None,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_proj: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str,
    top_k: int,
    renormalize: bool = True,
    token_scale: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    host_out: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bypass MoE ``host_out + s_t · Σ_{e ∈ topk} g_e · expert_e(x_t)``, by the chosen implementation.

    Args:
        x: (T, D) token states (float32, bfloat16 or float16); the experts run in this dtype.
        anchor: (S, A) per-sequence anchors; seq_idx: (T,) int64 in [0, S), the sequence of each token.
        router_weight: (E, D + A) gate over ``concat([x, anchor])`` (x first); router_bias: (E,) or None.
        up_proj: (E, F, D); down_proj: (E, D, F); gate_proj: (E, F, D), only for ``"silu_glu"``.
        up_bias, gate_bias: (E, F) or None (gate_bias only for ``"silu_glu"``); down_bias: (E, D) or None.
        activation: ``"silu_glu"`` (``silu(gate_proj x) * (up_proj x)``) or, for 2-layer experts
            (``act(up_proj x + up_bias)``), ``"gelu"`` (exact erf), ``"gelu_tanh"`` or ``"relu"``.
        top_k: experts per token; renormalize: the k routing weights sum to one.
        token_scale: (T,) per-token factor (λ · scope), no gradient; noise: (T, E) added to the logits.
        host_out: (T, D) in x's dtype, the host MLP's output the bypass is added to.
        impl: ``"auto"`` (Triton on CUDA, else ``"torch"``), ``"reference"``, ``"torch"`` or ``"triton"``;
            ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported.

    Returns:
        ``(out (T, D) in x's dtype, probs (T, E) fp32, experts (T, k) int64)``.

    Example:
        >>> import torch
        >>> T, D, F_, E, A = 8, 16, 32, 4, 8
        >>> out, probs, experts = moe_bypass(
        ...     torch.randn(T, D), torch.randn(1, A), torch.zeros(T, dtype=torch.long),
        ...     router_weight=torch.randn(E, D + A), up_proj=torch.randn(E, F_, D), down_proj=torch.randn(E, D, F_),
        ...     gate_proj=torch.randn(E, F_, D), activation="silu_glu", top_k=1)
        >>> out.shape, probs.shape, experts.shape
        (torch.Size([8, 16]), torch.Size([8, 4]), torch.Size([8, 1]))
    """
    args = dict(router_weight=router_weight, router_bias=router_bias, up_proj=up_proj, down_proj=down_proj,
                gate_proj=gate_proj, up_bias=up_bias, gate_bias=gate_bias, down_bias=down_bias,
                activation=activation, top_k=top_k, renormalize=renormalize, token_scale=token_scale, noise=noise,
                host_out=host_out)
    validate_moe_args(x, anchor, seq_idx, **args)
    impl = resolve_impl(impl, x.device)
    if seq_idx.dtype != torch.int64:
        seq_idx = seq_idx.long()
    if torch.compiler.is_compiling():
        # Under torch.compile: the registered op of the implementation, opaque to the tracer.
        from .custom_ops import moe_bypass_op

        return moe_bypass_op(impl, x, anchor, seq_idx, **args)
    if impl == "reference":
        return moe_bypass_reference(x, anchor, seq_idx, **args)
    if impl == "torch":
        return moe_bypass_torch(x, anchor, seq_idx, **args)
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "moe_bypass: impl='triton' on a non-CUDA tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (slow, for tests), or use impl='torch' / 'auto' on CPU"
        )
    if x.dtype == torch.float64:
        raise TypeError("moe_bypass: impl='triton' takes float32, bfloat16 or float16 tensors, got float64")
    from .triton_path import moe_bypass_triton  # lazy: triton is an optional dependency

    return moe_bypass_triton(x, anchor, seq_idx, **args)
