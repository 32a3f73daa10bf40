"""The registered ops (torch.library.custom_op) of the bypass MoE: opcheck, gradients, torch.compile."""
from __future__ import annotations

import pytest
import torch

from memoe_fast.ops import moe_bypass_reference
from memoe_fast.ops.custom_ops import moe_bypass_op
from memoe_fast.testing import TOLERANCES, assert_close, make_moe_inputs, moe_outputs_and_grads

FP32 = TOLERANCES[torch.float32]
CASES = [
    pytest.param(dict(activation="silu_glu", top_k=2, host_out=True, router_bias=True, expert_bias=True), id="glu-k2"),
    pytest.param(dict(activation="gelu", top_k=1, host_out=False, token_scale=True), id="gelu-k1"),
]


def _inputs(case):
    case = dict(case)
    top_k = case.pop("top_k")
    tensors, options = make_moe_inputs(13, 12, 20, 4, dev=torch.device("cpu"), **case)
    return tensors, dict(options, top_k=top_k)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_opcheck(impl, case):
    tensors, options = _inputs(case)
    args = dict(tensors, **options)
    x, anchor, seq_idx = args.pop("x"), args.pop("anchor"), args.pop("seq_idx")
    op = torch.ops.memoe_fast.__getattr__(f"moe_bypass_{impl}")
    full = dict(router_bias=None, gate_proj=None, up_bias=None, gate_bias=None, down_bias=None, token_scale=None,
                noise=None, host_out=None)
    full.update(args)
    op_args = (x, anchor, seq_idx, full["router_weight"], full["router_bias"], full["up_proj"], full["down_proj"],
               full["gate_proj"], full["up_bias"], full["gate_bias"], full["down_bias"], full["token_scale"],
               full["noise"], full["host_out"], full["activation"], full["top_k"], True)
    torch.library.opcheck(op, op_args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("case", CASES)
def test_op_gradients_match_reference(case):
    tensors, options = _inputs(case)
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(lambda **kw: moe_bypass_op("torch", **kw), tensors, options)
    assert torch.equal(got["experts"], ref["experts"])
    assert_close("out", got["out"], ref["out"], *FP32)
    assert_close("probs", got["probs"], ref["probs"], *FP32)
    assert set(got_g) == set(ref_g)
    for name in ref_g:
        assert_close(f"d{name}", got_g[name], ref_g[name], *FP32)


def test_torch_compile_of_an_edited_llama_matches_eager():
    # A tiny LLaMA with the bypass on one block, its down projections made non-zero (they start at zero,
    # where the bypass adds nothing): torch.compile's logits equal eager's, and so do the gradients.
    from transformers import AutoModelForCausalLM, LlamaConfig

    import memoe_fast
    from memoe_fast.anchors import Anchors

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    handle = memoe_fast.apply_memoe(model, memoe_fast.MEMoEConfig(layer=1, top_k=2, anchor_scope=False, impl="torch"))
    bypass = handle.bypass
    with torch.no_grad():
        bypass.w2.normal_(0, 0.2)
    ids = torch.randint(0, 64, (2, 7))
    anchors = Anchors(torch.randn(2, 32), torch.ones(2, dtype=torch.bool), [[], []])
    compiled = torch.compile(model, backend="aot_eager")
    with handle.anchored(anchors=anchors):
        eager = model(ids).logits
        got = compiled(ids).logits
        with handle.disabled():
            base = model(ids).logits
        assert not torch.allclose(base, eager, atol=1e-3), "the bypass must change the logits for the check to count"
        assert_close("logits", got, eager, *FP32)
        ge = torch.autograd.grad(model(ids).logits.square().mean(), [bypass.w1, bypass.w2])
        gc = torch.autograd.grad(compiled(ids).logits.square().mean(), [bypass.w1, bypass.w2])
    assert_close("dw1", gc[0], ge[0], *FP32)
    assert_close("dw2", gc[1], ge[1], *FP32)


@pytest.mark.slow
def test_inductor_compile_of_an_edited_smollm2_matches_eager(embedded):
    # The embedded SmolLM2 edited at block 0, compiled by the default inductor backend on the CPU (its
    # on-disk caches on: they are keyed by the traced graph and the compiler's version and options, so a
    # later run of the suite reuses the code compiled for this very graph, ~5x faster): the logits, the balance loss and every
    # bypass gradient equal eager's. Block 0 keeps the compile cheap: dynamo re-traces the blocks before
    # the bypass's graph breaks once per enclosing frame. A prompt key switches the experts on from token 2
    # of sequence 0 only, so the compiled graph carries the in-scope rows through the registered op.
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    import memoe_fast
    from memoe_fast.anchors import Anchors

    model, _ = embedded
    handle = memoe_fast.apply_memoe(model, memoe_fast.MEMoEConfig(
        layer=0, top_k=2, aux_loss_weight=0.1, key_threshold=0.99, key_span="after_match", key_snap=0.0,
        impl="torch"))
    bypass = handle.bypass
    try:
        with torch.no_grad():
            bypass.w2.normal_(0, 0.02)  # down projections start at zero, where the bypass adds nothing
        # "The Eiffel Tower is", "Paris is the capital of": five tokens each keep the compile cheap.
        ids = torch.tensor([[504, 414, 46682, 18669, 314], [38634, 314, 260, 3575, 282]])
        seen = {}
        hook = bypass.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach().clone()))
        with handle.disabled(), torch.no_grad():
            base = model(ids, use_cache=False).logits
        hook.remove()
        bypass.add_keys(seen["x"][0, 2:3], torch.tensor([0]))  # subject 0's key: sequence 0's token 2
        anchors = Anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]), [[], []], matched=[[0], [1]])
        params = bypass.bypass_parameters()

        def step(m):
            with handle.anchored(anchors=anchors):
                logits = m(ids, use_cache=False).logits
            aux = bypass.last_aux_loss
            grads = torch.autograd.grad(logits.square().mean() + aux, list(params.values()))
            return logits.detach(), aux.detach(), dict(zip(params, grads))

        graphs = []

        def inductor(gm, example_inputs):
            graphs.append(gm)
            return compile_fx(gm, example_inputs)

        model.train()  # the balance loss is computed in training (gate_noise is 0: no randomness)
        eager, eager_aux, eager_g = step(model)
        torch._dynamo.reset()
        with inductor_config.patch(force_disable_caches=False):  # (the default, stated)
            got, got_aux, got_g = step(torch.compile(model, backend=inductor))
    finally:
        model.eval()
        torch._dynamo.reset()
        handle.remove()
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "memoe_fast.moe_bypass_torch.default" in ops, "the compiled graphs must hold the registered op"
    torch.testing.assert_close(eager[0, :2], base[0, :2], rtol=0, atol=0)  # before the key: host only
    torch.testing.assert_close(eager[1], base[1], rtol=0, atol=0)  # no key of its subject: host only
    assert (eager[0, 2:] - base[0, 2:]).abs().amax() > 1e-2, "the bypass must change the logits for the check to count"
    assert_close("logits", got, eager, *FP32)
    assert_close("balance loss", got_aux, eager_aux, *FP32)
    for name, g in eager_g.items():
        assert g.abs().amax() > 0, f"d{name} is zero: the check would prove nothing"
        assert_close(f"d{name}", got_g[name], g, *FP32)
