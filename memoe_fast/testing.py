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


def in_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(available: bool, what: str) -> None:
    """Skip the test (or the whole test module, at module level) naming ``what`` is missing; under
    ``CI=true`` fail instead, so that a CI machine lacking a dependency or the data cannot stay green
    by skipping."""
    if available:
        return
    import pytest

    if in_ci():
        pytest.fail(f"missing under CI=true: {what}", pytrace=False)
    pytest.skip(f"missing: {what}", allow_module_level=True)


def require_module(name: str, purpose: str):
    """``import name`` for a test, through :func:`require` when the import fails."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"the Python package {name!r} ({purpose}): {exc}")


def shared_data_dir() -> str:
    """The shared data folder: ``../shared/data`` beside the checkout, or ``$MEMOE_SHARED_DATA``."""
    return os.environ.get("MEMOE_SHARED_DATA", SHARED_DATA)


def shared_data_path(name: str) -> str | None:
    """Path of a file in ``../shared/data`` beside the checkout, or None when absent."""
    path = os.path.join(shared_data_dir(), name)
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


def assert_same_training(name: str, got: list[float], want: list[float], ulps: int = 64) -> None:
    """Two runs of training took the same steps: the losses agree at fp32 rounding, both at step 0 and in
    what training changed (each loss minus step 0's), and training changed the loss by far more than
    that tolerance (else the check would be vacuous). The tolerance is ``ulps`` fp32 units at the
    largest loss: losses of ~10 that training moves by ~0.1-1 are compared to ~1e-4, not to 1e-3."""
    assert len(got) == len(want), f"{name}: {len(got)} steps, expected {len(want)}"
    tol = ulps * torch.finfo(torch.float32).eps * max(abs(v) for v in want)
    moved = max(abs(v - want[0]) for v in want)
    assert moved > 100 * tol, f"{name}: training moved the loss by only {moved:.3g} (tolerance {tol:.3g})"
    assert abs(got[0] - want[0]) <= tol, f"{name}: step 0 loss {got[0]!r} != {want[0]!r} (tolerance {tol:.3g})"
    for i, (g, w) in enumerate(zip(got, want)):
        diff = (g - got[0]) - (w - want[0])
        assert abs(diff) <= tol, (f"{name}: step {i} changed the loss by {g - got[0]!r}, expected {w - want[0]!r} "
                                  f"(difference {diff:.3g}, tolerance {tol:.3g})")


def make_moe_inputs(
    tokens: int, hidden: int, ffn: int, experts: int, anchor: int = 8, seqs: int = 3, *, glu: bool = True,
    dtype: torch.dtype = torch.float32, dev: torch.device | None = None, token_scale: bool = False,
    noise: bool = False, host_out: bool = False, route: str = "random", seed: int = 0,
) -> tuple[dict, dict]:
    """Small random bypass-MoE inputs: ``(tensors, options)`` for ``moe_bypass*(**tensors, **options)``.

    ``tensors`` are the differentiable leaves (requires_grad set); ``options`` the rest. ``route``:
    ``"random"``; ``"one"`` sends every token to expert 0; ``"skip_last"`` leaves the last expert empty.
    """
    dev = dev or device()
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    anchors = rnd(seqs, anchor)
    w_gate = rnd(experts, hidden + anchor, scale=0.5)
    if route != "random":
        # Anchors of ones and a dominant anchor column make one logit win (or one lose) for every token.
        anchors = torch.ones(seqs, anchor, device=dev, dtype=dtype)
        w_gate[:, :hidden] *= 0.01
        w_gate[0 if route == "one" else -1, hidden:] = 3.0 if route == "one" else -3.0
    t = dict(
        x=rnd(tokens, hidden), anchor=anchors, w_gate=w_gate,
        w1=rnd(experts, ffn, hidden, scale=hidden ** -0.5), w2=rnd(experts, hidden, ffn, scale=ffn ** -0.5),
    )
    if glu:
        t["w3"] = rnd(experts, ffn, hidden, scale=hidden ** -0.5)
    else:
        t["b1"], t["b2"] = rnd(experts, ffn, scale=0.1), rnd(experts, hidden, scale=0.1)
    if host_out:
        t["host_out"] = rnd(tokens, hidden)
    for v in t.values():
        v.requires_grad_(True)
    opts = dict(seq_idx=torch.randint(0, seqs, (tokens,), generator=g).to(dev),
                activation="silu_glu" if glu else "gelu_tanh")
    if token_scale:
        opts["token_scale"] = torch.rand(tokens, generator=g).to(dev, dtype)
    if noise:
        opts["noise"] = (torch.randn(tokens, experts, generator=g) * 0.1).to(dev)
    return t, opts


def moe_outputs_and_grads(fn, tensors: dict, options: dict, seed: int = 1) -> tuple[dict, dict]:
    """Runs ``fn(**tensors, **options)`` on fresh leaf copies and backpropagates a random loss through
    ``out`` and ``probs``; returns ``({"out", "probs", "experts"}, {name: grad})``."""
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    out, probs, experts = fn(**leaves, **options)
    g = torch.Generator().manual_seed(seed)
    r_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    r_probs = torch.randn(probs.shape, generator=g).to(probs.device)
    (out.float() * r_out.float()).sum().add((probs * r_probs).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return {"out": out, "probs": probs, "experts": experts}, grads


# Edge cases shared by the kernel and the CPU-path tests (BLOCK_M = 16 under the interpreter):
# (id, tokens, hidden, ffn, experts, top_k, glu, route, token_scale, noise, host_out, renormalize)
MOE_CASES = [
    # T = 1: one token, one slot; every block is mostly padding.
    ("T1", 1, 16, 32, 4, 1, True, "random", False, False, True, True),
    # T smaller than a block (BLOCK_M = 16 under the interpreter); k = 2 takes the atomic combine.
    ("T5-k2", 5, 16, 32, 4, 2, True, "random", True, True, True, True),
    # Odd D and F (masked K and N tails), prime E = 5, k = 1 (plain-store combine).
    ("odd-E5-k1", 37, 13, 19, 5, 1, True, "random", True, False, True, True),
    # k = E: every expert sees every token.
    ("kE-E5", 23, 13, 19, 5, 5, True, "random", False, True, False, True),
    # Several row tiles per expert (about 47 slots each over BLOCK_M = 16).
    ("multi-tile-E3-k2", 70, 16, 24, 3, 2, True, "random", True, False, True, True),
    # All tokens to one expert: the other experts' tiles are empty and their dW must be zero.
    ("all-one-expert", 19, 16, 24, 4, 1, True, "one", True, False, True, True),
    # An expert with no tokens, k = 2.
    ("empty-expert-k2", 29, 16, 24, 4, 2, True, "skip_last", False, False, True, True),
    # GPT-2 experts: GELU(tanh) with both biases, k = 2.
    ("gelu-tanh-bias-k2", 31, 12, 20, 3, 2, False, "random", True, True, True, True),
    # No renormalisation: the routing-weight gradient is non-zero at k = 1; no host_out.
    ("no-renorm-k1", 17, 12, 20, 4, 1, True, "random", False, False, False, False),
    # Exact-erf GELU, no renormalisation, k = 3.
    ("gelu-erf-k3", 17, 12, 20, 4, 3, False, "random", True, True, True, False),
]
MOE_CASE_ARGS = "tokens,hidden,ffn,experts,top_k,glu,route,token_scale,noise,host_out,renormalize"
