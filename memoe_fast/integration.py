"""Put a MEMoE bypass into a Hugging Face causal LM, feed it anchors, save it, and take it out again."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os

import torch
import torch.nn as nn

from .anchors import Anchors, AnchorBank, first_token_after
from .bypass import MEMoEBypass
from .config import MEMoEConfig
from .io import atomic_dir

KEY_TENSOR = "key_vectors"  # the key gate's prompt keys in bypass.safetensors (not a parameter)
BASIS_TENSOR = "key_subject_basis"  # the key gate's subject subspaces in bypass.safetensors
FORMAT_VERSION = 2  # 2 adds the backbone, the host fingerprint, shapes, versions and requests; 1 still loads


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a LLaMA-family or GPT-2-family model."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the transformer blocks of {type(model).__name__}")


def resolve_layer(model: nn.Module, layer: int | None, name: str = "layer") -> int:
    """The block index ``layer`` (None: the middle block); ``name`` is what an error calls it (``--layer``)."""
    n = len(transformer_blocks(model))
    idx = n // 2 if layer is None else layer
    if not 0 <= idx < n:
        raise ValueError(f"{name} {layer} is out of range: the model has {n} blocks (0..{n - 1})")
    return idx


ANCHOR_MODES = ("auto", "manual")


def resolve_anchor_mode(anchor_mode: str | None, has_tokenizer: bool) -> str:
    if anchor_mode is None:
        return "auto" if has_tokenizer else "manual"
    if anchor_mode not in ANCHOR_MODES:
        raise ValueError(f"anchor_mode must be one of {ANCHOR_MODES}, got {anchor_mode!r}")
    if anchor_mode == "auto" and not has_tokenizer:
        raise ValueError("anchor_mode='auto' computes anchors from text and needs tokenizer=; "
                         "without one use anchor_mode='manual' and give anchors yourself")
    return anchor_mode


class MEMoEHandle:
    """What :func:`apply_memoe` returns: the bypass, its anchors, and the way back.

    Anchors, by ``anchor_mode``:

    - ``"auto"`` (the default with a tokenizer): a forward of the model that starts new sequences (no
      KV cache yet) gets anchors computed from its ``input_ids`` (decoded to text, turned into
      anchors by the :class:`AnchorBank`), unless the caller gave some.
    - ``"manual"`` (the default without a tokenizer): anchors come only from the caller.

    In both modes, anchors the caller gave always win and are never overwritten:
    ``bypass.set_anchors(t)`` before ``model(...)`` (used by that one forward), or
    ``with handle.anchored(texts, subjects)`` / ``handle.anchored(anchors=...)`` (every forward in the
    block, e.g. teacher-forced scoring of ``prompt + target`` where only the prompt should decide the
    routing). Decode steps with a KV cache reuse the anchors of their prompt's forward. A forward
    without anchors, or with anchors for a different number of sequences, raises.
    """

    def __init__(self, model: nn.Module, config: MEMoEConfig, layer: int, bypass: MEMoEBypass,
                 original: nn.Module, bank: AnchorBank | None, anchor_mode: str | None = None):
        self.model = model
        self.config = config
        self.layer = layer
        self.bypass = bypass
        self.original = original
        self.bank = bank
        self.anchor_mode = resolve_anchor_mode(anchor_mode, bank is not None)
        self.edited_requests: list = []  # what save() records; editors and apply_memoe_to_model append
        self._hook = model.register_forward_pre_hook(self._auto_anchor, with_kwargs=True)
        self.removed = False

    # Anchors.
    def compute_anchors(self, texts: list[str], subjects: list[str | None] | None = None) -> Anchors:
        if self.bank is None:
            raise RuntimeError("this handle has no tokenizer, so it cannot compute anchors from text; "
                               "pass tokenizer= to apply_memoe or call bypass.set_anchors(tensor)")
        return self.bank(texts, subjects)

    def set_anchors(self, texts: list[str], subjects: list[str | None] | None = None, input_ids=None,
                    attention_mask=None) -> Anchors:
        """Anchors from text for the next forward (one forward; see :meth:`MEMoEBypass.set_anchors`);
        with ``input_ids`` (and ``attention_mask``) also the tokens the experts act on."""
        anchors = self.compute_anchors(texts, subjects)
        mask = None if input_ids is None else self.token_mask(anchors, input_ids, attention_mask)
        self.bypass.set_anchors(anchors.vectors, anchors.scope, token_mask=mask, route=self._route(anchors),
                                candidates=self._candidates(anchors))
        return anchors

    def _route(self, anchors: Anchors):
        route = anchors.route
        return route if route is not None and bool((route >= 0).any()) else None

    def _candidates(self, anchors: Anchors):
        """``(S, K)`` bool: the prompt keys of each sequence's matched subjects (key gate), or None."""
        if self.config.key_threshold is None or anchors.matched is None or not self.bypass.key_subject.numel():
            return None  # no prompt keys yet (nothing edited through an editor): no key gate
        owner = self.bypass.key_subject.cpu()
        out = torch.zeros(len(anchors.matched), owner.numel(), dtype=torch.bool)
        for s, subjects in enumerate(anchors.matched):
            if subjects and owner.numel():
                out[s] = torch.isin(owner, torch.tensor(subjects, dtype=torch.long))
        return out

    def active_starts(self, anchors: Anchors, rows: list[list[int]]) -> list[int]:
        """For each sequence (its real token ids, no padding), the first position the bypass acts on:
        0 with ``bypass_positions="all"``, else the first token after its edited-subject mention."""
        if self.config.bypass_positions == "all" or anchors.scope_end is None:
            return [0] * len(rows)
        tok = self.bank.tokenizer
        return [first_token_after(tok, ids, end) if in_scope else 0
                for ids, end, in_scope in zip(rows, anchors.scope_end, anchors.scope.tolist())]

    def token_mask(self, anchors: Anchors, input_ids: torch.Tensor, attention_mask=None):
        """``(B*L,)`` bool: the tokens of a padded ``(B, L)`` input the bypass acts on (None: all)."""
        if self.config.bypass_positions == "all":
            return None
        ids = input_ids.detach().cpu()
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
        rows = [ids[i][real[i]].tolist() for i in range(ids.shape[0])]
        starts = self.active_starts(anchors, rows)
        rank = real.long().cumsum(1) - 1  # each real token's index among its row's real tokens
        return (real & (rank >= torch.tensor(starts).unsqueeze(1))).reshape(-1)

    @contextlib.contextmanager
    def anchored(self, texts: list[str] | None = None, subjects=None, anchors: Anchors | torch.Tensor | None = None,
                 token_seq=None, scope: torch.Tensor | None = None, input_ids=None, attention_mask=None,
                 token_mask=None, key_tokens=None):
        """Pin the anchors for every forward inside the block (from texts, precomputed ``anchors``, or a
        ``(S, A)`` tensor with an optional ``scope``); ``token_seq`` for packed inputs (see
        :meth:`MEMoEBypass.set_anchors`). The anchors set before the block come back after it. With
        ``bypass_positions="after_subject"`` give the padded ``input_ids`` (and ``attention_mask``) the
        forwards will see, or a ready ``token_mask``, so the experts act after the subject only;
        ``key_tokens`` as in :meth:`MEMoEBypass.set_anchors`."""
        if anchors is None:
            anchors = self.compute_anchors(texts, subjects)
        elif isinstance(anchors, torch.Tensor):
            anchors = Anchors(anchors, scope, [[] for _ in range(anchors.shape[0])])
        if token_mask is None and input_ids is not None:
            token_mask = self.token_mask(anchors, input_ids, attention_mask)
        before = self.bypass.pending_anchors
        self.bypass.set_anchors(anchors.vectors, anchors.scope, token_seq, pin=True, token_mask=token_mask,
                                route=self._route(anchors), candidates=self._candidates(anchors),
                                key_tokens=key_tokens)
        try:
            yield anchors
        finally:
            self.bypass._pending = before

    def _auto_anchor(self, module, args, kwargs):
        if self.bypass.pending_anchors is not None or not self.bypass.enabled:
            return None  # the caller's anchors are never overwritten; a disabled bypass needs none
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers v4 / v5 names
        past = 0
        if cache is not None:
            past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]
        mask = kwargs.get("attention_mask")
        if input_ids is not None and mask is not None and mask.shape[-1] != input_ids.shape[-1]:
            past = max(past, mask.shape[-1] - input_ids.shape[-1])
        if past > 0:
            last = self.bypass.last_anchors
            batch = input_ids.shape[0] if input_ids is not None else None
            if last is None or last.token_seq is not None or (batch is not None and last.vectors.shape[0] != batch):
                raise RuntimeError("decode step without the anchors of its prompt: start generation from the prompt")
            # Every generated token comes after its prompt's subject: no token mask; the routes stay.
            # The routes are the prompt's as its forward resolved them (a matched key's expert first).
            route = self.bypass.last_route if self.bypass.last_route is not None else last.route
            self.bypass.set_anchors(last.vectors, last.scope, route=route, candidates=last.candidates,
                                    latched=self.bypass.last_latched)
            return None
        if self.anchor_mode == "manual":
            return None
        if input_ids is None:
            raise RuntimeError("MEMoE needs the input text for its anchors: call the model with input_ids, "
                               "or set them with `with handle.anchored(texts): ...`")
        texts = []
        for i in range(input_ids.shape[0]):
            ids = input_ids[i] if mask is None else input_ids[i][mask[i].bool()]
            texts.append(self.bank.tokenizer.decode(ids.tolist(), skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False))
        self.set_anchors(texts, input_ids=input_ids, attention_mask=mask)
        return None

    # Switching.
    def enable(self) -> None:
        self.bypass.enabled = True

    def disable(self) -> None:
        self.bypass.enabled = False

    @contextlib.contextmanager
    def disabled(self):
        """Run the unedited model inside the block (the bypass switched off)."""
        was = self.bypass.enabled
        self.bypass.enabled = False
        try:
            yield
        finally:
            self.bypass.enabled = was

    def set_impl(self, impl: str) -> None:
        self.bypass.impl = impl

    def add_subjects(self, subjects, owner: int = -1) -> None:
        if self.bank is not None:
            self.bank.add_subjects(subjects, owner)

    def parameters(self):
        """The parameters an optimiser should train (the gate only when it gets a real gradient)."""
        return self.bypass.trainable_parameters()

    def remove(self) -> nn.Module:
        """Take the bypass out and put the original MLP module back; returns the model."""
        if not self.removed:
            setattr(transformer_blocks(self.model)[self.layer], "mlp", self.original)
            self._hook.remove()
            self.removed = True
        return self.model

    # Saving.
    def save(self, path: str, extra: dict | None = None, requests=None) -> None:
        """Write ``bypass.safetensors`` and ``memoe.json`` into ``path`` atomically (no pickle).

        ``memoe.json`` records what the edit belongs to and holds: the config and block, the edited
        subjects, the backbone (:func:`backbone_info`), a fingerprint of the host block's weights
        (:func:`host_fingerprint`), every tensor's shape and dtype, the library version, and the edited
        requests (``requests``, else :attr:`edited_requests`: dataclasses or dicts)."""
        from safetensors.torch import save_file

        from . import __version__

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.bypass.bypass_parameters().items()}
        reqs = self.edited_requests if requests is None else list(requests)
        meta = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "config": self.config.to_dict(),
            "layer": self.layer,
            "subjects": list(self.bank.subjects) if self.bank else [],
            "subject_owners": self.bank.owners.tolist() if self.bank else [],
            "num_experts": self.bypass.num_experts,
            "owned_experts": self.bypass.owned_experts,
            "backbone": backbone_info(self.model),
            "host_fingerprint": host_fingerprint(self.original),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
            "requests": [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in reqs],
            **(extra or {}),
        }
        if self.bypass.keys.shape[0] and self.bank is not None:
            # The key gate's prompt keys; their subjects by name (bank indices change on reload).
            tensors[KEY_TENSOR] = self.bypass.keys.detach().cpu().contiguous()
            meta["key_subjects"] = [self.bank.subjects[i] for i in self.bypass.key_subject.tolist()]
            meta["key_owners"] = self.bypass.key_owner.tolist()
            if self.bypass.basis_subject.numel():
                tensors[BASIS_TENSOR] = self.bypass.key_basis.detach().cpu().contiguous()
                meta["basis_subjects"] = [self.bank.subjects[i] for i in self.bypass.basis_subject.tolist()]
        text = json.dumps(meta, indent=2)  # fails here, before anything is written, on a non-JSON value
        with atomic_dir(path) as tmp:
            save_file(tensors, os.path.join(tmp, "bypass.safetensors"))
            with open(os.path.join(tmp, "memoe.json"), "w", encoding="utf-8") as f:
                f.write(text)

    def check_compatible(self, meta: dict, path: str = "edits") -> None:
        """Raise ``ValueError`` naming what differs when the edit in ``meta`` was made on another backbone
        or block (the block index, the host weights' fingerprint, tensor shapes)."""
        if meta.get("layer") is not None and meta["layer"] != self.layer:
            raise ValueError(f"{path}: the edit is for block {meta['layer']}, this bypass is in block {self.layer}")
        saved = meta.get("host_fingerprint")
        if saved is not None:
            here = host_fingerprint(self.original)
            diffs = [k for k in ("shapes", "dtypes") if saved.get(k) != here.get(k)]
            if diffs or saved.get("sha256") != here.get("sha256"):
                what = {"shapes": f"shapes {saved.get('shapes')} vs {here.get('shapes')}",
                        "dtypes": f"dtypes {saved.get('dtypes')} vs {here.get('dtypes')}"}
                detail = "; ".join(what[d] for d in diffs) or (
                    f"sha256 {saved.get('sha256', '')[:12]} vs {here['sha256'][:12]}")
                src = meta.get("backbone", {}).get("name_or_path") or meta.get("model") or "?"
                raise ValueError(
                    f"{path}: made on another backbone: block {self.layer}'s MLP weights differ ({detail}); saved "
                    f"from {src!r}, this model is {backbone_info(self.model)['name_or_path']!r}")
        experts = int(meta.get("num_experts", self.bypass.num_experts))
        for name, info in (meta.get("tensors") or {}).items():
            p = self.bypass.bypass_parameters().get(name)
            # Lifelong editing may have grown the expert set (the first dimension); the rest must match.
            if p is not None and (list(p.shape[1:]) != info["shape"][1:] or info["shape"][0] != max(experts, p.shape[0])):
                raise ValueError(f"{path}: tensor {name!r} was saved with shape {tuple(info['shape'])}, "
                                 f"this bypass has {tuple(p.shape)}")

    def load_weights(self, path: str) -> dict:
        """Load bypass weights and subjects saved by :meth:`save`; returns the saved metadata.

        Refuses (``ValueError`` naming what differs) an edit made on another backbone, before any
        tensor is touched; every tensor (experts, biases, gate) is restored."""
        from safetensors.torch import load_file

        meta = read_edit_meta(path)
        self.check_compatible(meta, path)
        tensors = load_file(os.path.join(path, "bypass.safetensors"))
        keys = tensors.pop(KEY_TENSOR, None)
        basis = tensors.pop(BASIS_TENSOR, None)
        extra = int(meta.get("num_experts", self.bypass.num_experts)) - self.bypass.num_experts
        if extra > 0:  # lifelong editing grew the expert set
            self.bypass.add_experts(extra, freeze_existing=False)
        params = self.bypass.bypass_parameters()
        if set(tensors) != set(params):
            raise ValueError(f"{path}: bypass tensors {sorted(tensors)} do not match this model's {sorted(params)}")
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        owners = meta.get("subject_owners") or [-1] * len(meta.get("subjects", []))
        # Experts that hold a sequential batch each; the next batch gets a fresh one (older saves: the owners).
        self.bypass.owned_experts = int(meta.get("owned_experts", max([-1, *owners]) + 1))
        for owner in dict.fromkeys(owners):  # one call per owner: the subject pattern is rebuilt per call
            self.add_subjects([s for s, o in zip(meta.get("subjects", []), owners) if o == owner], int(owner))
        self.edited_requests.extend(meta.get("requests", []))
        if keys is not None and self.bank is not None:
            self.bypass.clear_keys()
            if basis is not None:
                self.bypass.add_subject_basis(
                    torch.tensor([self.bank.subject_index(s) for s in meta["basis_subjects"]]), basis)
            self.bypass.add_keys(keys, torch.tensor([self.bank.subject_index(s) for s in meta["key_subjects"]]),
                                 torch.tensor(meta.get("key_owners") or [-1] * len(meta["key_subjects"])))
        return meta


def backbone_info(model: nn.Module) -> dict:
    """What names the backbone: its ``name_or_path``, model type, block count and hidden size."""
    cfg = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(cfg, "model_type", None),
        "num_blocks": len(transformer_blocks(model)),
        "hidden_size": model.get_input_embeddings().weight.shape[1],
    }


def host_fingerprint(mlp: nn.Module) -> dict:
    """sha256 over the host MLP's tensors (names, dtypes, shapes and bytes, in name order), with the
    shapes and dtypes in the clear so that a mismatch can say what differs."""
    h = hashlib.sha256()
    shapes, dtypes = {}, {}
    for name, t in sorted(mlp.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        shapes[name], dtypes[name] = list(t.shape), str(t.dtype).replace("torch.", "")
        h.update(f"{name}|{dtypes[name]}|{shapes[name]}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return {"sha256": h.hexdigest(), "shapes": shapes, "dtypes": dtypes}


def read_edit_meta(path: str) -> dict:
    meta_path = os.path.join(path, "memoe.json")
    if not os.path.exists(meta_path) or not os.path.exists(os.path.join(path, "bypass.safetensors")):
        raise FileNotFoundError(f"{path}: not a saved MEMoE edit (expected memoe.json and bypass.safetensors)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def apply_memoe(model: nn.Module, config: MEMoEConfig | None = None, tokenizer=None, nlp=None,
                anchor_mode: str | None = None, bypass: MEMoEBypass | None = None) -> MEMoEHandle:
    """Wrap the MLP of block ``config.layer`` with a :class:`MEMoEBypass`; freeze everything else.

    Args:
        model: a Hugging Face causal LM (LLaMA or GPT-2 family), float or bitsandbytes 8-bit.
        config: :class:`MEMoEConfig` (defaults when None).
        tokenizer: the model's tokenizer, needed to compute anchors from text.
        nlp: an optional spaCy pipeline (the small English model is loaded lazily otherwise).
        anchor_mode: ``"auto"`` (anchors from the input text; needs ``tokenizer``) or ``"manual"``
            (only the caller's anchors); None picks ``"auto"`` when a tokenizer is given.
        bypass: a ready :class:`MEMoEBypass` around this block's MLP (e.g. from
            :meth:`MEMoEBypass.from_modules`) to put in place instead of a new one; ``config`` then
            only chooses the block (None: the bypass's own config).

    Returns:
        a :class:`MEMoEHandle`; ``handle.remove()`` puts the original MLP back.

    Example::

        handle = apply_memoe(model, MEMoEConfig(layer=15), tokenizer)
        out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"))
        handle.remove()
    """
    config = config or (bypass.config if bypass is not None else MEMoEConfig())
    anchor_mode = resolve_anchor_mode(anchor_mode, tokenizer is not None)
    for p in model.parameters():
        p.requires_grad_(False)
    layer = resolve_layer(model, config.layer)
    block = transformer_blocks(model)[layer]
    original = block.mlp
    if isinstance(original, MEMoEBypass):
        raise RuntimeError(f"block {layer} already has a MEMoE bypass; remove it first")
    embedding = model.get_input_embeddings()
    if bypass is None:
        bypass = MEMoEBypass(original, config, anchor_dim=embedding.weight.shape[1])
    elif bypass.base_layer is not original:
        raise ValueError(f"the given bypass wraps another module than block {layer}'s MLP")
    elif tokenizer is not None and bypass.anchor_dim != embedding.weight.shape[1]:
        raise ValueError(f"the given bypass reads anchors of width {bypass.anchor_dim}, but anchors from text have "
                         f"the embedding width {embedding.weight.shape[1]}; use anchor_mode='manual' without a tokenizer")
    else:
        bypass.config = config = dataclasses.replace(bypass.config, layer=layer)
    bypass.train(model.training)  # a new module starts in training mode; follow the host model
    block.mlp = bypass
    bank = None
    if tokenizer is not None:
        bank = AnchorBank(tokenizer, embedding, config.anchor_pooling, config.scope_threshold, nlp=nlp)
    return MEMoEHandle(model, config, layer, bypass, original, bank, anchor_mode)
