"""The command line: bad input fails clearly with nothing written; a small real run writes its results."""
import json
import math
import os

import pytest

from memoe_fast.cli import main


ZSRE = {"src": "q?", "alt": "a", "subject": "s", "rephrase": "r?", "loc": "l", "loc_ans": "x"}


def _zsre(**changes):
    """Two ZsRE records, the second with ``changes`` (None removes a field)."""
    second = {k: v for k, v in {**ZSRE, **changes}.items() if v is not None}
    return json.dumps([ZSRE, second])


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse rejects a value of the wrong type itself, with status 2
        return exc.code


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded: this check must come before")

    monkeypatch.setattr("memoe_fast.models.load_model", forbidden)


# argv: "{data}" stands for the data file, written from `data` (None: no file); `message`: what stderr must say.
@pytest.mark.parametrize("case", [
    pytest.param(dict(argv=["--data", "zsre:{data}"], data=None, message="data.json: no such data file"),
                 id="missing-file"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data="[{", message="data.json: not valid JSON"), id="not-json"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data=json.dumps(ZSRE),
                      message="data.json: expected a JSON list of records, got a JSON object"), id="not-a-list"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data="[]", message="data.json: the list of records is empty"),
                 id="empty-list"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data=_zsre(alt=None),
                      message="data.json: record 1: field 'alt' is missing"), id="missing-field"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data=_zsre(subject="  "),
                      message="data.json: record 1: field 'subject' must be a non-empty string, got an empty string"),
                 id="empty-field"),
    pytest.param(dict(argv=["--data", "zsre:{data}"], data=_zsre(alt=7),
                      message="data.json: record 1: field 'alt' must be a non-empty string, got int"),
                 id="non-string-target"),
    pytest.param(dict(argv=["--data", "squad:x.json"], data=None, message="unknown data spec"), id="unknown-data-spec"),
    pytest.param(dict(argv=["--n", "0"], data=None, message="--n must be >= 1"), id="n-0"),
    pytest.param(dict(argv=["--mode", "sequential"], data=None, message="--mode sequential needs --batch-size"),
                 id="sequential-without-batch-size"),
    pytest.param(dict(argv=["--experts", "2", "--top-k", "3"], data=None,
                      message="--experts 2 --top-k 3: top_k must be in [1, num_experts=2], got 3"),
                 id="top-k-above-experts"),
    pytest.param(dict(argv=["--top-k", "5"], data=None, message="--top-k 5: top_k must be in [1, num_experts=4]"),
                 id="top-k-above-default-experts"),
    pytest.param(dict(argv=["--key-threshold", "1.5"], data=None,
                      message="--key-threshold 1.5: key_threshold is a cosine similarity in [-1, 1]"),
                 id="key-threshold-not-a-cosine"),
    pytest.param(dict(argv=["--key-subject-rank", "-1"], data=None,
                      message="--key-subject-rank -1: key_subject_rank must be >= 0"),
                 id="key-subject-rank-negative"),
    pytest.param(dict(argv=["--context-prefixes", "-1"], data=None,
                      message="--context-prefixes -1: context_prefixes must be >= 0"),
                 id="context-prefixes-negative"),
    pytest.param(dict(argv=["--layer", "x"], data=None, message="argument --layer: invalid int value: 'x'"),
                 id="layer-not-an-integer"),
])
def test_bad_input_fails_before_the_model_loads(case, tmp_path, capsys, no_model):
    data = tmp_path / "data.json"
    if case["data"] is not None:
        data.write_text(case["data"])
    out = tmp_path / "out"
    argv = ["edit", *(a.replace("{data}", str(data)) for a in case["argv"]), "--out", str(out), "--no-progress"]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert case["message"] in err, err
    assert not out.exists()


def test_generate_without_an_edits_folder_fails_before_the_model_loads(capsys, no_model):
    assert main(["generate", "--edits", "/nonexistent/edits", "hi"]) == 2
    assert "not a saved MEMoE edit" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A random 4-block LLaMA with a 128-token context and the embedded tokenizer, as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_editing(monkeypatch):
    """Fails the test if the editor starts evaluating or training."""
    from memoe_fast.editing.editor import MEMoEEditor

    def forbidden(*a, **k):
        raise AssertionError("the edit started: this check must come before")

    monkeypatch.setattr(MEMoEEditor, "pre_locality", forbidden)
    monkeypatch.setattr(MEMoEEditor, "train", forbidden)


def _counterfact(**changes):
    """Two CounterFact records (EasyEdit format), the second with ``changes``."""
    rec = {"prompt": "The Eiffel Tower is in", "target_new": "Rome", "subject": "Eiffel Tower",
           "rephrase_prompt": "The Eiffel Tower stands in", "locality_prompt": "The Colosseum is in",
           "locality_ground_truth": "Rome", "case_id": 10}
    return json.dumps([rec, {**rec, "case_id": 11, **changes}])


LONG = "The tower that everyone in the whole wide world knows " * 20  # over 128 tokens


@pytest.mark.parametrize("case", [
    pytest.param(dict(argv=["--layer", "4"], message="--layer 4 is out of range: the model has 4 blocks (0..3)"),
                 id="layer-past-the-last"),
    # Negative indices are not taken from the end: -1 is as wrong as -5 (below -blocks).
    pytest.param(dict(argv=["--layer", "-1"], message="--layer -1 is out of range: the model has 4 blocks (0..3)"),
                 id="layer-negative"),
    pytest.param(dict(argv=["--layer", "-5"], message="--layer -5 is out of range: the model has 4 blocks (0..3)"),
                 id="layer-below-minus-blocks"),
    pytest.param(dict(argv=["--data", "counterfact:{data}"], data=_counterfact(prompt=LONG, rephrase_prompt=LONG),
                      message="request 1 (case_id 11): prompt + target is 201 tokens, longer than the model's "
                              "context of 128 tokens (and 1 more)"), id="prompt-longer-than-context"),
    pytest.param(dict(argv=["--data", "counterfact:{data}"], data=_counterfact(locality_prompt=LONG),
                      message="request 1 (case_id 11): locality_prompt + locality_answer is 201 tokens, longer than "
                              "the model's context of 128 tokens\n"), id="locality-prompt-longer-than-context"),
])
def test_bad_input_for_the_model_fails_before_editing(case, tiny_folder, tmp_path, capsys, no_editing):
    data = tmp_path / "data.json"
    if case.get("data") is not None:
        data.write_text(case["data"])
    out = tmp_path / "out"
    argv = ["edit", "--model", tiny_folder, "--device", "cpu", "--n", "2", "--steps", "1",
            *(a.replace("{data}", str(data)) for a in case["argv"]), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert case["message"] in err, err
    assert not out.exists()


def test_divergence_exits_2_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, capsys, monkeypatch):
    """A loss that turns NaN in the second batch: status 2, the first batch's checkpoint stays, no results."""
    from memoe_fast.editing.editor import MEMoEEditor

    train, calls = MEMoEEditor.train, []

    def nan_from_the_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            self.backward_step = lambda *a, **k: float("nan")
        return train(self, *a, **k)

    monkeypatch.setattr(MEMoEEditor, "train", nan_from_the_second_batch)
    out = tmp_path / "out"
    argv = ["edit", "--model", tiny_folder, "--device", "cpu", "--n", "2", "--steps", "2", "--mode", "sequential",
            "--batch-size", "1", "--no-user-metrics", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "training diverged: loss nan at step 0 (batch 2/2)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["checkpoint"]  # no results.json, no edits/
    assert json.loads((out / "checkpoint" / "memoe.json").read_text())["batches_done"] == 1


@pytest.mark.slow
def test_edit_then_generate_on_the_embedded_model(tmp_path, capsys, embedded):
    out = tmp_path / "run"
    rc = main(["edit", "--n", "3", "--steps", "25", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reliability" in printed and "locality" in printed and "wall time" in printed
    result = json.loads((out / "results.json").read_text())
    for key in ("reliability", "generality", "locality"):
        assert key in result["pre"] and key in result["post"]
    assert result["n_edits"] == 3 and len(result["post"]["per_example"]) == 3
    assert result["post"]["reliability"] > result["pre"]["reliability"]
    assert {"config", "timings", "versions", "memory"} <= set(result)
    from memoe_fast.editing.prepack import prepack_available

    assert result["editor_options"]["prepack"] is True  # the default
    assert result["prepacked"] is prepack_available()  # on the CPU, wherever oneDNN is there
    assert sorted(os.listdir(out / "edits")) == ["bypass.safetensors", "memoe.json"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary leftovers
    from memoe_fast.datasets import load_demo

    req = load_demo(1)[0]
    assert main(["generate", "--edits", str(out / "edits"), "--max-new-tokens", "3", req.prompt]) == 0
    assert req.target.split()[0] in capsys.readouterr().out


def test_no_prepack_flag_edits_without_packed_weights(tmp_path, embedded):
    out = tmp_path / "run"
    assert main(["edit", "--n", "2", "--steps", "2", "--no-prepack", "--no-user-metrics", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["editor_options"]["prepack"] is False and result["prepacked"] is False


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "bypass.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_sequential_edit(tmp_path, dtype):
    """``--dtype``: the backbone loads in that dtype and the experts follow it; ``--mode sequential``
    reports each batch."""
    import torch

    out = tmp_path / "run"
    argv = ["edit", "--n", "3", "--steps", "2", "--dtype", dtype, "--mode", "sequential", "--batch-size", "2",
            "--no-user-metrics", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["mode"] == "sequential" and result["batch_size"] == 2
    assert [b["n"] for b in result["per_batch"]] == [2, 1] and len(result["losses"]) == 2
    assert all(math.isfinite(v) for losses in result["losses"] for v in losses)
    tensors = _tensors(out / "edits")
    experts = {k: v for k, v in tensors.items() if k not in ("w_gate", "key_vectors", "key_subject_basis")}  # the gate and keys stay fp32
    assert experts and {k: str(v.dtype) for k, v in experts.items()} == {k: f"torch.{dtype}" for k in experts}
    assert tensors["w_gate"].dtype == torch.float32
    assert tensors["w2"].abs().max() > 0, "the experts trained"


@pytest.mark.slow
def test_8bit_edit_then_generate_with_its_config_and_compare(tmp_path, capsys, embedded):
    """An 8-bit edit with a non-default configuration; ``generate`` must rebuild that configuration from
    the saved edit (else the tensors would not fit), load in 8-bit, and with ``--compare`` print the
    unedited model's continuation too."""
    import torch

    out = tmp_path / "run"
    argv = ["edit", "--n", "2", "--steps", "2", "--load-in-8bit", "--experts", "2", "--top-k", "2", "--layer", "3",
            "--no-scope", "--no-user-metrics", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["load_in_8bit"] is True and result["layer"] == 3
    assert result["config"]["num_experts"] == 2 and result["config"]["top_k"] == 2
    assert result["config"]["anchor_scope"] is False
    assert _tensors(out / "edits")["w1"].shape[0] == 2
    capsys.readouterr()
    prompt = "The capital of France is"
    assert main(["generate", "--edits", str(out / "edits"), "--max-new-tokens", "4", "--compare", prompt]) == 0
    printed = capsys.readouterr().out
    # The 8-bit unedited continuation is the float model's greedy one on this short prompt.
    model, tokenizer = embedded
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert printed.startswith(f"unedited: {prompt}{plain}\nedited:   {prompt}"), printed
