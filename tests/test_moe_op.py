"""The public op ``memoe_fast.ops.moe_bypass``: one validation with errors naming the argument, and the
GELU host branch (exact erf GELU end to end)."""
from __future__ import annotations

import pytest
import torch

from memoe_fast.ops import moe_bypass, moe_bypass_reference
from memoe_fast.testing import TOLERANCES, assert_close, make_moe_inputs, moe_outputs_and_grads

FP32 = TOLERANCES[torch.float32]


def _inputs(activation="silu_glu", **kw):
    tensors, options = make_moe_inputs(6, 64, 80, 4, activation=activation, **kw)
    return {**{k: v.detach() for k, v in tensors.items()}, **options, "top_k": 1}


BAD = [
    pytest.param(lambda a: a.update(up_proj=torch.zeros(4, 80, 48)),
                 r"up_proj has shape \(4, 80, 48\), expected \(E, F, D\) = \(4, 80, 64\)", id="up_proj-shape"),
    pytest.param(lambda a: a.update(down_proj=torch.zeros(4, 80, 64)),
                 r"down_proj has shape \(4, 80, 64\), expected \(E, D, F\) = \(4, 64, 80\)", id="down_proj-shape"),
    pytest.param(lambda a: a.update(gate_proj=None), "gate_proj is required for activation='silu_glu'",
                 id="gate_proj-missing"),
    pytest.param(lambda a: a.update(activation="gelu"), "gate_proj must be None for activation='gelu'",
                 id="gate_proj-extra"),
    pytest.param(lambda a: a.update(activation="swish"), "unknown activation 'swish'", id="activation"),
    pytest.param(lambda a: a.update(router_weight=torch.zeros(4, 64)),
                 r"router_weight has shape \(4, 64\), expected \(E, D \+ A\) = \(4, 72\)", id="router_weight"),
    pytest.param(lambda a: a.update(router_bias=torch.zeros(5)),
                 r"router_bias has shape \(5,\), expected \(E,\) = \(4,\)", id="router_bias"),
    pytest.param(lambda a: a.update(up_bias=torch.zeros(4, 64)),
                 r"up_bias has shape \(4, 64\), expected \(E, F\) = \(4, 80\)", id="up_bias"),
    pytest.param(lambda a: a.update(down_bias=torch.zeros(4, 80)),
                 r"down_bias has shape \(4, 80\), expected \(E, D\) = \(4, 64\)", id="down_bias"),
    pytest.param(lambda a: a.update(up_proj=a["up_proj"].double()), "up_proj has dtype torch.float64 but x has",
                 id="up_proj-dtype"),
    pytest.param(lambda a: a.update(top_k=5), r"top_k must be an int in \[1, E=4\], got 5", id="top_k"),
    pytest.param(lambda a: a.update(seq_idx=a["seq_idx"][:3]), r"seq_idx has shape \(3,\), expected \(T,\)",
                 id="seq_idx"),
    pytest.param(lambda a: a.update(host_out=torch.zeros(6, 63)), "host_out has shape", id="host_out"),
    pytest.param(lambda a: a.update(noise=torch.zeros(6, 3)), r"noise has shape \(6, 3\), expected \(T, E\)",
                 id="noise"),
    pytest.param(lambda a: a.update(token_scale=torch.zeros(5)), "token_scale has shape", id="token_scale"),
]


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("mutate,message", BAD)
def test_validation_names_the_argument(mutate, message, impl):
    args = _inputs()
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        moe_bypass(**args, impl=impl)


def test_gate_bias_only_for_glu():
    args = _inputs("gelu")
    args["gate_bias"] = torch.zeros(4, 80)
    with pytest.raises(ValueError, match="gate_bias must be None for activation='gelu'"):
        moe_bypass(**args)


def test_keyword_only():
    args = _inputs()
    with pytest.raises(TypeError):
        moe_bypass(args["x"], args["anchor"], args["seq_idx"], args["router_weight"])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_exact_and_tanh_gelu_differ_and_match_reference(activation):
    # The exact (erf) and tanh GELU give different outputs, and the torch path follows the one asked for.
    tensors, options = make_moe_inputs(13, 16, 24, 3, activation=activation)
    options["top_k"] = 2
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(lambda **kw: moe_bypass(**kw, impl="torch"), tensors, options)
    assert_close("out", got["out"], ref["out"], *FP32)
    for name in ref_g:
        assert_close(f"d{name}", got_g[name], ref_g[name], *FP32)
    other = "gelu_tanh" if activation == "gelu" else "gelu"
    wrong = moe_bypass(**tensors, **dict(options, activation=other), impl="torch")[0]
    # The two GELUs differ by ~5e-4 at these inputs, several times the fp32 tolerance the check above uses.
    assert not torch.allclose(wrong, ref["out"], atol=FP32[0], rtol=FP32[1])


def test_gelu_host_uses_exact_gelu():
    # A GPT-2 host with activation "gelu" (exact erf) gets exact-GELU experts; "gelu_new" gets the tanh one.
    from transformers import GPT2Config, GPT2LMHeadModel

    from memoe_fast.bypass import describe_host

    for act, expected in (("gelu", "gelu"), ("gelu_new", "gelu_tanh")):
        cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16, activation_function=act)
        mlp = GPT2LMHeadModel(cfg).transformer.h[0].mlp
        assert describe_host(mlp)["activation"] == expected
