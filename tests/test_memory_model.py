"""The fast editor's memory model: its terms add up and scale as the editor's tensors do, the micro-batch
it picks respects the budget, it matches a measured peak on a small model, and the CLI's --memory-budget."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from memoe_fast import MEMoEConfig
from memoe_fast.cli import main, pick_for_budget
from memoe_fast.datasets import EditRequest
from memoe_fast.editing.memory import (GiB, LLAMA2_7B, MiB, BackboneShape, backbone_bytes, parse_size,
                                       pick_micro_batch, predict_peak)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = BackboneShape(hidden=256, ffn=704, layers=6, heads=4, kv_heads=2, vocab=5000)


def _tiny_llama(tied: bool, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), **over},
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kw", [
    pytest.param(dict(device="cpu", micro_batch=64), id="cpu-one-chunk"),
    pytest.param(dict(device="cpu", micro_batch=7), id="cpu-chunks"),
    pytest.param(dict(device="cuda", micro_batch=64, expert_dtype="bfloat16"), id="cuda-bf16"),
    pytest.param(dict(device="cuda", micro_batch=3), id="cuda-chunks"),
])
def test_terms_add_up(kw):
    pred = predict_peak(SMALL, 40, **kw)
    assert pred.total == sum(pred.terms.values())
    assert pred.increase == pred.total - pred.terms["backbone_weights"]
    assert pred.terms == pred.phases[pred.phase]
    other = next(p for name, p in pred.phases.items() if name != pred.phase)
    assert pred.other_phase_total == sum(other.values()) <= pred.total
    assert all(v >= 0 for v in pred.terms.values())
    assert pred.chunks == -(-40 // pred.micro_batch)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_backbone_bytes_equal_the_models_tensors(tied):
    model = _tiny_llama(tied)
    shape = BackboneShape.from_model(model)
    assert shape.tied_embeddings == tied and not shape.int8
    assert backbone_bytes(shape) == sum(p.numel() * p.element_size() for p in model.parameters())
    half = BackboneShape(**{**shape.__dict__, "dtype": "bfloat16"})
    assert backbone_bytes(half) * 2 == backbone_bytes(shape)


def test_int8_backbone_is_one_byte_per_linear_weight_plus_row_scales():
    model = _tiny_llama(False)
    f32 = BackboneShape.from_model(model)
    int8 = BackboneShape(**{**f32.__dict__, "int8": True})
    linears = [m for blk in model.model.layers for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    assert backbone_bytes(f32) - backbone_bytes(int8) == weights * 4 - (weights + 4 * rows)


def test_frozen_prefix_scales_with_edits_and_activations_with_micro_batch():
    kw = dict(device="cuda", prompt_tokens=13, target_tokens=4)
    one, ten = predict_peak(SMALL, 40, micro_batch=8, **kw), predict_peak(SMALL, 400, micro_batch=8, **kw)
    assert ten.terms["frozen_prefix"] == pytest.approx(10 * one.terms["frozen_prefix"], rel=1e-6)
    # One micro-batch's graph is alive at a time: the edits count only through the prefix.
    same = ("upper_block_activations", "bypass_activations", "lm_head_at_targets", "gradients", "adam_state")
    for term in same:
        assert ten.phases["head backward"][term] == one.phases["head backward"][term], term
    a, b = predict_peak(SMALL, 400, micro_batch=8, **kw), predict_peak(SMALL, 400, micro_batch=16, **kw)
    for term in ("upper_block_activations", "bypass_activations", "lm_head_at_targets"):
        assert b.phases["head backward"][term] == pytest.approx(2 * a.phases["head backward"][term], rel=1e-6), term
    assert b.terms["adam_state"] == a.terms["adam_state"]


def test_expert_dtype_and_trained_gate_scale_the_optimiser_terms():
    f32 = predict_peak(SMALL, 40, device="cuda", expert_dtype="float32")
    bf16 = predict_peak(SMALL, 40, device="cuda", expert_dtype="bfloat16")
    gate = 4 * 2 * SMALL.hidden * 4  # E=4 rows over concat(x, anchor), fp32
    assert f32.terms["experts_and_gate"] - gate == 2 * (bf16.terms["experts_and_gate"] - gate)
    assert f32.terms["adam_state"] == 2 * bf16.terms["adam_state"]
    trained = predict_peak(SMALL, 40, device="cuda", expert_dtype="float32", gate_trains=True)
    assert trained.terms["adam_state"] - f32.terms["adam_state"] == 2 * gate


def test_cpu_only_terms():
    cpu = predict_peak(SMALL, 40, device="cpu")
    cuda = predict_peak(SMALL, 40, device="cuda")
    no_pack = predict_peak(SMALL, 40, device="cpu", prepack=False)
    assert cuda.terms["prepacked_weights"] == 0 == no_pack.terms["prepacked_weights"]
    upper = SMALL.layers - SMALL.layers // 2 - 1
    d, f, kv = SMALL.hidden, SMALL.ffn, SMALL.kv_dim
    assert cpu.terms["prepacked_weights"] == 4 * (upper * (2 * d * d + 2 * d * kv + 3 * d * f) + SMALL.vocab * d)
    # The grouped CPU experts save what the Triton ones save and write each weight gradient once (no
    # concatenated [gate; up] copy), so the bypass's terms do not depend on the device.
    for phase in ("head backward", "bypass backward"):
        assert cpu.phases[phase]["bypass_activations"] == cuda.phases[phase]["bypass_activations"]
    e_bytes = 4 * 3 * d * f * 4
    assert cpu.phases["bypass backward"]["gradients"] == cuda.phases["bypass backward"]["gradients"] >= e_bytes


@pytest.mark.parametrize("bad", [dict(n_edits=0), dict(micro_batch=0), dict(device="mps"), dict(layer=6),
                                 dict(expert_dtype="int8"), dict(prompt_tokens=0), dict(keys=-1),
                                 dict(cached_edits=9)],
                         ids=lambda d: next(iter(d)))
def test_bad_arguments_name_the_field(bad):
    kw = {"n_edits": 10, **bad}
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        predict_peak(SMALL, **kw)


def test_key_gate_term_is_the_bypass_key_store():
    # The key gate's store as the bypass holds it after a run's keys and subject subspaces are added.
    from memoe_fast.bypass import MEMoEBypass

    model = _tiny_llama(False)
    d, keys, subjects, rank = model.config.hidden_size, 7, 3, 5
    bypass = MEMoEBypass(model.model.layers[1].mlp, MEMoEConfig(num_experts=2))
    bypass.add_subject_basis(torch.arange(subjects), torch.linalg.qr(torch.randn(subjects, d, rank)).Q.transpose(1, 2))
    bypass.add_keys(torch.randn(keys, d), torch.arange(keys) % subjects)
    held = sum(t.numel() * t.element_size() for t in (bypass.keys, bypass.key_proj, bypass.key_subject,
                                                      bypass.key_basis_idx, bypass.key_basis, bypass.basis_subject))
    shape = BackboneShape.from_model(model)
    with_keys = predict_peak(shape, 4, keys=keys, key_subjects=subjects, key_rank=rank)
    assert with_keys.terms["key_gate"] == held
    assert predict_peak(shape, 4).terms["key_gate"] == 0


def test_every_update_groups_prefix_is_cached():
    # 1000 edits in update groups of 100: activations of one group, the frozen prefix of all ten.
    one = predict_peak(SMALL, 100, micro_batch=50)
    ten = predict_peak(SMALL, 100, micro_batch=50, cached_edits=1000)
    assert ten.terms["frozen_prefix"] == 10 * one.terms["frozen_prefix"]
    assert {k: v for k, v in ten.terms.items() if k != "frozen_prefix"} == \
        {k: v for k, v in one.terms.items() if k != "frozen_prefix"}


@pytest.mark.parametrize("n", [30, 100, 1000])
def test_pick_micro_batch_respects_the_budget(n):
    kw = dict(num_experts=4, expert_dtype="bfloat16", device="cuda")
    budget = 22 * GiB
    mb = pick_micro_batch(budget, LLAMA2_7B, n, **kw)
    assert 1 <= mb <= n
    assert predict_peak(LLAMA2_7B, n, micro_batch=mb, **kw).total <= budget
    if mb < n:
        assert predict_peak(LLAMA2_7B, n, micro_batch=mb + 1, **kw).total > budget


def test_pick_micro_batch_is_monotone_in_the_budget():
    kw = dict(num_experts=4, expert_dtype="bfloat16", device="cuda")
    picks = [pick_micro_batch(int(g * GiB), LLAMA2_7B, 1000, **kw) for g in (14, 16, 18, 20, 22, 26, 40)]
    assert picks == sorted(picks) and picks[0] < picks[-1]


def test_pick_micro_batch_fails_clearly_below_the_smallest_peak():
    need = predict_peak(LLAMA2_7B, 100, micro_batch=1, device="cuda").total
    with pytest.raises(ValueError, match="below the predicted peak at micro-batch 1"):
        pick_micro_batch(need - 1, LLAMA2_7B, 100, device="cuda")
    assert pick_micro_batch(need, LLAMA2_7B, 100, device="cuda") >= 1


@pytest.mark.parametrize("text, expected", [
    ("22GiB", 22 * GiB), ("22 GiB", 22 * GiB), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)),
    ("24GB", 24 * 10**9), ("1000", 1000), ("64k", 64 * 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "22XB", "-1GiB", "0", "nan GiB", "twenty"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size(text)


@pytest.mark.parametrize("argv, message", [
    (["--memory-budget", "lots"], "--memory-budget: not a memory size: 'lots'"),
    (["--memory-budget", "8GiB", "--editor", "reference"], "needs --editor fast"),
])
def test_cli_rejects_a_bad_budget_before_loading(argv, message, capsys, tmp_path):
    out = tmp_path / "o"
    assert main(["edit", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_budget_picks_the_micro_batch(tokenizer_free_requests):
    model = _tiny_llama(False, vocab_size=400)
    tok = _WordTokenizer()
    args = argparse.Namespace(mode="batch", batch_size=None, no_prepack=False)
    config = MEMoEConfig(num_experts=3, layer=1)
    shape = BackboneShape.from_model(model)
    # The requests have 6 prompt tokens (with BOS) and 2 target tokens each; on the CPU with packed copies.
    # The default key gate keeps 6 keys and 6 subject subspaces of min(32, 64 / 4) directions.
    kw = dict(prompt_tokens=6, target_tokens=2, device="cpu", prepack=True, num_experts=3, layer=1,
              keys=6, key_subjects=6, key_rank=16, cached_edits=6)
    budget = predict_peak(shape, 6, micro_batch=2, **kw).total
    got = pick_for_budget(budget, model, tok, tokenizer_free_requests, config, args)
    assert got["micro_batch"] == pick_micro_batch(budget, shape, 6, **kw)
    assert got["predicted_peak_bytes"] == predict_peak(shape, 6, micro_batch=got["micro_batch"], **kw).total <= budget
    big = pick_for_budget(64 * GiB, model, tok, tokenizer_free_requests, config, args)
    assert big["micro_batch"] == len(tokenizer_free_requests)
    json.dumps(big)  # goes into results.json


def test_cli_budget_too_small_names_the_expert_count_that_fits(tokenizer_free_requests):
    # A budget between the peaks of 2 and 3 experts at micro-batch 1: the error names --experts 2.
    model = _tiny_llama(False, vocab_size=400)
    tok = _WordTokenizer()
    args = argparse.Namespace(mode="batch", batch_size=None, no_prepack=False)
    shape = BackboneShape.from_model(model)
    kw = dict(prompt_tokens=6, target_tokens=2, device="cpu", prepack=True, layer=1,
              keys=6, key_subjects=6, key_rank=16, cached_edits=6)
    two, three = (predict_peak(shape, 6, micro_batch=1, num_experts=e, **kw).total for e in (2, 3))
    budget = (two + three) // 2
    fit = pick_micro_batch(budget, shape, 6, num_experts=2, **kw)
    with pytest.raises(ValueError, match=rf"with 3 experts; --experts 2 fits \(micro-batch {fit}, "):
        pick_for_budget(budget, model, tok, tokenizer_free_requests, MEMoEConfig(num_experts=3, layer=1), args)
    with pytest.raises(ValueError, match=r"below the predicted peak at micro-batch 1 \([0-9.]+ GiB\)$"):
        pick_for_budget(two // 2, model, tok, tokenizer_free_requests, MEMoEConfig(num_experts=3, layer=1), args)


def test_cli_budget_counts_the_chat_forms_and_the_update_groups():
    # Questions are trained twice (as asked and as a chat turn): 12 sequences of 6 and 7 prompt tokens,
    # 12 keys; with --update-batch 2 each update trains 4 of them and all 12 stay cached.
    model = _tiny_llama(False, vocab_size=400)
    tok = _ChatWordTokenizer()
    args = argparse.Namespace(mode="batch", batch_size=None, no_prepack=False)
    questions = [EditRequest(prompt=f"Where is tower {i} built?", target="in Paris", subject=f"tower {i}",
                             case_id=str(i)) for i in range(6)]
    shape = BackboneShape.from_model(model)
    kw = dict(prompt_tokens=6.5, target_tokens=2, device="cpu", prepack=True, num_experts=3, layer=1,
              keys=12, key_subjects=6, key_rank=16)
    got = pick_for_budget(64 * GiB, model, tok, questions, MEMoEConfig(num_experts=3, layer=1, update_batch=0), args)
    assert got["sequences"] == 12
    assert got["predicted_peak_bytes"] == predict_peak(shape, 12, micro_batch=12, cached_edits=12, **kw).total
    grouped = pick_for_budget(64 * GiB, model, tok, questions, MEMoEConfig(num_experts=3, layer=1, update_batch=2), args)
    assert grouped["sequences"] == 4
    assert grouped["predicted_peak_bytes"] == predict_peak(shape, 4, micro_batch=4, cached_edits=12, **kw).total
    no_chat = pick_for_budget(64 * GiB, model, tok, questions,
                              MEMoEConfig(num_experts=3, layer=1, update_batch=0, chat_augment=False), args)
    assert no_chat["sequences"] == 6 and no_chat["prediction"]["terms"]["key_gate"] < got["prediction"]["terms"]["key_gate"]
    # Each edit after two context texts (the model writes them): two more sequences and keys per edit.
    ctx = pick_for_budget(64 * GiB, model, tok, questions, MEMoEConfig(num_experts=3, layer=1, update_batch=0,
                                                                        chat_augment=False, context_prefixes=2,
                                                                        context_tokens=3), args)
    assert ctx["sequences"] == 18
    key_bytes = 2 * shape.hidden * 4 + 16
    assert ctx["prediction"]["terms"]["key_gate"] - no_chat["prediction"]["terms"]["key_gate"] == 12 * key_bytes


class _WordTokenizer:
    """One id per word, BOS first: enough for the token counts the CLI averages."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [hash(w) % 300 + 3 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


@pytest.fixture
def tokenizer_free_requests():
    return [EditRequest(prompt=f"Where is tower {i} built", target="in Paris", subject=f"tower {i}", case_id=str(i))
            for i in range(6)]


MEASURED_TOLERANCE = 0.10  # |predicted - measured| / measured, for the increase over the loaded model


def test_prediction_matches_a_measured_peak():
    """The embedded SmolLM2 editing 8 demo edits in a fresh process: the RSS high-water mark over the loaded
    model (benchmarks/memory_model.py explains the measurement) against the prediction for that run. (A
    tiny from_config LLaMA, hidden 512 and vocabulary 4000, came out 13% under the prediction: the model's
    fixed terms were fitted on real backbones; benchmarks/RESULTS.md has the validated cases.)"""
    spec = dict(case="smollm2", n=8, experts=4, micro_batch=4, steps=2)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_model.py"), "--measure",
                           json.dumps(spec)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    inputs = dict(r["inputs"])
    predicted = predict_peak(BackboneShape(**r["shape"]), inputs.pop("n_edits"), **inputs).increase
    measured = r["increase_bytes"]
    assert abs(predicted - measured) <= MEASURED_TOLERANCE * measured, (predicted / MiB, measured / MiB, r)


class _ChatWordTokenizer(_WordTokenizer):
    """A word tokenizer with a chat template: a user turn is the question between two marker words."""

    chat_template = "user-turn"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user> " + messages[0]["content"] + " <assistant>"

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(map(str, ids))
