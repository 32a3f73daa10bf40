"""``MEMoEBypass``: a host MLP plus a bypass mixture of experts routed by knowledge anchors.

``out = host(x) + λ·s·Σ_{e∈topk} g_e·expert_e(x)``, where ``s`` is 1 for sequences in the edit scope
(or always, with ``anchor_scope`` off) and the gate reads ``concat(x, anchor)``.

Anchors are per sequence, a ``(B, A)`` tensor and an optional ``(B,)`` scope mask for a ``(B, L, D)``
input: pass them to ``forward(x, anchors, scope)``, or set them with :meth:`MEMoEBypass.set_anchors`
for the next forward (consumed by it, unless pinned, so they can never go stale).
:class:`~memoe_fast.integration.MEMoEHandle` sets them from the input text, including decode steps with
a KV cache, and never overwrites anchors the caller set.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import MEMoEConfig
from .ops import load_balance_loss, moe_bypass


@dataclass
class AnchorSet:
    """Anchors for one forward (or every forward, when ``pinned``): ``vectors`` (S, A), ``scope`` (S,)
    bool on the CPU or None (every sequence in scope), ``token_seq`` (N,) for packed inputs or None."""

    vectors: torch.Tensor
    scope: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    pinned: bool = False
    token_mask: torch.Tensor | None = None  # (N,) bool: the tokens the experts act on (None: all)
    route: torch.Tensor | None = None  # (S,) int64: forced expert per sequence, -1: the gate's choice
    candidates: torch.Tensor | None = None  # (S, K) bool: the prompt keys a sequence may match (key gate)
    latched: torch.Tensor | None = None  # (S,) bool: sequences already past a matching token (decode steps)
    key_tokens: torch.Tensor | None = None  # (N,) bool: the tokens that may match a key (None: all)


def _float_weight(linear: nn.Module) -> torch.Tensor:
    """A host projection's weight as a float ``(out, in)`` tensor, dequantising bitsandbytes int8.

    bitsandbytes stores ``round(127 · w / absmax_row)`` as int8 (``weight``) and the row absmax as
    ``SCB``, which moves from the weight to ``linear.state`` on the first forward; ``CB · SCB / 127`` is
    its own ``int8_vectorwise_dequant`` (tests/test_int8.py compares the two).
    """
    w = linear.weight
    if w.dtype == torch.int8:
        state = getattr(linear, "state", None)
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(state, "SCB", None)
        if scb is None:
            raise TypeError(f"int8 weight of {type(linear).__name__} has no SCB scales to dequantise it")
        out_f, in_f = getattr(linear, "out_features", None), getattr(linear, "in_features", None)
        # bitsandbytes < 0.45 swaps the weight for a tiled GPU layout (state.CxB) after the first CUDA
        # forward; those bytes are not a row-major (out, in) matrix any more.
        stale = getattr(state, "__dict__", {}).get("CxB") is not None  # a field before 0.45, a deprecated property after
        if stale or (out_f is not None and tuple(w.shape) != (out_f, in_f)):
            raise TypeError(
                f"int8 weight of {type(linear).__name__} is in a tiled layout (bitsandbytes < 0.45 after a "
                "forward on the GPU): apply MEMoE before the model's first forward, or upgrade bitsandbytes"
            )
        return w.detach().float() * (scb.detach().float().unsqueeze(1) / 127.0)
    if type(linear).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return w.detach().float().t()
    return w.detach().float()


def _float_bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float()


GLU_ACTIVATIONS = ("silu_glu",)
TWO_LAYER_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def _best_of_each_sequence(score: torch.Tensor, eligible: torch.Tensor, seq_of: torch.Tensor, n_seq: int) -> torch.Tensor:
    """``(n,)`` bool: the eligible rows whose ``score`` is their sequence's highest among its eligible rows
    (``seq_of``: each row's sequence)."""
    scored = score.masked_fill(~eligible, -3.0)  # below any cosine
    top = torch.full((n_seq,), -3.0, device=score.device).scatter_reduce(0, seq_of, scored, "amax")
    return eligible & (scored == top[seq_of])


def describe_host(mlp: nn.Module) -> dict:
    """Recognise the host MLP: LLaMA-style gated SiLU (``gate_proj``/``up_proj``/``down_proj``, with or
    without biases) or GPT-2-style (``c_fc``/``c_proj``, Conv1D). ``first`` is the projection that a
    2-layer expert's ``up_proj`` copies, ``gate`` / ``up`` the two GLU projections (None for GPT-2)."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(getattr(mlp, "config", None), "hidden_act", None) or type(getattr(mlp, "act_fn", None)).__name__
        if str(act).lower() not in ("silu", "siluactivation", "swish"):
            raise TypeError(f"gated MLP with activation {act!r} is not supported (only SiLU)")
        return {"kind": "llama", "activation": "silu_glu", "gate": mlp.gate_proj, "up": mlp.up_proj,
                "first": mlp.up_proj, "down": mlp.down_proj}
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        act = type(getattr(mlp, "act", None)).__name__
        activation = "gelu" if act == "GELUActivation" else "gelu_tanh"
        return {"kind": "gpt2", "activation": activation, "gate": None, "up": None, "first": mlp.c_fc,
                "down": mlp.c_proj}
    raise TypeError(
        f"unsupported MLP {type(mlp).__name__}: expected LLaMA-style gate_proj/up_proj/down_proj "
        "or GPT-2-style c_fc/c_proj"
    )


ROUTE_BIAS = 1e4  # gate-logit bias of a forced expert (``route``); gate logits are O(1)


class MEMoEBypass(nn.Module):
    """Wraps ``base_layer`` (the host MLP, kept untouched and frozen) with a trainable bypass MoE.

    Parameters (``E`` experts, ``D`` hidden, ``F`` expert width, ``A`` anchor width):
    ``w_gate`` (E, D + A) fp32 gate over ``concat(x, anchor)``, ``b_gate`` (E,) with ``gate_bias``;
    SiLU-GLU experts: ``w1`` gate_proj, ``w3`` up_proj (E, F, D), ``b1`` / ``b3`` their biases (E, F);
    2-layer experts (gelu, gelu_tanh, relu): ``w1`` up_proj (E, F, D), ``b1`` (E, F), no ``w3``;
    ``w2`` down_proj (E, D, F), ``b2`` (E, D). Biases exist where the host has them.

    State dicts: ``state_dict()`` is PyTorch's, with the frozen host under ``base_layer.*`` (so a model
    holding the bypass saves whole); :meth:`bypass_state_dict` has only the tensors above (what an edit
    saves). ``load_state_dict`` takes either, a bypass-only one leaving the host as it is, one naming
    the host's tensors as the unedited model does (``gate_proj.weight``, no ``base_layer.``), and after
    :meth:`from_modules` also the ported adapter's own checkpoint, translated by :meth:`key_map`.

    Args:
        base_layer: the host MLP module.
        config: :class:`MEMoEConfig`.
        anchor_dim: width of the anchor vectors (the backbone's embedding width).

    Example::

        bypass = MEMoEBypass(model.model.layers[15].mlp, MEMoEConfig())
        y = bypass(torch.randn(2, 7, 576), anchors=torch.randn(2, 576))  # the host's output at initialisation
    """

    def __init__(self, base_layer: nn.Module, config: MEMoEConfig, anchor_dim: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        host = describe_host(base_layer)
        act = getattr(config, "expert_activation", "host")
        self.activation = host["activation"] if act == "host" else act
        first = _float_weight(host["first"])  # (F, D)
        host_ffn, hidden = first.shape
        ffn = config.expert_ffn or host_ffn
        if ffn != host_ffn and config.expert_init == "copy_zero_down":
            raise ValueError(f"expert_ffn={ffn} differs from the host's width {host_ffn}: the experts cannot copy the "
                             "host; use expert_init='random_zero_down'")
        self.hidden_size, self.ffn_size = hidden, ffn
        self.anchor_dim = anchor_dim or hidden
        ref = next(base_layer.parameters())
        if ref.device.type == "meta":
            raise ValueError(
                "the host MLP's weights are offloaded (on the meta device, loaded only during its forward): "
                "the edited block must stay on a device; leave it out of the offloaded part of the device_map")
        if config.expert_dtype is not None:
            dtype = getattr(torch, config.expert_dtype)
        else:
            dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        device = ref.device
        self._host = host
        self._expert_dtype, self._expert_device = dtype, device
        fresh = self._fresh_experts(config.num_experts, torch.Generator().manual_seed(config.seed))
        for name, t in fresh.items():
            setattr(self, name, None if t is None else nn.Parameter(t))
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.enabled = True
        self.impl = config.impl
        self._pending: AnchorSet | None = None
        self.last_anchors: AnchorSet | None = None  # what the last forward with the experts on used
        self.frozen_experts = 0  # experts [0, frozen_experts) get no gradient (lifelong editing)
        self.owned_experts = 0  # experts [0, owned_experts) each hold one sequential batch's edits
        # Prompt keys (config.key_threshold): unit-norm host-MLP inputs at the edit prompts' last tokens,
        # and the subject (index into the anchor bank's subjects) each belongs to.
        self.register_buffer("keys", torch.zeros(0, self.hidden_size), persistent=False)
        self.register_buffer("key_subject", torch.zeros(0, dtype=torch.long), persistent=False)
        # The expert each key's edit was trained into (lifelong editing; -1: the gate decides). A matched
        # input goes to its key's expert, so a subject edited again in a later batch keeps its older facts.
        self.register_buffer("key_owner", torch.zeros(0, dtype=torch.long), persistent=False)
        self.last_route: torch.Tensor | None = None  # (S,) the routes the last forward used (keys' experts first)
        # Subject subspaces (config.key_subject_rank): per edited subject, an orthonormal (r, D) basis of
        # the directions its other prompts share (:meth:`add_subject_basis`). A key of a subject with a
        # basis is compared with inputs after both lose those directions: what is left is the question
        # asked, not who it is about. ``key_basis_idx`` (K,): each key's basis row, -1 for none.
        self.register_buffer("key_basis", torch.zeros(0, 0, self.hidden_size), persistent=False)
        self.register_buffer("basis_subject", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("key_basis_idx", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("key_proj", torch.zeros(0, self.hidden_size), persistent=False)
        self.last_latched: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None
        self.__dict__["_foreign"] = None  # set by from_modules; a plain attribute, outside the state dict

    def _fresh_experts(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor | None]:
        """``n`` experts at initialisation and their gate rows, as plain tensors."""
        host, config, hidden, ffn = self._host, self.config, self.hidden_size, self.ffn_size
        dtype, device = self._expert_dtype, self._expert_device
        glu = self.activation in GLU_ACTIVATIONS

        def stack(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.unsqueeze(0).repeat(n, *([1] * t.dim())).to(device=device, dtype=dtype).contiguous()

        def rand(*shape) -> torch.Tensor:
            bound = 1.0 / math.sqrt(hidden)
            return (torch.rand(n, *shape, generator=gen) * 2 - 1).mul_(bound).to(device, dtype)

        # Experts start as copies of the host's projections (GLU experts on a 2-layer host copy its first
        # projection twice; 2-layer experts on a GLU host copy up_proj).
        gate_src = host["gate"] or host["first"]
        up_src = host["up"] or host["first"]
        w1_src = gate_src if glu else up_src
        copy = config.expert_init == "copy_zero_down"
        out: dict[str, torch.Tensor | None] = {}
        out["w1"] = stack(_float_weight(w1_src)) if copy else rand(ffn, hidden)
        out["w3"] = (stack(_float_weight(up_src)) if copy else rand(ffn, hidden)) if glu else None
        b1, b3 = _float_bias(w1_src), _float_bias(up_src) if glu else None
        out["b1"] = stack(b1 if copy else None if b1 is None else torch.zeros_like(b1))
        out["b3"] = stack(b3 if copy else None if b3 is None else torch.zeros_like(b3))
        # Down-projections start at zero: the edited model equals the base model at initialisation.
        out["w2"] = torch.zeros(n, hidden, ffn, device=device, dtype=dtype)
        out["b2"] = torch.zeros(n, hidden, device=device, dtype=dtype) if _float_bias(host["down"]) is not None else None
        # Gate over concat(x, anchor). The token half starts at zero, so routing starts as a function of
        # the anchor alone: inputs about one entity begin on one expert.
        w_gate = torch.zeros(n, hidden + self.anchor_dim)
        if getattr(config, "routing", "anchor") == "token":  # the ablation: token state alone, anchor half zero
            w_gate[:, :hidden] = torch.randn(n, hidden, generator=gen) / math.sqrt(hidden)
        else:
            w_gate[:, hidden:] = torch.randn(n, self.anchor_dim, generator=gen) / math.sqrt(self.anchor_dim)
        out["w_gate"] = w_gate.to(device=device, dtype=torch.float32)
        out["b_gate"] = (torch.zeros(n, device=device, dtype=torch.float32)
                         if getattr(config, "gate_bias", False) else None)
        return out

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def add_experts(self, n: int, freeze_existing: bool = True) -> range:
        """Append ``n`` fresh experts (a copy of the host, zero down-projection: they add nothing until
        trained) with a gate row each; with ``freeze_existing`` the experts already there get no gradient
        from now on. Returns the new experts' indices. Lifelong editing gives each batch its own experts,
        so that a later batch cannot overwrite what an earlier one relies on."""
        if n < 1:
            raise ValueError(f"add_experts needs n >= 1, got {n}")
        start = self.num_experts
        gen = torch.Generator().manual_seed(self.config.seed + start)
        fresh = self._fresh_experts(n, gen)
        with torch.no_grad():
            for name, t in fresh.items():
                old = getattr(self, name)
                if old is not None:
                    setattr(self, name, nn.Parameter(torch.cat([old.detach(), t.to(old.dtype)])))
        if freeze_existing:
            self.frozen_experts = start
        self._install_freeze_hooks()
        return range(start, start + n)

    def add_subject_basis(self, subjects: torch.Tensor, basis: torch.Tensor) -> None:
        """Remember subject subspaces: ``basis`` ``(B, r, D)`` orthonormal rows per subject, ``subjects``
        ``(B,)`` their indices in the anchor bank. Subjects that already have one keep it; keys added
        later for these subjects are compared in the subspace's orthogonal complement."""
        if basis.dim() != 3 or basis.shape[2] != self.hidden_size or subjects.shape != (basis.shape[0],):
            raise ValueError(f"add_subject_basis: basis must be (B, r, {self.hidden_size}) with (B,) subjects, got "
                             f"{tuple(basis.shape)} and {tuple(subjects.shape)}")
        if self.key_basis.shape[0] and basis.shape[1] != self.key_basis.shape[1]:
            raise ValueError(f"add_subject_basis: rank {basis.shape[1]} differs from the stored bases' "
                             f"{self.key_basis.shape[1]}")
        subjects = subjects.to(self.basis_subject.device, torch.long)
        new = ~torch.isin(subjects, self.basis_subject)
        if not bool(new.any()):
            return
        self.key_basis = torch.cat([self.key_basis.reshape(-1, basis.shape[1], self.hidden_size),
                                    basis[new.to(basis.device)].detach().float().to(self.keys.device)])
        self.basis_subject = torch.cat([self.basis_subject, subjects[new]])

    def add_keys(self, states: torch.Tensor, subjects: torch.Tensor, owners: torch.Tensor | None = None) -> None:
        """Remember prompt keys: ``states`` ``(K, D)`` host-MLP inputs at edit prompts' last tokens and
        ``subjects`` ``(K,)`` the index of each one's subject in the anchor bank (with its subject's
        basis, when :meth:`add_subject_basis` gave one, the key is also kept projected off it);
        ``owners`` ``(K,)`` the expert each edit was trained into (None: -1, the gate decides)."""
        if states.dim() != 2 or states.shape[1] != self.hidden_size or subjects.shape != (states.shape[0],):
            raise ValueError(f"add_keys: states must be (K, {self.hidden_size}) with (K,) subjects, got "
                             f"{tuple(states.shape)} and {tuple(subjects.shape)}")
        unit = torch.nn.functional.normalize(states.detach().float(), dim=-1).to(self.keys.device)
        subjects = subjects.to(self.key_subject.device, torch.long)
        idx = torch.full_like(subjects, -1)
        hit = subjects[:, None] == self.basis_subject[None, :]
        has = hit.any(1)
        if bool(has.any()):
            idx[has] = hit[has].float().argmax(1)
        proj = unit.clone()
        if bool(has.any()):
            proj[has] = torch.nn.functional.normalize(self._off_basis(unit[has], idx[has]), dim=-1)
        self.keys = torch.cat([self.keys, unit])
        self.key_subject = torch.cat([self.key_subject, subjects])
        owners = torch.full_like(subjects, -1) if owners is None else owners.to(subjects.device, torch.long)
        if owners.shape != subjects.shape:
            raise ValueError(f"add_keys: owners must be ({subjects.shape[0]},), got {tuple(owners.shape)}")
        self.key_owner = torch.cat([self.key_owner, owners])
        self.key_basis_idx = torch.cat([self.key_basis_idx, idx])
        self.key_proj = torch.cat([self.key_proj, proj])

    def _off_basis(self, rows: torch.Tensor, basis_idx: torch.Tensor) -> torch.Tensor:
        """``rows`` ``(n, D)`` minus their part in the subspace ``key_basis[basis_idx]`` (one per row)."""
        out = rows.clone()
        basis = self.key_basis.to(rows.device)
        for start in range(0, rows.shape[0], 256):  # (chunk, r, D) at a time
            P = basis[basis_idx[start:start + 256].to(rows.device)]
            x = rows[start:start + 256]
            out[start:start + 256] = x - torch.einsum("nr,nrd->nd", torch.einsum("nd,nrd->nr", x, P), P)
        return out

    def clear_keys(self) -> None:
        """Forget every prompt key and subject basis (the key gate then lets nothing through)."""
        self.keys, self.key_subject, self.key_owner = self.keys[:0], self.key_subject[:0], self.key_owner[:0]
        self.key_basis_idx, self.key_proj = self.key_basis_idx[:0], self.key_proj[:0]
        self.key_basis, self.basis_subject = self.key_basis[:0], self.basis_subject[:0]

    def _key_similarity(self, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """``(n, K)`` cosine of each row with each candidate key (others -2): raw for keys without a
        subject basis, else between both with the key's subject subspace removed. Rows are grouped by the
        bases their candidates use, so the cost is the rows times the subjects they may be about."""
        keys = self.keys.to(rows.device)
        unit = torch.nn.functional.normalize(rows, dim=-1)
        sims = unit @ keys.t()
        bidx = self.key_basis_idx.to(rows.device)
        with_basis = bidx >= 0
        if bool(with_basis.any()):
            proj = self.key_proj.to(rows.device)
            # <x - PPᵀx, k'> = <x, k'> for k' in the complement; only the norm of the rest needs P.
            num = rows @ proj.t()
            sq = rows.square().sum(-1)
            used = (cand & with_basis).any(0)
            basis = self.key_basis.to(rows.device)
            for b in torch.unique(bidx[used]).tolist():
                cols = (bidx == b).nonzero().squeeze(1)
                r_idx = cand[:, cols].any(1).nonzero().squeeze(1)
                x = rows.index_select(0, r_idx)
                rest = (sq.index_select(0, r_idx) - (x @ basis[b].t()).square().sum(-1)).clamp_min(1e-12).sqrt()
                sims[r_idx[:, None], cols[None, :]] = num[r_idx[:, None], cols[None, :]] / rest[:, None]
        return sims.masked_fill(~cand, -2.0)

    def _key_gate(self, given: "AnchorSet", x: torch.Tensor, tok_scope: torch.Tensor, token_seq: torch.Tensor,
                  n_seq: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """``tok_scope`` narrowed by the key gate, the snap of the matched tokens and the key route (see
        :meth:`_active`).

        A token matches when its state is within ``key_threshold`` (:meth:`_key_similarity`) of one of its
        subject's prompt keys. ``key_span="whole_input"``: a match anywhere switches on every in-scope
        token of its sequence; ``"after_match"``: from the first match on (the answer and what follows).
        Tokens of a sequence are contiguous and in order in both layouts ((B, L) rows, packed rows),
        which the running count uses."""
        n_tok = tok_scope.numel()
        match = torch.zeros(n_tok, dtype=torch.bool)
        snap = key_route = None
        idx = tok_scope.nonzero().squeeze(1)
        if idx.numel() and self.keys.shape[0]:
            rows = x.reshape(n_tok, -1).index_select(0, idx.to(x.device)).float()
            cand = given.candidates[token_seq.index_select(0, idx)].to(rows.device)
            sims = self._key_similarity(rows, cand)
            best, nearest = sims.max(dim=1)
            hit = best >= self.config.key_threshold
            if given.key_tokens is not None:
                if given.key_tokens.numel() != n_tok:
                    raise RuntimeError(f"key_tokens has {given.key_tokens.numel()} entries but the input has {n_tok} tokens")
                hit &= given.key_tokens.index_select(0, idx).to(hit.device)
            match[idx] = hit.cpu()
            seq_of = token_seq.index_select(0, idx).to(best.device)
            owner = self.key_owner.to(nearest.device)[nearest]
            owned = hit & (owner >= 0)
            if bool(owned.any()):
                # Each matched sequence goes to the expert of its best-matching key.
                pick = _best_of_each_sequence(best, owned, seq_of, n_seq)
                key_route = torch.full((n_seq,), -1, dtype=torch.long)
                key_route[seq_of[pick].cpu()] = owner[pick].cpu()
            if self.config.key_snap > 0 and bool(hit.any()):
                snap_rows = hit
                if self.config.key_snap_tokens == "best":  # only each sequence's closest matching token
                    snap_rows = _best_of_each_sequence(best, hit, seq_of, n_seq)
                snap = (idx[snap_rows.cpu()], nearest[snap_rows])
        if self.config.key_span == "whole_input":
            hit_seq = torch.zeros(n_seq, dtype=torch.bool)
            hit_seq[token_seq[match]] = True
            on = hit_seq[token_seq]
        else:  # "after_match": a running count of matches within each sequence
            counts = match.long().cumsum(0)
            before = torch.zeros(n_seq, dtype=torch.long)
            starts = torch.ones(n_tok, dtype=torch.bool)
            starts[1:] = token_seq[1:] != token_seq[:-1]
            first = starts.nonzero().squeeze(1)
            before[token_seq[first]] = counts[first] - match[first].long()
            on = (counts - before[token_seq]) > 0
        if given.latched is not None:
            on |= given.latched[token_seq]
        latched = torch.zeros(n_seq, dtype=torch.bool)
        latched[token_seq[on]] = True
        self.last_latched = latched
        return tok_scope & on, snap, key_route

    def _snapped(self, flat_x: torch.Tensor, rows: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """``flat_x`` with the key-matched ``rows`` moved ``config.key_snap`` of the way (in direction, at
        their own norm) toward their nearest subject key ``self.keys[nearest]``."""
        rows = rows.to(flat_x.device)
        picked = flat_x.index_select(0, rows).float()
        norm = picked.norm(dim=-1, keepdim=True)
        a = self.config.key_snap
        direction = torch.nn.functional.normalize(
            (1 - a) * picked / norm.clamp_min(1e-12) + a * self.keys.to(picked.device)[nearest], dim=-1)
        return flat_x.index_copy(0, rows, (direction * norm).to(flat_x.dtype))

    def freeze_experts(self, n: int) -> None:
        """Experts ``[0, n)`` get no gradient from now on (0: every expert trains)."""
        if not 0 <= n <= self.num_experts:
            raise ValueError(f"freeze_experts: n must be in [0, {self.num_experts}], got {n}")
        self.frozen_experts = n
        if n:
            self._install_freeze_hooks()

    def _install_freeze_hooks(self) -> None:
        for p in self.bypass_parameters().values():
            if not getattr(p, "_memoe_freeze_hook", False):
                p.register_hook(self._mask_frozen)
                p._memoe_freeze_hook = True

    def _mask_frozen(self, grad: torch.Tensor) -> torch.Tensor:
        if self.frozen_experts <= 0:
            return grad
        grad = grad.clone()
        grad[: self.frozen_experts] = 0
        return grad

    def set_anchors(self, anchors: torch.Tensor | None, scope: torch.Tensor | None = None,
                    token_seq: torch.Tensor | None = None, *, pin: bool = False,
                    token_mask: torch.Tensor | None = None, route: torch.Tensor | None = None,
                    candidates: torch.Tensor | None = None, latched: torch.Tensor | None = None,
                    key_tokens: torch.Tensor | None = None) -> None:
        """Anchors ``(S, A)`` for the next forward, an optional bool scope ``(S,)``, and for packed inputs
        (several sequences in one row, no padding) the sequence of every token ``(N,)`` (CPU int64).
        Without ``token_seq`` the input is ``(S, L, D)``: sequence ``s`` is row ``s``.

        Anchors set here are used by exactly one forward and then dropped, so anchors meant for one
        batch can never be reused for a later batch of the same size. ``pin=True`` keeps them for every
        forward until :meth:`clear_anchors` or the next ``set_anchors`` (the handle's ``anchored`` block
        pins). ``anchors=None`` clears them.

        ``token_mask`` ``(N,)`` bool (one entry per token of the input, flattened) limits the bypass to
        the marked tokens (``bypass_positions="after_subject"``); ``route`` ``(S,)`` int64 sends every
        token of sequence ``s`` to expert ``route[s]`` (weight 1) instead of the gate's choice, -1 keeps
        the gate's (lifelong editing routes each batch's subjects to that batch's expert).
        ``candidates`` ``(S, K)`` bool: with ``config.key_threshold``, the prompt keys (:meth:`add_keys`)
        each sequence may match; ``latched`` ``(S,)``: sequences that matched in an earlier forward
        (the prompt of a decode step); ``key_tokens`` ``(N,)`` bool: the tokens that may match a key
        (None: all; teacher-forced evaluation passes the prompt's, so that a target never switches its
        own prompt on with ``key_span="whole_input"``).
        """
        if anchors is None:
            self._pending = None
            return
        if anchors.dim() != 2:
            raise ValueError(f"anchors must be (sequences, anchor_dim), got shape {tuple(anchors.shape)}")
        if anchors.shape[1] != self.anchor_dim:
            raise ValueError(f"anchors have width {anchors.shape[1]}, the gate expects anchor_dim={self.anchor_dim}")
        if scope is not None and scope.shape != (anchors.shape[0],):
            raise ValueError(f"scope must have shape ({anchors.shape[0]},), got {tuple(scope.shape)}")
        self._pending = AnchorSet(
            anchors, None if scope is None else scope.to("cpu", torch.bool),
            None if token_seq is None else token_seq.to("cpu", torch.long), pin,
            None if token_mask is None else token_mask.to("cpu", torch.bool).reshape(-1),
            None if route is None else route.to("cpu", torch.long),
            None if candidates is None else candidates.to("cpu", torch.bool),
            None if latched is None else latched.to("cpu", torch.bool),
            None if key_tokens is None else key_tokens.to("cpu", torch.bool).reshape(-1))

    def clear_anchors(self) -> None:
        """Forget the anchors set for the next forward(s)."""
        self._pending = None

    @property
    def pending_anchors(self) -> "AnchorSet | None":
        """The anchors the next forward will use (None: it needs explicit ones)."""
        return self._pending

    def _take_anchors(self, anchors, scope, token_seq) -> "AnchorSet | None":
        """The anchors of this forward: explicit arguments first, else the set ones (consumed unless pinned)."""
        if anchors is not None:
            if anchors.dim() != 2 or anchors.shape[1] != self.anchor_dim:
                raise ValueError(f"anchors must have shape (sequences, {self.anchor_dim}), got {tuple(anchors.shape)}")
            return AnchorSet(anchors, None if scope is None else scope.to("cpu", torch.bool),
                             None if token_seq is None else token_seq.to("cpu", torch.long), False)
        if scope is not None or token_seq is not None:
            raise ValueError("scope and token_seq go with explicit anchors: pass anchors= as well")
        found = self._pending
        if found is not None and not found.pinned:
            self._pending = None
        return found

    @property
    def gate_learns(self) -> bool:
        """Whether the gate gets a real gradient. With top-1 renormalised routing the weight is p/p = 1, so
        only the balance loss reaches the gate; without it the gradient is rounding noise, which Adam
        would scale up to full-size steps that reshuffle the routing."""
        return self.config.aux_loss_weight > 0 or not (self.config.top_k == 1 and self.config.renormalize)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.bypass_parameters().items() if n != "w_gate" or self.gate_learns]

    def bypass_parameters(self) -> dict[str, torch.Tensor]:
        names = ("w_gate", "b_gate", "w1", "w3", "w2", "b1", "b3", "b2")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def op_weights(self) -> dict[str, torch.Tensor | None]:
        """The parameters under the keyword names of :func:`memoe_fast.ops.moe_bypass`."""
        glu = self.activation in GLU_ACTIVATIONS
        return dict(
            router_weight=self.w_gate, router_bias=self.b_gate,
            gate_proj=self.w1 if glu else None, up_proj=self.w3 if glu else self.w1, down_proj=self.w2,
            gate_bias=self.b1 if glu else None, up_bias=self.b3 if glu else self.b1, down_bias=self.b2,
        )

    def forward(self, x: torch.Tensor, anchors: torch.Tensor | None = None, scope: torch.Tensor | None = None,
                token_seq: torch.Tensor | None = None) -> torch.Tensor:
        """Host output plus the experts' for ``x`` ``(B, L, D)`` (or ``(N, D)`` packed with ``token_seq``).

        ``anchors`` ``(B, A)``: one per sequence; when None, the ones given to :meth:`set_anchors`
        (consumed by this forward unless pinned). ``scope`` ``(B,)`` bool: which sequences the
        experts see when ``config.anchor_scope`` is on (None: all)."""
        return self.add_to(x, self.base_layer(x), anchors=anchors, scope=scope, token_seq=token_seq)

    def moe_output(self, x: torch.Tensor, anchors: torch.Tensor | None = None, scope: torch.Tensor | None = None,
                   token_seq: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' term alone, ``λ·s·Σ g_e·expert_e(x)`` (what a separate MoE adapter's
        ``forward(x, anchor)`` returns); anchors as in :meth:`forward`."""
        return self.add_to(x, torch.zeros_like(x), anchors=anchors, scope=scope, token_seq=token_seq)

    def _active(self, given: "AnchorSet", x: torch.Tensor, token_seq: torch.Tensor, n_tok: int):
        """``(N,)`` bool: the tokens the experts act on (scope, token mask, key gate), or None for all; the
        key gate's snap, ``(rows, nearest key)`` of the matched tokens, or None; and the key route ``(S,)``:
        the expert of each sequence's best-matching key that has one (-1 elsewhere), or None."""
        tok_scope = None
        if self.config.anchor_scope and given.scope is not None:
            tok_scope = given.scope[token_seq]
        if given.token_mask is not None:
            if given.token_mask.numel() != n_tok:
                raise RuntimeError(f"token_mask has {given.token_mask.numel()} entries but the input has {n_tok} tokens")
            tok_scope = given.token_mask if tok_scope is None else tok_scope & given.token_mask
        if self.config.key_threshold is not None and given.candidates is not None:
            # The key gate applies to anchors the handle computed from text once edits stored prompt keys;
            # anchors given by hand (a ported adapter, manual mode) route as MEMoE does.
            if tok_scope is None:
                tok_scope = torch.ones(n_tok, dtype=torch.bool)
            return self._key_gate(given, x, tok_scope, token_seq, given.vectors.shape[0])
        return tok_scope, None, None

    def active_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the tokens of ``x`` the experts would act on under the anchors pinned now (they
        are not consumed). A function of the host-MLP input and the anchors only, so the fast editor
        computes it once per batch: tokens before a sequence's first active one never change."""
        given = self._pending
        if given is None:
            raise RuntimeError("active_tokens needs anchors set (pinned) first")
        n_tok = x.numel() // x.shape[-1]
        token_seq = given.token_seq
        if token_seq is None:
            batch = x.shape[0] if x.dim() > 2 else 1
            token_seq = torch.arange(batch).repeat_interleave(n_tok // batch)
        tok, _, _ = self._active(given, x, token_seq, n_tok)
        return torch.ones(n_tok, dtype=torch.bool) if tok is None else tok

    def add_to(self, x: torch.Tensor, out: torch.Tensor, anchors: torch.Tensor | None = None,
               scope: torch.Tensor | None = None, token_seq: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` plus the bypass's output for the host input ``x`` (``forward(x) = add_to(x, host(x))``).

        ``out`` may be any tensor of the host output's shape that the bypass adds into: the fast editor
        passes the edited block's cached output, which is the host output plus terms that do not
        depend on it. ``out`` is never modified in place. Anchors as in :meth:`forward`."""
        self.last_aux_loss = None
        given = self._take_anchors(anchors, scope, token_seq)  # consumed even when disabled: never stale
        if not self.enabled:
            return out
        if given is None:
            raise RuntimeError(
                "MEMoEBypass has no anchors for this input: pass anchors= to forward, call set_anchors(...) "
                "before this forward (anchors set there serve one forward unless pinned), or call "
                "apply_memoe() with a tokenizer (anchor_mode='auto'), which computes them from the input text"
            )
        hidden = x.shape[-1]
        n_tok = x.numel() // hidden
        token_seq = given.token_seq
        if token_seq is None:
            batch = x.shape[0] if x.dim() > 2 else 1
            if given.vectors.shape[0] != batch:
                raise RuntimeError(f"anchors were given for {given.vectors.shape[0]} sequences but the input has {batch}")
            token_seq = torch.arange(batch).repeat_interleave(n_tok // batch)
        elif token_seq.numel() != n_tok:
            raise RuntimeError(f"token_seq has {token_seq.numel()} entries but the input has {n_tok} tokens")
        elif n_tok and int(token_seq.max()) >= given.vectors.shape[0]:
            raise RuntimeError(f"token_seq names sequence {int(token_seq.max())} but anchors were given for "
                               f"{given.vectors.shape[0]} sequences")
        self.last_anchors = given
        sel = None
        tok_scope, snap, key_route = self._active(given, x, token_seq, n_tok)
        route = given.route
        if key_route is not None:
            route = torch.where(key_route >= 0, key_route, route if route is not None else torch.full_like(key_route, -1))
        self.last_route = route  # a decode step keeps its prompt's routes (the handle passes them on)
        if tok_scope is not None:
            if not bool(tok_scope.any()):
                return out  # no sequence is about an edited entity: the experts have nothing to add
            if not bool(tok_scope.all()):
                sel = tok_scope.nonzero().squeeze(1).to(x.device)  # only in-scope tokens go through the experts
        flat_x, flat_out = x.reshape(n_tok, hidden), out.reshape(n_tok, hidden)
        if snap is not None:
            flat_x = self._snapped(flat_x, *snap)
        seq_idx = token_seq.to(x.device)
        if sel is not None:
            flat_x, seq_idx = flat_x.index_select(0, sel), seq_idx.index_select(0, sel)
        host_rows = flat_out if sel is None else flat_out.index_select(0, sel)
        anchor = given.vectors.to(device=x.device, dtype=self.w1.dtype)
        tokens = flat_x.to(self.w1.dtype)
        noise = None
        n_exp = self.w1.shape[0]
        if self.training and self.config.gate_noise > 0:
            noise = torch.randn(tokens.shape[0], n_exp, device=x.device) * self.config.gate_noise
        if route is not None:
            # A forced expert is a logit bias far above any gate logit: top-1 picks it with weight 1, and
            # every implementation (reference, torch, Triton) routes it without a change of its own.
            seq_route = route.to(x.device)[seq_idx]
            forced = seq_route >= 0
            if bool(forced.any()):
                bias = torch.zeros(tokens.shape[0], n_exp, device=x.device)
                bias[forced.nonzero().squeeze(1), seq_route[forced]] = ROUTE_BIAS
                noise = bias if noise is None else noise + bias
        # The kernels add the bypass into the host output in their epilogue when both share a dtype.
        fuse_host = out.dtype == self.w1.dtype
        y, probs, experts = moe_bypass(
            tokens, anchor, seq_idx, **self.op_weights(),
            token_scale=None if self.config.scale == 1.0 else torch.full((tokens.shape[0],), self.config.scale, device=x.device),
            noise=noise, top_k=self.config.top_k, renormalize=self.config.renormalize,
            activation=self.activation, host_out=host_rows if fuse_host else None, impl=self.impl,
        )
        self.last_experts = experts.detach()
        if self.training:
            self.last_aux_loss = load_balance_loss(probs, experts, n_exp)
        if not fuse_host:
            # The host output stays in its own dtype: lower-precision experts must not round it.
            y = host_rows + y.to(out.dtype)
        if sel is None:
            return y.view(out.shape)
        return flat_out.index_copy(0, sel, y).view(out.shape)

    # Porting from and to another MoE adapter's modules.
    @classmethod
    def from_modules(cls, host_mlp: nn.Module, *, gate: nn.Module, experts, config: MEMoEConfig | None = None,
                     gate_input: str = "x_anchor", activation: str | None = None, layout: str | None = None,
                     gate_name: str = "gate", experts_name: str = "experts") -> "MEMoEBypass":
        """A bypass whose gate and experts are those of an existing MoE adapter (copied, bit for bit).

        Args:
            host_mlp: the frozen host MLP the experts are added to.
            gate: an ``nn.Linear`` with ``E`` outputs over ``concat([x, anchor])`` (``gate_input="x_anchor"``)
                or ``concat([anchor, x])`` (``"anchor_x"``), with or without bias; the anchor width is its
                input width minus the host's hidden size.
            experts: one of
                - an ``nn.ModuleList`` of LLaMA-style experts (``gate_proj``/``up_proj``/``down_proj`` or
                  Mixtral's ``w1``/``w3``/``w2``), or of 2-layer FFNs (``fc1``/``fc2``, ``c_fc``/``c_proj``,
                  ``w1``/``w2``, ``up_proj``/``down_proj``, or ``nn.Sequential(Linear, act, Linear)``),
                  ``nn.Linear`` or GPT-2 ``Conv1D`` projections, biases optional;
                - stacked tensors, as a module (transformers' ``*Experts``) or a dict: ``gate_up_proj``
                  (E, 2F, D) (gate rows first, as transformers stores it) or ``gate_proj`` + ``up_proj``
                  (E, F, D), or only ``up_proj`` for 2-layer experts; ``down_proj`` (E, D, F); biases
                  ``<name>_bias``. ``layout="in_out"`` reads (E, in, out) tensors instead (told apart
                  from the shapes when None).
            config: a :class:`MEMoEConfig` with ``num_experts == E`` (routing and training options);
                None: defaults with ``num_experts=E``.
            activation: the experts' activation; None: read from the expert modules (their
                ``act_fn`` / ``act`` / activation child), ``"silu_glu"`` for stacked gate/up tensors.
            gate_name, experts_name: the adapter's attribute names, used for :meth:`key_map`.

        The adapter's layout is remembered: :meth:`to_modules` gives new modules in it,
        :meth:`foreign_state_dict` a state dict under its names, and :meth:`load_state_dict` accepts one.

        Example::

            bypass = MEMoEBypass.from_modules(model.model.layers[8].mlp, gate=adapter.gate,
                                              experts=adapter.experts, config=MEMoEConfig(num_experts=4))
            y = bypass(x, anchors)            # adapter(x, anchors) + host(x)
            gate, experts = bypass.to_modules()
        """
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        if layout not in (None, "out_in", "in_out"):
            raise ValueError(f"layout must be None, 'out_in' or 'in_out', got {layout!r}")
        host = describe_host(host_mlp)
        hidden = _float_weight(host["first"]).shape[1]
        if not isinstance(gate, nn.Linear):
            raise TypeError(f"gate must be an nn.Linear over the token state and the anchor, got {type(gate).__name__}")
        n_exp, gate_in = gate.weight.shape
        anchor_dim = gate_in - hidden
        if anchor_dim <= 0:
            raise ValueError(f"gate reads {gate_in} inputs; it must read the token state ({hidden}) plus an anchor")
        spec = _ExpertSpec.read(experts, hidden, layout, activation, experts_name)
        if spec.num_experts != n_exp:
            raise ValueError(f"gate has {n_exp} outputs but there are {spec.num_experts} experts")
        if config is None:
            config = MEMoEConfig(num_experts=n_exp)
        if config.num_experts != n_exp:
            raise ValueError(f"config.num_experts={config.num_experts} but the adapter has {n_exp} experts")
        # The config records what the weights are, so that apply_memoe(model, config) can load them back.
        host_ffn = _float_weight(host["first"]).shape[0]
        config = dataclasses.replace(
            config, expert_activation=spec.activation, gate_bias=gate.bias is not None,
            expert_dtype=str(spec.dtype).replace("torch.", ""), expert_ffn=None if spec.ffn == host_ffn else spec.ffn,
            expert_init=config.expert_init if spec.ffn == host_ffn else "random_zero_down")
        bypass = cls(host_mlp, config, anchor_dim=anchor_dim)
        entries = spec.entries + _gate_entries(gate_name, gate, hidden, anchor_dim, gate_input)
        shapes = {e.key: e.foreign_shape for e in entries}
        dtypes = {e.key: e.foreign_dtype for e in entries}
        ffn = spec.ffn
        device = bypass.w_gate.device
        with torch.no_grad():
            for name, shape, dtype in (("w1", (n_exp, ffn, hidden), spec.dtype), ("w2", (n_exp, hidden, ffn), spec.dtype),
                                       ("w3", (n_exp, ffn, hidden) if spec.glu else None, spec.dtype),
                                       ("b1", (n_exp, ffn) if spec.has("b1") else None, spec.dtype),
                                       ("b3", (n_exp, ffn) if spec.has("b3") else None, spec.dtype),
                                       ("b2", (n_exp, hidden) if spec.has("b2") else None, spec.dtype)):
                setattr(bypass, name, None if shape is None else nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        bypass.ffn_size = ffn
        bypass.__dict__["_foreign"] = ForeignLayout(entries, shapes, dtypes, spec, gate, gate_input)
        bypass.load_foreign_state_dict(_read_foreign(entries, gate_name, gate, spec.source))
        return bypass

    @property
    def foreign_layout(self) -> "ForeignLayout | None":
        return self._foreign

    def key_map(self) -> list[dict]:
        """How the adapter's state-dict keys map onto this module's parameters (after :meth:`from_modules`):
        one row per piece, ``foreign[key][foreign_index] == param[param_index]`` (transposed where
        ``transpose``), e.g. ``{"key": "experts.0.gate_proj.weight", "param": "w1", "param_index": "[0]"}``."""
        return [e.describe() for e in self._layout().entries]

    def _layout(self) -> "ForeignLayout":
        if self._foreign is None:
            raise RuntimeError("this bypass was not built with MEMoEBypass.from_modules: it has no foreign layout")
        return self._foreign

    def foreign_state_dict(self, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The bypass's weights under the adapter's names, shapes and dtypes (see :meth:`key_map`).

        ``values``: other tensors shaped like the parameters, by parameter name (e.g. their gradients)
        to lay out the same way; default the parameters themselves."""
        layout = self._layout()
        values = values if values is not None else self.bypass_parameters()
        out = {k: torch.empty(s, dtype=layout.dtypes[k], device=self.w_gate.device) for k, s in layout.shapes.items()}
        with torch.no_grad():
            for e in layout.entries:
                piece = values[e.param][e.param_index]
                out[e.key][e.foreign_index] = (piece.transpose(-1, -2) if e.transpose else piece).to(out[e.key].dtype)
        return out

    def load_foreign_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict under the adapter's names (every key of :meth:`key_map`, no other)."""
        layout = self._layout()
        missing, unexpected = sorted(set(layout.shapes) - set(state)), sorted(set(state) - set(layout.shapes))
        if missing or unexpected:
            raise KeyError(f"foreign state dict: missing keys {missing}, unexpected keys {unexpected}")
        for k, shape in layout.shapes.items():
            if tuple(state[k].shape) != tuple(shape):
                raise ValueError(f"foreign state dict: {k!r} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
        with torch.no_grad():
            for e in layout.entries:
                piece = state[e.key][e.foreign_index]
                piece = piece.transpose(-1, -2) if e.transpose else piece
                target = getattr(self, e.param)
                if tuple(target[e.param_index].shape) != tuple(piece.shape):
                    raise ValueError(f"{e.key}{e.describe()['foreign_index']} has shape {tuple(piece.shape)} but "
                                     f"{e.param}{e.describe()['param_index']} has {tuple(target[e.param_index].shape)}")
                target[e.param_index] = piece.to(target.dtype)

    def to_modules(self) -> tuple[nn.Linear, nn.Module | dict]:
        """New ``(gate, experts)`` in the adapter's layout holding the bypass's current weights."""
        layout = self._layout()
        state = self.foreign_state_dict()
        gate = copy.deepcopy(layout.gate)
        gate_state = {k[len(layout.gate_prefix):]: v for k, v in state.items() if k.startswith(layout.gate_prefix)}
        gate.load_state_dict(gate_state)
        experts = layout.spec.export(state)
        return gate, experts

    def bypass_state_dict(self) -> dict[str, torch.Tensor]:
        """The bypass's own tensors (no host weights), detached: what :meth:`MEMoEHandle.save` writes."""
        return {k: v.detach() for k, v in self.bypass_parameters().items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A foreign checkpoint (the adapter's names, see key_map) is translated; a bypass-only one
        # (no host keys) leaves the frozen host as it is.
        layout = self._foreign
        if layout is not None and any(prefix + k in state_dict for k in layout.shapes):
            foreign = {k: state_dict.pop(prefix + k) for k in list(layout.shapes) if prefix + k in state_dict}
            self.load_foreign_state_dict(foreign)
            for name, p in self.bypass_parameters().items():
                state_dict.setdefault(prefix + name, p.detach())
        if not any(k.startswith(prefix + "base_layer.") for k in state_dict):
            host = self.base_layer.state_dict(keep_vars=True)
            if any(prefix + k in state_dict for k in host):
                # The unedited model's checkpoint names the host MLP's tensors without base_layer.
                for k in host:
                    if prefix + k in state_dict:
                        state_dict[prefix + "base_layer." + k] = state_dict.pop(prefix + k)
            else:
                for k, v in host.items():
                    state_dict[prefix + "base_layer." + k] = v.detach() if isinstance(v, torch.Tensor) else v
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


GATE_INPUTS = ("x_anchor", "anchor_x")


@dataclass
class KeyMapEntry:
    """``foreign[key][foreign_index]`` (transposed when ``transpose``) is ``param[param_index]``."""

    key: str
    foreign_index: tuple
    param: str
    param_index: tuple
    transpose: bool
    foreign_shape: tuple
    foreign_dtype: torch.dtype

    def describe(self) -> dict:
        def idx(t):
            return "[" + ", ".join(f"{s.start or ''}:{s.stop or ''}" if isinstance(s, slice) else str(s) for s in t) + "]"

        return {"key": self.key, "foreign_index": idx(self.foreign_index), "param": self.param,
                "param_index": idx(self.param_index), "transpose": self.transpose}


@dataclass
class ForeignLayout:
    entries: list
    shapes: dict
    dtypes: dict
    spec: "_ExpertSpec"
    gate: nn.Linear
    gate_input: str

    @property
    def gate_prefix(self) -> str:
        return self.entries[-1].key.rsplit(".", 1)[0] + "."


def _gate_entries(name: str, gate: nn.Linear, hidden: int, anchor_dim: int, order: str) -> list[KeyMapEntry]:
    w = gate.weight
    all_ = slice(None)
    if order == "x_anchor":
        entries = [KeyMapEntry(f"{name}.weight", (), "w_gate", (), False, tuple(w.shape), w.dtype)]
    else:  # the adapter's columns are [anchor, x]; ours are [x, anchor]
        entries = [
            KeyMapEntry(f"{name}.weight", (all_, slice(anchor_dim, None)), "w_gate", (all_, slice(0, hidden)), False,
                        tuple(w.shape), w.dtype),
            KeyMapEntry(f"{name}.weight", (all_, slice(0, anchor_dim)), "w_gate", (all_, slice(hidden, None)), False,
                        tuple(w.shape), w.dtype),
        ]
    if gate.bias is not None:
        entries.insert(0, KeyMapEntry(f"{name}.bias", (), "b_gate", (), False, tuple(gate.bias.shape), gate.bias.dtype))
    return entries


def _read_foreign(entries, gate_name, gate, source) -> dict[str, torch.Tensor]:
    state = {f"{gate_name}.{k}": v for k, v in gate.state_dict().items()}
    state.update(source)
    return {e.key: state[e.key] for e in entries}


# Attribute names of one expert module: (gate, up, down) for GLU experts, (None, up, down) for 2-layer.
_GLU_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_TWO_LAYER_NAMES = (("fc1", "fc2"), ("c_fc", "c_proj"), ("w1", "w2"), ("up_proj", "down_proj"), ("0", "2"))


def _activation_of(module: nn.Module) -> str | None:
    """The activation of an expert module, from its ``act_fn`` / ``act`` / activation child."""
    candidates = [getattr(module, n, None) for n in ("act_fn", "act", "activation", "activation_fn")]
    candidates += [m for m in module.children() if not isinstance(m, (nn.Linear,)) and type(m).__name__ != "Conv1D"]
    for act in candidates:
        if act is None or not isinstance(act, nn.Module):
            continue
        kind = type(act).__name__
        if isinstance(act, nn.SiLU) or kind == "SiLUActivation":
            return "silu"
        if isinstance(act, nn.ReLU):
            return "relu"
        if isinstance(act, nn.GELU):
            return "gelu_tanh" if act.approximate == "tanh" else "gelu"
        if kind in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh", "FastGELUActivation"):
            return "gelu_tanh"
        if kind == "GELUActivation":
            return "gelu"
    return None


def _linear_weight(mod: nn.Module) -> tuple[torch.Tensor, bool]:
    """A projection's weight and whether it is stored (in, out) (GPT-2's Conv1D)."""
    if isinstance(mod, nn.Linear):
        return mod.weight, False
    if type(mod).__name__ == "Conv1D":
        return mod.weight, True
    raise TypeError(f"expert projection must be nn.Linear or Conv1D, got {type(mod).__name__}")


@dataclass
class _ExpertSpec:
    num_experts: int
    ffn: int
    glu: bool
    activation: str
    dtype: torch.dtype
    entries: list
    source: dict  # the adapter's expert tensors by key
    template: object  # the adapter's experts (deep-copied on export) or the dict's keys
    prefix: str
    biases: set

    def has(self, name: str) -> bool:
        return name in self.biases

    @classmethod
    def read(cls, experts, hidden: int, layout: str | None, activation: str | None, name: str) -> "_ExpertSpec":
        if isinstance(experts, (nn.ModuleList, list, tuple)) and len(experts) and all(isinstance(m, nn.Module) for m in experts):
            return cls._from_list(nn.ModuleList(experts) if not isinstance(experts, nn.ModuleList) else experts,
                                  hidden, activation, name)
        if isinstance(experts, nn.Module):
            tensors = {k: v for k, v in experts.named_parameters(recurse=False)}
            tensors.update({k: v for k, v in experts.named_buffers(recurse=False)})
            found = _activation_of(experts)
            default = "silu_glu" if found in (None, "silu") else found
            return cls._from_stacked(tensors, experts, hidden, layout, activation or default, name)
        if isinstance(experts, dict):
            return cls._from_stacked(dict(experts), None, hidden, layout, activation, name)
        raise TypeError("experts must be an nn.ModuleList of expert modules, a module holding stacked expert "
                        f"tensors, or a dict of stacked tensors; got {type(experts).__name__}")

    @classmethod
    def _from_list(cls, experts: nn.ModuleList, hidden, activation, name) -> "_ExpertSpec":
        first = experts[0]
        names = next((n for n in _GLU_NAMES if all(hasattr(first, a) for a in n)), None)
        glu = names is not None
        if not glu:
            names = next((n for n in _TWO_LAYER_NAMES if all(hasattr(first, a) for a in n)), None)
            if names is None:
                raise TypeError(
                    f"expert {type(first).__name__} has none of the known layouts: gate_proj/up_proj/down_proj, "
                    "w1/w3/w2 (SiLU-GLU), fc1/fc2, c_fc/c_proj, w1/w2, up_proj/down_proj, Sequential(Linear, act, Linear)")
            names = (None, *names)
        found = _activation_of(first)
        if activation is None:
            if glu:
                if found not in (None, "silu"):
                    raise TypeError(f"gated experts with activation {found!r}: only SiLU-GLU is supported")
                activation = "silu_glu"
            elif found is None or found == "silu":
                raise TypeError(f"cannot tell the activation of expert {type(first).__name__}: pass activation= "
                                f"one of {TWO_LAYER_ACTIVATIONS}")
            else:
                activation = found
        _check_activation(activation, glu)
        entries, source, biases = [], {}, set()
        dtype = None
        ffn = None
        for e, mod in enumerate(experts):
            for attr, param, bias in zip(names, ("w1", "w3", "w2") if glu else (None, "w1", "w2"),
                                         ("b1", "b3", "b2") if glu else (None, "b1", "b2")):
                if attr is None:
                    continue
                proj = getattr(mod, attr, None)
                if proj is None:
                    raise TypeError(f"expert {e} has no {attr!r}")
                w, transpose = _linear_weight(proj)
                wt = w.t() if transpose else w
                if dtype is None:
                    dtype = w.dtype
                if w.dtype != dtype:
                    raise TypeError(f"expert {e}.{attr} has dtype {w.dtype}; every expert weight must be {dtype}")
                if param == "w2":
                    if wt.shape[0] != hidden:
                        raise ValueError(f"expert {e}.{attr} outputs {wt.shape[0]} features, the host has hidden size {hidden}")
                else:
                    if wt.shape[1] != hidden:
                        raise ValueError(f"expert {e}.{attr} reads {wt.shape[1]} features, the host has hidden size {hidden}")
                    ffn = ffn or wt.shape[0]
                key = f"{name}.{e}.{attr}.weight"
                source[key] = w
                entries.append(KeyMapEntry(key, (), param, (e,), transpose, tuple(w.shape), w.dtype))
                b = getattr(proj, "bias", None)
                if b is not None:
                    if e > 0 and bias not in biases:
                        raise TypeError(f"expert {e}.{attr} has a bias that expert 0 lacks")
                    biases.add(bias)
                    source[f"{name}.{e}.{attr}.bias"] = b
                    entries.append(KeyMapEntry(f"{name}.{e}.{attr}.bias", (), bias, (e,), False, tuple(b.shape), b.dtype))
                elif bias in biases:
                    raise TypeError(f"expert {e}.{attr} has no bias but expert 0 has one")
        return cls(len(experts), ffn, glu, activation, dtype, entries, source, experts, name, biases)

    @classmethod
    def _from_stacked(cls, tensors: dict, module, hidden, layout, activation, name) -> "_ExpertSpec":
        glu = "gate_up_proj" in tensors or "gate_proj" in tensors
        if "down_proj" not in tensors or not ("up_proj" in tensors or "gate_up_proj" in tensors):
            raise TypeError(f"stacked experts need 'down_proj' and 'gate_up_proj', 'gate_proj'+'up_proj' or 'up_proj'; "
                            f"got {sorted(tensors)}")
        activation = activation or ("silu_glu" if glu else None)
        if activation is None:
            raise TypeError(f"pass activation= for stacked 2-layer experts, one of {TWO_LAYER_ACTIVATIONS}")
        _check_activation(activation, glu)
        down = tensors["down_proj"]
        n_exp = down.shape[0]
        if layout is None:
            # (E, D, F) is out_in, (E, F, D) is in_out; equal sizes cannot be told apart.
            if down.shape[1] == down.shape[2]:
                raise ValueError("stacked experts with F == D: pass layout='out_in' or 'in_out'")
            layout = "out_in" if down.shape[1] == hidden else "in_out"
        tr = layout == "in_out"
        ffn = down.shape[2] if not tr else down.shape[1]
        all_ = slice(None)
        entries, biases = [], set()
        if "gate_up_proj" in tensors:
            gu = tensors["gate_up_proj"]
            rows = (all_, slice(0, ffn)) if not tr else (all_, all_, slice(0, ffn))
            rows2 = (all_, slice(ffn, None)) if not tr else (all_, all_, slice(ffn, None))
            entries += [KeyMapEntry(f"{name}.gate_up_proj", rows, "w1", (), tr, tuple(gu.shape), gu.dtype),
                        KeyMapEntry(f"{name}.gate_up_proj", rows2, "w3", (), tr, tuple(gu.shape), gu.dtype)]
            if "gate_up_proj_bias" in tensors:
                b = tensors["gate_up_proj_bias"]
                entries += [KeyMapEntry(f"{name}.gate_up_proj_bias", (all_, slice(0, ffn)), "b1", (), False, tuple(b.shape), b.dtype),
                            KeyMapEntry(f"{name}.gate_up_proj_bias", (all_, slice(ffn, None)), "b3", (), False, tuple(b.shape), b.dtype)]
                biases |= {"b1", "b3"}
        else:
            for attr, param, bias in ((("gate_proj", "w1", "b1"), ("up_proj", "w3", "b3")) if glu else (("up_proj", "w1", "b1"),)):
                t = tensors[attr]
                entries.append(KeyMapEntry(f"{name}.{attr}", (), param, (), tr, tuple(t.shape), t.dtype))
                if f"{attr}_bias" in tensors:
                    b = tensors[f"{attr}_bias"]
                    entries.append(KeyMapEntry(f"{name}.{attr}_bias", (), bias, (), False, tuple(b.shape), b.dtype))
                    biases.add(bias)
        entries.append(KeyMapEntry(f"{name}.down_proj", (), "w2", (), tr, tuple(down.shape), down.dtype))
        if "down_proj_bias" in tensors:
            b = tensors["down_proj_bias"]
            entries.append(KeyMapEntry(f"{name}.down_proj_bias", (), "b2", (), False, tuple(b.shape), b.dtype))
            biases.add("b2")
        expected_d = down.shape[1] if not tr else down.shape[2]
        if expected_d != hidden:
            raise ValueError(f"stacked experts: down_proj has shape {tuple(down.shape)}, which does not output the host's "
                             f"hidden size {hidden} in layout {layout!r}")
        used = {e.key[len(name) + 1:] for e in entries}
        ignored = sorted(k for k in tensors if k not in used)
        if ignored:
            raise TypeError(f"stacked experts: tensors {ignored} are not understood")
        source = {f"{name}.{k}": v for k, v in tensors.items()}
        dtypes = {v.dtype for k, v in tensors.items() if not k.endswith("_bias")}
        if len(dtypes) != 1:
            raise TypeError(f"stacked experts mix dtypes {sorted(map(str, dtypes))}")
        for e in entries:
            full = source[e.key][e.foreign_index]
            full = full.transpose(-1, -2) if e.transpose else full
            want = {"w1": (n_exp, ffn, hidden), "w3": (n_exp, ffn, hidden), "w2": (n_exp, hidden, ffn),
                    "b1": (n_exp, ffn), "b3": (n_exp, ffn), "b2": (n_exp, hidden)}[e.param]
            if tuple(full.shape) != want:
                raise ValueError(f"stacked experts: {e.key} gives {e.param} of shape {tuple(full.shape)}, expected {want}")
        return cls(n_exp, ffn, glu, activation, dtypes.pop(), entries, source,
                   module if module is not None else sorted(tensors), name, biases)

    def export(self, state: dict[str, torch.Tensor]):
        """New experts in the adapter's layout, holding ``state`` (foreign keys)."""
        ours = {k[len(self.prefix) + 1:]: v for k, v in state.items() if k.startswith(self.prefix + ".")}
        if isinstance(self.template, (nn.Module,)):
            out = copy.deepcopy(self.template)
            with torch.no_grad():
                own = dict(out.named_parameters())
                own.update(dict(out.named_buffers()))
                for k, v in ours.items():
                    own[k].copy_(v)
            return out
        return {k: ours[k].clone() for k in self.template}


def _check_activation(activation: str, glu: bool) -> None:
    allowed = GLU_ACTIVATIONS if glu else TWO_LAYER_ACTIVATIONS
    if activation not in allowed:
        kind = "gated (gate/up/down)" if glu else "2-layer"
        raise ValueError(f"activation {activation!r} does not fit {kind} experts; expected one of {allowed}")
