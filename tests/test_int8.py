"""MEMoE on a bitsandbytes int8 backbone (CPU): a tiny random LLaMA saved and reloaded with
``load_in_8bit=True``. Checks that the bypass starts as the identity on the 8-bit model, that the
experts copy the dequantised host, that an edit takes, and that the int8 host is never touched."""
from __future__ import annotations

import warnings

import pytest
import torch

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.datasets import EditRequest
from memoe_fast.editing.editor import MEMoEEditor
from memoe_fast.editing.fast_editor import FastMEMoEEditor
from memoe_fast.testing import TOLERANCES, assert_close, require_module

bnb = require_module("bitsandbytes", "the 8-bit backbone")

EDITORS = {"reference": MEMoEEditor, "fast": FastMEMoEEditor}
# bitsandbytes warns on every CPU int8 matmul that fp32 inputs are cast to fp16.
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


class _NoEntities:
    """Stand-in for a spaCy ``Doc`` with no entities and no parse: anchors then come from the edited
    subjects (rule 1) or the whole text (rule 4), so these tests do not depend on the NER model."""

    ents = ()
    noun_chunks = ()

    def has_annotation(self, _name):
        return False


def no_ner(_text):
    return _NoEntities()


@pytest.fixture(scope="session")
def int8_tokenizer():
    """The embedded SmolLM2 tokenizer alone (no model load; converted from the GGUF once per machine)."""
    from transformers import AutoTokenizer

    from memoe_fast.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, int8_tokenizer):
    """A tiny random LLaMA over the tokenizer's vocabulary, saved in float32; also returns its MLP weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(int8_tokenizer), hidden_size=64, intermediate_size=144, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=int8_tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    int8_tokenizer.save_pretrained(path)  # a complete model folder, as load_model expects
    mlps = [{n: getattr(b.mlp, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
            for b in model.model.layers]
    return str(path), mlps


def load_int8(path):
    from memoe_fast.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_model(path, dtype=torch.float32, load_in_8bit=True, device="cpu")
    return model


def int8_state(linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight and its row scales (bitsandbytes moves SCB from the weight to ``state`` on the
    first forward)."""
    scb = getattr(linear.weight, "SCB", None)
    if scb is None:
        scb = linear.state.SCB
    return linear.weight.data.clone(), scb.clone()


def requests_for(tok) -> list[EditRequest]:
    """Two facts about invented subjects whose targets are random tokens: nothing a random model knows."""
    g = torch.Generator().manual_seed(1)
    facts = [("Zorblax Quint", "Zorblax Quint was born in"), ("Mirela Tovanska", "The employer of Mirela Tovanska is")]
    out = []
    for i, (subject, prompt) in enumerate(facts):
        target = tok.decode(torch.randint(1000, 20000, (2,), generator=g).tolist()).strip()
        out.append(EditRequest(prompt=prompt, target=target, subject=subject,
                               rephrase=[prompt.replace(subject, subject + ",")],
                               locality_prompt="The colour of the sky is", locality_answer="blue", case_id=str(i)))
    return out


def test_load_model_int8(tiny_llama_dir):
    model = load_int8(tiny_llama_dir[0])
    lin = model.model.layers[0].mlp.gate_proj
    assert isinstance(lin, bnb.nn.Linear8bitLt) and lin.weight.dtype == torch.int8
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("expert_dtype", [None, "bfloat16"], ids=["fp32_experts", "bf16_experts"])
def test_int8_init_is_identity(tiny_llama_dir, int8_tokenizer, expert_dtype):
    path, _ = tiny_llama_dir
    model = load_int8(path)
    ids = int8_tokenizer(["Zorblax Quint was born in", "The colour of the sky is blue"],
                         return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits
    original = model.model.layers[2].mlp
    # Scope off: every sequence goes through the experts, so the identity is not a shortcut.
    handle = apply_memoe(model, MEMoEConfig(layer=2, anchor_scope=False, expert_dtype=expert_dtype), int8_tokenizer,
                         nlp=no_ner)
    dtype = torch.float32 if expert_dtype is None else getattr(torch, expert_dtype)
    assert all(p.dtype == dtype and p.requires_grad for n, p in handle.bypass.bypass_parameters().items() if n != "w_gate")
    with torch.no_grad():
        edited = model(**ids).logits
        with handle.disabled():
            disabled = model(**ids).logits
    # Exact: the zero down-projections add exactly zero to the host output.
    assert torch.equal(edited, base), "logits at init"
    assert torch.equal(disabled, base), "logits disabled"
    assert handle.remove().model.layers[2].mlp is original
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, base), "logits after remove"


@pytest.mark.parametrize("expert_dtype", [None, "bfloat16"], ids=["fp32_experts", "bf16_experts"])
def test_int8_experts_copy_dequantised_host(tiny_llama_dir, expert_dtype):
    path, float_mlps = tiny_llama_dir
    model = load_int8(path)
    host = model.model.layers[2].mlp
    handle = apply_memoe(model, MEMoEConfig(layer=2, expert_dtype=expert_dtype))
    bypass = handle.bypass
    atol, rtol = TOLERANCES[bypass.w1.dtype]
    for name, proj in (("w1", "gate_proj"), ("w3", "up_proj")):
        lin = getattr(host, proj)
        cb, scb = int8_state(lin)
        # bitsandbytes' own dequantisation is the yardstick for the int8 -> float mapping.
        deq = bnb.functional.int8_vectorwise_dequant(cb, scb).float()
        orig = float_mlps[2][proj]
        # bitsandbytes quantises the fp16-rounded weight, row-wise absmax, round to nearest: off by at most
        # half an int8 step (absmax / 254) plus the fp16 rounding of the weight (2^-11 relative).
        step = orig.abs().amax(dim=1, keepdim=True) / 254 + orig.abs() * 2 ** -10
        assert ((deq - orig).abs() <= step + 1e-7).all(), f"{proj}: bitsandbytes dequantisation off the int8 grid"
        for e in range(bypass.config.num_experts):
            assert_close(f"{name}[{e}] vs bitsandbytes dequant", getattr(bypass, name)[e], deq, atol, rtol)
            err = (getattr(bypass, name)[e].float() - orig).abs()
            bound = step + 1e-7 + (0 if expert_dtype is None else orig.abs() * 2 ** -8 + deq.abs() * 2 ** -8)
            assert (err <= bound).all(), f"{name}[{e}]: max error {err.max().item():.3g} beyond the int8 rounding step"
    assert torch.count_nonzero(bypass.w2) == 0


@pytest.mark.parametrize("editor_name", list(EDITORS))
def test_int8_edit_takes_and_host_untouched(tiny_llama_dir, int8_tokenizer, editor_name):
    path, _ = tiny_llama_dir
    model = load_int8(path)
    linears = {f"{i}.{n}": getattr(b.mlp, n) for i, b in enumerate(model.model.layers)
               for n in ("gate_proj", "up_proj", "down_proj")}
    before = {k: int8_state(v) for k, v in linears.items()}
    editor = EDITORS[editor_name](model, int8_tokenizer, MEMoEConfig(layer=2, lr=2e-2, steps=30, seed=0), nlp=no_ner)
    requests = requests_for(int8_tokenizer)
    result = editor.edit(requests, mode="batch")
    assert result["pre"]["reliability"] < 0.5
    assert result["post"]["reliability"] == 1.0
    assert result["post"]["locality"] == 1.0  # the locality prompt names no edited subject: out of scope
    assert result["losses"][0][-1] < result["losses"][0][0]
    for key, lin in linears.items():
        cb, scb = int8_state(lin)
        assert lin.weight.dtype == torch.int8 and not lin.weight.requires_grad and lin.weight.grad is None, key
        assert torch.equal(cb, before[key][0]) and torch.equal(scb, before[key][1]), f"{key}: int8 host changed"
    for name, p in editor.handle.bypass.bypass_parameters().items():
        assert p.dtype == torch.float32 and p.requires_grad, name
    assert torch.count_nonzero(editor.handle.bypass.w2) > 0
