"""EasyEdit's calling convention: request dicts, hparams YAML, apply_memoe_to_model, restore."""
import json

import pytest

from memoe_fast.datasets import DataFormatError, load_counterfact

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
