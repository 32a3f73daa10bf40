"""Pre-packed frozen linears (oneDNN, CPU): the same products and input gradients as nn.Linear."""
import pytest
import torch
from torch import nn

from memoe_fast.editing.prepack import PrepackedLinears, packable, prepack_available
from memoe_fast.testing import assert_same_training, require

require(prepack_available(), "oneDNN linear ops in this torch build (torch.ops.mkldnn._reorder_linear_weight, _linear_pointwise)")


def _frozen_mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 96, bias=bias), nn.SiLU(), nn.Linear(96, 48, bias=bias))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_and_input_gradient_match_nn_linear(bias):
    net = _frozen_mlp(bias)
    x = torch.randn(2, 13, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = net(xa)
    want.square().sum().backward()
    packed = PrepackedLinears([net])
    assert packed.active and len(packed.packed) == 2
    with packed():
        assert all("forward" in lin.__dict__ for lin in packed.packed)
        got = net(xb)
        got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in net.parameters()), "frozen weights must get no gradient"
    # Outside the context the modules are plain nn.Linear again.
    assert all("forward" not in lin.__dict__ for lin in packed.packed)


def test_only_frozen_fp32_linears_without_hooks_are_packed():
    net = _frozen_mlp()
    assert packable(net[0])
    net[0].weight.requires_grad_(True)
    assert not packable(net[0]), "a trained weight changes every step: a packed copy would go stale"
    half = nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    assert not packable(half)
    hooked = _frozen_mlp()[0]
    hooked._hf_hook = object()  # accelerate replaces forward on hooked modules; leave them alone
    assert not packable(hooked)


def test_nothing_is_packed_beyond_the_memory_cap():
    packed = PrepackedLinears([_frozen_mlp()], max_fraction=0.0)
    assert not packed.active
    net = _frozen_mlp()
    with packed():  # inactive: the context does nothing
        net(torch.randn(3, 48))
    assert all("forward" not in m.__dict__ for m in net)


def test_fast_editor_losses_do_not_depend_on_prepacking(tiny_model, tokenizer):
    from memoe_fast import MEMoEConfig
    from memoe_fast.datasets import EditRequest
    from memoe_fast.editing.fast_editor import FastMEMoEEditor

    requests = [EditRequest("The capital of France is", "Rome", "France", [], "Water boils at", "100 degrees"),
                EditRequest("Apple was founded by", "Bill Gates", "Apple", [], "The Eiffel Tower is in", "Paris")]
    losses, active = {}, {}
    for prepack in (False, True):
        editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="torch"),
                                 prepack=prepack)
        seen = []
        step = editor.backward_step
        editor.backward_step = lambda *a: (seen.append(editor._prepacked is not None and editor._prepacked.active),
                                           step(*a))[1]
        try:
            losses[prepack] = editor.train(requests)
        finally:
            editor.handle.remove()
        active[prepack] = all(seen)
        assert (editor._prepacked is not None) == prepack, "the packed copies are kept for the next call"
        editor.release()
        assert editor._prepacked is None
    assert active == {False: False, True: True}
    assert_same_training("prepacked", losses[True], losses[False])


def test_packed_copies_are_reused_until_a_weight_changes():
    net = _frozen_mlp()
    packed = PrepackedLinears([net])
    assert packed.active and packed.current()
    x = torch.randn(5, 48)
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # in place: the copy is stale
    assert not packed.current()
    fresh = PrepackedLinears([net])
    with fresh():
        got = net(x)
    torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-5)  # packed from the changed weights
    net[2].weight = nn.Parameter(net[2].weight.detach().clone(), requires_grad=False)  # replaced
    assert not fresh.current()


def test_the_fast_editor_packs_once_across_calls_and_again_after_a_change(tiny_model, tokenizer):
    from memoe_fast import MEMoEConfig
    from memoe_fast.datasets import EditRequest
    from memoe_fast.editing.fast_editor import FastMEMoEEditor

    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=1, impl="torch"))
    edit = [EditRequest("The capital of France is", "Rome", "France", [], "Water boils at", "100 degrees")]
    try:
        editor.train(edit)
        first = editor._prepacked
        assert first is not None and first.active
        editor.train(edit)
        assert editor._prepacked is first, "an unchanged backbone is not packed again"
        lin = next(iter(first.packed))
        with torch.no_grad():
            lin.weight.add_(1e-3)
        editor.train(edit)
        assert editor._prepacked is not first, "a changed weight must be packed again"
    finally:
        editor.handle.remove()
