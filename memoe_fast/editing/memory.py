"""A memory model of the fast editor: the peak bytes of one editing run, term by term, before running it.

:func:`predict_peak` adds up what :class:`~memoe_fast.editing.fast_editor.FastMEMoEEditor` holds at the
two moments a step can peak, and returns the larger, with its terms named:

* **head backward** (the start of a micro-batch's backward): every activation the upper blocks saved for
  backward is alive, plus the target-row logits, their log-softmax and its gradient;
* **bypass backward** (the end of it): the upper blocks' activations are gone, but the experts' new
  gradient buffers are being written next to the gradients accumulated by the earlier micro-batches.

Both sit on the same base: the backbone, the experts and their Adam state (from the second step on),
the cached frozen prefix of *every* micro-batch (the editor keeps them for all steps), the packed
weight copies on the CPU (``memoe_fast.editing.prepack``), and a fixed overhead. Only one micro-batch's
graph is alive at a time, so the micro-batch size scales the activations and nothing else;
:func:`pick_micro_batch` inverts that for a budget.

What a tensor costs follows the code it models: the one-node upper blocks
(``memoe_fast.editing.frozen_block``) on the CPU in fp32, transformers' LLaMA blocks through autograd
elsewhere (a frozen ``nn.Linear`` saves nothing for backward, a bitsandbytes int8 linear saves its input
and dequantises its weight in backward), the packed attention on the padded layout, the grouped CPU
experts (``memoe_fast.ops.torch_path``) or the Triton experts on CUDA (both save the same tensors and write
each weight gradient once). Checked against measured peaks in ``benchmarks/memory_model.py`` (table in benchmarks/RESULTS.md).

The key gate's store (prompt keys and subject subspaces) and the chat-form sequences are counted when the
caller passes them (the CLI's ``--memory-budget`` does); the activations are those of full rows, an upper
bound for the key gate's suffix-only run above the edited block.

Scope: LLaMA-style backbones (SiLU-gated MLP, rotary attention), top-1 routing, no same-subject
negatives, no activation checkpointing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MiB = 2**20
GiB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICES = ("cpu", "cuda")
# Fixed overhead: small tensors (token ids, masks, anchors, routing indices, optimizer step counters) and
# allocator slack on the CPU (16 MiB: with glibc pinned to mmap large blocks, the measured SmolLM2 peaks sit
# within a few MiB of the tensor terms alone); on CUDA also cuBLAS workspaces and the caching allocator's fragmentation
# (the CUDA context itself is outside ``max_memory_allocated`` and outside this model).
OVERHEAD = {"cpu": 16 * MiB, "cuda": 1 * GiB}


@dataclass(frozen=True)
class BackboneShape:
    """The sizes of a LLaMA-style backbone that its editing memory depends on.

    Args:
        hidden, ffn, layers, heads, kv_heads, vocab: the model's sizes (``D``, ``F``, ...).
        dtype: float dtype of the hidden states, embeddings and norms (and of the linears unless ``int8``).
        int8: the blocks' linear layers are bitsandbytes int8 (1 byte per weight + fp32 row scales).
        tied_embeddings: the LM head shares the input embedding's weight.
    """

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "float32"
    int8: bool = False
    tied_embeddings: bool = False

    def __post_init__(self):
        for name in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"BackboneShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"BackboneShape.dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide into heads ({self.heads}), and heads into "
                             f"kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config, dtype: str = "float32", int8: bool = False) -> "BackboneShape":
        """From a transformers LLaMA-style config (``hidden_size``, ``intermediate_size``, ...)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, ffn=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, dtype=dtype, int8=int8,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @classmethod
    def from_model(cls, model) -> "BackboneShape":
        """From a loaded model: its config, the dtype of its embedding, whether its blocks are int8."""
        emb = model.get_input_embeddings().weight
        int8 = any(getattr(m, "weight", None) is not None and str(m.weight.dtype) == "torch.int8"
                   for m in model.modules())
        shape = cls.from_config(model.config, dtype=str(emb.dtype).replace("torch.", ""), int8=int8)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
        return cls(**{**shape.__dict__, "tied_embeddings": tied})


LLAMA2_7B = BackboneShape(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                          dtype="float16", int8=True)


@dataclass
class MemoryPrediction:
    """Predicted peak bytes of an editing run: ``total == sum(terms.values())``.

    ``terms`` are those of the moment that peaks (``phase``); ``phases`` holds both moments' terms and
    ``other_phase_total`` the other moment's total. ``baseline`` is the part that exists before editing (the backbone weights):
    ``total - baseline`` is the increase an editing run adds to a loaded model."""

    terms: dict[str, int]
    phase: str
    other_phase_total: int
    micro_batch: int
    chunks: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # both moments' terms
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def baseline(self) -> int:
        return self.terms["backbone_weights"]

    @property
    def increase(self) -> int:
        return self.total - self.baseline

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "increase_bytes": self.increase, "phase": self.phase,
                "micro_batch": self.micro_batch, "chunks": self.chunks, "terms": dict(self.terms),
                "other_phase_total_bytes": self.other_phase_total, **self.details}

    def table(self) -> str:
        """Markdown: one row per term, in MiB."""
        rows = ["| term | MiB |", "|---|---:|"]
        rows += [f"| {k} | {v / MiB:.1f} |" for k, v in self.terms.items()]
        rows.append(f"| **total ({self.phase})** | **{self.total / MiB:.1f}** |")
        return "\n".join(rows)


def backbone_bytes(shape: BackboneShape) -> int:
    """The backbone's weights: embeddings, LM head (unless tied), the blocks' linears (int8: one byte per
    weight plus an fp32 scale per output row), norms."""
    s = DTYPE_BYTES[shape.dtype]
    d, f, kv = shape.hidden, shape.ffn, shape.kv_dim
    linear_params = 2 * d * d + 2 * d * kv + 3 * d * f
    rows = 2 * d + 2 * kv + 2 * f + d  # output rows of q, k, v, o, gate, up, down
    per_layer = (linear_params + 4 * rows if shape.int8 else linear_params * s) + 2 * d * s
    head = 0 if shape.tied_embeddings else shape.vocab * d * s
    return shape.vocab * d * s + head + shape.layers * per_layer + d * s


def _block_linear_bytes(shape: BackboneShape) -> int:
    d, f, kv = shape.hidden, shape.ffn, shape.kv_dim
    return (2 * d * d + 2 * d * kv + 3 * d * f) * 4


def upper_block_bytes_per_token(shape: BackboneShape, one_node: bool, padding: float = 1.0) -> float:
    """Bytes one upper block saves for backward per token of a micro-batch.

    ``one_node``: the CPU fp32 one-node block saves both norms' normalised inputs, the gate and up
    projections, the rotated q/k/v and the attention output, and the attention's own graph (q/k/v/out on
    the padded layout, heads repeated to ``heads``). Through autograd: each RMSNorm keeps its fp32
    input, the packed attention its padded q/k/v/out, the SiLU gate its input, output and the up
    projection; a frozen ``nn.Linear`` keeps nothing, a bitsandbytes int8 linear its input.
    ``padding``: padded over real tokens of the micro-batch (the attention works on the padded layout).
    """
    s = DTYPE_BYTES[shape.dtype]
    d, f, kv, h = shape.hidden, shape.ffn, shape.kv_dim, shape.heads
    attention_padded = (4 * d * s + 4 * h) * padding  # q, k, v (heads repeated), out; fp32 log-sum-exp
    if one_node:
        return 4 * (4 * d + 2 * kv + 2 * f) + 8 + attention_padded
    per = 2 * (4 * d + 4) + attention_padded + 3 * f * s
    if shape.int8:
        per += (3 * d + f) * s  # the inputs of q/k/v (shared), o, gate/up (shared), down
    return per


def last_block_bytes_per_token(shape: BackboneShape) -> float:
    """The last block run at the target rows only (``packing.block_at_rows``): for every token its fp32
    norm input and the keys and values (heads repeated) stay; the rest exists at the target rows only."""
    s = DTYPE_BYTES[shape.dtype]
    return 4 * shape.hidden + 4 + 2 * shape.hidden * s + (shape.hidden * s if shape.int8 else 0)


def predict_peak(shape: BackboneShape, n_edits: int, *, layer: int | None = None, micro_batch: int = 64,
                 prompt_tokens: float = 12.0, target_tokens: float = 4.0, num_experts: int = 4,
                 expert_dtype: str | None = None, device: str = "cpu", prepack: bool | None = None,
                 gate_trains: bool = False, padding: float = 1.1, keys: int = 0, key_subjects: int = 0,
                 key_rank: int = 0, cached_edits: int | None = None) -> MemoryPrediction:
    """Predicted peak memory of :class:`~memoe_fast.editing.fast_editor.FastMEMoEEditor` editing ``n_edits``
    requests in one batch, in bytes (see the module docstring for the two moments compared).

    Args:
        shape: the backbone (:class:`BackboneShape`; ``BackboneShape.from_model(model)``).
        n_edits: sequences trained together in one optimiser update (edits, their chat forms and negatives).
        cached_edits: sequences whose frozen prefix is cached, all update groups together (the editor keeps
            every group's for all steps; default ``n_edits``).
        layer: the edited block (default: ``layers // 2``, as :class:`~memoe_fast.config.MEMoEConfig`).
        micro_batch: sequences per forward (``FastMEMoEEditor.micro_batch``).
        prompt_tokens, target_tokens: average tokens per prompt (with BOS) and per target.
        num_experts: ``E``; expert_dtype: the experts' dtype (default: the backbone's float dtype, float32
            for an int8 backbone, as ``MEMoEConfig.expert_dtype=None`` does).
        device: ``"cpu"`` (grouped PyTorch experts, one-node fp32 blocks, packed weight copies) or ``"cuda"``
            (Triton experts, autograd blocks, no copies).
        prepack: whether the CPU packed copies apply (default: on the CPU; they cover the fp32 ``nn.Linear``
            layers of the upper blocks and the LM head; ``PrepackedLinears`` skips them when memory is short).
        gate_trains: the gate is trained (top-k > 1 or a balance loss); with top-1 renormalised routing it is not.
        padding: padded over real tokens in a micro-batch's attention (sequences are sorted by length).
        keys, key_subjects, key_rank: the key gate's store (``MEMoEConfig.key_threshold``): ``keys`` prompt
            keys (edit prompts with a subject, plus their chat-form prompts), each kept twice in fp32 (as is,
            and off its subject's subspace), and ``key_subjects`` subject subspaces of ``key_rank`` fp32
            directions each (``key_subject_rank``, at most D/4). At 1000 subjects of LLaMA-2-7B, 0.5 GiB.

    Example::

        shape = BackboneShape.from_model(model)
        pred = predict_peak(shape, 1000, micro_batch=64, device="cuda", expert_dtype="bfloat16")
        print(pred.table())
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if n_edits < 1 or micro_batch < 1:
        raise ValueError(f"n_edits and micro_batch must be >= 1, got {n_edits} and {micro_batch}")
    if min(keys, key_subjects, key_rank) < 0:
        raise ValueError(f"keys, key_subjects and key_rank must be >= 0, got {keys}, {key_subjects} and {key_rank}")
    if prompt_tokens < 1 or target_tokens < 1:
        raise ValueError(f"prompt_tokens and target_tokens must be >= 1, got {prompt_tokens} and {target_tokens}")
    cached_edits = n_edits if cached_edits is None else cached_edits
    if cached_edits < n_edits:
        raise ValueError(f"cached_edits ({cached_edits}) must be >= n_edits ({n_edits}): every trained sequence is cached")
    layer = shape.layers // 2 if layer is None else layer
    if not 0 <= layer < shape.layers:
        raise ValueError(f"layer must be in [0, {shape.layers}), got {layer}")
    expert_dtype = expert_dtype or ("float32" if shape.int8 else shape.dtype)
    if expert_dtype not in DTYPE_BYTES:
        raise ValueError(f"expert_dtype must be one of {tuple(DTYPE_BYTES)}, got {expert_dtype!r}")
    s, se = DTYPE_BYTES[shape.dtype], DTYPE_BYTES[expert_dtype]
    d, f, v = shape.hidden, shape.ffn, shape.vocab
    micro = min(micro_batch, n_edits)
    chunks = math.ceil(n_edits / micro)
    # The editor drops each sequence's last token (it predicts nothing scored).
    seq_tokens = prompt_tokens + target_tokens - 1
    tokens_all, tokens = cached_edits * seq_tokens, micro * seq_tokens
    # Every update group is cut into micro-batches of its own.
    groups = math.ceil(cached_edits / n_edits)
    cached_chunks = groups * chunks
    rows = micro * target_tokens
    upper = shape.layers - layer - 1
    cpu = device == "cpu"
    fp32_linears = cpu and shape.dtype == "float32" and not shape.int8
    one_node = fp32_linears and upper >= 2  # frozen_block: CPU, fp32, nn.Linear, at least two upper blocks
    prepack = cpu if prepack is None else (prepack and cpu)

    expert_params = num_experts * 3 * d * f
    trainable = expert_params * se + (num_experts * 2 * d * 4 if gate_trains else 0)
    base = {
        "backbone_weights": backbone_bytes(shape),
        "prepacked_weights": ((upper * _block_linear_bytes(shape) if fp32_linears else 0)
                              + (v * d * 4 if shape.dtype == "float32" else 0)) if prepack else 0,
        "experts_and_gate": expert_params * se + num_experts * 2 * d * 4,
        "adam_state": 2 * trainable,
        # Per token, for every micro-batch: the edited block's input, its host-MLP input and its output
        # without the bypass, and the rotary tables gathered per token; per micro-batch the masks.
        "frozen_prefix": int(tokens_all * (3 * d * s + 2 * shape.head_dim * s)
                             + cached_chunks * (tokens ** 2 + micro * (seq_tokens * padding) ** 2)),
        # Per key: the unit state and its projection off the subject's subspace (fp32), the subject and
        # basis indices (int64); per subject: its subspace (fp32) and index.
        "key_gate": keys * (2 * d * 4 + 16) + key_subjects * (key_rank * d * 4 + 8),
        "overhead": OVERHEAD[device],
    }
    accumulated = trainable if chunks > 1 else 0  # gradients of the earlier micro-batches
    # The bypass's saved tensors for one micro-batch: the grouped token copy, [h, u], act(h), act*u, the
    # expert output (expert dtype), the gate's fp32 input.
    bypass_act = tokens * ((2 * d + 4 * f) * se + 4 * d)
    if upper == 0:
        upper_act = 0.0
    else:
        full = upper - 1  # the last block runs at the target rows (LLaMA-style, checked by the editor)
        upper_act = full * tokens * upper_block_bytes_per_token(shape, one_node, padding) \
            + tokens * last_block_bytes_per_token(shape) + rows * (2 * d + 3 * f) * s
    # Backward of an int8 linear dequantises its weight (the largest: F x D) in the hidden dtype.
    dequant = f * d * s if shape.int8 and upper > 0 else 0
    head = rows * v * (3 * 4 + (0 if s == 4 else s)) + rows * d * 4
    head_bwd = {
        "gradients": accumulated,
        "bypass_activations": int(bypass_act),
        "upper_block_activations": int(upper_act),
        "int8_dequantised_weight": dequant,
        "lm_head_at_targets": int(head),
    }
    # New gradient buffers, one per trainable tensor (accumulated into the earlier micro-batches' ones).
    new_grads = trainable
    bypass_bwd = {
        "gradients": accumulated + new_grads,
        "bypass_activations": int(bypass_act),
        "upper_block_activations": 0,
        "int8_dequantised_weight": 0,
        "lm_head_at_targets": 0,
    }
    a, b = sum(head_bwd.values()), sum(bypass_bwd.values())
    phase, terms, other = ("head backward", head_bwd, b) if a >= b else ("bypass backward", bypass_bwd, a)
    details = {"device": device, "expert_dtype": expert_dtype, "one_node_blocks": one_node, "prepack": prepack,
               "upper_blocks": upper, "tokens_per_micro_batch": tokens, "layer": layer}
    phases = {"head backward": {**base, **head_bwd}, "bypass backward": {**base, **bypass_bwd}}
    return MemoryPrediction({**base, **terms}, phase, int(sum(base.values()) + other), micro, chunks, phases, details)


def pick_micro_batch(budget_bytes: int, shape: BackboneShape, n_edits: int, **kwargs) -> int:
    """The largest micro-batch (<= ``n_edits``) whose predicted peak stays under ``budget_bytes``.

    Raises ``ValueError`` when even one sequence per micro-batch does not fit (the error says by how much).
    ``kwargs`` go to :func:`predict_peak`."""
    kwargs.pop("micro_batch", None)

    def fits(m: int) -> bool:
        return predict_peak(shape, n_edits, micro_batch=m, **kwargs).total <= budget_bytes

    if not fits(1):
        need = predict_peak(shape, n_edits, micro_batch=1, **kwargs).total
        raise ValueError(f"memory budget {budget_bytes / GiB:.2f} GiB is below the predicted peak at micro-batch 1 "
                         f"({need / GiB:.2f} GiB)")
    lo, hi = 1, n_edits  # fits(lo); find the largest m in [lo, hi] that fits
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parse_size(text: str) -> int:
    """``"22GiB"``, ``"512MiB"``, ``"24GB"``, ``"1.5G"`` or a plain number of bytes -> bytes.

    Binary units: KiB, MiB, GiB, TiB and K, M, G, T; decimal: KB, MB, GB, TB."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": 2**40,
             "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    raw = str(text).strip()
    num = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = raw[len(raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")):].lower()
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 22GiB, 512MiB, 24GB)")
    return int(value * units[unit])
