"""The training options of MEMoEConfig, each checked by what it does: gate noise, expert init,
learning-rate schedule, weight decay, early stop, and experts in bfloat16."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from memoe_fast import MEMoEConfig
from memoe_fast.bypass import MEMoEBypass
from memoe_fast.datasets import EditRequest
from memoe_fast.editing.fast_editor import FastMEMoEEditor

REQUESTS = [
    EditRequest("The capital of France is", "Rome", "France", ["France's capital city is"]),
    EditRequest("Barack Obama was born in", "Canada", "Barack Obama", ["The birthplace of Barack Obama is"]),
    EditRequest("Apple was founded by", "Bill Gates", "Apple", ["The founder of Apple is"]),
]
D, F, A = 16, 24, 8


def _bypass(**cfg) -> MEMoEBypass:
    torch.manual_seed(123)  # not the experts' seed (0): a host drawn like the random experts would equal them
    host = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=2, num_key_value_heads=2))
    return MEMoEBypass(host, MEMoEConfig(anchor_scope=False, impl="torch", **cfg), anchor_dim=A)


def _train(tiny_model, tokenizer, **cfg):
    """Train on REQUESTS with the fast editor; the losses and the trained bypass tensors."""
    base = dict(layer=1, steps=2, lr=1e-2, impl="torch", stop_loss=0.0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(**{**base, **cfg}))
    try:
        init = {k: v.detach().clone() for k, v in editor.handle.bypass.bypass_parameters().items()}
        losses = editor.train(REQUESTS)
        return losses, init, {k: v.detach().clone() for k, v in editor.handle.bypass.bypass_parameters().items()}
    finally:
        editor.handle.remove()


def test_gate_noise_acts_in_training_only():
    g = torch.Generator().manual_seed(0)
    x, out, anchors = torch.randn(2, 16, D, generator=g), torch.randn(2, 16, D, generator=g), torch.randn(2, A, generator=g)
    quiet, noisy = _bypass(num_experts=4), _bypass(num_experts=4, gate_noise=100.0)
    with torch.no_grad():
        for p in (quiet.w2, noisy.w2):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    for b in (quiet, noisy):
        b.set_anchors(anchors, pin=True)  # several forwards below use them
    with torch.no_grad():
        quiet.eval(), noisy.eval()
        clean = quiet.add_to(x, out)
        assert torch.equal(noisy.add_to(x, out), clean), "no gate noise outside training"
        assert torch.equal(noisy.last_experts, quiet.last_experts)
        quiet.train(), noisy.train()
        assert torch.equal(quiet.add_to(x, out), clean), "gate_noise=0 adds nothing in training"
        noisy.add_to(x, out)
        # Noise of std 100 on the logits reroutes about 3/4 of the 32 tokens over 4 experts.
        moved = (noisy.last_experts != quiet.last_experts).sum().item()
        assert moved >= 8, f"only {moved} of 32 tokens rerouted by the gate noise"


def test_random_zero_down_experts_start_random_and_add_nothing():
    copy, rand = _bypass(num_experts=3), _bypass(num_experts=3, expert_init="random_zero_down")
    host_w1 = copy.base_layer.gate_proj.weight.detach()
    bound = 1.0 / math.sqrt(D)
    for name in ("w1", "w3"):
        w = getattr(rand, name).detach()
        assert w.shape == (3, F, D)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, f"{name}: not U(-1/sqrt(D), 1/sqrt(D))"
        assert not torch.equal(w[0], w[1]), f"{name}: the experts must differ"
    assert not torch.allclose(rand.w1[0], host_w1), "random experts must not copy the host"
    assert torch.equal(copy.w1[0], host_w1)
    assert torch.equal(rand.w2, torch.zeros_like(rand.w2))
    x = torch.randn(2, 5, D)
    rand.set_anchors(torch.randn(2, A))
    with torch.no_grad():
        host = rand.base_layer(x)
        assert torch.equal(rand(x), host), "zero down-projections: the bypass starts as the identity"


def test_constant_schedule_keeps_the_learning_rate(tiny_model, tokenizer):
    """Adam's step is ``lr_t · m̂ / (√v̂ + ε)``. Both schedules take the same first step; the second has the
    same moments, so with the cosine over 2 steps (lr halves) it is exactly half the constant's."""
    _, init, one = _train(tiny_model, tokenizer, steps=1, lr_schedule="constant")
    _, _, const = _train(tiny_model, tokenizer, steps=2, lr_schedule="constant")
    _, _, cosine = _train(tiny_model, tokenizer, steps=2, lr_schedule="cosine")
    _, _, cosine_one = _train(tiny_model, tokenizer, steps=1, lr_schedule="cosine")
    for name in one:
        assert torch.equal(cosine_one[name], one[name]), f"{name}: the first step must not depend on the schedule"
    step_const, step_cos = const["w2"] - one["w2"], cosine["w2"] - one["w2"]
    assert step_const.abs().max() > 1e-3
    torch.testing.assert_close(step_cos, 0.5 * step_const, rtol=1e-4, atol=1e-7)
    assert not torch.equal(init["w2"], one["w2"])


def test_weight_decay_shrinks_weights_without_a_gradient(tiny_model, tokenizer):
    """At step 1 the down-projections are zero, so the up-projections get no loss gradient: without
    weight decay Adam leaves them alone; with it, the gradient is ``wd · w`` and Adam's first step moves
    every weight by ``lr`` towards zero."""
    lr = 1e-3
    _, init, plain = _train(tiny_model, tokenizer, steps=1, lr=lr)
    _, _, decayed = _train(tiny_model, tokenizer, steps=1, lr=lr, weight_decay=0.1)
    assert torch.equal(plain["w1"], init["w1"])
    big = init["w1"].abs() > 1e-3  # where wd·|w| dwarfs Adam's ε
    assert big.float().mean() > 0.5
    want = init["w1"] - lr * torch.sign(init["w1"])
    torch.testing.assert_close(decayed["w1"][big], want[big], rtol=0, atol=1e-6)


def test_stop_loss_stops_at_the_first_step_below_it(tiny_model, tokenizer):
    full, _, _ = _train(tiny_model, tokenizer, steps=5)
    assert len(full) == 5
    k = next(i for i in range(1, 5) if full[i] < min(full[:i]))  # the first step with a new lowest loss
    assert k < 4
    threshold = (full[k] + min(full[:k])) / 2
    stopped, _, _ = _train(tiny_model, tokenizer, steps=5, stop_loss=threshold)
    assert stopped == full[:k + 1]


def test_bfloat16_experts_train(tiny_model, tokenizer):
    """Experts in bfloat16 on a float32 host: the host output stays float32 and the edit still trains."""
    fp32, _, _ = _train(tiny_model, tokenizer, steps=6, lr=1e-2)
    bf16, init, trained = _train(tiny_model, tokenizer, steps=6, lr=1e-2, expert_dtype="bfloat16")
    assert all(v.dtype == (torch.float32 if k == "w_gate" else torch.bfloat16) for k, v in trained.items())
    assert bf16[0] == fp32[0], "zero down-projections add exactly nothing at step 0"
    assert trained["w2"].abs().max() > 0 and not torch.equal(trained["w1"], init["w1"])
    drop32, drop16 = fp32[0] - fp32[-1], bf16[0] - bf16[-1]
    assert drop32 > 0.5
    assert drop16 == pytest.approx(drop32, rel=0.1), "bf16 experts must train about as far as fp32 ones"
