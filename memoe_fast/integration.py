"""Put a MEMoE bypass into a Hugging Face causal LM, feed it anchors, save it, and take it out again."""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn

from .anchors import Anchors, AnchorBank, first_token_after
from .bypass import MEMoEBypass
from .config import MEMoEConfig
from .io import atomic_dir

FORMAT_VERSION = 1


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


def resolve_layer(model: nn.Module, layer: int | None) -> int:
    n = len(transformer_blocks(model))
    idx = n // 2 if layer is None else layer
    if not 0 <= idx < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} blocks (0..{n - 1})")
    return idx


class MEMoEHandle:
    """What :func:`apply_memoe` returns: the bypass, its anchors, and the way back.

    Anchors are set automatically from ``input_ids`` on every forward of the model that starts a new
    sequence (no KV cache yet): the ids are decoded to text and turned into anchors by the
    :class:`AnchorBank`. Decode steps with a KV cache keep the anchors of their prompt. To give anchors
    yourself (e.g. for teacher-forced scoring of ``prompt + target``, where only the prompt should
    decide the routing), use ``with handle.anchored(texts, subjects): model(...)``.
    """

    def __init__(self, model: nn.Module, config: MEMoEConfig, layer: int, bypass: MEMoEBypass,
                 original: nn.Module, bank: AnchorBank | None):
        self.model = model
        self.config = config
        self.layer = layer
        self.bypass = bypass
        self.original = original
        self.bank = bank
        self._pinned = 0
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
        anchors = self.compute_anchors(texts, subjects)
        mask = None if input_ids is None else self.token_mask(anchors, input_ids, attention_mask)
        self.bypass.set_anchors(anchors.vectors, anchors.scope, token_mask=mask, route=self._route(anchors))
        return anchors

    def _route(self, anchors: Anchors):
        route = anchors.route
        return route if route is not None and bool((route >= 0).any()) else None

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
    def anchored(self, texts: list[str] | None = None, subjects=None, anchors: Anchors | None = None,
                 token_seq=None, input_ids=None, attention_mask=None, token_mask=None):
        """Fix the anchors for the forwards inside the block (from texts, or precomputed ``anchors``);
        ``token_seq`` for packed inputs (see :meth:`MEMoEBypass.set_anchors`). With
        ``bypass_positions="after_subject"`` give the padded ``input_ids`` (and ``attention_mask``) the
        forwards will see, or a ready ``token_mask``, so the bypass acts after the subject only."""
        anchors = anchors if anchors is not None else self.compute_anchors(texts, subjects)
        if token_mask is None and input_ids is not None:
            token_mask = self.token_mask(anchors, input_ids, attention_mask)
        self.bypass.set_anchors(anchors.vectors, anchors.scope, token_seq, token_mask=token_mask,
                                route=self._route(anchors))
        self._pinned += 1
        try:
            yield anchors
        finally:
            self._pinned -= 1

    def _auto_anchor(self, module, args, kwargs):
        if self._pinned or not self.bypass.enabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers v4 / v5 names
        past = 0
        if cache is not None:
            past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]
        mask = kwargs.get("attention_mask")
        if input_ids is not None and mask is not None and mask.shape[-1] != input_ids.shape[-1]:
            past = max(past, mask.shape[-1] - input_ids.shape[-1])
        if past > 0:
            anchor = self.bypass._anchor
            if anchor is None or input_ids is None or anchor.shape[0] != input_ids.shape[0]:
                raise RuntimeError("decode step without the anchors of its prompt: start generation from the prompt")
            self.bypass._token_mask = None  # every generated token comes after its prompt's subject
            return None
        if input_ids is None:
            raise RuntimeError("MEMoE needs the input text for its anchors: call the model with input_ids, "
                               "or set them with `with handle.anchored(texts): ...`")
        texts = []
        for i in range(input_ids.shape[0]):
            ids = input_ids[i] if mask is None else input_ids[i][mask[i].bool()]
            texts.append(self.bank.tokenizer.decode(ids.tolist(), skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False) if self.bank else "")
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
    def save(self, path: str, extra: dict | None = None) -> None:
        """Write ``bypass.safetensors`` and ``memoe.json`` into ``path`` atomically."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.bypass.bypass_parameters().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layer": self.layer,
            "subjects": list(self.bank.subjects) if self.bank else [],
            "subject_owners": self.bank._owner.tolist() if self.bank else [],
            "num_experts": self.bypass.num_experts,
            **(extra or {}),
        }
        with atomic_dir(path) as tmp:
            save_file(tensors, os.path.join(tmp, "bypass.safetensors"))
            with open(os.path.join(tmp, "memoe.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)

    def load_weights(self, path: str) -> dict:
        """Load bypass weights and subjects saved by :meth:`save`; returns the saved metadata."""
        from safetensors.torch import load_file

        meta = read_edit_meta(path)
        tensors = load_file(os.path.join(path, "bypass.safetensors"))
        extra = int(meta.get("num_experts", self.bypass.num_experts)) - self.bypass.num_experts
        if extra > 0:  # lifelong editing grew the expert set
            self.bypass.add_experts(extra, freeze_existing=False)
        params = self.bypass.bypass_parameters()
        if set(tensors) != set(params):
            raise ValueError(f"{path}: bypass tensors {sorted(tensors)} do not match this model's {sorted(params)}")
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
                p.copy_(tensors[name])
        owners = meta.get("subject_owners") or [-1] * len(meta.get("subjects", []))
        for owner in dict.fromkeys(owners):  # one call per owner: the subject pattern is rebuilt per call
            self.add_subjects([s for s, o in zip(meta.get("subjects", []), owners) if o == owner], int(owner))
        return meta


def read_edit_meta(path: str) -> dict:
    meta_path = os.path.join(path, "memoe.json")
    if not os.path.exists(meta_path) or not os.path.exists(os.path.join(path, "bypass.safetensors")):
        raise FileNotFoundError(f"{path}: not a saved MEMoE edit (expected memoe.json and bypass.safetensors)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def apply_memoe(model: nn.Module, config: MEMoEConfig | None = None, tokenizer=None, nlp=None) -> MEMoEHandle:
    """Wrap the MLP of block ``config.layer`` with a :class:`MEMoEBypass`; freeze everything else.

    Args:
        model: a Hugging Face causal LM (LLaMA or GPT-2 family), float or bitsandbytes 8-bit.
        config: :class:`MEMoEConfig` (defaults when None).
        tokenizer: the model's tokenizer, needed to compute anchors from text.
        nlp: an optional spaCy pipeline (the small English model is loaded lazily otherwise).

    Returns:
        a :class:`MEMoEHandle`; ``handle.remove()`` puts the original MLP back.

    Example::

        handle = apply_memoe(model, MEMoEConfig(layer=15), tokenizer)
        out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"))
        handle.remove()
    """
    config = config or MEMoEConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    layer = resolve_layer(model, config.layer)
    block = transformer_blocks(model)[layer]
    original = block.mlp
    if isinstance(original, MEMoEBypass):
        raise RuntimeError(f"block {layer} already has a MEMoE bypass; remove it first")
    embedding = model.get_input_embeddings()
    bypass = MEMoEBypass(original, config, anchor_dim=embedding.weight.shape[1])
    bypass.train(model.training)  # a new module starts in training mode; follow the host model
    block.mlp = bypass
    bank = None
    if tokenizer is not None:
        bank = AnchorBank(tokenizer, embedding, config.anchor_pooling, config.scope_threshold, nlp=nlp)
    return MEMoEHandle(model, config, layer, bypass, original, bank)
