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
        E = config.num_experts
        gen = torch.Generator().manual_seed(config.seed)

        def stack(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.unsqueeze(0).repeat(E, *([1] * t.dim())).to(device=device, dtype=dtype).contiguous())

        if config.expert_init == "copy_zero_down":
            self.w1 = stack(w1)
            self.w3 = stack(_float_weight(host["w3"])) if host["w3"] is not None else None
        else:
            bound = 1.0 / math.sqrt(hidden)
            self.w1 = nn.Parameter((torch.rand(E, ffn, hidden, generator=gen) * 2 - 1).mul_(bound).to(device, dtype))
            self.w3 = (nn.Parameter((torch.rand(E, ffn, hidden, generator=gen) * 2 - 1).mul_(bound).to(device, dtype))
                       if host["w3"] is not None else None)
        # Down-projections start at zero: the edited model equals the base model at initialisation.
        self.w2 = nn.Parameter(torch.zeros(E, hidden, ffn, device=device, dtype=dtype))
        b1 = _float_bias(host["w1"])
        self.b1 = stack(b1) if b1 is not None and config.expert_init == "copy_zero_down" else (
            nn.Parameter(torch.zeros(E, ffn, device=device, dtype=dtype)) if b1 is not None else None)
        self.b2 = nn.Parameter(torch.zeros(E, hidden, device=device, dtype=dtype)) if _float_bias(host["w2"]) is not None else None
        # Gate over concat(x, anchor). The token half starts at zero, so routing starts as a function of
        # the anchor alone: inputs about one entity begin on one expert.
        w_gate = torch.zeros(E, hidden + self.anchor_dim)
        w_gate[:, hidden:] = torch.randn(E, self.anchor_dim, generator=gen) / math.sqrt(self.anchor_dim)
        self.w_gate = nn.Parameter(w_gate.to(device=device, dtype=torch.float32))
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.enabled = True
        self.impl = config.impl
        self._anchor: torch.Tensor | None = None
        self._scope: torch.Tensor | None = None
        self._token_seq: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None

    def set_anchors(self, anchors: torch.Tensor | None, scope: torch.Tensor | None = None,
                    token_seq: torch.Tensor | None = None) -> None:
        """Anchors ``(S, A)`` for the next forwards, an optional bool scope ``(S,)``, and for packed inputs
        (several sequences in one row, no padding) the sequence of every token ``(N,)`` (CPU int64).
        Without ``token_seq`` the input is ``(S, L, D)``: sequence ``s`` is row ``s``."""
        self._anchor = anchors
        self._scope = None if scope is None else scope.to("cpu", torch.bool)
        self._token_seq = None if token_seq is None else token_seq.to("cpu", torch.long)

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
        if self.config.anchor_scope and self._scope is not None:
            tok_scope = self._scope[token_seq]
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
        if self.training and self.config.gate_noise > 0:
            noise = torch.randn(tokens.shape[0], self.config.num_experts, device=x.device) * self.config.gate_noise
        # The kernels add the bypass into the host output in their epilogue when both share a dtype.
        fuse_host = out.dtype == self.w1.dtype
        glu = self.w3 is not None
        y, probs, experts = moe_bypass(
            tokens, anchor, seq_idx, router_weight=self.w_gate,
            gate_proj=self.w1 if glu else None, up_proj=self.w3 if glu else self.w1, down_proj=self.w2,
            gate_bias=self.b1 if glu else None, up_bias=None if glu else self.b1, down_bias=self.b2,
            token_scale=None if self.config.scale == 1.0 else torch.full((tokens.shape[0],), self.config.scale, device=x.device),
            noise=noise, top_k=self.config.top_k, renormalize=self.config.renormalize,
            activation=self.activation, host_out=host_rows if fuse_host else None, impl=self.impl,
        )
        self.last_experts = experts.detach()
        if self.training:
            self.last_aux_loss = load_balance_loss(probs, experts, self.config.num_experts)
        if not fuse_host:
            # The host output stays in its own dtype: lower-precision experts must not round it.
            y = host_rows + y.to(out.dtype)
        if sel is None:
            return y.view(out.shape)
        return flat_out.index_copy(0, sel, y).view(out.shape)
