"""EasyEdit's calling convention: request dicts, hparams YAML, apply_memoe_to_model, restore."""
import json
import os

import pytest
import torch
import yaml

from memoe_fast import MEMoEConfig, MEMoEHyperParams, apply_memoe_to_model
from memoe_fast.bypass import MEMoEBypass
from memoe_fast.datasets import DataFormatError, load_counterfact
from memoe_fast.easyedit import requests_from_dicts
from memoe_fast.integration import transformer_blocks

NESTED = {
    "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English", "subject": "Danielle Darrieux",
    "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux's mother tongue is",
    "locality": {"neighborhood": {"prompt": "The mother tongue of Léon Blum is", "ground_truth": "French"}},
    "portability": {"reasoning": {"prompt": "Danielle Darrieux's first language is", "ground_truth": "English"}},
}


def _write(tmp_path, records):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def test_counterfact_keeps_the_nested_locality(tmp_path):
    (req,) = load_counterfact(_write(tmp_path, [NESTED]))
    assert (req.locality_prompt, req.locality_answer) == ("The mother tongue of Léon Blum is", "French")
    assert req.rephrase == ["Danielle Darrieux's mother tongue is"] and req.ground_truth == "French"


@pytest.mark.parametrize("change, message", [
    pytest.param({"locality": {"neighborhood": {"prompt": "x"}}}, "'locality.neighborhood.ground_truth' is missing",
                 id="no-answer"),
    pytest.param({"locality": {"neighborhood": "x"}}, "'locality.neighborhood' must be a JSON object", id="not-object"),
    pytest.param({"locality": ["x"]}, "'locality' must be a JSON object", id="list"),
    pytest.param({"locality_prompt": "a", "locality_ground_truth": "b"}, "both give the locality prompt", id="both-layouts"),
    pytest.param({"portability": "x"}, "'portability' must be a JSON object", id="portability"),
])
def test_counterfact_nested_locality_errors_name_the_field(tmp_path, change, message):
    with pytest.raises(DataFormatError, match=message):
        load_counterfact(_write(tmp_path, [{**NESTED, **change}]))


def test_counterfact_nested_locality_names_the_entries_it_drops(tmp_path):
    extra = dict(NESTED, locality={**NESTED["locality"], "forgetfulness": {"prompt": "p", "ground_truth": "g"}})
    with pytest.warns(UserWarning, match="forgetfulness"):
        (req,) = load_counterfact(_write(tmp_path, [extra]))
    assert req.locality_answer == "French"


# EasyEdit's calling style, end to end.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_YAML = os.path.join(ROOT, "hparams", "MEMoE", "smollm2.yaml")

REQUESTS = [
    NESTED,
    {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome", "subject": "Eiffel Tower",
     "ground_truth": "Paris", "rephrase_prompt": ["Where is the Eiffel Tower? In the city of"],
     "locality": {"neighborhood": {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}}},
]


def _hparams_file(tmp_path, **changes):
    with open(SMOLLM2_YAML, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data.update(changes)
    path = tmp_path / "memoe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, experts", [("smollm2.yaml", MEMoEConfig().num_experts), ("llama-7b.yaml", 4)])
def test_shipped_hparams_load(name, experts):
    hp = MEMoEHyperParams.from_hparams(os.path.join(ROOT, "hparams", "MEMoE", name))
    cfg = hp.to_config()
    assert hp.alg_name == "MEMoE" and len(hp.layers) == 1 and cfg.layer == hp.layers[0]
    assert (cfg.num_experts, cfg.top_k) == (experts, 1)  # the library's default; 4 fits 24 GB at 7B
    assert MEMoEHyperParams.from_hparams(os.path.join(ROOT, "hparams", "MEMoE", name[:-5])) == hp  # EasyEdit drops .yaml


@pytest.mark.parametrize("change, message", [
    pytest.param({"experts": 4}, "unknown key 'experts'", id="unknown"),
    pytest.param({"alg_name": "ROME"}, "alg_name must be 'MEMoE'", id="alg"),
    pytest.param({"layers": [3, 4]}, "layers must be a list with one block index", id="two-layers"),
    pytest.param({"top_k": 9}, "top_k must be in", id="top_k"),
    pytest.param({"lr": "fast"}, "'lr' must be a number", id="lr-string"),
    pytest.param({"num_steps": 2.5}, "'num_steps' must be an integer", id="steps-float"),
    pytest.param({"scope": "yes"}, "'scope' must be true or false", id="scope"),
    pytest.param({"num_steps": 3, "steps": 4}, "alias both given", id="alias-twice"),
    pytest.param({"mode": "sequential"}, "batch_size", id="sequential-no-batch"),
])
def test_hparams_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        MEMoEHyperParams.from_hparams(_hparams_file(tmp_path, **change))


def test_hparams_missing_key_and_yaml_quirks(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("alg_name: MEMoE\nlayers: [1]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing key.*model_name"):
        MEMoEHyperParams.from_hparams(str(path))
    path.write_text("alg_name: MEMoE\nmodel_name: m\nlayers: 2\nlr: 5e-3\n", encoding="utf-8")  # YAML 1.1: '5e-3' is a str
    hp = MEMoEHyperParams.from_hparams(str(path))
    assert hp.to_config().lr == 5e-3 and hp.layers == [2]
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        MEMoEHyperParams.from_hparams(str(path))
    with pytest.raises(FileNotFoundError, match="no such hparams file"):
        MEMoEHyperParams.from_hparams(str(tmp_path / "none.yaml"))


def test_request_dicts_convert_with_named_errors():
    a, b = requests_from_dicts(REQUESTS)
    assert (a.prompt, a.target, a.subject, a.ground_truth) == (NESTED["prompt"], "English", "Danielle Darrieux", "French")
    assert a.locality_prompt == "The mother tongue of Léon Blum is" and b.rephrase == ["Where is the Eiffel Tower? In the city of"]
    for bad, message in (({**NESTED, "target_new": 3}, "record 0: field 'target_new' must be a non-empty string"),
                         ({k: v for k, v in NESTED.items() if k != "subject"}, "record 0: field 'subject' is missing"),
                         ({**NESTED, "rephrase_prompt": ["ok", 1]}, "rephrase_prompt\\[1\\]"),
                         ({**NESTED, "target_new": "  "}, "record 0: field 'target_new' is empty")):
        with pytest.raises(DataFormatError, match=message):
            requests_from_dicts([bad])
    with pytest.raises(DataFormatError, match="non-empty list"):
        requests_from_dicts([])


@pytest.mark.slow
def test_easyedit_style_edit_metrics_restore(embedded, tmp_path):
    """YAML + request dicts -> apply_memoe_to_model -> metrics -> restore gives the unedited outputs."""
    model, tok = embedded
    hparams = MEMoEHyperParams.from_hparams(_hparams_file(tmp_path, num_steps=8, stop_loss=0.0))
    enc = tok([r["prompt"] for r in REQUESTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
    original = transformer_blocks(model)[hparams.layers[0]].mlp
    edited, restore = apply_memoe_to_model(model, tok, REQUESTS, hparams, evaluate=True)
    assert edited is model and isinstance(transformer_blocks(model)[hparams.layers[0]].mlp, MEMoEBypass)
    post = restore.result["post"]
    assert post["reliability"] > restore.result["pre"]["reliability"]
    assert 0.0 <= post["locality"] <= 1.0 and len(restore.result["losses"][0]) == 8
    with torch.no_grad():
        assert not torch.allclose(model(**enc).logits, before), "the edits must change the edited prompts"
    assert restore() is model
    assert transformer_blocks(model)[hparams.layers[0]].mlp is original
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before, rtol=0, atol=0)


@pytest.mark.slow
def test_easyedit_copy_and_sequential_calls(embedded, tmp_path):
    model, tok = embedded
    hparams = MEMoEHyperParams.from_hparams(_hparams_file(tmp_path, num_steps=2, stop_loss=0.0))
    layer = hparams.layers[0]
    original = transformer_blocks(model)[layer].mlp
    edited, restore = apply_memoe_to_model(model, tok, REQUESTS[:1], hparams, copy=True)
    assert edited is not model and transformer_blocks(model)[layer].mlp is original
    # A second call continues the bypass already there (EasyEdit's sequential editing) ...
    again, restore2 = apply_memoe_to_model(edited, tok, REQUESTS[1:], hparams)
    assert restore2.handle is restore.handle and restore.handle.bank.subjects == ["Danielle Darrieux", "Eiffel Tower"]
    # ... unless keep_original_weight asks for a fresh start.
    _, restore3 = apply_memoe_to_model(edited, tok, REQUESTS[1:], hparams, keep_original_weight=True)
    assert restore3.handle is not restore.handle and restore3.handle.bank.subjects == ["Eiffel Tower"]
    restore3()
    assert not isinstance(transformer_blocks(edited)[layer].mlp, MEMoEBypass)


def test_hparams_easyedit_fields(tmp_path):
    hp = MEMoEHyperParams.from_hparams(SMOLLM2_YAML)
    assert (hp.max_length, hp.model_parallel, hp.fp16, hp.torch_device) == (40, False, False, "cpu")
    assert MEMoEHyperParams.from_dict({"alg_name": "MEMoE", "model_name": "m", "layers": [1], "device": 0}).torch_device == "cuda:0"
    for change, message in (({"max_length": 0}, "max_length"), ({"fp16": "no"}, "fp16 must be true or false")):
        with pytest.raises(ValueError, match=message):
            MEMoEHyperParams.from_hparams(_hparams_file(tmp_path, **change))
