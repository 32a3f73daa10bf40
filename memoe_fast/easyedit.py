"""EasyEdit's calling convention: ``MEMoEHyperParams.from_hparams(yaml)`` and
``apply_memoe_to_model(model, tok, requests, hparams)``, so that EasyEdit (or code written like it) takes
MEMoE as one more algorithm.

Example::

    from memoe_fast import MEMoEHyperParams, apply_memoe_to_model

    hparams = MEMoEHyperParams.from_hparams("hparams/MEMoE/smollm2.yaml")
    requests = [{"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
                 "subject": "Danielle Darrieux", "ground_truth": "French",
                 "locality": {"neighborhood": {"prompt": "The capital of Italy is", "ground_truth": "Rome"}}}]
    edited, restore = apply_memoe_to_model(model, tok, requests, hparams)
    ...
    restore()          # the unedited model again
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .config import MEMoEConfig
from .datasets import DataFormatError, EditRequest, _counterfact_easyedit, _Record

# EasyEdit's names that differ from MEMoEConfig's.
ALIASES = {"num_steps": "steps", "scope": "anchor_scope"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(MEMoEConfig)} - {"layer"}


@dataclass
class MEMoEHyperParams:
    """MEMoE's hyperparameters in EasyEdit's form (a YAML file of flat keys).

    Required: ``alg_name`` (``"MEMoE"``), ``model_name`` (``"smollm2"``, a local folder or a cached Hugging
    Face id), ``layers`` (a list with the one block whose MLP gets the bypass, EasyEdit style; an int
    is accepted). Optional: ``device`` (``"cpu"``, ``"cuda"``, an int GPU index; used by
    :func:`load_model_for`, the edit runs where the given model is), ``editor``
    (``"fast"`` or ``"reference"``), ``mode`` (``"batch"`` / ``"sequential"``) with ``batch_size``,
    EasyEdit's own ``max_length``, ``model_parallel`` and ``fp16`` (read by EasyEdit, not here), and
    every :class:`MEMoEConfig` field (``num_experts``, ``top_k``, ``lr``, ``steps`` or EasyEdit's
    ``num_steps``, ``scope`` for ``anchor_scope``, ``scale``, ``expert_activation``, ...). Unknown keys
    and missing ones are errors naming them.
    """

    alg_name: str
    model_name: str
    layers: list[int]
    device: str | int = "cpu"
    editor: str = "fast"
    mode: str = "batch"
    batch_size: int | None = None
    # Read by EasyEdit's own editor and evaluation, not by this library.
    max_length: int = 40
    model_parallel: bool = False
    fp16: bool = False
    config: dict = field(default_factory=dict)  # MEMoEConfig overrides, by MEMoEConfig's names

    REQUIRED = ("alg_name", "model_name", "layers")
    OWN = ("alg_name", "model_name", "layers", "device", "editor", "mode", "batch_size", "max_length",
           "model_parallel", "fp16")

    def __post_init__(self):
        where = "MEMoEHyperParams"
        if self.alg_name != "MEMoE":
            raise ValueError(f"{where}: alg_name must be 'MEMoE', got {self.alg_name!r}")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(f"{where}: model_name must be a non-empty string, got {self.model_name!r}")
        layers = [self.layers] if isinstance(self.layers, int) and not isinstance(self.layers, bool) else self.layers
        if (not isinstance(layers, list) or len(layers) != 1 or isinstance(layers[0], bool)
                or not isinstance(layers[0], int)):
            raise ValueError(f"{where}: layers must be a list with one block index (MEMoE edits one block), got {self.layers!r}")
        self.layers = layers
        if self.editor not in ("fast", "reference"):
            raise ValueError(f"{where}: editor must be 'fast' or 'reference', got {self.editor!r}")
        if self.mode not in ("batch", "sequential"):
            raise ValueError(f"{where}: mode must be 'batch' or 'sequential', got {self.mode!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"{where}: max_length must be a positive integer, got {self.max_length!r}")
        for name in ("model_parallel", "fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.mode == "sequential" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"{where}: mode 'sequential' needs batch_size >= 1, got {self.batch_size!r}")
        self.to_config()  # every MEMoEConfig value is checked now, not at the first edit

    @classmethod
    def from_dict(cls, data: dict, where: str = "hparams") -> "MEMoEHyperParams":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of hyperparameters, got {type(data).__name__}")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        own, config = {}, {}
        for key, value in data.items():
            name = ALIASES.get(key, key)
            if key in cls.OWN:
                own[key] = value
            elif name in CONFIG_FIELDS:
                if name in config:
                    raise ValueError(f"{where}: '{key}' and its alias both given")
                config[name] = _typed(where, key, name, value)
            else:
                known = sorted(set(cls.OWN) | CONFIG_FIELDS | set(ALIASES))
                raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
        try:
            return cls(**own, config=config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_hparams(cls, path: str | os.PathLike) -> "MEMoEHyperParams":
        """Read a YAML file (``.yaml`` may be left out, as EasyEdit allows)."""
        import yaml

        path = str(path)
        if not os.path.exists(path) and os.path.exists(path + ".yaml"):
            path += ".yaml"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such hparams file")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_dict(data, where=path)

    def to_config(self) -> MEMoEConfig:
        """The :class:`MEMoEConfig` these hyperparameters describe."""
        try:
            return MEMoEConfig(layer=self.layers[0], **self.config)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device}" if isinstance(self.device, int) and not isinstance(self.device, bool) else str(self.device)


_DEFAULTS = MEMoEConfig()


def _typed(where: str, key: str, name: str, value):
    """A MEMoEConfig value with the field's type; YAML 1.1 reads ``5e-3`` (no dot) as a string, so
    numeric strings are accepted for float fields."""
    default = getattr(_DEFAULTS, name)
    kind = type(default)
    if value is None or default is None:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def load_model_for(hparams: MEMoEHyperParams):
    """``(model, tokenizer)`` named by ``hparams.model_name`` on ``hparams.device``."""
    from .models import load_model
    from .preflight import preflight

    preflight(hparams.model_name)
    return load_model(hparams.model_name, device=hparams.torch_device)


def requests_from_dicts(requests: list[dict]) -> list[EditRequest]:
    """EasyEdit request dicts (``prompt``, ``target_new``, ``subject``, optional ``ground_truth``,
    ``rephrase_prompt`` (a string or a list), nested ``locality`` / ``portability``) as
    :class:`EditRequest`; errors name the request and the field."""
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, list) or not requests:
        raise DataFormatError("requests: expected a non-empty list of request dicts")
    records, rephrases = [], []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise DataFormatError(f"requests: record {i}: must be a dict, got {type(r).__name__}")
        r = dict(r)
        reph = r.get("rephrase_prompt")
        if isinstance(reph, list):  # EasyEdit allows several paraphrases
            bad = [j for j, p in enumerate(reph) if not isinstance(p, str)]
            if bad:
                raise DataFormatError(f"requests: record {i}: field 'rephrase_prompt[{bad[0]}]' must be a string")
            r.pop("rephrase_prompt")
            rephrases.append([p.strip() for p in reph if p.strip()])
        else:
            rephrases.append(None)
        records.append(r)
    out = []
    for i, r in enumerate(records):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a dropped extra locality entry is documented
            req = _counterfact_easyedit(_Record(f"requests: record {i}", r))
        if req is None:  # the file loaders skip such records; a caller's request must not vanish
            raise DataFormatError(f"requests: record {i}: field 'target_new' is empty; nothing to edit")
        out.append(req)
    for req, reph in zip(out, rephrases):
        if reph is not None:
            req.rephrase = reph
    return out


def apply_memoe_to_model(model, tok, requests: list[dict], hparams: MEMoEHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any):
    """Edit ``model`` with MEMoE on EasyEdit-style ``requests``; returns ``(edited_model, restore)``.

    As EasyEdit's WISE and GRACE: the second value is a callable that takes the edits out again
    (``restore()`` puts the original MLP back; the backbone's weights are never changed). It also
    carries ``restore.handle`` (the :class:`~memoe_fast.integration.MEMoEHandle`, for ``save``) and
    ``restore.result`` (losses and, with ``evaluate=True``, the metrics).

    Args:
        model, tok: the backbone and its tokenizer.
        requests: EasyEdit request dicts (see :func:`requests_from_dicts`).
        hparams: :class:`MEMoEHyperParams`.
        copy: edit a deep copy of ``model`` (the given one stays unedited).
        return_orig_weights: accepted for EasyEdit's signature; MEMoE never changes the backbone's
            weights, so the restore callable is returned either way.
        keep_original_weight: start from the unedited model even when an earlier call left edits in
            it; False (EasyEdit's default) continues editing the bypass already there (sequential editing).
        kwargs: ``evaluate`` (bool, default False): also measure Reliability / Generality / Locality;
            ``nlp``: a spaCy pipeline; ``progress`` (bool); other EasyEdit keywords are ignored.
    """
    from .editing import FastMEMoEEditor, MEMoEEditor
    from .integration import transformer_blocks
    from .bypass import MEMoEBypass
    from .preflight import check_spacy

    if not isinstance(hparams, MEMoEHyperParams):
        raise TypeError(f"hparams must be MEMoEHyperParams, got {type(hparams).__name__}")
    reqs = requests_from_dicts(requests)
    nlp = kwargs.get("nlp")
    if nlp is None:
        check_spacy()  # before any work: a missing spaCy model is reported now, not after training
    if copy:
        model = _copy.deepcopy(model)
    config = hparams.to_config()
    block = transformer_blocks(model)[config.layer] if 0 <= config.layer < len(transformer_blocks(model)) else None
    existing = getattr(block, "mlp", None) if block is not None else None
    handle = None
    if isinstance(existing, MEMoEBypass):
        handle = getattr(existing, "handle", None)
        if keep_original_weight and handle is not None:
            handle.remove()
            handle = None
    cls = FastMEMoEEditor if hparams.editor == "fast" else MEMoEEditor
    editor = cls(model, tok, config, handle=handle, nlp=nlp, progress=bool(kwargs.get("progress", False)))
    editor.handle.bypass.handle = editor.handle  # found again by the next call (sequential editing)
    result = editor.edit(reqs, mode=hparams.mode, batch_size=hparams.batch_size,
                         evaluate=bool(kwargs.get("evaluate", False)))
    handle = editor.handle
    handle.edited_requests.extend(dataclasses.asdict(r) for r in reqs)  # saved with the edit

    def restore():
        """Take the MEMoE edits out: the model is the unedited one again."""
        handle.bypass.__dict__.pop("handle", None)
        handle.remove()
        return model

    restore.handle = handle
    restore.result = result
    return model, restore
