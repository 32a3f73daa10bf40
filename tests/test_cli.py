"""The command line: bad input fails clearly with nothing written; a small real run writes its results."""
import json
import math
import os

import pytest

from memoe_fast.cli import main


def test_missing_data_file_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["edit", "--data", f"zsre:{tmp_path / 'nope.json'}", "--out", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not out.exists()


def test_malformed_record_names_file_record_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"src": "q?", "alt": "a", "subject": "s", "rephrase": "r?", "loc": "l", "loc_ans": "x"},
                               {"src": "q2?", "subject": "s", "rephrase": "r?", "loc": "l", "loc_ans": "x"}]))
    out = tmp_path / "out"
    assert main(["edit", "--data", f"zsre:{bad}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "record 1" in err and "'alt'" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["edit", "--n", "0"], "--n"),
    (["edit", "--mode", "sequential"], "--batch-size"),
    (["edit", "--data", "squad:x.json"], "data spec"),
    (["generate", "--edits", "/nonexistent/edits", "hi"], "not a saved MEMoE edit"),
])
def test_bad_arguments_exit_nonzero(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "edit" else [])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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
    assert main(["edit", "--n", "2", "--steps", "2", "--no-prepack", "--out", str(out), "--no-progress"]) == 0
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
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["mode"] == "sequential" and result["batch_size"] == 2
    assert [b["n"] for b in result["per_batch"]] == [2, 1] and len(result["losses"]) == 2
    assert all(math.isfinite(v) for losses in result["losses"] for v in losses)
    tensors = _tensors(out / "edits")
    experts = {k: v for k, v in tensors.items() if k not in ("w_gate", "key_vectors")}  # the gate and keys stay fp32
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
            "--no-scope", "--out", str(out), "--no-progress"]
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
