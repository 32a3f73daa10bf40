"""Dispatch of the bypass MoE among its implementations."""
from __future__ import annotations

import os

import torch

from .reference import moe_bypass_reference
from .torch_path import moe_bypass_torch

IMPLEMENTATIONS = ("auto", "reference", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` picks the Triton kernels on CUDA and the grouped PyTorch path elsewhere."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def moe_bypass(*args, impl: str = "auto", **kwargs):
    """The bypass MoE with the contract of :func:`moe_bypass_reference`, by the chosen implementation.

    ``impl="triton"`` on CPU tensors runs the kernels under the Triton interpreter and so needs
    ``TRITON_INTERPRET=1`` in the environment before triton is imported (that is how the tests run).
    """
    x = args[0] if args else kwargs["x"]
    impl = resolve_impl(impl, x.device)
    if impl == "reference":
        return moe_bypass_reference(*args, **kwargs)
    if impl == "torch":
        return moe_bypass_torch(*args, **kwargs)
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "impl='triton' on a non-CUDA tensor needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton (slow, for tests), or use impl='torch' / 'auto' on CPU"
        )
    from .triton_path import moe_bypass_triton  # lazy: triton is an optional dependency

    return moe_bypass_triton(*args, **kwargs)
