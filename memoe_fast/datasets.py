"""Edit requests and their loaders (ZsRE and CounterFact in EasyEdit format, CounterFact in ROME format).

Every loader validates the whole file before returning anything: a malformed file raises
:class:`DataFormatError` whose message names the file, the record index and the field, e.g.
``"data.json: record 12: field 'alt' is missing"``.

Conventions shared by the loaders:

* every string is stripped; a string that is empty after stripping counts as absent, so an empty
  required field is an error and an empty optional field becomes ``None`` (or is left out of a list);
* ``target`` never carries a leading space: evaluation scores ``prompt + " " + target``;
* a record whose *target* is empty is skipped with one ``UserWarning`` listing the skipped indices
  rather than failing the file: EasyEdit's ``zsre_mend_train`` ships such records (nothing to teach,
  so nothing to edit), and refusing the whole file for them would make it unusable;
* ``n`` keeps the first ``n`` usable records, in file order.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


@dataclass
class EditRequest:
    """One fact to edit.

    ``prompt`` + " " + ``target`` is what the edited model must produce; ``rephrase`` are paraphrases
    of the prompt (Generality); ``locality_prompt`` / ``locality_answer`` an unrelated prompt and its
    answer, teacher-forced to compare the edited model with the unedited one (Locality).
    """

    prompt: str
    target: str
    subject: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    ground_truth: str | None = None
    case_id: str | None = None
    # (question, answer) pairs about facts the edit should carry over to (ZsRE's portability).
    portability: list[tuple[str, str]] = field(default_factory=list)


class DataFormatError(ValueError):
    """A malformed data file or record; the message names the file, the record index and the field."""


DEMO_PACKAGE = "memoe_fast.data"
DEMO_FILE = "demo_edits.json"


class _Record:
    """Typed access to the fields of one JSON object, with errors that name file, record and field."""

    def __init__(self, where: str, obj: Any, prefix: str = ""):
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: must be a JSON object, got {_type_name(obj)}")
        self.where, self.obj, self.prefix = where, obj, prefix

    def _error(self, key: str, problem: str) -> DataFormatError:
        return DataFormatError(f"{self.where}: field '{self.prefix}{key}' {problem}")

    def _value(self, key: str, required: bool) -> Any:
        if self.obj.get(key) is None:
            if required:
                raise self._error(key, "is missing")
            return None
        return self.obj[key]

    def text(self, key: str, required: bool = True) -> str | None:
        """A string field, stripped; empty counts as absent (an error when required)."""
        value = self._value(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._error(key, f"must be a non-empty string, got {_type_name(value)}")
        if not value.strip() and required:
            raise self._error(key, "must be a non-empty string, got an empty string")
        return value.strip() or None

    def target(self, key: str) -> str | None:
        """The edit target: a string that must be present; None when empty (the record is skipped)."""
        self._value(key, True)
        return self.text(key, required=False)

    def texts(self, key: str, required: bool = True) -> list[str]:
        """A list of strings, each stripped; empty strings are dropped."""
        value = self._value(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._error(key, f"must be a list of strings, got {_type_name(value)}")
        for j, item in enumerate(value):
            if not isinstance(item, str):
                raise self._error(f"{key}[{j}]", f"must be a string, got {_type_name(item)}")
        return [item.strip() for item in value if item.strip()]

    def nested(self, key: str) -> "_Record":
        """A required nested object; its errors name the field as ``outer.inner``."""
        value = self._value(key, True)
        if not isinstance(value, dict):
            raise self._error(key, f"must be a JSON object, got {_type_name(value)}")
        return _Record(self.where, value, prefix=f"{self.prefix}{key}.")

    def optional_object(self, key: str) -> None:
        value = self._value(key, False)
        if value is not None and not isinstance(value, dict):
            raise self._error(key, f"must be a JSON object, got {_type_name(value)}")

    def case_id(self, key: str = "case_id") -> str | None:
        """An optional int or string id, returned as a string."""
        value = self._value(key, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self._error(key, f"must be an integer or a string, got {_type_name(value)}")
        return str(value).strip() or None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _read_json_list(path: str | os.PathLike, text: str | None = None) -> list:
    """Parses ``path`` (or ``text`` read from it) as a JSON list, with errors that name the file."""
    if text is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got a JSON {_type_name(data)}")
    if not data:
        raise DataFormatError(f"{path}: the list of records is empty")
    return data


def _check_n(n: int | None, path: str | os.PathLike) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an integer or None, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"n must be a positive number of records to load from {path}, got {n}")


def _finish(path: str | os.PathLike, requests: list[EditRequest | None], n: int | None) -> list[EditRequest]:
    """Drops the records with an empty target (one warning), then keeps the first ``n``."""
    skipped = [i for i, r in enumerate(requests) if r is None]
    usable = [r for r in requests if r is not None]
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} record(s) with an empty target (records {shown})", stacklevel=3)
    if n is not None and n > len(usable):
        extra = f" ({len(skipped)} skipped for an empty target)" if skipped else ""
        raise ValueError(f"n={n} records asked for, but {path} has only {len(usable)} usable records{extra}")
    return usable if n is None else usable[:n]


def load_zsre(path: str | os.PathLike, n: int | None = None) -> list[EditRequest]:
    """Loads ZsRE in EasyEdit's "mend" format (``zsre_mend_train.json``, ``zsre_mend_eval*.json``).

    Required per record (non-empty strings): ``src``, ``alt``, ``subject``, ``rephrase``, ``loc``,
    ``loc_ans``. Optional: ``answers`` (list of strings), ``pred``, ``cond`` (strings), ``portability``
    (object, accepted and not used). Mapping: prompt=src, target=alt, rephrase=[rephrase],
    locality_prompt=loc (kept with its ``"nq question: "`` prefix, as EasyEdit does),
    locality_answer=loc_ans, ground_truth=answers[0] (None without answers), case_id=the record's index
    in the file (ZsRE records carry no id). Records with an empty ``alt`` are skipped with a warning.

    Args:
        path: the JSON file, a list of records.
        n: keep only the first ``n`` usable records; must be positive and at most the number available.

    Example:
        >>> reqs = load_zsre("zsre_mend_train-1k.json", n=10)  # doctest: +SKIP
        >>> reqs[0].prompt, reqs[0].target                      # doctest: +SKIP
        ('What is the product made by UniFirst?', 'unmanned aircraft')
    """
    _check_n(n, path)
    requests = [_zsre_record(_Record(f"{path}: record {i}", obj), i) for i, obj in enumerate(_read_json_list(path))]
    return _finish(path, requests, n)


def _zsre_record(rec: _Record, index: int) -> EditRequest | None:
    # Every field is read before returning, so a file is either well-formed throughout or rejected.
    prompt, target, subject = rec.text("src"), rec.target("alt"), rec.text("subject")
    rephrase, loc, loc_ans = rec.text("rephrase"), rec.text("loc"), rec.text("loc_ans")
    answers = rec.texts("answers", required=False)
    rec.text("pred", required=False)
    rec.text("cond", required=False)
    rec.optional_object("portability")
    portability = []
    if rec.obj.get("portability") is not None:
        port = rec.nested("portability")
        question, answer = port.text("New Question", required=False), port.text("New Answer", required=False)
        if question and answer:
            portability.append((question, answer))
    if target is None:
        return None
    return EditRequest(
        prompt=prompt, target=target, subject=subject, rephrase=[rephrase],
        locality_prompt=loc, locality_answer=loc_ans,
        ground_truth=answers[0] if answers else None, case_id=str(index), portability=portability,
    )


def _counterfact_easyedit(rec: _Record) -> EditRequest | None:
    prompt, target, subject = rec.text("prompt"), rec.target("target_new"), rec.text("subject")
    rephrase = rec.text("rephrase_prompt", required=False)
    loc, loc_ans = rec.text("locality_prompt", required=False), rec.text("locality_ground_truth", required=False)
    if (loc is None) != (loc_ans is None):
        given, lacking = ("locality_prompt", "locality_ground_truth") if loc else ("locality_ground_truth", "locality_prompt")
        raise DataFormatError(f"{rec.where}: field '{given}' is given without '{lacking}'")
    nested = _nested_locality(rec)
    if nested is not None:
        if loc is not None:
            raise DataFormatError(f"{rec.where}: field 'locality' and field 'locality_prompt' both give the "
                                  "locality prompt; keep one")
        loc, loc_ans = nested
    rec.optional_object("portability")
    ground_truth, case_id = rec.text("ground_truth", required=False), rec.case_id()
    if target is None:
        return None
    return EditRequest(
        prompt=prompt, target=target, subject=subject, rephrase=[rephrase] if rephrase else [],
        locality_prompt=loc, locality_answer=loc_ans, ground_truth=ground_truth, case_id=case_id,
    )


def _nested_locality(rec: _Record) -> tuple[str, str] | None:
    """EasyEdit's request layout ``{"locality": {"neighborhood": {"prompt": ..., "ground_truth": ...}}}``:
    the first named entry gives the locality prompt and answer (a request holds one; the others are
    named in a warning)."""
    if rec.obj.get("locality") is None:
        return None
    rec.optional_object("locality")
    entries = rec.obj["locality"]
    if not entries:
        return None
    names = list(entries)
    first = rec.nested("locality").nested(names[0])
    pair = first.text("prompt"), first.text("ground_truth")
    if len(names) > 1:
        warnings.warn(f"field 'locality' has entries {names}; a request keeps one, '{names[0]}' is used",
                      stacklevel=5)
    return pair


def _counterfact_rome(rec: _Record) -> EditRequest | None:
    rewrite = rec.nested("requested_rewrite")
    template, subject = rewrite.text("prompt"), rewrite.text("subject")
    count = template.count("{}")
    if count != 1:
        raise DataFormatError(
            f"{rec.where}: field 'requested_rewrite.prompt' must contain the subject placeholder '{{}}' "
            f"exactly once, found it {count} times in {template!r}"
        )
    target = rewrite.nested("target_new").target("str")
    true = rewrite.nested("target_true").text("str")
    rephrase, neighbours = rec.texts("paraphrase_prompts"), rec.texts("neighborhood_prompts")
    case_id = rec.case_id()
    if target is None:
        return None
    return EditRequest(
        # str.replace rather than str.format: a brace elsewhere in a prompt must not be interpreted.
        prompt=template.replace("{}", subject), target=target, subject=subject, rephrase=rephrase,
        locality_prompt=neighbours[0] if neighbours else None,
        locality_answer=true if neighbours else None, ground_truth=true, case_id=case_id,
    )


def load_counterfact(path: str | os.PathLike, n: int | None = None) -> list[EditRequest]:
    """Loads CounterFact, detecting EasyEdit's format or ROME/MEMIT's from the first record.

    **EasyEdit** (``counterfact-edit.json``, ``counterfact-val.json``): required ``prompt``,
    ``target_new``, ``subject``; optional ``rephrase_prompt``, ``ground_truth``, ``case_id`` (int or
    string), and ``locality_prompt`` with ``locality_ground_truth`` (both or neither) or EasyEdit's
    nested request layout ``locality: {name: {prompt, ground_truth}}`` (the first entry is used; not
    both layouts); ``portability`` (object, accepted and not used). The fields map one to one
    (rephrase=[rephrase_prompt]).

    **ROME/MEMIT** (``counterfact.json``; a record has ``requested_rewrite``): required
    ``requested_rewrite`` {``prompt`` with exactly one ``{}`` placeholder for the subject, ``subject``,
    ``target_new.str``, ``target_true.str``}, ``paraphrase_prompts`` and ``neighborhood_prompts``
    (lists of strings). Mapping: prompt = the template with the subject put in place of ``{}``;
    target = target_new.str (ROME's strings have no leading space; stripped in any case); rephrase = all
    paraphrase_prompts (they start with unrelated text by design of the data set); locality_prompt =
    neighborhood_prompts[0] and locality_answer = target_true.str, because ROME's neighbourhood prompts
    are about other subjects sharing the true attribute; ground_truth = target_true.str. The
    ``attribute_prompts`` and ``generation_prompts`` are not used.

    Every record must be in the detected format. Records with an empty target are skipped with a
    warning.

    Args:
        path: the JSON file, a list of records.
        n: keep only the first ``n`` usable records; must be positive and at most the number available.

    Example:
        >>> reqs = load_counterfact("counterfact_500.json", n=1)  # doctest: +SKIP
        >>> reqs[0].prompt, reqs[0].target                          # doctest: +SKIP
        ('Angola is located in', 'Antarctica')
    """
    _check_n(n, path)
    return _load_counterfact_records(path, _read_json_list(path), n)


def _load_counterfact_records(path: str | os.PathLike, records: list, n: int | None) -> list[EditRequest]:
    first = _Record(f"{path}: record 0", records[0])
    if "requested_rewrite" in first.obj:
        parse = _counterfact_rome
    elif "prompt" in first.obj or "target_new" in first.obj:
        parse = _counterfact_easyedit
    else:
        raise DataFormatError(
            f"{path}: record 0: neither CounterFact format: EasyEdit records have 'prompt' and 'target_new', "
            f"ROME records have 'requested_rewrite' (found fields {sorted(first.obj)})"
        )
    requests = [parse(_Record(f"{path}: record {i}", obj)) for i, obj in enumerate(records)]
    return _finish(path, requests, n)


def load_demo(n: int | None = None) -> list[EditRequest]:
    """Loads the demo set shipped with the package (``memoe_fast/data/demo_edits.json``).

    Hand-written counterfactual edits, in EasyEdit's CounterFact format, of facts that the embedded
    SmolLM2-135M-Instruct predicts correctly before editing (their ``ground_truth`` is its greedy
    continuation), each with a paraphrase naming the same subject and an unrelated locality prompt.

    Example:
        >>> reqs = load_demo(n=2)
        >>> len(reqs)
        2
    """
    where = f"{DEMO_PACKAGE}/{DEMO_FILE}"
    _check_n(n, where)
    text = resources.files(DEMO_PACKAGE).joinpath(DEMO_FILE).read_text(encoding="utf-8")
    return _load_counterfact_records(where, _read_json_list(where, text), n)


def load_requests(spec: str, n: int | None = None) -> list[EditRequest]:
    """Loads edit requests from a spec: ``demo``, ``zsre:PATH`` or ``counterfact:PATH``.

    Example:
        >>> len(load_requests("demo", n=3))
        3
    """
    if not isinstance(spec, str):
        raise TypeError(f"the data spec must be a string, got {type(spec).__name__}")
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "demo" and not sep:
        return load_demo(n)
    loaders = {"zsre": load_zsre, "counterfact": load_counterfact}
    if kind in loaders and sep and path.strip():
        return loaders[kind](path.strip(), n)
    if kind in loaders:
        raise ValueError(f"data spec {spec!r} names no file: write '{kind}:PATH'")
    raise ValueError(f"unknown data spec {spec!r}: expected 'demo', 'zsre:PATH' or 'counterfact:PATH'")
