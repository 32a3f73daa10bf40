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
    scope = handle.bypass._scope.tolist()
    assert scope == [True, False]
    assert not torch.allclose(out[0], base[0]), "the in-scope sequence must go through the experts"
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)


def test_generate_with_kv_cache_keeps_prompt_anchors(tiny_model, tokenizer):
    """Decode steps see one token each; they must reuse their prompt's anchors (and match a no-cache run)."""
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False), tokenizer)
    _perturb(handle, 0.5)
    enc = _inputs(tokenizer)
    anchors_seen = []
    hook = handle.bypass.register_forward_pre_hook(lambda m, a: anchors_seen.append(m._anchor.clone()))
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
