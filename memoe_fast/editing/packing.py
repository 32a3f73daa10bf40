"""Packed micro-batches: several sequences in one row of real tokens, and the attention over them.

* :func:`pack_block_inputs` turns a block's captured inputs for a right-padded ``(B, L)`` batch into
  one ``(1, N)`` row (rotary tables and positions gathered per token, a block-diagonal causal mask).
* :func:`packed_sdpa` is an attention function for that row. The linear layers work on the ``N`` real
  tokens, but attention over one ``N x N`` block-diagonal mask computes ``N^2`` scores where the
  sequences need ``sum(len_i^2)``: 30 ZsRE-length sequences are ~10x fewer. So attention alone runs
  on the padded ``(B, L)`` layout and comes back packed.
* :func:`block_at_rows` runs a LLaMA-style block at a few rows only (the last block, at the rows the
  loss reads).
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "memoe_packed_sdpa"


class Packed:
    """Where the tokens of a packed micro-batch came from."""

    def __init__(self, token_seq: torch.Tensor, pred_abs: torch.Tensor, slots: torch.Tensor, length: int,
                 pad_mask: torch.Tensor):
        self.token_seq = token_seq  # (N,) CPU: the sequence of every packed token
        self.pred_abs = pred_abs  # (B, Tt): packed positions that predict the target tokens
        self.slots = slots  # (N,) each packed token's slot ``seq * length + pos`` in the padded layout
        self.length = length  # L of the padded layout
        self.pad_mask = pad_mask  # (B, 1, L, L) bool: causal, and only real keys


def pack_block_inputs(args: tuple, kwargs: dict, batch):
    """Turn the captured inputs of a block for a right-padded ``(B, L)`` batch into one packed row.

    Tensors laid out ``(B, L, ...)`` keep their real tokens (``(1, N, ...)``); position tensors laid out
    ``(1, L, ...)`` (rotary tables, position ids) are gathered at each token's own position; the 4-D
    attention mask becomes block-diagonal causal. A batch without padding is packed too (it saves no
    padding, but the packed row is what the step's shortcuts run on: the last block at the target rows,
    one-node upper blocks): where the model passed no mask (its attention is causal by itself), the
    block-diagonal one is made here. Returns the inputs unchanged (and ``None``) when a padded batch
    has no attention mask to rebuild.
    """
    mask = batch.attention_mask.bool()
    n_seq, length = mask.shape
    lengths = mask.sum(1)
    unpadded = bool((lengths == length).all())
    device = batch.input_ids.device
    rows, pos = mask.nonzero(as_tuple=True)  # row-major: sequence by sequence, positions in order
    n = rows.numel()
    same = rows.unsqueeze(0) == rows.unsqueeze(1)
    causal = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [i, j]: key j at or before query i
    block_mask = (same & causal).view(1, 1, n, n)
    found_mask = False

    def convert(t):
        nonlocal found_mask
        if isinstance(t, tuple):
            return tuple(convert(v) for v in t)
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() == 4 and t.shape[-2:] == (length, length):
            found_mask = True
            if t.dtype == torch.bool:
                return block_mask
            return torch.zeros(1, 1, n, n, dtype=t.dtype, device=t.device).masked_fill(~block_mask, torch.finfo(t.dtype).min)
        if t.dim() >= 2 and t.shape[1] == length and t.shape[0] == n_seq:
            return t[rows, pos].unsqueeze(0)
        if t.dim() >= 2 and t.shape[1] == length and t.shape[0] == 1:
            return t[0, pos].unsqueeze(0)
        return t

    new_args = tuple(convert(a) for a in args)
    new_kwargs = {k: convert(v) for k, v in kwargs.items()}
    if not found_mask:
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not (unpadded and "attention_mask" in kwargs and kwargs["attention_mask"] is None and hidden is not None
                and hidden.is_floating_point()):
            return args, kwargs, None
        # No padding, so the model let attention be causal by itself: the packed row needs the mask.
        new_kwargs["attention_mask"] = torch.zeros(1, 1, n, n, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~block_mask, torch.finfo(hidden.dtype).min)
    starts = torch.cumsum(lengths, 0) - lengths
    pred_abs = (starts.unsqueeze(1) + batch.pred_pos).clamp(max=n - 1)
    ar = torch.arange(length, device=device)
    pad_mask = ((ar.view(1, -1) <= ar.view(-1, 1)).unsqueeze(0) & mask.unsqueeze(1)).unsqueeze(1)
    return new_args, new_kwargs, Packed(rows.cpu(), pred_abs.to(device), rows * length + pos, length, pad_mask)


def _llama_attention(block, kwargs: dict, hidden_rows: int | None = None):
    """``(attn, rotary, mask, (cos, sin), attention function)`` of a LLaMA-style pre-norm block over one
    packed row; ``NotImplementedError`` for other layouts (callers check against the block first)."""
    attn = getattr(block, "self_attn", None)
    names = ("input_layernorm", "post_attention_layernorm", "mlp")
    if attn is None or not all(hasattr(block, n) for n in names) or not all(
            hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")):
        raise NotImplementedError(f"{type(block).__name__} is not a LLaMA-style block")
    rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
    if rotary is None or pos is None or mask is None or mask.dim() != 4 or hidden_rows not in (None, 1):
        raise NotImplementedError("needs rotary position embeddings and a 4-D mask over one packed row")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    return attn, rotary, mask, pos, interface


def block_at_rows(block, hidden: torch.Tensor, rows: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A LLaMA-style pre-norm block's output at the packed rows ``rows`` only: ``(1, N, D)`` -> ``(Nt, D)``.

    Keys and values come from every row; queries, the attention output, its projection and the MLP only
    from ``rows``. In the last block nothing else is read, so the other rows need no work. Raises
    ``NotImplementedError`` for blocks of another layout; callers compare it to the whole block first.
    """
    attn, rotary, mask, (cos, sin), interface = _llama_attention(block, kwargs, hidden.shape[0])
    n, nt, hd = hidden.shape[1], rows.numel(), attn.head_dim
    x = block.input_layernorm(hidden)
    q = attn.q_proj(x[:, rows]).view(1, nt, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, _ = rotary(q, q, cos[:, rows], sin[:, rows])
    _, k = rotary(k, k, cos, sin)
    out, _ = interface(attn, q, k, v, mask[:, :, rows], dropout=0.0, scaling=attn.scaling)
    h = hidden[0, rows] + attn.o_proj(out.reshape(nt, -1))
    return h + block.mlp(block.post_attention_layernorm(h))


def block_keys_values(block, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated keys and the values ``(1, Hkv, N, d)`` a LLaMA-style block computes from the packed
    states ``hidden`` ``(1, N, D)`` (what :func:`block_at_suffix` caches)."""
    attn, rotary, _, (cos, sin), _ = _llama_attention(block, kwargs, hidden.shape[0])
    n, hd = hidden.shape[1], attn.head_dim
    x = block.input_layernorm(hidden)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    _, k = rotary(k, k, cos, sin)
    return k, v


def block_at_suffix(block, h_rows: torch.Tensor, rows: torch.Tensor, cached: tuple, kwargs: dict) -> torch.Tensor:
    """A LLaMA-style block's output at ``rows`` ``(Nt, D)`` from the new states there ``h_rows``
    ``(Nt, D)``, every other row's keys and values taken from ``cached`` (:func:`block_keys_values` of
    the states those rows keep). Exact when the rows outside ``rows`` do not change, which is what the
    fast editor checks: the bypass acts only from each sequence's first active token on, so every
    token before it keeps its unedited state in every block."""
    attn, rotary, mask, (cos, sin), interface = _llama_attention(block, kwargs)
    nt, hd = rows.numel(), attn.head_dim
    x = block.input_layernorm(h_rows).unsqueeze(0)
    q = attn.q_proj(x).view(1, nt, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, nt, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, nt, -1, hd).transpose(1, 2)
    q, k = rotary(q, k, cos[:, rows], sin[:, rows])
    keys, values = cached[0].index_copy(2, rows, k), cached[1].index_copy(2, rows, v)
    out, _ = interface(attn, q, keys, values, mask[:, :, rows], dropout=0.0, scaling=attn.scaling)
    h = h_rows + attn.o_proj(out.reshape(nt, -1))
    return h + block.mlp(block.post_attention_layernorm(h))


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                memoe_packed: Packed | None = None, **kwargs):
    """``sdpa`` attention over a packed row, computed on the padded layout (registered with transformers
    as ``"memoe_packed_sdpa"``). Without ``memoe_packed`` (or for a query that is not the whole row)
    it is transformers' own ``sdpa`` attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    if (memoe_packed is None or query.shape[0] != 1 or key.shape[2] != n or memoe_packed.slots.numel() != n
            or (dropout > 0 and module.training) or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = attend_packed(*(t[0].transpose(0, 1) for t in (query, key, value)), memoe_packed, scaling)
    return rows.unsqueeze(0), None  # (1, N, H, d), as transformers' attention functions return it


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: Packed, scale=None) -> torch.Tensor:
    """Causal attention of packed per-head rows, each sequence on its own: ``q`` ``(N, H, d)``, ``k``/``v``
    ``(N, Hkv, d)`` (grouped-query heads allowed) -> ``(N, H, d)``, computed on the padded layout."""
    qp, kp, vp = (_to_padded(t, pk) for t in (q, k, v))
    groups = qp.shape[1] // kp.shape[1]
    if groups > 1:
        kp, vp = (t.repeat_interleave(groups, dim=1) for t in (kp, vp))
    return _from_padded(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=pk.pad_mask, scale=scale), pk)


def _to_padded(rows: torch.Tensor, pk: Packed) -> torch.Tensor:
    """Packed per-head rows ``(N, h, d)`` -> the padded layout ``(B, h, L, d)``, zeros in the padding."""
    n_seq, (h, d) = pk.pad_mask.shape[0], rows.shape[1:]
    flat = rows.new_zeros(n_seq * pk.length, h, d).index_copy_(0, pk.slots, rows)
    return flat.view(n_seq, pk.length, h, d).transpose(1, 2)


def _from_padded(t: torch.Tensor, pk: Packed) -> torch.Tensor:
    """The padded layout ``(B, h, L, d)`` -> the packed rows ``(N, h, d)``."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).index_select(0, pk.slots)


def register_packed_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    return PACKED_ATTENTION


def attention_configs(blocks) -> list | None:
    """The configs the attention modules of ``blocks`` read their implementation from, when every one of
    them uses ``sdpa`` (the packed attention replaces only that); else None."""
    configs = []
    for block in blocks:
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        cfg = getattr(attn, "config", None)
        if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
            return None
        if all(c is not cfg for c in configs):
            configs.append(cfg)
    return configs


@contextlib.contextmanager
def packed_attention(configs):
    """Inside, the attention modules reading ``configs`` use :func:`packed_sdpa` (``sdpa`` where a call
    brings no ``memoe_packed``)."""
    name = register_packed_attention()
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
