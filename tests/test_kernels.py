"""Triton kernels of the bypass MoE against the reference: forward and every gradient.

On a machine without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` is set
here, before triton is imported); shapes are tiny because the interpreter is slow. On CUDA the same
tests run compiled, plus the bf16 forward.
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
    MOE_CASE_ARGS, MOE_CASES, TOLERANCES, assert_close, device, make_moe_inputs, moe_outputs_and_grads,
)

ON_CUDA = device().type == "cuda"
pytestmark = [] if ON_CUDA else [pytest.mark.interpret]
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET was set to something other than 1"))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Every kernel output starts as NaN (-1 for integers): an unwritten tile fails assert_close.
    monkeypatch.setattr(triton_path, "POISON", True)


CASES, CASE_ARGS = MOE_CASES, MOE_CASE_ARGS


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
    assert_close("probs", got["probs"], ref["probs"], *TOLERANCES[torch.float32])
    if grads:
        assert set(got_g) == set(ref_g)
        for name in ref_g:
            assert got_g[name] is not None, f"no gradient for {name}"
            assert_close(f"d{name}", got_g[name], ref_g[name], atol, rtol)


@pytest.mark.parametrize(CASE_ARGS, [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_forward_and_grads(tokens, hidden, ffn, experts, top_k, glu, route, token_scale, noise, host_out,
                                renormalize):
    tensors, options = make_moe_inputs(tokens, hidden, ffn, experts, glu=glu, route=route,
                                       token_scale=token_scale, noise=noise, host_out=host_out)
    if route == "random" and not glu and top_k == 3:
        options["activation"] = "gelu"
    options.update(top_k=top_k, renormalize=renormalize)
    _check(tensors, options)


LOW_CASES = [
    # fp16 forward, GLU, k = 2 (atomic fp32 accumulation, then cast).
    ("glu-k2", 29, 16, 32, 4, 2, True),
    # fp16 forward, GELU with biases, k = 1 (plain store with the host output in the epilogue).
    ("gelu-k1", 21, 16, 32, 3, 1, False),
]


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ON_CUDA, reason="the Triton interpreter has no bf16 tl.dot; bf16 is checked on CUDA")),
], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens,hidden,ffn,experts,top_k,glu", [c[1:] for c in LOW_CASES], ids=[c[0] for c in LOW_CASES])
def test_low_precision_forward(dtype, tokens, hidden, ffn, experts, top_k, glu):
    tensors, options = make_moe_inputs(tokens, hidden, ffn, experts, glu=glu, dtype=dtype, token_scale=True,
                                       host_out=True)
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
    assert_close("probs", got[1], ref[1], *TOLERANCES[dtype])


@pytest.mark.skipif(not ON_CUDA, reason="bf16/fp16 gradients are checked on CUDA only (no bf16 tl.dot in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_grads_cuda(dtype):
    tensors, options = make_moe_inputs(64, 64, 128, 4, dtype=dtype, token_scale=True, host_out=True)
    options["top_k"] = 2
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(moe_bypass_triton, tensors, options)
    if torch.equal(got["experts"], ref["experts"]):
        atol, rtol = TOLERANCES[dtype]
        assert_close("out", got["out"], ref["out"], atol, rtol)
        for name in ref_g:
            # Gradients sum many rounded products: 4x the forward tolerance.
            assert_close(f"d{name}", got_g[name], ref_g[name], 4 * atol, 4 * rtol)


def test_gate_launcher_and_routing():
    # The gate launcher alone: probs, top-k, renormalised weights and the per-expert counts/offsets.
    tensors, options = make_moe_inputs(37, 13, 19, 5, noise=True)
    x, anchor, w_gate = (tensors[k].detach() for k in ("x", "anchor", "w_gate"))
    probs, weights, experts, counts = gate_fwd(x, anchor, options["seq_idx"], w_gate, 2, options["noise"], True)
    rw, re, rp = gate_topk_reference(x, anchor, options["seq_idx"], w_gate, 2, options["noise"], True)
    assert torch.equal(experts, re)
    assert_close("probs", probs, rp, *TOLERANCES[torch.float32])
    assert_close("weights", weights, rw, *TOLERANCES[torch.float32])
    assert torch.equal(counts.long(), torch.bincount(re.reshape(-1), minlength=5))
    order, tok, offs = route_fwd(experts, counts)
    assert offs[0] == 0 and offs[-1] == 37 * 2
    sorted_experts = experts.reshape(-1)[order]
    for e in range(5):
        assert (sorted_experts[offs[e]:offs[e + 1]] == e).all()
    assert torch.equal(tok, order // 2)


def test_non_contiguous_inputs():
    # x is a column slice, w1/w2 are transposed views, host_out is a strided slice, w_gate a slice.
    tensors, options = make_moe_inputs(21, 12, 20, 4, token_scale=True, host_out=True)
    dev = tensors["x"].device
    wide = torch.randn(21, 30, device=dev)
    wide[:, 5:17] = tensors["x"].detach()
    nc = dict(
        tensors,
        x=wide[:, 5:17],
        w1=tensors["w1"].detach().transpose(1, 2).contiguous().transpose(1, 2),
        w2=tensors["w2"].detach().transpose(1, 2).contiguous().transpose(1, 2),
        host_out=torch.randn(42, 12, device=dev)[::2],
        w_gate=torch.cat([tensors["w_gate"].detach(), torch.randn(4, 3, device=dev)], 1)[:, :20],
    )
    assert not nc["x"].is_contiguous() and not nc["w1"].is_contiguous() and not nc["w_gate"].is_contiguous()
    for v in nc.values():
        v.requires_grad_(True)
    _check(nc, dict(options, top_k=2))


def test_frozen_x_and_gate():
    # x without grad (a frozen prefix) and a frozen gate: only expert weights and host_out get gradients.
    tensors, options = make_moe_inputs(15, 12, 20, 4, host_out=True)
    for name in ("x", "w_gate", "anchor"):
        tensors[name].requires_grad_(False)
    _check(tensors, dict(options, top_k=2))


def test_dispatch_and_interpreter_guard(monkeypatch):
    tensors, options = make_moe_inputs(9, 8, 16, 4)
    out = moe_bypass(**tensors, **options, impl="triton")[0]
    assert_close("out", out, moe_bypass_reference(**tensors, **options)[0], *TOLERANCES[torch.float32])
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            moe_bypass(**tensors, **options, impl="triton")
