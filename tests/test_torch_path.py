"""The grouped PyTorch path against the reference: forward and every gradient, fp32."""
from __future__ import annotations

import pytest
import torch

from memoe_fast.ops import moe_bypass
from memoe_fast.ops.reference import moe_bypass_reference
from memoe_fast.ops.torch_path import moe_bypass_torch, route_by_expert
from memoe_fast.testing import MOE_CASES, TOLERANCES, assert_close, device, make_moe_inputs, moe_outputs_and_grads

CASES = MOE_CASES


def _check(tensors, options, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(moe_bypass_torch, tensors, options)
    assert torch.equal(got["experts"], ref["experts"]), "experts differ"
    assert_close("out", got["out"], ref["out"], atol, rtol)
    assert_close("probs", got["probs"], ref["probs"], atol, rtol)
    assert set(got_g) == set(ref_g)
    for name in ref_g:
        assert got_g[name] is not None, f"no gradient for {name}"
        assert_close(f"d{name}", got_g[name], ref_g[name], atol, rtol)


@pytest.mark.parametrize(
    "tokens,hidden,ffn,experts,top_k,glu,route,token_scale,noise,host_out,renormalize",
    [c[1:] for c in CASES], ids=[c[0] for c in CASES],
)
def test_torch_path_matches_reference(tokens, hidden, ffn, experts, top_k, glu, route, token_scale, noise,
                                      host_out, renormalize):
    tensors, options = make_moe_inputs(tokens, hidden, ffn, experts, glu=glu, route=route,
                                       token_scale=token_scale, noise=noise, host_out=host_out)
    options.update(top_k=top_k, renormalize=renormalize)
    _check(tensors, options)


def test_routes_hit_their_edge():
    # The forced routes really produce the edge cases the table above claims.
    t, o = make_moe_inputs(19, 16, 24, 4, route="one")
    _, _, experts = moe_bypass_reference(**t, **o, top_k=1)
    assert (experts == 0).all()
    t, o = make_moe_inputs(29, 16, 24, 4, route="skip_last")
    _, _, experts = moe_bypass_reference(**t, **o, top_k=2)
    assert not (experts == 3).any()
    _, _, _, identity = route_by_expert(torch.zeros(7, 1, dtype=torch.long), 4)
    assert identity


def test_non_contiguous_inputs():
    # x is a column slice, the weights are transposed views, host_out is a strided slice.
    tensors, options = make_moe_inputs(21, 12, 20, 4, token_scale=True, host_out=True)
    dev = tensors["x"].device
    wide = torch.randn(21, 30, device=dev)
    wide[:, 5:17] = tensors["x"].detach()
    x = wide[:, 5:17]
    assert not x.is_contiguous()
    w1 = tensors["w1"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    w2 = tensors["w2"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    host = torch.randn(42, 12, device=dev)[::2]
    nc = dict(tensors, x=x, w1=w1, w2=w2, host_out=host)
    for v in nc.values():
        v.requires_grad_(True)
    _check(nc, dict(options, top_k=2))


def test_frozen_x_and_frozen_weights():
    # x not requiring grad (a frozen prefix) and frozen w_gate: only the expert weights get gradients.
    tensors, options = make_moe_inputs(15, 12, 20, 4, host_out=True)
    tensors["x"].requires_grad_(False)
    tensors["w_gate"].requires_grad_(False)
    tensors["anchor"].requires_grad_(False)
    _check(tensors, dict(options, top_k=2))


def test_dispatch():
    tensors, options = make_moe_inputs(9, 8, 16, 4)
    a = moe_bypass(**tensors, **options, impl="torch")[0]
    b = moe_bypass(**tensors, **options, impl="auto" if device().type == "cpu" else "torch")[0]
    c = moe_bypass(**tensors, **options, impl="reference")[0]
    assert_close("out", a, c, *TOLERANCES[torch.float32])
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        moe_bypass(**tensors, **options, impl="nope")


@pytest.mark.skipif(device().type != "cuda", reason="bf16/fp16 forward of the torch path is checked on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_forward(dtype):
    tensors, options = make_moe_inputs(33, 64, 96, 4, dtype=dtype, host_out=True, token_scale=True)
    options["top_k"] = 2
    ref = moe_bypass_reference(**tensors, **options)
    got = moe_bypass_torch(**tensors, **options)
    assert_close("out", got[0], ref[0], *TOLERANCES[dtype])
