"""``torch.library`` registration of the bypass MoE, so that ``torch.compile`` can trace an edited model.

Each implementation (``reference``, ``torch``, ``triton``) is one forward op and one explicit backward
op, ``memoe_fast::moe_bypass_<impl>`` and ``memoe_fast::moe_bypass_<impl>_backward``, with fake
(meta) kernels for tracing. The compiler sees them as opaque nodes: the data-dependent routing (how
many tokens each expert gets) never reaches a graph, so nothing recompiles when it changes.

The backward op recomputes the forward under autograd and differentiates it (the hand-written
backward of each implementation runs inside); it costs one more forward, so :func:`moe_bypass` takes
these ops only while ``torch.compile`` traces and calls the implementations directly in eager mode.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

# Differentiable inputs, in the order of the ops' signature and of the backward op's outputs.
GRAD_INPUTS = ("x", "anchor", "router_weight", "router_bias", "up_proj", "down_proj", "gate_proj", "up_bias",
               "gate_bias", "down_bias", "host_out")


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd back on inside an op's kernel: the dispatcher runs a custom op's implementation with the
    autograd keys excluded, so the backward op re-enables them (and grad mode) to differentiate its
    recomputed forward."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _impl_fn(impl: str):
    if impl == "reference":
        from .reference import moe_bypass_reference

        return moe_bypass_reference
    if impl == "torch":
        from .torch_path import moe_bypass_torch

        return moe_bypass_torch
    from .triton_path import moe_bypass_triton

    return moe_bypass_triton


def _kwargs(router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias, down_bias, token_scale,
            noise, host_out, activation, top_k, renormalize) -> dict:
    return dict(router_weight=router_weight, router_bias=router_bias, up_proj=up_proj, down_proj=down_proj,
                gate_proj=gate_proj, up_bias=up_bias, gate_bias=gate_bias, down_bias=down_bias, activation=activation,
                top_k=top_k, renormalize=renormalize, token_scale=token_scale, noise=noise, host_out=host_out)


def _register(impl: str):
    name = f"memoe_fast::moe_bypass_{impl}"

    @torch.library.custom_op(name, mutates_args=())
    def fwd(x: Tensor, anchor: Tensor, seq_idx: Tensor, router_weight: Tensor, router_bias: Optional[Tensor],
            up_proj: Tensor, down_proj: Tensor, gate_proj: Optional[Tensor], up_bias: Optional[Tensor],
            gate_bias: Optional[Tensor], down_bias: Optional[Tensor], token_scale: Optional[Tensor],
            noise: Optional[Tensor], host_out: Optional[Tensor], activation: str, top_k: int,
            renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        fn = _impl_fn(impl)  # at call time: triton is imported only when its op runs
        with torch.no_grad():
            out, probs, experts = fn(x, anchor, seq_idx, **_kwargs(
                router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias, down_bias, token_scale,
                noise, host_out, activation, top_k, renormalize))
        return out, probs, experts

    @fwd.register_fake
    def _(x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias,
          down_bias, token_scale, noise, host_out, activation, top_k, renormalize):
        t = x.shape[0]
        e = router_weight.shape[0]
        return (x.new_empty(x.shape), x.new_empty((t, e), dtype=torch.float32),
                x.new_empty((t, top_k), dtype=torch.int64))

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def bwd(grad_out: Tensor, grad_probs: Tensor, x: Tensor, anchor: Tensor, seq_idx: Tensor, router_weight: Tensor,
            router_bias: Optional[Tensor], up_proj: Tensor, down_proj: Tensor, gate_proj: Optional[Tensor],
            up_bias: Optional[Tensor], gate_bias: Optional[Tensor], down_bias: Optional[Tensor],
            token_scale: Optional[Tensor], noise: Optional[Tensor], host_out: Optional[Tensor], activation: str,
            top_k: int, renormalize: bool, needs: list[bool]) -> list[Tensor]:
        inputs = dict(x=x, anchor=anchor, router_weight=router_weight, router_bias=router_bias, up_proj=up_proj,
                      down_proj=down_proj, gate_proj=gate_proj, up_bias=up_bias, gate_bias=gate_bias,
                      down_bias=down_bias, host_out=host_out)
        leaves = {k: (v.detach().requires_grad_(need) if v is not None else None)
                  for (k, v), need in zip(inputs.items(), needs)}
        fn = _impl_fn(impl)
        with _autograd_inside_op():
            out, probs, _ = fn(leaves["x"], leaves["anchor"], seq_idx, **_kwargs(
                leaves["router_weight"], leaves["router_bias"], leaves["up_proj"], leaves["down_proj"],
                leaves["gate_proj"], leaves["up_bias"], leaves["gate_bias"], leaves["down_bias"], token_scale, noise,
                leaves["host_out"], activation, top_k, renormalize))
            wanted = [k for k, need in zip(GRAD_INPUTS, needs) if need and leaves[k] is not None]
            grads = torch.autograd.grad([out, probs], [leaves[k] for k in wanted], [grad_out, grad_probs],
                                        allow_unused=True)
        by_name = dict(zip(wanted, grads))
        # An op's outputs may not alias its inputs: d(host_out) is grad_out itself in every implementation.
        taken = {t.untyped_storage().data_ptr() for t in (grad_out, grad_probs) + tuple(inputs.values()) if t is not None}
        by_name = {k: (g.clone() if g is not None and g.untyped_storage().data_ptr() in taken else g)
                   for k, g in by_name.items()}
        result = []
        for k in GRAD_INPUTS:
            g = by_name.get(k)
            if g is None and k in by_name:
                g = torch.zeros_like(leaves[k])
            result.append(g if g is not None else x.new_empty(0))
        return result

    @bwd.register_fake
    def _(grad_out, grad_probs, x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias,
          gate_bias, down_bias, token_scale, noise, host_out, activation, top_k, renormalize, needs):
        inputs = (x, anchor, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias, down_bias,
                  host_out)
        return [torch.empty_like(v) if (v is not None and need) else x.new_empty(0) for v, need in zip(inputs, needs)]

    def setup_context(ctx, inputs, output):
        (x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias, down_bias,
         token_scale, noise, host_out, activation, top_k, renormalize) = inputs
        ctx.save_for_backward(x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias,
                              gate_bias, down_bias, token_scale, noise, host_out)
        ctx.activation = activation
        ctx.top_k = top_k
        ctx.renormalize = renormalize

    def backward(ctx, grad_out, grad_probs, _grad_experts):
        (x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias, down_bias,
         token_scale, noise, host_out) = ctx.saved_tensors
        # needs_input_grad follows the op's inputs; map it to GRAD_INPUTS.
        need = dict(zip(("x", "anchor", "seq_idx", "router_weight", "router_bias", "up_proj", "down_proj", "gate_proj",
                         "up_bias", "gate_bias", "down_bias"), ctx.needs_input_grad))
        need["host_out"] = ctx.needs_input_grad[13]
        needs = [bool(need[k]) for k in GRAD_INPUTS]
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if grad_probs is None:
            grad_probs = x.new_zeros((x.shape[0], router_weight.shape[0]), dtype=torch.float32)
        grads = bwd(grad_out, grad_probs, x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj,
                    up_bias, gate_bias, down_bias, token_scale, noise, host_out, ctx.activation, ctx.top_k,
                    ctx.renormalize, needs)
        g = {k: (v if n else None) for k, v, n in zip(GRAD_INPUTS, grads, needs)}
        return (g["x"], g["anchor"], None, g["router_weight"], g["router_bias"], g["up_proj"], g["down_proj"],
                g["gate_proj"], g["up_bias"], g["gate_bias"], g["down_bias"], None, None, g["host_out"], None, None,
                None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


OPS = {impl: _register(impl) for impl in ("reference", "torch", "triton")}


def moe_bypass_op(impl: str, x, anchor, seq_idx, *, router_weight, router_bias=None, up_proj, down_proj,
                  gate_proj=None, up_bias=None, gate_bias=None, down_bias=None, activation, top_k, renormalize=True,
                  token_scale=None, noise=None, host_out=None):
    """The registered op of ``impl`` with :func:`memoe_fast.ops.moe_bypass`'s keyword arguments."""
    return OPS[impl](x, anchor, seq_idx, router_weight, router_bias, up_proj, down_proj, gate_proj, up_bias, gate_bias,
                     down_bias, token_scale, noise, host_out, activation, top_k, renormalize)


__all__ = ["GRAD_INPUTS", "OPS", "moe_bypass_op"]
