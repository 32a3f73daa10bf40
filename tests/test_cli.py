"""The command line: bad input fails clearly with nothing written; a small real run writes its results."""
import json
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
