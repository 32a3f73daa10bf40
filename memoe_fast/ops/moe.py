"""Dispatch of the bypass MoE among its implementations."""
from __future__ import annotations

import torch

from .reference import moe_bypass_reference

IMPLEMENTATIONS = ("auto", "reference", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` picks the Triton kernels on CUDA and the grouped PyTorch path elsewhere."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def moe_bypass(*args, impl: str = "auto", **kwargs):
    """The bypass MoE with the contract of :func:`moe_bypass_reference`, by the chosen implementation."""
    x = args[0] if args else kwargs["x"]
    impl = resolve_impl(impl, x.device)
    if impl == "reference":
        return moe_bypass_reference(*args, **kwargs)
    # Fused implementations are added by the kernels work; until then they fall back loudly.
    raise NotImplementedError(f"implementation {impl!r} is not built yet")
