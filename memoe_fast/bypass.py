"""``MEMoEBypass``: a host MLP plus a bypass mixture of experts routed by knowledge anchors.

``out = host(x) + λ·s·Σ_{e∈topk} g_e·expert_e(x)``, where ``s`` is 1 for sequences in the edit scope
(or always, with ``anchor_scope`` off) and the gate reads ``concat(x, anchor)``.

Anchors are per sequence: set them with :meth:`MEMoEBypass.set_anchors` (a ``(B, D)`` tensor and an
optional ``(B,)`` scope mask) before a forward over a ``(B, L, D)`` input. :class:`~memoe_fast.integration.MEMoEHandle`
does this for you from the input text, including decode steps with a KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import MEMoEConfig
from .ops import load_balance_loss, moe_bypass


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


def describe_host(mlp: nn.Module) -> dict:
    """Recognise the host MLP: LLaMA-style gated SiLU or GPT-2-style GELU with Conv1D."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(getattr(mlp, "config", None), "hidden_act", None) or type(getattr(mlp, "act_fn", None)).__name__
        if str(act).lower() not in ("silu", "siluactivation", "swish"):
            raise TypeError(f"gated MLP with activation {act!r} is not supported (only SiLU)")
        return {"kind": "llama", "activation": "silu_glu",
                "w1": mlp.gate_proj, "w3": mlp.up_proj, "w2": mlp.down_proj}
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        act = type(getattr(mlp, "act", None)).__name__
        activation = "gelu" if act == "GELUActivation" else "gelu_tanh"
        return {"kind": "gpt2", "activation": activation, "w1": mlp.c_fc, "w3": None, "w2": mlp.c_proj}
    raise TypeError(
        f"unsupported MLP {type(mlp).__name__}: expected LLaMA-style gate_proj/up_proj/down_proj "
        "or GPT-2-style c_fc/c_proj"
    )


ROUTE_BIAS = 1e4  # gate-logit bias of a forced expert (``route``); gate logits are O(1)


class MEMoEBypass(nn.Module):
    """Wraps ``base_layer`` (the host MLP, kept untouched and frozen) with a trainable bypass MoE.

    Args:
        base_layer: the host MLP module.
        config: :class:`MEMoEConfig`.
        anchor_dim: width of the anchor vectors (the backbone's embedding width).

    Example::

        bypass = MEMoEBypass(model.model.layers[15].mlp, MEMoEConfig())
        bypass.set_anchors(torch.randn(2, 576))
        y = bypass(torch.randn(2, 7, 576))      # equals the host MLP's output at initialisation
    """

    def __init__(self, base_layer: nn.Module, config: MEMoEConfig, anchor_dim: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        host = describe_host(base_layer)
        self.activation = host["activation"]
        w1 = _float_weight(host["w1"])  # (F, D)
        ffn, hidden = w1.shape
        self.hidden_size, self.ffn_size = hidden, ffn
        self.anchor_dim = anchor_dim or hidden
        ref = next(base_layer.parameters())
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
        self._anchor: torch.Tensor | None = None
        self._scope: torch.Tensor | None = None
        self._token_seq: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self._route: torch.Tensor | None = None
        self.frozen_experts = 0  # experts [0, frozen_experts) get no gradient (lifelong editing)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None

    def _fresh_experts(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor | None]:
        """``n`` experts at initialisation and their gate rows, as plain tensors."""
        host, config, hidden, ffn = self._host, self.config, self.hidden_size, self.ffn_size
        dtype, device = self._expert_dtype, self._expert_device

        def stack(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(0).repeat(n, *([1] * t.dim())).to(device=device, dtype=dtype).contiguous()

        def uniform(*shape) -> torch.Tensor:
            return (torch.rand(*shape, generator=gen) * 2 - 1).mul_(1.0 / math.sqrt(hidden)).to(device, dtype)

        out: dict[str, torch.Tensor | None] = {}
        if config.expert_init == "copy_zero_down":
            out["w1"] = stack(_float_weight(host["w1"]))
            out["w3"] = stack(_float_weight(host["w3"])) if host["w3"] is not None else None
        else:
            out["w1"] = uniform(n, ffn, hidden)
            out["w3"] = uniform(n, ffn, hidden) if host["w3"] is not None else None
        # Down-projections start at zero: the edited model equals the base model at initialisation.
        out["w2"] = torch.zeros(n, hidden, ffn, device=device, dtype=dtype)
        b1 = _float_bias(host["w1"])
        out["b1"] = (stack(b1) if config.expert_init == "copy_zero_down" else torch.zeros(n, ffn, device=device, dtype=dtype)) \
            if b1 is not None else None
        out["b2"] = torch.zeros(n, hidden, device=device, dtype=dtype) if _float_bias(host["w2"]) is not None else None
        # Gate over concat(x, anchor). The token half starts at zero, so routing starts as a function of
        # the anchor alone: inputs about one entity begin on one expert.
        w_gate = torch.zeros(n, hidden + self.anchor_dim)
        w_gate[:, hidden:] = torch.randn(n, self.anchor_dim, generator=gen) / math.sqrt(self.anchor_dim)
        out["w_gate"] = w_gate.to(device=device, dtype=torch.float32)
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
                    token_seq: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                    route: torch.Tensor | None = None) -> None:
        """Anchors ``(S, A)`` for the next forwards, an optional bool scope ``(S,)``, and for packed inputs
        (several sequences in one row, no padding) the sequence of every token ``(N,)`` (CPU int64).
        Without ``token_seq`` the input is ``(S, L, D)``: sequence ``s`` is row ``s``.

        ``token_mask`` ``(N,)`` bool (one entry per token of the input, flattened) limits the bypass to
        the marked tokens (``bypass_positions="after_subject"``); ``route`` ``(S,)`` int64 sends every
        token of sequence ``s`` to expert ``route[s]`` (weight 1) instead of the gate's choice, -1 keeps
        the gate's (lifelong editing routes each batch's subjects to that batch's expert)."""
        self._anchor = anchors
        self._scope = None if scope is None else scope.to("cpu", torch.bool)
        self._token_seq = None if token_seq is None else token_seq.to("cpu", torch.long)
        self._token_mask = None if token_mask is None else token_mask.to("cpu", torch.bool).reshape(-1)
        self._route = None if route is None else route.to("cpu", torch.long)

    @property
    def gate_learns(self) -> bool:
        """Whether the gate gets a real gradient. With top-1 renormalised routing the weight is p/p = 1, so
        only the balance loss reaches the gate; without it the gradient is rounding noise, which Adam
        would scale up to full-size steps that reshuffle the routing."""
        return self.config.aux_loss_weight > 0 or not (self.config.top_k == 1 and self.config.renormalize)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.bypass_parameters().items() if n != "w_gate" or self.gate_learns]

    def bypass_parameters(self) -> dict[str, torch.Tensor]:
        names = ("w_gate", "w1", "w3", "w2", "b1", "b2")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to(x, self.base_layer(x))

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the bypass's output for the host input ``x`` (``forward(x) = add_to(x, host(x))``).

        ``out`` may be any tensor of the host output's shape that the bypass adds into: the fast editor
        passes the edited block's cached output, which is the host output plus terms that do not
        depend on it. ``out`` is never modified in place."""
        self.last_aux_loss = None
        if not self.enabled:
            return out
        if self._anchor is None:
            raise RuntimeError(
                "MEMoEBypass has no anchors for this input: call set_anchors(...) or use the handle from "
                "apply_memoe(), which computes them from the input text"
            )
        hidden = x.shape[-1]
        n_tok = x.numel() // hidden
        token_seq = self._token_seq
        if token_seq is None:
            batch = x.shape[0] if x.dim() > 2 else 1
            if self._anchor.shape[0] != batch:
                raise RuntimeError(f"anchors were set for {self._anchor.shape[0]} sequences but the input has {batch}")
            token_seq = torch.arange(batch).repeat_interleave(n_tok // batch)
        elif token_seq.numel() != n_tok:
            raise RuntimeError(f"token_seq has {token_seq.numel()} entries but the input has {n_tok} tokens")
        sel = None
        tok_scope = None
        if self.config.anchor_scope and self._scope is not None:
            tok_scope = self._scope[token_seq]
        if self._token_mask is not None:
            if self._token_mask.numel() != n_tok:
                raise RuntimeError(f"token_mask has {self._token_mask.numel()} entries but the input has {n_tok} tokens")
            tok_scope = self._token_mask if tok_scope is None else tok_scope & self._token_mask
        if tok_scope is not None:
            if not bool(tok_scope.any()):
                return out  # no sequence is about an edited entity: the experts have nothing to add
            if not bool(tok_scope.all()):
                sel = tok_scope.nonzero().squeeze(1).to(x.device)  # only in-scope tokens go through the experts
        flat_x, flat_out = x.reshape(n_tok, hidden), out.reshape(n_tok, hidden)
        seq_idx = token_seq.to(x.device)
        if sel is not None:
            flat_x, seq_idx = flat_x.index_select(0, sel), seq_idx.index_select(0, sel)
        host_rows = flat_out if sel is None else flat_out.index_select(0, sel)
        anchor = self._anchor.to(device=x.device, dtype=self.w1.dtype)
        tokens = flat_x.to(self.w1.dtype)
        noise = None
        n_exp = self.w1.shape[0]
        if self.training and self.config.gate_noise > 0:
            noise = torch.randn(tokens.shape[0], n_exp, device=x.device) * self.config.gate_noise
        if self._route is not None:
            # A forced expert is a logit bias far above any gate logit: top-1 picks it with weight 1, and
            # every implementation (reference, torch, Triton) routes it without a change of its own.
            seq_route = self._route.to(x.device)[seq_idx]
            forced = seq_route >= 0
            if bool(forced.any()):
                bias = torch.zeros(tokens.shape[0], n_exp, device=x.device)
                bias[forced.nonzero().squeeze(1), seq_route[forced]] = ROUTE_BIAS
                noise = bias if noise is None else noise + bias
        # The kernels add the bypass into the host output in their epilogue when both share a dtype.
        fuse_host = out.dtype == self.w1.dtype
        y, probs, experts = moe_bypass(
            tokens, anchor, seq_idx, self.w_gate, self.w1, self.w2, self.w3, self.b1, self.b2,
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
