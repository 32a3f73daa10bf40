"""Backbones spread by accelerate's device_map: the bypass lives on its host block's device."""
import pytest
import torch

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.integration import transformer_blocks


def _saved_tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_bypass_follows_its_block_under_a_device_map(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _saved_tiny_llama(tmp_path)
    # One machine has one device here, so the map spreads the model over the CPU and the disk: block 2
    # is offloaded and loaded by accelerate's hooks at each forward, the edited block 1 stays put.
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off")).eval()
    assert model.hf_device_map["model.layers.2"] == "disk"
    assert hasattr(transformer_blocks(model)[2], "_hf_hook")  # accelerate dispatched it
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    handle = apply_memoe(model, MEMoEConfig(layer=1, impl="reference", anchor_scope=False, top_k=2))
    host = transformer_blocks(model)[1].mlp.base_layer
    for name, p in handle.bypass.bypass_parameters().items():
        assert p.device == host.up_proj.weight.device, name
    anchors = torch.randn(2, 48)
    with torch.no_grad(), handle.anchored(anchors=anchors):
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        edited = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert not torch.allclose(edited, base) and out.shape == (2, 8)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_offloaded_host_block_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(_saved_tiny_llama(tmp_path), device_map=device_map,
                                                 offload_folder=str(tmp_path / "off")).eval()
    with pytest.raises(ValueError, match="offloaded"):
        apply_memoe(model, MEMoEConfig(layer=1))
    assert type(transformer_blocks(model)[1].mlp).__name__ == "LlamaMLP"
