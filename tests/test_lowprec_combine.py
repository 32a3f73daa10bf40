"""The grouped PyTorch path in fp16 / bf16 on the CPU: the top-k > 1 combine (fp32 accumulation of
``weight · expert(x)`` over the k slots) and the k = 1 combine, against the reference at the dtype's
tolerance."""
import pytest
import torch

from memoe_fast.ops.reference import moe_bypass_reference
from memoe_fast.ops.torch_path import moe_bypass_torch
from memoe_fast.testing import TOLERANCES, assert_close, make_moe_inputs

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k,renormalize", [(2, True), (3, False), (1, False)], ids=["k2", "k3-norenorm", "k1-norenorm"])
@pytest.mark.parametrize("host_out", [True, False], ids=["host", "nohost"])
def test_low_precision_forward_matches_reference(dtype, top_k, renormalize, host_out):
    tensors, options = make_moe_inputs(33, 64, 96, 4, dtype=dtype, host_out=host_out, token_scale=True,
                                       dev=torch.device("cpu"))
    options.update(top_k=top_k, renormalize=renormalize)
    with torch.no_grad():
        ref = moe_bypass_reference(**tensors, **options)
        got = moe_bypass_torch(**tensors, **options)
    assert got[0].dtype == dtype
    assert torch.equal(got[2], ref[2]), "experts differ"
    assert_close("out", got[0], ref[0], *TOLERANCES[dtype])
    assert_close("probs", got[1], ref[1], *TOLERANCES[torch.float32])
    # Not vacuous: dropping the routing weights (every weight 1) moves the output far past the tolerance.
    unweighted = expert_sum(tensors, options, ref[2])
    if host_out:
        unweighted = unweighted + tensors["host_out"].detach().float()
    assert (unweighted - ref[0].float()).abs().max() > 10 * TOLERANCES[dtype][0]


def expert_sum(tensors, options, experts):
    """``s_t · Σ_j expert_{experts[t, j]}(x_t)`` with every routing weight 1, in fp32."""
    from memoe_fast.ops.reference import expert_ffn_reference

    f = {k: v.detach().float() for k, v in tensors.items() if k != "host_out"}
    names = ("up_proj", "down_proj", "gate_proj", "up_bias", "gate_bias", "down_bias")
    return expert_ffn_reference(f["x"], torch.ones(experts.shape), experts, **{k: f[k] for k in names if k in f},
                                token_scale=options["token_scale"].float(), activation=options["activation"])
