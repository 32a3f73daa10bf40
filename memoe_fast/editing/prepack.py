"""Frozen ``nn.Linear`` layers with pre-packed weights on the CPU (oneDNN).

The fast editor runs the same frozen linears of the upper blocks forward and backward in every step.
MKL's GEMM re-packs the weight on every call; oneDNN can pack it once (the blocked layout that its
kernels read) and reuse it, which makes the forward products of a ZsRE-sized step ~15% faster on an
AVX2 machine (``benchmarks/RESULTS.md``). This is the weight pre-packing that CPU inference stacks do
(``torch.compile``'s CPU backend calls the same two ops).

Only the forward uses the packed copy; the backward (``grad @ W``, the gradient of the input only: the
weights are frozen) is already MKL's fast layout. Cost: one packed copy of each weight, held only while
the editor trains (``FastMEMoEEditor`` packs in ``prepare`` and frees in ``finish``).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def prepack_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def _available_memory() -> int:
    """Bytes of memory available without swapping (Linux ``MemAvailable``; free pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _packed_linear(x2d: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


class _PrepackedLinear(torch.autograd.Function):
    """``x @ W.T + b`` with a packed ``W`` forward; the input's gradient ``g @ W`` backward."""

    @staticmethod
    def forward(ctx, x, weight, packed, bias):
        ctx.save_for_backward(weight)
        y = _packed_linear(x.reshape(-1, x.shape[-1]), packed, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = grad.reshape(-1, grad.shape[-1]) @ weight
        return gx.view(*grad.shape[:-1], weight.shape[1]), None, None, None


def packable(module: nn.Module) -> bool:
    """A plain frozen fp32 ``nn.Linear`` on the CPU with no hooks that replace its forward."""
    if type(module) is not nn.Linear or hasattr(module, "_hf_hook") or "forward" in module.__dict__:
        return False
    w, b = module.weight, module.bias
    return (w.device.type == "cpu" and w.dtype == torch.float32 and not w.requires_grad
            and (b is None or (b.dtype == torch.float32 and not b.requires_grad)))


class PrepackedLinears:
    """Packed copies of the frozen linears in ``modules`` and a context that runs them packed.

    Checked once, not assumed: the packed product must match ``F.linear`` on a random input, otherwise
    (or where the ops are missing) :attr:`active` is False and the context does nothing. Nothing is
    packed either when the copies would take more than ``max_fraction`` of the available memory.
    """

    def __init__(self, modules, max_fraction: float = 0.25):
        self.packed: dict[nn.Linear, torch.Tensor] = {}
        self._made_from: dict[nn.Linear, tuple] = {}
        if not prepack_available():
            return
        linears = [m for root in modules for m in root.modules() if packable(m)]
        need = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        if need > max_fraction * _available_memory():
            return  # a copy that could push the machine into swap is not worth ~5% of a step
        try:
            for lin in linears:
                self.packed[lin] = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
        except RuntimeError:
            self.packed = {}
            return
        if linears and not self._agrees(linears[0]):
            self.packed = {}
        # What each copy was made from: a weight replaced, moved or changed in place makes the copies stale.
        self._made_from = {lin: _identity(lin) for lin in self.packed}

    def current(self) -> bool:
        """Whether every packed copy still matches its linear's weight (nothing replaced or changed in place)."""
        return all(_identity(lin) == made for lin, made in self._made_from.items())

    def _agrees(self, lin: nn.Linear) -> bool:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(7, lin.in_features, generator=gen)
        try:
            got = _packed_linear(x, self.packed[lin], lin.bias)
        except RuntimeError:
            return False
        want = nn.functional.linear(x, lin.weight, lin.bias)
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

    @property
    def active(self) -> bool:
        return bool(self.packed)

    @contextlib.contextmanager
    def __call__(self):
        """Inside, the packed linears' forward is the packed product (autograd included)."""
        try:
            for lin, packed in self.packed.items():
                lin.forward = _bind(lin, packed)
            yield
        finally:
            for lin in self.packed:
                lin.__dict__.pop("forward", None)


def _identity(lin: nn.Linear) -> tuple:
    w, b = lin.weight, lin.bias
    return (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version), packable(lin))


def _bind(lin: nn.Linear, packed: torch.Tensor):
    weight, bias = lin.weight, lin.bias

    def forward(x):
        return _PrepackedLinear.apply(x, weight, packed, bias)

    return forward
