"""Saving and loading an edit, and the handle's checks on what it is given."""
import json

import pytest
import torch

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.integration import transformer_blocks


def _randomise(handle, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.bypass.bypass_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _saved(handle):
    return {k: v.detach().clone() for k, v in handle.bypass.bypass_parameters().items()}


def test_load_restores_every_tensor_and_the_subjects(tiny_model, tokenizer, tmp_path):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, top_k=2, anchor_scope=False), tokenizer)
    _randomise(handle, 1)
    handle.add_subjects(["France", "Barack Obama"])
    saved = _saved(handle)
    assert {"w_gate", "w1", "w2"} <= set(saved)
    enc = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        want = tiny_model(**enc).logits
    handle.save(str(tmp_path / "edit"))
    handle.remove()

    fresh = apply_memoe(tiny_model, MEMoEConfig(layer=1, top_k=2, anchor_scope=False), tokenizer)
    _randomise(fresh, 2)  # every tensor, the gate included, differs from the saved one before loading
    for name, value in _saved(fresh).items():
        assert not torch.equal(value, saved[name]), name
    meta = fresh.load_weights(str(tmp_path / "edit"))
    for name, value in _saved(fresh).items():
        assert torch.equal(value, saved[name]), f"{name} was not restored"
    assert fresh.bank.subjects == ["France", "Barack Obama"]
    assert meta["layer"] == 1 and meta["config"]["top_k"] == 2
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(**enc).logits, want, rtol=0, atol=0)
    fresh.remove()


def test_load_rejects_another_format_version(tiny_model, tokenizer, tmp_path):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1), tokenizer)
    path = tmp_path / "edit"
    handle.save(str(path))
    meta = json.loads((path / "memoe.json").read_text())
    for version in (3, None, "1"):
        meta["format_version"] = version
        (path / "memoe.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=rf"memoe.json: unsupported format_version {version!r}"):
            handle.load_weights(str(path))
    handle.remove()


def test_load_rejects_other_shapes_and_tensors(tiny_model, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    small = apply_memoe(tiny_model, MEMoEConfig(layer=1, num_experts=2), tokenizer)
    small.save(str(tmp_path / "two"))
    small.remove()
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, num_experts=4), tokenizer)
    before = _saved(handle)
    with pytest.raises(ValueError, match=r"two: tensor '\w+' was saved with shape \(2, \d+(, \d+)?\), this bypass has \(4, "):
        handle.load_weights(str(tmp_path / "two"))
    handle.save(str(tmp_path / "four"))
    tensors = load_file(str(tmp_path / "four" / "bypass.safetensors"))
    del tensors["w2"]
    save_file(tensors, str(tmp_path / "four" / "bypass.safetensors"))
    with pytest.raises(ValueError, match=r"bypass tensors \[.*\] do not match this model's \[.*'w2'.*\]"):
        handle.load_weights(str(tmp_path / "four"))
    for name, value in _saved(handle).items():
        assert torch.equal(value, before[name]), f"a rejected load changed {name}"
    with pytest.raises(FileNotFoundError, match="not a saved MEMoE edit"):
        handle.load_weights(str(tmp_path / "nothing"))
    handle.remove()


def test_default_layer_is_the_middle_block(tiny_model, tokenizer):
    blocks = transformer_blocks(tiny_model)
    handle = apply_memoe(tiny_model, MEMoEConfig(), tokenizer)
    assert handle.layer == len(blocks) // 2 == 2
    assert blocks[2].mlp is handle.bypass
    handle.remove()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_decode_step_without_the_prompt_anchors_fails(tiny_model, tokenizer):
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, anchor_scope=False), tokenizer)
    enc = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = tiny_model(**enc, use_cache=True)
        step = dict(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        anchors = handle.bypass.last_anchors.vectors
        assert anchors.shape[0] == 1
        tiny_model(**step)  # a decode step keeps the prompt's anchors
        assert handle.bypass.last_anchors.vectors is anchors
        handle.bypass.last_anchors = None  # no prompt forward before this step
        with pytest.raises(RuntimeError, match="decode step without the anchors of its prompt"):
            tiny_model(**step)
        from memoe_fast.bypass import AnchorSet

        handle.bypass.last_anchors = AnchorSet(torch.zeros(2, anchors.shape[1]))  # anchors of another batch
        with pytest.raises(RuntimeError, match="decode step without the anchors of its prompt"):
            tiny_model(**step)
    handle.remove()
