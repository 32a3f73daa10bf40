"""The bypass module on tiny random LLaMA and GPT-2 models: PEFT-style behaviour checks."""
import importlib.util
import os

import pytest
import torch

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.anchors import Anchors
from memoe_fast.bypass import MEMoEBypass
from memoe_fast.integration import transformer_blocks

PROMPTS = ["The capital of France is", "Barack Obama was born in the city of"]


def _inputs(tokenizer):
    tokenizer.padding_side = "left"
    try:
        return tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


def _perturb(handle, std=0.3):
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_init_equals_base_and_removal_restores(tiny_model, tokenizer, impl):
    enc = _inputs(tokenizer)
    base = tiny_model(**enc).logits
    original = transformer_blocks(tiny_model)[2].mlp
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=2, impl=impl, anchor_scope=False), tokenizer)
    assert isinstance(transformer_blocks(tiny_model)[2].mlp, MEMoEBypass)
    torch.testing.assert_close(tiny_model(**enc).logits, base, rtol=0, atol=0)
    _perturb(handle)
    assert not torch.allclose(tiny_model(**enc).logits, base), "a trained bypass must change the output"
    with handle.disabled():
        torch.testing.assert_close(tiny_model(**enc).logits, base, rtol=0, atol=0)
    handle.remove()
    assert transformer_blocks(tiny_model)[2].mlp is original
    torch.testing.assert_close(tiny_model(**enc).logits, base, rtol=0, atol=0)


def test_gradients_reach_only_the_bypass(tiny_model, tokenizer):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False, aux_loss_weight=0.01), tokenizer)
    _perturb(handle, 0.05)
    handle.bypass.train()
    enc = _inputs(tokenizer)
    out = tiny_model(**enc).logits
    (out.float().pow(2).mean() + handle.bypass.last_aux_loss).backward()
    bypass_params = {id(p) for p in handle.parameters()}
    for name, p in tiny_model.named_parameters():
        if id(p) in bypass_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, f"frozen parameter {name} got a gradient"


def test_experts_copy_the_host_first_projection(tiny_model, tokenizer):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=0), tokenizer)
    b = handle.bypass
    host = handle.original
    w1 = host.gate_proj.weight if hasattr(host, "gate_proj") else host.c_fc.weight.t()
    for e in range(b.config.num_experts):
        torch.testing.assert_close(b.w1[e], w1.float())
    assert torch.count_nonzero(b.w2) == 0


def test_save_load_gives_same_outputs(tiny_model, tokenizer, tmp_path):
    enc = _inputs(tokenizer)
    cfg = MEMoEConfig(layer=1, impl="reference", anchor_scope=True)
    handle = apply_memoe(tiny_model, cfg, tokenizer)
    handle.add_subjects(["France", "Barack Obama"])
    _perturb(handle)
    edited = tiny_model(**enc).logits
    handle.save(str(tmp_path / "edits"))
    assert sorted(os.listdir(tmp_path / "edits")) == ["bypass.safetensors", "memoe.json"]
    handle.remove()
    handle2 = apply_memoe(tiny_model, cfg, tokenizer)
    handle2.load_weights(str(tmp_path / "edits"))
    assert handle2.bank.subjects == ["France", "Barack Obama"]
    torch.testing.assert_close(tiny_model(**enc).logits, edited)


def test_anchor_scope_leaves_unrelated_inputs_untouched(tiny_model, tokenizer):
    enc = tokenizer(["Paris is a city in", "The Eiffel Tower was built by"], return_tensors="pt", padding=True)
    base = tiny_model(**enc).logits
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference"), tokenizer)
    handle.add_subjects(["Paris"])
    _perturb(handle)
    out = tiny_model(**enc).logits
    scope = handle.bypass.last_anchors.scope.tolist()
    assert scope == [True, False]
    assert not torch.allclose(out[0], base[0]), "the in-scope sequence must go through the experts"
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)


def test_generate_with_kv_cache_keeps_prompt_anchors(tiny_model, tokenizer):
    """Decode steps see one token each; they must reuse their prompt's anchors (and match a no-cache run)."""
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False), tokenizer)
    _perturb(handle, 0.5)
    enc = _inputs(tokenizer)
    anchors_seen = []
    hook = handle.bypass.register_forward_pre_hook(lambda m, a: anchors_seen.append(m.pending_anchors.vectors.clone()))
    cached = tiny_model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hook.remove()
    assert len(anchors_seen) == 4 and all(torch.equal(a, anchors_seen[0]) for a in anchors_seen)
    expected = handle.compute_anchors(PROMPTS).vectors
    torch.testing.assert_close(anchors_seen[0], expected)
    # Without a cache every forward re-reads the text, which then includes the generated tokens; with
    # the prompt's anchors pinned, the no-cache run must give the cached run's tokens.
    with handle.anchored(PROMPTS):
        uncached = tiny_model.generate(**enc, max_new_tokens=4, do_sample=False, use_cache=False,
                                       pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(cached, uncached)


def test_explicit_anchors_without_tokenizer(tiny_model):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False))
    ids = torch.randint(0, 1000, (3, 5))
    with pytest.raises(RuntimeError, match="tokenizer"):
        tiny_model(input_ids=ids)
    hidden = tiny_model.get_input_embeddings().weight.shape[1]
    with handle.anchored(anchors=Anchors(torch.randn(3, hidden), torch.ones(3, dtype=torch.bool), [[]] * 3)):
        assert tiny_model(input_ids=ids).logits.shape[:2] == (3, 5)


def test_config_json_round_trip_and_validation():
    cfg = MEMoEConfig(layer=3, num_experts=5, top_k=2, lr=3e-4)
    assert MEMoEConfig.from_json(cfg.to_json()) == cfg
    paper = MEMoEConfig.paper()
    assert (paper.num_experts, paper.top_k, paper.lr, paper.anchor_scope) == (4, 1, 2e-4, False)
    with pytest.raises(ValueError, match="top_k"):
        MEMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown MEMoEConfig field"):
        MEMoEConfig.from_dict({"experts": 4})


def test_layer_out_of_range(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        apply_memoe(tiny_model, MEMoEConfig(layer=9), tokenizer)


def test_top_level_kernels_name_is_not_ours():
    """`import kernels` must never resolve to this project's kernels/ folder (HF's `kernels` owns the name)."""
    import memoe_fast.kernels

    ours = os.path.dirname(os.path.abspath(memoe_fast.kernels.__file__))
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        locations = [os.path.abspath(p) for p in (spec.submodule_search_locations or [])]
        origin = os.path.dirname(os.path.abspath(spec.origin)) if spec.origin else None
        assert ours not in locations and origin != ours, f"`import kernels` resolves to {ours}"
    # transformers' own probe must not be fooled either.
    from transformers.utils import import_utils

    probe = getattr(import_utils, "is_kernels_available", None)
    if probe is not None and spec is None:
        assert not probe()


def test_kernels_folder_stays_inert_from_the_checkout_root():
    """Run from the checkout's root (the one place the folder is on sys.path), transformers must still
    see no Hugging Face `kernels`, and asking our folder for HF's API must fail with a clear ImportError."""
    import subprocess
    import sys

    import memoe_fast.kernels

    root = os.path.dirname(os.path.abspath(memoe_fast.kernels.__path__[0]))
    code = (
        "import importlib.util, os\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers import LlamaConfig\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = spec is not None and os.path.abspath(spec.origin or '').startswith(os.path.abspath('kernels'))\n"
        "print('ours' if ours else 'other', is_kernels_available())\n"
        "if ours:\n"
        "    try:\n"
        "        from kernels import get_kernel\n"
        "    except ImportError as exc:\n"
        "        print('refused:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    if first.startswith("ours"):
        assert first == "ours False"
        assert "memoe_fast.kernels" in proc.stdout


def test_unrelated_batch_in_training_mode_passes_through(tiny_model, tokenizer):
    """A batch naming no edited subject skips the experts, also while the bypass is training."""
    enc = tokenizer(["The capital of France is"], return_tensors="pt")
    base = tiny_model(**enc).logits
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference"), tokenizer)
    assert handle.bypass.training == tiny_model.training
    handle.add_subjects(["Danielle Darrieux"])
    _perturb(handle)
    handle.bypass.train()
    torch.testing.assert_close(tiny_model(**enc).logits, base, rtol=0, atol=0)


def _manual(tiny_model, **over):
    cfg = dict(layer=1, impl="reference", anchor_scope=False, top_k=2)
    cfg.update(over)
    handle = apply_memoe(tiny_model, MEMoEConfig(**cfg))
    _perturb(handle, 0.5)
    return handle, tiny_model.get_input_embeddings().weight.shape[1]


def test_anchor_mode_defaults_and_validation(tiny_model, tokenizer):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1), tokenizer)
    assert handle.anchor_mode == "auto"
    handle.remove()
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1))
    assert handle.anchor_mode == "manual"
    handle.remove()
    with pytest.raises(ValueError, match="tokenizer"):
        apply_memoe(tiny_model, MEMoEConfig(layer=1), anchor_mode="auto")
    with pytest.raises(ValueError, match="anchor_mode"):
        apply_memoe(tiny_model, MEMoEConfig(layer=1), tokenizer, anchor_mode="sometimes")


def test_auto_mode_never_overwrites_the_callers_anchors(tiny_model, tokenizer):
    """`bypass.set_anchors(t)` then `model(input_ids=...)` must use t, not anchors from the text."""
    # top-2: the gate weights, and so the output, move with the anchors.
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False, top_k=2), tokenizer)
    _perturb(handle, 0.5)
    enc = _inputs(tokenizer)
    hidden = tiny_model.get_input_embeddings().weight.shape[1]
    mine = torch.randn(2, hidden) * 3
    handle.bypass.set_anchors(mine)
    out = tiny_model(**enc).logits
    assert torch.equal(handle.bypass.last_anchors.vectors, mine)
    with handle.anchored(anchors=mine):
        pinned = tiny_model(**enc).logits
    torch.testing.assert_close(out, pinned, rtol=0, atol=0)
    auto = tiny_model(**enc).logits  # no anchors given: computed from the text
    torch.testing.assert_close(handle.bypass.last_anchors.vectors, handle.compute_anchors(PROMPTS).vectors)
    assert not torch.allclose(auto, out), "anchors from the text must differ from the caller's here"


def test_set_anchors_serve_one_forward(tiny_model):
    """Anchors set for one batch are consumed by its forward: a later batch of the same size raises."""
    handle, hidden = _manual(tiny_model)
    ids = torch.randint(0, 1000, (3, 5))
    handle.bypass.set_anchors(torch.randn(3, hidden))
    tiny_model(input_ids=ids)
    assert handle.bypass.pending_anchors is None
    with pytest.raises(RuntimeError, match="no anchors"):
        tiny_model(input_ids=ids)
    # Disabled forwards consume them too: they were meant for that forward.
    handle.bypass.set_anchors(torch.randn(3, hidden))
    with handle.disabled():
        tiny_model(input_ids=ids)
    with pytest.raises(RuntimeError, match="no anchors"):
        tiny_model(input_ids=ids)


def test_pinned_anchors_stay_and_nested_blocks_restore(tiny_model):
    handle, hidden = _manual(tiny_model)
    ids = torch.randint(0, 1000, (3, 5))
    outer, inner = torch.randn(3, hidden), torch.randn(3, hidden)
    with handle.anchored(anchors=outer):
        first = tiny_model(input_ids=ids).logits
        with handle.anchored(anchors=inner):
            tiny_model(input_ids=ids)
            assert torch.equal(handle.bypass.last_anchors.vectors, inner)
        again = tiny_model(input_ids=ids).logits
        assert torch.equal(handle.bypass.last_anchors.vectors, outer)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert handle.bypass.pending_anchors is None


def test_anchors_for_another_batch_are_an_error(tiny_model):
    handle, hidden = _manual(tiny_model)
    handle.bypass.set_anchors(torch.randn(2, hidden))
    with pytest.raises(RuntimeError, match="2 sequences but the input has 3"):
        tiny_model(input_ids=torch.randint(0, 1000, (3, 5)))
    with pytest.raises(ValueError, match="width"):
        handle.bypass.set_anchors(torch.randn(3, hidden + 1))
    with pytest.raises(ValueError, match="scope"):
        handle.bypass.set_anchors(torch.randn(3, hidden), scope=torch.ones(2, dtype=torch.bool))


def test_forward_takes_explicit_anchors(tiny_model):
    """`bypass(x, anchors)` equals setting the same anchors first, and leaves set anchors alone."""
    handle, hidden = _manual(tiny_model)
    bypass = handle.bypass
    x, anchors = torch.randn(2, 4, hidden), torch.randn(2, hidden)
    explicit = bypass(x, anchors)
    bypass.set_anchors(anchors)
    torch.testing.assert_close(bypass(x), explicit, rtol=0, atol=0)
    other = torch.randn(2, hidden)
    assert not torch.allclose(bypass(x, other), explicit)
    scope = torch.tensor([True, False])
    bypass.config.anchor_scope = True
    scoped = bypass(x, anchors, scope)
    torch.testing.assert_close(scoped[0], explicit[0])  # fewer rows through the experts: fp32 rounding
    torch.testing.assert_close(scoped[1], bypass.base_layer(x)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="explicit anchors"):
        bypass(x, scope=scope)


def test_manual_generation_keeps_the_callers_prompt_anchors(tiny_model, tokenizer):
    handle, hidden = _manual(tiny_model)
    enc = _inputs(tokenizer)
    mine = torch.randn(2, hidden)
    seen = []
    hook = handle.bypass.register_forward_pre_hook(lambda m, a: seen.append(m.pending_anchors.vectors.clone()))
    handle.bypass.set_anchors(mine)
    tiny_model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hook.remove()
    assert len(seen) == 3 and all(torch.equal(a, mine) for a in seen)
    assert handle.bypass.pending_anchors is None


def test_disabled_generation_needs_no_anchors(tiny_model, tokenizer):
    """With the bypass off, generation runs for any batch, before or after edited forwards."""
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False), tokenizer)
    enc = _inputs(tokenizer)
    one = tokenizer(["The capital of France is"], return_tensors="pt")
    tiny_model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with handle.disabled():
        out = tiny_model.generate(**one, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    base = tiny_model.generate(**one, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out, base)
