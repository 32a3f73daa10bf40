"""Edits as artifacts: what save() records, load -> identical outputs, another backbone refused."""
import json
import os

import pytest
import torch

from memoe_fast import MEMoEConfig, __version__, apply_memoe
from memoe_fast.datasets import EditRequest
from memoe_fast.integration import host_fingerprint, read_edit_meta, transformer_blocks

PROMPTS = ["The capital of France is", "Barack Obama was born in the city of"]


def _tiny_llama(seed=0, hidden=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _edited(model, tokenizer, **cfg):
    handle = apply_memoe(model, MEMoEConfig(layer=1, impl="reference", top_k=2, gate_bias=True, **cfg), tokenizer)
    handle.add_subjects(["France", "Barack Obama"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.bypass.bypass_parameters().values():  # every tensor moves, the gate included
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return handle


def _enc(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def test_save_load_identical_outputs_every_tensor(tokenizer, tmp_path):
    model = _tiny_llama()
    handle = _edited(model, tokenizer)
    enc = _enc(tokenizer)
    with torch.no_grad():
        edited = model(**enc).logits
    saved = {k: v.detach().clone() for k, v in handle.bypass.bypass_parameters().items()}
    assert {"w_gate", "b_gate", "w1", "w3", "w2"} <= set(saved)
    req = EditRequest(prompt="The capital of France is", target="Lyon", subject="France")
    handle.save(str(tmp_path / "edits"), requests=[req])
    handle.remove()
    handle2 = apply_memoe(model, MEMoEConfig.from_dict(read_edit_meta(str(tmp_path / "edits"))["config"]), tokenizer)
    before = {k: v.detach().clone() for k, v in handle2.bypass.bypass_parameters().items()}
    assert not torch.equal(before["w_gate"], saved["w_gate"])  # a fresh gate: the load must bring the saved one
    meta = handle2.load_weights(str(tmp_path / "edits"))
    for name, t in saved.items():
        assert torch.equal(handle2.bypass.bypass_parameters()[name], t), name
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, edited, rtol=0, atol=0)
    assert meta["requests"][0]["target"] == "Lyon" and handle2.edited_requests == meta["requests"]


def test_metadata_names_the_backbone_and_is_json_only(tokenizer, tmp_path):
    model = _tiny_llama()
    handle = _edited(model, tokenizer)
    handle.edited_requests.append({"prompt": "p", "target": "t"})
    handle.save(str(tmp_path / "edits"), extra={"model": "tiny"})
    assert sorted(os.listdir(tmp_path / "edits")) == ["bypass.safetensors", "memoe.json"]
    with open(tmp_path / "edits" / "memoe.json", encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["format_version"] == 2 and meta["library_version"] == __version__ and meta["model"] == "tiny"
    assert meta["backbone"]["model_type"] == "llama" and meta["backbone"]["num_blocks"] == 3
    assert meta["host_fingerprint"] == host_fingerprint(transformer_blocks(model)[1].mlp.base_layer)
    assert meta["host_fingerprint"]["shapes"]["up_proj.weight"] == [80, 48]
    assert meta["tensors"]["w_gate"] == {"shape": [handle.bypass.num_experts, 96], "dtype": "float32"}
    assert meta["requests"] == [{"prompt": "p", "target": "t"}]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "edits" / "bypass.safetensors"), "pt") as f:
        assert set(f.keys()) == set(meta["tensors"])


def test_fingerprint_sees_one_changed_weight():
    mlp = transformer_blocks(_tiny_llama())[1].mlp
    fp = host_fingerprint(mlp)
    with torch.no_grad():
        mlp.down_proj.weight[3, 7] += 1e-6
    assert host_fingerprint(mlp)["sha256"] != fp["sha256"]


@pytest.mark.parametrize("other, message", [
    pytest.param(dict(seed=1), r"block 1's MLP weights differ \(sha256", id="same-shapes-other-weights"),
    pytest.param(dict(hidden=64), r"weights differ \(shapes", id="other-width"),
])
def test_another_backbone_is_refused_before_anything_changes(tokenizer, tmp_path, other, message):
    handle = _edited(_tiny_llama(), tokenizer)
    handle.save(str(tmp_path / "edits"))
    model2 = _tiny_llama(**other)
    handle2 = apply_memoe(model2, MEMoEConfig(layer=1, impl="reference", top_k=2, gate_bias=True), tokenizer)
    before = {k: v.detach().clone() for k, v in handle2.bypass.bypass_parameters().items()}
    with pytest.raises(ValueError, match=message):
        handle2.load_weights(str(tmp_path / "edits"))
    assert all(torch.equal(handle2.bypass.bypass_parameters()[k], v) for k, v in before.items())
    assert handle2.bank.subjects == []


def test_edit_for_another_block_is_refused(tokenizer, tmp_path):
    model = _tiny_llama()
    handle = _edited(model, tokenizer)
    handle.save(str(tmp_path / "edits"))
    handle.remove()
    handle2 = apply_memoe(model, MEMoEConfig(layer=2, top_k=2, gate_bias=True), tokenizer)
    with pytest.raises(ValueError, match="for block 1, this bypass is in block 2"):
        handle2.load_weights(str(tmp_path / "edits"))


def test_format_1_edits_still_load(tokenizer, tmp_path):
    model = _tiny_llama()
    handle = _edited(model, tokenizer)
    handle.save(str(tmp_path / "edits"))
    path = tmp_path / "edits" / "memoe.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    old = {k: meta[k] for k in ("config", "layer", "subjects")}
    path.write_text(json.dumps({"format_version": 1, **old}), encoding="utf-8")
    enc = _enc(tokenizer)
    with torch.no_grad():
        edited = model(**enc).logits
    handle.remove()
    handle2 = apply_memoe(model, MEMoEConfig.from_dict(old["config"]), tokenizer)
    handle2.load_weights(str(tmp_path / "edits"))
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, edited, rtol=0, atol=0)
    path.write_text(json.dumps({"format_version": 7, **old}), encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported format_version 7"):
        read_edit_meta(str(tmp_path / "edits"))


def test_save_with_a_non_json_value_writes_nothing(tokenizer, tmp_path):
    handle = _edited(_tiny_llama(), tokenizer)
    with pytest.raises(TypeError):
        handle.save(str(tmp_path / "edits"), extra={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_cli_generate_refuses_edits_from_another_model(tokenizer, tmp_path, capsys):
    """`memoe-fast generate --edits` with another backbone: exit status 2, the message says what differs."""
    from memoe_fast.cli import main

    folders = {}
    for name, seed in (("a", 0), ("b", 1)):
        folders[name] = str(tmp_path / name)
        _tiny_llama(seed).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    handle = _edited(_tiny_llama(0), tokenizer)
    handle.save(str(tmp_path / "edits"), extra={"model": folders["a"]})
    before = sorted(os.listdir(tmp_path))
    assert main(["generate", "--edits", str(tmp_path / "edits"), "--model", folders["b"], "--device", "cpu",
                 "--max-new-tokens", "2", "The capital of France is"]) == 2
    err = capsys.readouterr().err
    assert "made on another backbone" in err and "MLP weights differ" in err
    assert sorted(os.listdir(tmp_path)) == before
    assert main(["generate", "--edits", str(tmp_path / "edits"), "--device", "cpu", "--max-new-tokens", "2",
                 "The capital of France is"]) == 0


def test_checkpoints_resume_the_last_finished_batch(tokenizer, tmp_path):
    from memoe_fast.io import load_checkpoint, read_latest, run_fingerprint, save_checkpoint

    model = _tiny_llama()
    handle = _edited(model, tokenizer)
    run = run_fingerprint(handle.config.to_dict(), [{"prompt": "p", "target": "t"}])
    ckpt = str(tmp_path / "ckpt")
    assert load_checkpoint(handle, ckpt, run) is None  # nothing to resume yet
    save_checkpoint(handle, ckpt, 0, {"losses": [[1.0]]}, run)
    with torch.no_grad():
        handle.bypass.w2.add_(1.0)
    handle.add_subjects(["Paris"])
    torch.manual_seed(123)
    save_checkpoint(handle, ckpt, 1, {"losses": [[1.0], [0.5]]}, run)
    expected_rng = torch.get_rng_state()
    saved = {k: v.detach().clone() for k, v in handle.bypass.bypass_parameters().items()}
    assert sorted(os.listdir(ckpt)) == ["batch-00001", "latest.json"]  # the older one is gone
    assert read_latest(ckpt)["batch"] == 1
    # A non-finite weight never becomes the latest checkpoint.
    with torch.no_grad():
        handle.bypass.w2[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="w2 has non-finite values; the last good checkpoint is kept"):
        save_checkpoint(handle, ckpt, 2, {}, run)
    assert read_latest(ckpt)["batch"] == 1
    handle.remove()

    torch.manual_seed(0)
    fresh = apply_memoe(model, MEMoEConfig(layer=1, impl="reference", top_k=2, gate_bias=True), tokenizer)
    got = load_checkpoint(fresh, ckpt, run)
    assert got == {"batch": 1, "state": {"losses": [[1.0], [0.5]]}}
    assert all(torch.equal(fresh.bypass.bypass_parameters()[k], v) for k, v in saved.items())
    assert fresh.bank.subjects == ["France", "Barack Obama", "Paris"]
    assert torch.equal(torch.get_rng_state(), expected_rng)
    other = run_fingerprint(handle.config.to_dict(), [{"prompt": "p", "target": "u"}])
    with pytest.raises(ValueError, match="another run"):
        load_checkpoint(fresh, ckpt, other)
