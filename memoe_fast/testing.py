"""Helpers shared by the tests and benchmarks: one device helper, tolerances, a named assert_close."""
from __future__ import annotations

import os

import torch

# (dtype, atol, rtol) per dtype for kernel-vs-reference comparisons.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

SHARED_DATA = os.path.normpath(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
)


def device() -> torch.device:
    """CUDA when present, else the CPU. Tests never hard-code ``.cuda()``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shared_data_path(name: str) -> str | None:
    """Path of a file in ``../shared/data`` beside the checkout, or None when absent."""
    path = os.path.join(os.environ.get("MEMOE_SHARED_DATA", SHARED_DATA), name)
    return path if os.path.exists(path) else None


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """``torch.testing.assert_close`` that names the tensor and reports the relative error."""
    actual_f, expected_f = actual.detach().float(), expected.detach().float()
    assert actual_f.shape == expected_f.shape, f"{name}: shape {tuple(actual_f.shape)} != {tuple(expected_f.shape)}"
    assert torch.isfinite(actual_f).all(), f"{name}: non-finite values (an unwritten tile?)"
    err = (actual_f - expected_f).abs().max().item() if actual_f.numel() else 0.0
    rel = err / max(expected_f.abs().max().item() if expected_f.numel() else 0.0, 1e-12)
    torch.testing.assert_close(
        actual_f, expected_f, atol=atol, rtol=rtol,
        msg=lambda m: f"{name}: max abs err {err:.3g}, rel err {rel:.3g}\n{m}",
    )
