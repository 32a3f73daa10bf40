"""Helpers shared by the tests and benchmarks: one device helper, tolerances, a named assert_close."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def reloaded(model, config, tokenizer, path: str):
    """A fresh MEMoE handle on ``model`` with the edit saved at ``path`` loaded; removed on exit."""
    from .integration import apply_memoe

    handle = apply_memoe(model, config, tokenizer)
    try:
        handle.load_weights(path)
        yield handle
    finally:
        handle.remove()


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
    tokens: int, hidden: int, ffn: int, experts: int, anchor: int = 8, seqs: int = 3, *,
    activation: str = "silu_glu", expert_bias: bool | None = None, router_bias: bool = False,
    dtype: torch.dtype = torch.float32, dev: torch.device | None = None, token_scale: bool = False,
    noise: bool = False, host_out: bool = False, route: str = "random", seed: int = 0,
) -> tuple[dict, dict]:
    """Small random bypass-MoE inputs: ``(tensors, options)`` for ``moe_bypass*(**tensors, **options)``.

    ``tensors`` are the differentiable leaves (requires_grad set); ``options`` the rest (``top_k`` is the
    caller's). ``expert_bias`` (default: on for the 2-layer experts, off for ``silu_glu``) adds every
    expert bias; ``router_bias`` the gate's. ``route``: ``"random"``; ``"one"`` sends every token to
    expert 0; ``"skip_last"`` leaves the last expert empty.
    """
    dev = dev or device()
    g = torch.Generator().manual_seed(seed)
    glu = activation == "silu_glu"
    if expert_bias is None:
        expert_bias = not glu

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    anchors = rnd(seqs, anchor)
    router = rnd(experts, hidden + anchor, scale=0.5)
    if route != "random":
        # Anchors of ones and a dominant anchor column make one logit win (or one lose) for every token,
        # by a margin of about 4 (p ~ 0.95, not 1 - 1e-9), so that the gate's gradients stay measurable.
        anchors = torch.ones(seqs, anchor, device=dev, dtype=dtype)
        router[:, :hidden] *= 0.01
        router[:, hidden:] *= 0.1
        router[0 if route == "one" else -1, hidden:] = (0.6 if route == "one" else -0.6)
    t = dict(
        x=rnd(tokens, hidden), anchor=anchors, router_weight=router,
        up_proj=rnd(experts, ffn, hidden, scale=hidden ** -0.5), down_proj=rnd(experts, hidden, ffn, scale=ffn ** -0.5),
    )
    if glu:
        t["gate_proj"] = rnd(experts, ffn, hidden, scale=hidden ** -0.5)
    if expert_bias:
        t["up_bias"], t["down_bias"] = rnd(experts, ffn, scale=0.1), rnd(experts, hidden, scale=0.1)
        if glu:
            t["gate_bias"] = rnd(experts, ffn, scale=0.1)
    if router_bias:
        t["router_bias"] = rnd(experts, scale=0.5)
    if host_out:
        t["host_out"] = rnd(tokens, hidden)
    for v in t.values():
        v.requires_grad_(True)
    opts = dict(seq_idx=torch.randint(0, seqs, (tokens,), generator=g).to(dev), activation=activation)
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


def _case(tokens, hidden, ffn, experts, top_k, activation="silu_glu", **kw) -> dict:
    return dict(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, activation=activation, **kw)


# Edge cases shared by the kernel and the CPU-path tests as (id, case); a case is make_moe_inputs'
# arguments plus top_k and renormalize (default True). BLOCK_M = 16 is the smallest row tile.
MOE_CASES = [
    # T = 1: one token, one slot; every block is mostly padding.
    ("T1", _case(1, 16, 32, 4, 1, host_out=True)),
    # T smaller than a block; k = 2 takes the atomic combine.
    ("T5-k2", _case(5, 16, 32, 4, 2, token_scale=True, noise=True, host_out=True)),
    # Odd D and F (masked K and N tails), prime E = 5, k = 1 (plain-store combine).
    ("odd-E5-k1", _case(37, 13, 19, 5, 1, token_scale=True, host_out=True)),
    # k = E: every expert sees every token.
    ("kE-E5", _case(23, 13, 19, 5, 5, noise=True)),
    # Several row tiles per expert (about 47 slots each over BLOCK_M = 16).
    ("multi-tile-E3-k2", _case(70, 16, 24, 3, 2, token_scale=True, host_out=True)),
    # All tokens to one expert: the other experts' tiles are empty and their dW must be zero.
    ("all-one-expert", _case(19, 16, 24, 4, 1, route="one", token_scale=True, host_out=True)),
    # An expert with no tokens, k = 2.
    ("empty-expert-k2", _case(29, 16, 24, 4, 2, route="skip_last", host_out=True)),
    # GPT-2 experts: GELU(tanh) with both biases, k = 2.
    ("gelu-tanh-bias-k2", _case(31, 12, 20, 3, 2, "gelu_tanh", token_scale=True, noise=True, host_out=True)),
    # No renormalisation: the routing-weight gradient is non-zero at k = 1; no host_out.
    ("no-renorm-k1", _case(17, 12, 20, 4, 1, renormalize=False)),
    # Exact-erf GELU, no renormalisation, k = 3.
    ("gelu-erf-k3", _case(17, 12, 20, 4, 3, "gelu", token_scale=True, noise=True, host_out=True, renormalize=False)),
    # LLaMA with mlp_bias=True: gate, up and down biases on GLU experts, and a router bias.
    ("glu-biases-router-bias-k2", _case(27, 12, 20, 4, 2, expert_bias=True, router_bias=True, host_out=True)),
    # ReLU 2-layer experts with biases, router bias, no renormalisation.
    ("relu-bias-k2", _case(25, 12, 20, 3, 2, "relu", router_bias=True, renormalize=False, token_scale=True)),
    # ReLU 2-layer experts without any bias, k = 1.
    ("relu-nobias-k1", _case(19, 12, 20, 4, 1, "relu", expert_bias=False)),
]


def split_case(case: dict) -> tuple[dict, dict]:
    """``(tensors, options)`` of a MOE_CASES entry, options with top_k and renormalize set."""
    kw = dict(case)
    top_k, renormalize = kw.pop("top_k"), kw.pop("renormalize", True)
    tensors, options = make_moe_inputs(kw.pop("tokens"), kw.pop("hidden"), kw.pop("ffn"), kw.pop("experts"), **kw)
    options.update(top_k=top_k, renormalize=renormalize)
    return tensors, options
