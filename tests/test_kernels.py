"""Triton kernels of the bypass MoE against the reference: forward and every gradient.

On a machine without CUDA the kernels run under the Triton interpreter; ``TRITON_INTERPRET=1`` is set
here, before triton is imported (the interpreter flag is read at import). Shapes are tiny because the
interpreter is slow. On CUDA the same tests run compiled.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from memoe_fast.ops import moe_bypass  # noqa: E402
from memoe_fast.ops import triton_path  # noqa: E402
from memoe_fast.ops.reference import gate_topk_reference, moe_bypass_reference  # noqa: E402
from memoe_fast.ops.triton_path import gate_fwd, moe_bypass_triton, route_fwd  # noqa: E402
from memoe_fast.testing import (  # noqa: E402
    MOE_CASES, TOLERANCES, assert_close, device, make_moe_inputs, moe_outputs_and_grads, split_case,
)

ON_CUDA = device().type == "cuda"
pytestmark = [] if ON_CUDA else [pytest.mark.interpret]
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET was set to something other than 1"))

CASES = [pytest.param(case, id=name) for name, case in MOE_CASES]
FP32 = TOLERANCES[torch.float32]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Every kernel output starts as NaN (-1 for integers): an unwritten tile fails assert_close.
    monkeypatch.setattr(triton_path, "POISON", True)


def _check(tensors, options, dtype=torch.float32, grads=True):
    atol, rtol = TOLERANCES[dtype]
    if grads:
        ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
        got, got_g = moe_outputs_and_grads(moe_bypass_triton, tensors, options)
    else:
        with torch.no_grad():
            ref = dict(zip(("out", "probs", "experts"), moe_bypass_reference(**tensors, **options)))
            got = dict(zip(("out", "probs", "experts"), moe_bypass_triton(**tensors, **options)))
    assert torch.equal(got["experts"], ref["experts"]), "experts differ"
    assert_close("out", got["out"], ref["out"], atol, rtol)
    assert_close("probs", got["probs"], ref["probs"], *FP32)
    if grads:
        assert set(got_g) == set(ref_g)
        for name in ref_g:
            assert got_g[name] is not None, f"no gradient for {name}"
            assert_close(f"d{name}", got_g[name], ref_g[name], atol, rtol)


@pytest.mark.parametrize("case", CASES)
def test_fp32_forward_and_grads(case):
    _check(*split_case(case))


LOW_CASES = [
    # fp16 forward, GLU, k = 2 (atomic fp32 accumulation, then cast).
    pytest.param(dict(tokens=29, hidden=16, ffn=32, experts=4, top_k=2, activation="silu_glu"), id="glu-k2"),
    # fp16 forward, GELU with biases, k = 1 (plain store with the host output in the epilogue).
    pytest.param(dict(tokens=21, hidden=16, ffn=32, experts=3, top_k=1, activation="gelu_tanh"), id="gelu-k1"),
]


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ON_CUDA, reason="the Triton interpreter has no bf16 tl.dot; bf16 is checked on CUDA")),
], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_CASES)
def test_low_precision_forward(dtype, case):
    case = dict(case)
    top_k = case.pop("top_k")
    tensors, options = make_moe_inputs(case.pop("tokens"), case.pop("hidden"), case.pop("ffn"), case.pop("experts"),
                                       dtype=dtype, token_scale=True, host_out=True, **case)
    # The reference runs in fp32 on the same (rounded) inputs so that routing ties cannot flip.
    ref_t = {k: v.detach().float() for k, v in tensors.items()}
    ref_o = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in options.items()}
    ref_o["top_k"] = options["top_k"] = top_k
    ref = moe_bypass_reference(**ref_t, **ref_o)
    with torch.no_grad():
        got = moe_bypass_triton(**tensors, **options)
    assert got[0].dtype == dtype
    assert torch.equal(got[2], ref[2]), "experts differ"
    assert_close("out", got[0], ref[0], *TOLERANCES[dtype])
    assert_close("probs", got[1], ref[1], *FP32)


@pytest.mark.skipif(not ON_CUDA, reason="bf16/fp16 gradients need a bf16/fp16 tl.dot (none in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_grads_cuda(dtype):
    tensors, options = make_moe_inputs(64, 64, 128, 4, dtype=dtype, token_scale=True, host_out=True)
    options["top_k"] = 2
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(moe_bypass_triton, tensors, options)
    assert torch.equal(got["experts"], ref["experts"]), "experts differ"
    atol, rtol = TOLERANCES[dtype]
    assert_close("out", got["out"], ref["out"], atol, rtol)
    for name in ref_g:
        # Gradients sum many rounded products: 4x the forward tolerance.
        assert_close(f"d{name}", got_g[name], ref_g[name], 4 * atol, 4 * rtol)


def test_gate_launcher_and_routing():
    # The gate launcher alone: probs, top-k, renormalised weights and the per-expert counts/offsets.
    tensors, options = make_moe_inputs(37, 13, 19, 5, noise=True, router_bias=True)
    x, anchor, router, bias = (tensors[k].detach() for k in ("x", "anchor", "router_weight", "router_bias"))
    gate = gate_fwd(x, anchor, options["seq_idx"], router, 2, options["noise"], True, bias)
    probs, weights, experts, counts = gate.probs, gate.weights, gate.experts, gate.counts
    rw, re, rp = gate_topk_reference(x, anchor, options["seq_idx"], router, 2, options["noise"], True, bias)
    assert torch.equal(experts, re)
    assert_close("probs", probs, rp, *FP32)
    assert_close("weights", weights, rw, *FP32)
    assert torch.equal(counts.long(), torch.bincount(re.reshape(-1), minlength=5))
    order, tok, offs = route_fwd(experts, counts)
    assert offs.tolist() == [0] + torch.bincount(re.reshape(-1), minlength=5).cumsum(0).tolist()
    # Each expert's slots are its (token, choice) pairs in token order.
    for e in range(5):
        expect = (re == e).nonzero()[:, 0]
        assert torch.equal(tok[offs[e]:offs[e + 1]], expect)


def test_non_contiguous_inputs():
    # x is a column slice, the weights are transposed views, host_out is a strided slice, the router a slice.
    tensors, options = make_moe_inputs(21, 12, 20, 4, token_scale=True, host_out=True)
    dev = tensors["x"].device
    wide = torch.randn(21, 30, device=dev)
    wide[:, 5:17] = tensors["x"].detach()
    nc = dict(
        tensors,
        x=wide[:, 5:17],
        gate_proj=tensors["gate_proj"].detach().transpose(1, 2).contiguous().transpose(1, 2),
        down_proj=tensors["down_proj"].detach().transpose(1, 2).contiguous().transpose(1, 2),
        host_out=torch.randn(42, 12, device=dev)[::2],
        router_weight=torch.cat([tensors["router_weight"].detach(), torch.randn(4, 3, device=dev)], 1)[:, :20],
    )
    assert not nc["x"].is_contiguous() and not nc["gate_proj"].is_contiguous()
    assert not nc["router_weight"].is_contiguous()
    for v in nc.values():
        v.requires_grad_(True)
    _check(nc, dict(options, top_k=2))


def test_frozen_x_and_gate():
    # x without grad (a frozen prefix) and a frozen gate: only expert weights and host_out get gradients.
    tensors, options = make_moe_inputs(15, 12, 20, 4, host_out=True)
    for name in ("x", "router_weight", "anchor"):
        tensors[name].requires_grad_(False)
    _check(tensors, dict(options, top_k=2))


def test_dispatch_and_interpreter_guard(monkeypatch):
    tensors, options = make_moe_inputs(9, 8, 16, 4)
    out = moe_bypass(**tensors, **options, top_k=1, impl="triton")[0]
    assert_close("out", out, moe_bypass_reference(**tensors, **options, top_k=1)[0], *FP32)
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            moe_bypass(**tensors, **options, top_k=1, impl="triton")
