"""Loaders of edit requests: ZsRE, CounterFact (EasyEdit and ROME formats), the shipped demo set."""
import copy
import json
import re

import pytest

from memoe_fast.datasets import (
    DataFormatError,
    EditRequest,
    load_counterfact,
    load_demo,
    load_requests,
    load_zsre,
)

ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who plays the cat in the hat movie",
    "loc_ans": "Mike Myers",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
CF_EASYEDIT = {
    "case_id": 3087,
    "prompt": "David Robinson professionally plays the sport",
    "target_new": "baseball",
    "subject": "David Robinson",
    "ground_truth": "basketball",
    "rephrase_prompt": "David Robinson's greatest weakness is",
    "locality_prompt": "Shaquille O'Neal plays",
    "locality_ground_truth": "basketball",
}
CF_ROME = {
    "case_id": 20952,
    "pararel_idx": 5151,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "relation_id": "P30",
        "target_new": {"str": "Antarctica", "id": "Q51"},
        "target_true": {"str": "Africa", "id": "Q15"},
        "subject": "Angola",
    },
    "paraphrase_prompts": ["Last updated 2017. Angola belongs to the continent of", "Angola is a part of the continent of"],
    "neighborhood_prompts": ["South Africa is a part of the continent of", "Ghana is in"],
    "attribute_prompts": ["Ross Island is located in"],
    "generation_prompts": ["People around Angola speak the language of"],
}


def write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def with_record(base, i=0, count=3, **changes):
    """``count`` copies of ``base`` (distinct case ids / subjects), record ``i`` changed by ``changes``.

    A value of ``...`` deletes the field; a key ``a__b`` reaches the nested field ``a.b``.
    """
    records = [copy.deepcopy(base) for _ in range(count)]
    for j, r in enumerate(records):
        if "case_id" in r:
            r["case_id"] = base["case_id"] + j
    for key, value in changes.items():
        *outer, last = key.split("__")
        target = records[i]
        for k in outer:
            target = target[k]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    return records


# Loaders on tiny files


def test_zsre_maps_fields(tmp_path):
    path = write(tmp_path, with_record(ZSRE, count=2))
    reqs = load_zsre(path)
    assert reqs[0] == EditRequest(
        prompt=ZSRE["src"], target="unmanned aircraft", subject="UniFirst",
        rephrase=["What will be the product of UniFirst?"], locality_prompt=ZSRE["loc"],
        locality_answer="Mike Myers", ground_truth="uniform", case_id="0",
    )
    assert [r.case_id for r in reqs] == ["0", "1"]


def test_zsre_optional_fields(tmp_path):
    # No answers -> no ground truth; portability (an object) is accepted; surrounding spaces stripped.
    records = with_record(ZSRE, count=3, answers=...)
    records[1]["portability"] = {"New Question": "q", "New Answer": "a"}
    records[2]["answers"] = []
    records[2]["alt"] = "  drone "
    reqs = load_zsre(write(tmp_path, records))
    assert reqs[0].ground_truth is None and reqs[2].ground_truth is None
    assert reqs[1].ground_truth == "uniform"
    assert reqs[2].target == "drone"


def test_zsre_empty_target_is_skipped_with_warning(tmp_path):
    # EasyEdit's zsre_mend_train ships records with alt == "": nothing to edit, so they are dropped.
    path = write(tmp_path, with_record(ZSRE, i=1, count=3, alt=""))
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) with an empty target \(records 1\)"):
        reqs = load_zsre(path)
    assert [r.case_id for r in reqs] == ["0", "2"]


def test_counterfact_easyedit(tmp_path):
    reqs = load_counterfact(write(tmp_path, with_record(CF_EASYEDIT, count=2)))
    assert reqs[0] == EditRequest(
        prompt="David Robinson professionally plays the sport", target="baseball", subject="David Robinson",
        rephrase=["David Robinson's greatest weakness is"], locality_prompt="Shaquille O'Neal plays",
        locality_answer="basketball", ground_truth="basketball", case_id="3087",
    )
    assert reqs[1].case_id == "3088"


def test_counterfact_easyedit_optional_fields_absent_or_empty(tmp_path):
    records = with_record(CF_EASYEDIT, count=2, rephrase_prompt=..., locality_prompt=..., locality_ground_truth=...,
                          ground_truth=..., case_id=...)
    records[1].update(rephrase_prompt="", locality_prompt=" ", locality_ground_truth="", ground_truth="", case_id="x-1")
    reqs = load_counterfact(write(tmp_path, records))
    for r in reqs:
        assert r.rephrase == [] and r.locality_prompt is None and r.locality_answer is None and r.ground_truth is None
    assert reqs[0].case_id is None and reqs[1].case_id == "x-1"


def test_counterfact_rome(tmp_path):
    records = with_record(CF_ROME, count=2)
    records[1]["requested_rewrite"]["target_new"]["str"] = " Europe "  # ROME strings: stripped either way
    reqs = load_counterfact(write(tmp_path, records))
    assert reqs[0] == EditRequest(
        prompt="Angola is located in", target="Antarctica", subject="Angola",
        rephrase=CF_ROME["paraphrase_prompts"], locality_prompt="South Africa is a part of the continent of",
        locality_answer="Africa", ground_truth="Africa", case_id="20952",
    )
    assert reqs[1].target == "Europe"


def test_counterfact_rome_placeholder_mid_prompt_and_braces(tmp_path):
    # The subject goes where "{}" is; another brace in the prompt is left alone (no str.format).
    records = with_record(CF_ROME, count=1, requested_rewrite__prompt="The {x} country {} is in")
    assert load_counterfact(write(tmp_path, records))[0].prompt == "The {x} country Angola is in"


def test_counterfact_rome_no_neighbours(tmp_path):
    records = with_record(CF_ROME, count=1, neighborhood_prompts=[])
    req = load_counterfact(write(tmp_path, records))[0]
    assert req.locality_prompt is None and req.locality_answer is None and req.ground_truth == "Africa"


# n


@pytest.mark.parametrize("n, expected", [(None, 3), (1, 1), (3, 3)], ids=["all", "first", "exactly-all"])
def test_n_takes_first_records(tmp_path, n, expected):
    reqs = load_counterfact(write(tmp_path, with_record(CF_EASYEDIT, count=3)), n=n)
    assert [r.case_id for r in reqs] == [str(3087 + j) for j in range(expected)]


@pytest.mark.parametrize("n", [0, -2], ids=["zero", "negative"])
def test_n_not_positive(tmp_path, n):
    with pytest.raises(ValueError, match=f"n must be a positive number of records to load from .*data.json, got {n}"):
        load_zsre(write(tmp_path, with_record(ZSRE)), n=n)


def test_n_too_large_names_file_and_count(tmp_path):
    with pytest.raises(ValueError, match=r"n=5 records asked for, but .*data.json has only 3 usable records$"):
        load_counterfact(write(tmp_path, with_record(CF_ROME)), n=5)


def test_n_counts_usable_records(tmp_path):
    path = write(tmp_path, with_record(ZSRE, i=0, count=3, alt=""))
    with pytest.warns(UserWarning):
        assert [r.case_id for r in load_zsre(path, n=2)] == ["1", "2"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"only 2 usable records \(1 skipped for an empty target\)"):
        load_zsre(path, n=3)


def test_n_wrong_type(tmp_path):
    with pytest.raises(TypeError, match="n must be an integer or None, got str"):
        load_zsre(write(tmp_path, with_record(ZSRE)), n="2")


# Malformed files and records


@pytest.mark.parametrize("loader", [load_zsre, load_counterfact], ids=["zsre", "counterfact"])
def test_missing_file(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match="nope.json: no such data file"):
        loader(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("loader", [load_zsre, load_counterfact], ids=["zsre", "counterfact"])
@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"src": "a",', r"data.json: not valid JSON \(.* at line 1, column \d+\)"),
        ("", r"data.json: not valid JSON"),
        ('{"src": "a"}', r"data.json: expected a JSON list of records, got a JSON object"),
        ('"text"', r"data.json: expected a JSON list of records, got a JSON str"),
        ("[]", r"data.json: the list of records is empty"),
        ('[1, 2]', r"data.json: record 0: must be a JSON object, got int"),
    ],
    ids=["truncated", "empty-file", "object", "string", "empty-list", "not-objects"],
)
def test_malformed_file(tmp_path, loader, text, message):
    with pytest.raises(DataFormatError, match=message):
        loader(write(tmp_path, text))


ZSRE_ERRORS = [
    (dict(alt=...), "field 'alt' is missing"),
    (dict(alt=None), "field 'alt' is missing"),
    (dict(src=...), "field 'src' is missing"),
    (dict(src=""), "field 'src' must be a non-empty string, got an empty string"),
    (dict(subject="   "), "field 'subject' must be a non-empty string, got an empty string"),
    (dict(alt=7), "field 'alt' must be a non-empty string, got int"),
    (dict(rephrase=["a"]), "field 'rephrase' must be a non-empty string, got list"),
    (dict(loc=...), "field 'loc' is missing"),
    (dict(loc_ans=1.5), "field 'loc_ans' must be a non-empty string, got float"),
    (dict(answers="uniform"), "field 'answers' must be a list of strings, got str"),
    (dict(answers=["a", 3]), r"field 'answers\[1\]' must be a string, got int"),
    (dict(pred=True), "field 'pred' must be a non-empty string, got bool"),
    (dict(portability="x"), "field 'portability' must be a JSON object, got str"),
]


@pytest.mark.parametrize("changes, message", ZSRE_ERRORS, ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(ZSRE_ERRORS)])
def test_zsre_record_errors(tmp_path, changes, message):
    # The bad record is the third one: the message must name its index.
    path = write(tmp_path, with_record(ZSRE, i=2, **changes))
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(tmp_path))}/data.json: record 2: {message}$"):
        load_zsre(path)


CF_EASYEDIT_ERRORS = [
    (dict(target_new=...), "field 'target_new' is missing"),
    (dict(prompt=...), "field 'prompt' is missing"),
    (dict(subject=""), "field 'subject' must be a non-empty string, got an empty string"),
    (dict(prompt=12), "field 'prompt' must be a non-empty string, got int"),
    (dict(target_new={"str": "x"}), "field 'target_new' must be a non-empty string, got object"),
    (dict(rephrase_prompt=["a"]), "field 'rephrase_prompt' must be a non-empty string, got list"),
    (dict(locality_ground_truth=...), "field 'locality_prompt' is given without 'locality_ground_truth'"),
    (dict(locality_prompt=""), "field 'locality_ground_truth' is given without 'locality_prompt'"),
    (dict(case_id=1.0), "field 'case_id' must be an integer or a string, got float"),
]


@pytest.mark.parametrize("changes, message", CF_EASYEDIT_ERRORS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(CF_EASYEDIT_ERRORS)])
def test_counterfact_easyedit_record_errors(tmp_path, changes, message):
    path = write(tmp_path, with_record(CF_EASYEDIT, i=1, **changes))
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(tmp_path))}/data.json: record 1: {message}$"):
        load_counterfact(path)


CF_ROME_ERRORS = [
    (dict(requested_rewrite__prompt="Where is the subject located?"),
     r"field 'requested_rewrite.prompt' must contain the subject placeholder '\{\}' exactly once, found it 0 times"),
    (dict(requested_rewrite__prompt="{} and {} are in"), r"field 'requested_rewrite.prompt' must contain .* exactly once, found it 2 times"),
    (dict(requested_rewrite__prompt=...), "field 'requested_rewrite.prompt' is missing"),
    (dict(requested_rewrite__subject=3), "field 'requested_rewrite.subject' must be a non-empty string, got int"),
    (dict(requested_rewrite__target_new=...), "field 'requested_rewrite.target_new' is missing"),
    (dict(requested_rewrite__target_new="Antarctica"), "field 'requested_rewrite.target_new' must be a JSON object, got str"),
    (dict(requested_rewrite__target_new__str=...), "field 'requested_rewrite.target_new.str' is missing"),
    (dict(requested_rewrite__target_true__str=""),
     "field 'requested_rewrite.target_true.str' must be a non-empty string, got an empty string"),
    (dict(requested_rewrite=[1]), "field 'requested_rewrite' must be a JSON object, got list"),
    (dict(paraphrase_prompts=...), "field 'paraphrase_prompts' is missing"),
    (dict(paraphrase_prompts="a"), "field 'paraphrase_prompts' must be a list of strings, got str"),
    (dict(neighborhood_prompts=["a", None]), r"field 'neighborhood_prompts\[1\]' must be a string, got null"),
]


@pytest.mark.parametrize("changes, message", CF_ROME_ERRORS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(CF_ROME_ERRORS)])
def test_counterfact_rome_record_errors(tmp_path, changes, message):
    path = write(tmp_path, with_record(CF_ROME, i=2, **changes))
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(tmp_path))}/data.json: record 2: {message}"):
        load_counterfact(path)


def test_counterfact_unknown_format(tmp_path):
    with pytest.raises(DataFormatError, match=r"record 0: neither CounterFact format: .*found fields \['alt', "):
        load_counterfact(write(tmp_path, [ZSRE]))


def test_counterfact_mixed_formats(tmp_path):
    # The format is detected from record 0; a ROME record later is reported against the EasyEdit fields.
    with pytest.raises(DataFormatError, match="record 1: field 'prompt' is missing"):
        load_counterfact(write(tmp_path, [CF_EASYEDIT, CF_ROME]))


def test_empty_target_cannot_hide_later_errors(tmp_path):
    # A skipped record is still validated: a file is either well-formed throughout or rejected.
    with pytest.raises(DataFormatError, match="record 0: field 'loc' is missing"):
        load_zsre(write(tmp_path, with_record(ZSRE, i=0, alt="", loc=...)))


def test_not_utf8(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"src": "caf\xe9"}]')
    with pytest.raises(DataFormatError, match=r"data.json: not UTF-8 text \(byte 13\)"):
        load_zsre(str(path))


# load_requests


def test_load_requests_dispatch(tmp_path):
    zsre = write(tmp_path, with_record(ZSRE), "z.json")
    cf = write(tmp_path, with_record(CF_ROME), "c.json")
    assert load_requests(f"zsre:{zsre}") == load_zsre(zsre)
    assert load_requests(f"counterfact:{cf}", n=2) == load_counterfact(cf, n=2)
    assert load_requests("demo", n=4) == load_demo(n=4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("squad:x.json", "unknown data spec 'squad:x.json': expected 'demo', 'zsre:PATH' or 'counterfact:PATH'"),
        ("x.json", "unknown data spec 'x.json'"),
        ("", "unknown data spec ''"),
        ("demo:x.json", "unknown data spec 'demo:x.json'"),
        ("zsre:", "data spec 'zsre:' names no file: write 'zsre:PATH'"),
        ("counterfact", "data spec 'counterfact' names no file"),
    ],
    ids=["unknown-kind", "bare-path", "empty", "demo-with-path", "zsre-no-path", "counterfact-no-colon"],
)
def test_load_requests_bad_spec(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_requests(spec)


# The shipped demo set


def test_demo_set():
    reqs = load_demo()
    assert len(reqs) >= 30
    subjects = [r.subject for r in reqs]
    assert len(set(subjects)) == len(subjects), "a subject is edited twice"
    assert len({r.case_id for r in reqs}) == len(reqs)
    for r in reqs:
        assert r.case_id.startswith("demo-")
        assert r.subject in r.prompt, r
        assert len(r.rephrase) == 1 and r.subject in r.rephrase[0] and r.rephrase[0] != r.prompt, r
        assert r.locality_prompt and r.locality_answer, r
        assert r.subject not in r.locality_prompt, r
        assert r.ground_truth and r.target != r.ground_truth, r
        assert 1 <= len(r.target.split()) <= 2, r


def test_demo_locality_prompts_avoid_edited_subjects():
    # In a batch edit, a locality prompt about another edited subject would not measure locality.
    reqs = load_demo()
    for r in reqs:
        for other in reqs:
            assert other.subject not in r.locality_prompt, (r.locality_prompt, other.subject)


def test_demo_n():
    assert len(load_demo(n=5)) == 5
    with pytest.raises(ValueError, match=r"n=1000 records asked for, but memoe_fast.data/demo_edits.json has only"):
        load_demo(n=1000)


# The real data sets in ../shared/data (skipped when absent)


def test_real_zsre(shared_data):
    path = shared_data("zsre_mend_train-1k.json")
    with pytest.warns(UserWarning, match=r"skipped 2 record\(s\) with an empty target \(records 534, 723\)"):
        reqs = load_zsre(path)
    assert len(reqs) == 998
    assert reqs[0] == EditRequest(
        prompt="What is the product made by UniFirst?", target="unmanned aircraft", subject="UniFirst",
        rephrase=["What will be the product of UniFirst?"],
        locality_prompt="nq question: john goodman's character in the big lebowski",
        locality_answer="Walter Sobchak", ground_truth="uniform", case_id="0",
    )
    assert all(r.subject in r.prompt for r in reqs)


def test_real_counterfact_easyedit(shared_data):
    reqs = load_counterfact(shared_data("counterfact-edit-1k.json"))
    assert len(reqs) == 1000
    assert reqs[0] == EditRequest(
        prompt="David Robinson professionally plays the sport", target="baseball", subject="David Robinson",
        rephrase=["David Robinson's greatest weakness is"], locality_prompt="Shaquille O'Neal plays",
        locality_answer="basketball", ground_truth="basketball", case_id="3087",
    )


def test_real_counterfact_rome(shared_data):
    reqs = load_counterfact(shared_data("counterfact_500.json"))
    assert len(reqs) == 500
    first = reqs[0]
    assert (first.prompt, first.target, first.subject) == ("Angola is located in", "Antarctica", "Angola")
    assert (first.ground_truth, first.locality_answer, first.case_id) == ("Africa", "Africa", "20952")
    assert first.locality_prompt == "South Africa is a part of the continent of"
    assert len(first.rephrase) == 2 and all("Angola" in p for p in first.rephrase)
    assert all(not r.target.startswith(" ") and len(r.rephrase) == 2 for r in reqs)


def test_real_n(shared_data):
    reqs = load_requests(f"counterfact:{shared_data('counterfact_500.json')}", n=10)
    assert len(reqs) == 10 and reqs[0].subject == "Angola"
