"""The grouped PyTorch path against the reference: forward and every gradient."""
from __future__ import annotations

import pytest
import torch

from memoe_fast.ops import moe_bypass
from memoe_fast.ops.reference import moe_bypass_reference
from memoe_fast.ops.torch_path import moe_bypass_torch, route_by_expert
from memoe_fast.testing import (
    MOE_CASES, TOLERANCES, assert_close, make_moe_inputs, moe_outputs_and_grads, split_case,
)

CASES = [pytest.param(case, id=name) for name, case in MOE_CASES]
FP32 = TOLERANCES[torch.float32]


def _check(tensors, options, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(moe_bypass_torch, tensors, options)
    assert torch.equal(got["experts"], ref["experts"]), "experts differ"
    assert_close("out", got["out"], ref["out"], atol, rtol)
    assert_close("probs", got["probs"], ref["probs"], *FP32)
    assert set(got_g) == set(ref_g)
    for name in ref_g:
        assert got_g[name] is not None, f"no gradient for {name}"
        assert_close(f"d{name}", got_g[name], ref_g[name], atol, rtol)
    return ref_g


@pytest.mark.parametrize("case", CASES)
def test_torch_path_matches_reference(case):
    tensors, options = split_case(case)
    ref_g = _check(tensors, options)
    # Every gradient the case checks is well above the tolerance: a zero or wrong-sign gradient cannot pass.
    for name, g in ref_g.items():
        assert g.abs().max() > 100 * FP32[0], f"d{name} is too small to be checked at atol {FP32[0]}"


def test_routes_hit_their_edge():
    # The forced routes really produce the edge cases MOE_CASES claims.
    t, o = make_moe_inputs(19, 16, 24, 4, route="one")
    _, _, experts = moe_bypass_reference(**t, **o, top_k=1)
    assert (experts == 0).all()
    t, o = make_moe_inputs(29, 16, 24, 4, route="skip_last")
    _, _, experts = moe_bypass_reference(**t, **o, top_k=2)
    assert not (experts == 3).any()
    routing = route_by_expert(torch.zeros(7, 1, dtype=torch.long), 4)
    assert routing.identity and routing.bounds == [0, 7, 7, 7, 7]


def test_non_contiguous_inputs():
    # x is a column slice, the weights are transposed views, host_out is a strided slice.
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
    )
    assert not nc["x"].is_contiguous() and not nc["gate_proj"].is_contiguous()
    for v in nc.values():
        v.requires_grad_(True)
    _check(nc, dict(options, top_k=2))


def test_frozen_x_and_frozen_gate():
    # x not requiring grad (a frozen prefix) and a frozen router: only the expert weights get gradients.
    tensors, options = make_moe_inputs(15, 12, 20, 4, host_out=True)
    for name in ("x", "router_weight", "anchor"):
        tensors[name].requires_grad_(False)
    _check(tensors, dict(options, top_k=2))


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_dispatch_matches_reference(impl):
    tensors, options = make_moe_inputs(9, 8, 16, 4, dev=torch.device("cpu"))
    got = moe_bypass(**tensors, **options, top_k=2, impl=impl)
    ref = moe_bypass_reference(**tensors, **options, top_k=2)
    assert torch.equal(got[2], ref[2])
    assert_close("out", got[0], ref[0], *FP32)
    with pytest.raises(ValueError, match="impl must be one of"):
        moe_bypass(**tensors, **options, top_k=1, impl="nope")


# Low-precision experts: the k = 2 combine accumulates the weighted expert outputs in fp32; the
# reference runs in fp32 on the same rounded inputs, so routing cannot flip.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("top_k", [1, 2], ids=["k1", "k2"])
def test_low_precision_forward(dtype, top_k):
    tensors, options = make_moe_inputs(33, 64, 96, 4, dtype=dtype, host_out=True, token_scale=True)
    options["top_k"] = top_k
    ref_t = {k: v.detach().float() for k, v in tensors.items()}
    ref_o = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in options.items()}
    ref = moe_bypass_reference(**ref_t, **ref_o)
    with torch.no_grad():
        got = moe_bypass_torch(**tensors, **options)
    assert got[0].dtype == dtype
    assert torch.equal(got[2], ref[2]), "experts differ"
    assert_close("probs", got[1], ref[1], *FP32)
    # The bypass term alone (out - host_out) so that the host's rounding cannot hide a wrong combine.
    host = tensors["host_out"].detach().float()
    assert_close("bypass", got[0].float() - host, ref[0] - host, *TOLERANCES[dtype])
