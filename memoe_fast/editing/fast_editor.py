"""The fast editor: the least work the method allows.

* Frozen prefix computed once: blocks below the edited one never change, so the hidden states (and
  every other input, e.g. rotary embeddings and the attention mask) that enter the edited block are
  captured once per training batch and reused by every step; a step runs only the edited block and the
  blocks above it.
* The edited block's frozen part cached too: its attention and host MLP see only frozen states, and in
  a pre-norm block the output is ``rest + mlp(x)``; so a step adds the bypass's output to the cached
  block output and starts at the next block (checked numerically once per batch, else the whole
  block runs).
* Logits only where they are needed: the final norm and LM head run at the real target tokens only,
  for training and for the metrics, never as a (tokens x vocabulary) tensor for the whole batch. The
  last block, too, runs its queries, attention output and MLP at those rows only (LLaMA-style blocks,
  checked against the whole block once).
* No token that nothing reads: a sequence's last token (its last target token) predicts nothing that is
  scored and no earlier position sees it, so it is dropped from every forward (without a balance loss;
  with one, its routing counts).
* No work on padding: each micro-batch runs as one packed row of its real tokens, with per-sequence
  positions; the linear layers see only real tokens, and attention runs per sequence on the padded
  layout (``memoe_fast.editing.packing``), which costs ~10x fewer scores than one block-diagonal mask.
* No graph below the edited block and no weight gradients for frozen parameters; optional activation
  checkpointing of the upper blocks for long batches.
* On the CPU, the upper blocks' frozen linears and the LM head run with weights packed once for
  oneDNN (``memoe_fast.editing.prepack``; one copy, kept for the next call; :meth:`FastMEMoEEditor.release` frees it).
* Anchors and tokenisation computed once per text.

It computes the same function as :class:`~memoe_fast.editing.editor.MEMoEEditor` (tests compare the losses step
by step at the first, a middle and the last block).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from .editor import MEMoEEditor, loss_totals, row_loss
from ..integration import transformer_blocks
from ..metrics import length_batches
from .packing import (Packed, attention_configs, block_at_rows, block_at_suffix, block_keys_values,  # noqa: F401
                      pack_block_inputs, packed_attention)
from .frozen_block import FrozenBlocks, supported as frozen_block_supported
from .prepack import PrepackedLinears


log = logging.getLogger("memoe_fast")

@dataclass
class Decision:
    taken: bool
    reason: str


@dataclass
class EditPlan:
    """Which of the fast editor's shortcuts a training batch took, and why not where it did not.

    Each shortcut checks itself at run time and steps aside where it does not hold; the plan makes that
    visible: it is logged (a check that *failed* as a warning), and the CLI writes it to results.json."""

    decisions: dict[str, Decision] = field(default_factory=dict)

    def record(self, name: str, taken: bool, reason: str, failed_check: bool = False) -> None:
        old = self.decisions.get(name)
        if old is None:
            self.decisions[name] = Decision(taken, reason)
            (log.warning if failed_check else log.info)("fast editor: %s %s (%s)", name,
                                                        "taken" if taken else "skipped", reason)
        elif old.taken != taken:
            self.decisions[name] = Decision(False, f"mixed across micro-batches: {old.reason}; {reason}")

    def to_dict(self) -> dict:
        return {k: {"taken": d.taken, "reason": d.reason} for k, d in self.decisions.items()}


class _StopForward(Exception):
    pass


def final_norm(model) -> torch.nn.Module:
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        mod = getattr(base, name, None)
        if mod is not None:
            return mod
    raise TypeError(f"cannot find the final norm of {type(model).__name__}")


def head_logits(model, hidden: torch.Tensor, pred_pos: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """LM head at ``pred_pos`` only: ``(B, L, D)`` states -> ``(B, Tt, V)`` logits.

    ``hidden`` is the last block's output, or with ``normed`` the decoder's output (final norm applied).
    """
    picked = hidden.gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return lm_head(model, picked, normed)


def lm_head(model, picked: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """Final norm (unless ``normed``) and LM head on states already picked at the target positions."""
    head = model.get_output_embeddings()
    x = picked if normed else final_norm(model)(picked)
    w = getattr(head, "weight", None)
    if (type(head) is torch.nn.Linear and "forward" not in head.__dict__  # (not while prepacked)
            and head.bias is None and not w.requires_grad and x.device.type == "cpu"
            and w.dtype == x.dtype and x.dim() == 2 and x.shape[0] < 256):
        return _TallHead.apply(x, w)
    return head(x)


class _TallHead(torch.autograd.Function):
    """``x @ W.T`` for a few rows ``x`` and a frozen vocabulary-sized ``W``. On the CPU, MKL runs this
    product ~1.4x faster as ``(W @ x.T).T`` (the tall operand first); the backward ``g @ W`` is already
    the fast layout. Only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return (w @ x.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w, None


class FastMEMoEEditor(MEMoEEditor):
    """:class:`MEMoEEditor` with a cached frozen prefix and target-only logits.

    Extra args:
        checkpoint: recompute the upper blocks' activations in backward (less memory, ~30% more time).
        micro_batch: sequences per forward inside one training step (gradients are accumulated).
        pack: run each micro-batch as one packed row of its real tokens (no padding), with a
            block-diagonal causal mask, instead of a padded ``(B, L)`` batch.
        prepack: on the CPU, run the upper blocks' frozen fp32 linears and the LM head with weights packed
            once for oneDNN (see :mod:`memoe_fast.editing.prepack`; one packed copy of those weights:
            ~310 MiB for SmolLM2-135M, ~1 s to make). The copy is kept for the editor's next call (one
            edit at a time would otherwise pay for it every call), remade if a weight changed, and freed
            by :meth:`release`.
    """

    def __init__(self, *args, checkpoint: bool = False, micro_batch: int = 64, pack: bool = True,
                 prepack: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.pack = pack
        self.prepack = prepack
        self._prepacked: PrepackedLinears | None = None
        self.prepacked_last = False  # whether the last training batch ran with packed weights
        self.checkpoint = checkpoint
        self.micro_batch = micro_batch
        self.blocks = transformer_blocks(self.model)
        self._anchor_cache: dict = {}
        self._prefix: dict = {}  # id(batch) -> (batch, [(Prefix, prompts, subjects)]) while training
        self.plan = EditPlan()  # the shortcuts the last training batch took (see EditPlan)
        self._attn_configs = None

    def _capture(self, batch, block: int) -> tuple[tuple, dict]:
        """Inputs of ``blocks[block]`` for ``batch``, computed with no graph (the forward stops there)."""
        store: dict = {}

        def hook(_mod, args, kwargs):
            store["args"], store["kwargs"] = args, kwargs
            raise _StopForward

        h = self.blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad(), self.handle.disabled():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
        if "args" not in store:
            raise RuntimeError(f"block {block} was never reached while capturing the frozen prefix")
        return store["args"], store["kwargs"]

    def _frozen_prefix(self, sub) -> "Prefix":
        """Everything a step needs that does not depend on the bypass, for the micro-batch ``sub``.

        Packed: block 0's inputs are captured (embeddings, mask, rotary tables) and packed, then the
        blocks below the edited one run on the packed row, so padding is never computed, not even once.
        """
        layer = self.handle.layer
        packed = None
        plan = self.plan
        if self.pack:
            args, kwargs, packed = pack_block_inputs(*self._capture(sub, 0), sub)
            plan.record("packed_rows", packed is not None,
                        "one row of real tokens" if packed is not None else "no attention mask to rebuild")
        else:
            plan.record("packed_rows", False, "pack=False")
        if packed is None:
            plan.record("packed_attention", False, "no packed rows")
            args, kwargs = self._capture(sub, layer)
        else:
            agrees, first = self._packed_attention_agrees(args, kwargs, packed)
            if agrees:
                kwargs = {**kwargs, "memoe_packed": packed}
            if layer > 0:  # the check ran block 0 already: carry on from block 1
                with torch.no_grad(), self.handle.disabled(), self._attention(kwargs):
                    hidden = _run_blocks(self.blocks[1:layer], (first, *args[1:]), kwargs)
                args = (hidden, *args[1:])
        with self._attention(kwargs):
            mlp_in, base_out = self._split_edited_block(args, kwargs)
        plan.record("cached_edited_block", base_out is not None, self._split_reason, self._split_reason.startswith("check failed"))
        if packed is not None:
            rows = packed.pred_abs[sub.target_mask]
        else:
            b, t = sub.target_mask.nonzero(as_tuple=True)
            rows = b * args[0].shape[1] + sub.pred_pos[b, t]  # into the flattened (B*L) states
        prefix = Prefix(sub, args, kwargs, packed, mlp_in, base_out, rows, sub.target_ids[sub.target_mask])
        if sub.negative is not None:
            tm = sub.target_mask
            prefix.negatives = (sub.negative.unsqueeze(1).expand_as(tm)[tm], sub.ref_ids[tm], sub.ref_logp[tm])
        if packed is None:
            prefix.last_at_rows = False
            plan.record("last_block_at_rows", False, "no packed rows")
        else:
            prefix.last_at_rows = self._last_block_at_rows_agrees(prefix)
        prefix.fused = self._frozen_blocks(prefix)
        return prefix

    def _frozen_blocks(self, prefix: "Prefix") -> FrozenBlocks | None:
        """The one-node runner of the upper blocks (:mod:`memoe_fast.editing.frozen_block`) where it applies: CPU,
        fp32, packed rows with the packed attention, no checkpointing, LLaMA-style blocks. Checked on the
        first upper block, output and input gradient against the block's own, before it is used."""
        upper = self.blocks[self.handle.layer + 1:]
        hidden = prefix.base_out if prefix.base_out is not None else prefix.args[0]
        why = ("checkpointing is on" if self.checkpoint else
               "no packed attention" if "memoe_packed" not in prefix.kwargs else
               "fewer than two upper blocks" if len(upper) < 2 else
               f"{hidden.device.type} states (CPU only)" if hidden.device.type != "cpu" else
               f"{hidden.dtype} states (float32 only)" if hidden.dtype != torch.float32 else
               "an upper block is not LLaMA-style" if not all(frozen_block_supported(b) for b in upper) else
               "upper blocks differ in layout" if any(_layout(b) != _layout(upper[0]) for b in upper) else None)
        if why is not None:
            self.plan.record("one_node_blocks", False, why)
            return None
        fused = FrozenBlocks(prefix.kwargs, lambda: self._prepacked.packed if self._prepacked is not None else {})
        block = upper[0]
        gen = torch.Generator().manual_seed(0)
        cot = torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype)
        outs, grads = [], []
        with self._attention(prefix.kwargs), self._linears():
            for run in (lambda h: _hidden(block(h, *prefix.args[1:], **prefix.kwargs)), lambda h: fused(block, h)):
                h = hidden.detach().requires_grad_()
                y = run(h)
                y.backward(cot)
                outs.append(y.detach())
                grads.append(h.grad)
        if _agree(outs[1], outs[0], rtol=1e-4) and _agree(grads[1], grads[0], rtol=1e-3, ulps=64):
            self.plan.record("one_node_blocks", True, "output and input gradient match the block's own")
            return fused
        self.plan.record("one_node_blocks", False, "check failed: output or input gradient differs from the block's own",
                         failed_check=True)
        return None

    def _last_block_at_rows_agrees(self, prefix: "Prefix") -> bool:
        """Whether :func:`block_at_rows` reproduces the last block at the target rows. Checked once, on
        the edited block's input: any states will do, the question is whether the two compute the same
        function of them."""
        if len(self.blocks) - 1 <= self.handle.layer:
            self.plan.record("last_block_at_rows", False, "the edited block is the last block")
            return False
        hidden = prefix.args[0]
        with torch.no_grad():
            try:
                part = block_at_rows(self.blocks[-1], hidden, prefix.rows, prefix.kwargs)
            except NotImplementedError as exc:
                self.plan.record("last_block_at_rows", False, f"not a LLaMA-style block ({exc})")
                return False
            whole = _hidden(self.blocks[-1](hidden, *prefix.args[1:], **prefix.kwargs))[0, prefix.rows]
        ok = _agree(part, whole, rtol=1e-4)
        self.plan.record("last_block_at_rows", ok, "matches the whole block" if ok else
                         "check failed: differs from the whole block", failed_check=not ok)
        return ok

    def _attention(self, kwargs: dict):
        """The packed attention, for inputs that carry their packing (see :func:`packed_sdpa`)."""
        if "memoe_packed" not in kwargs or self._attn_configs is None:
            return contextlib.nullcontext()
        return packed_attention(self._attn_configs)

    def _packed_attention_agrees(self, args: tuple, kwargs: dict, packed: Packed) -> tuple[bool, torch.Tensor]:
        """Whether the blocks take the packed attention (their attention is ``sdpa`` and passes the block's
        extra arguments on to it), checked on block 0: its output must be the one with ``sdpa``.
        Also returns block 0's output (no bypass), computed on the way."""
        block = self.blocks[0]
        self._attn_configs = attention_configs(self.blocks)
        with torch.no_grad(), self.handle.disabled():
            plain = _hidden(block(*args, **kwargs))
            if self._attn_configs is None:
                self.plan.record("packed_attention", False, "the blocks' attention is not sdpa-compatible")
                return False, plain
            with packed_attention(self._attn_configs):
                fast = _hidden(block(*args, **{**kwargs, "memoe_packed": packed}))
        if not _agree(fast, plain, rtol=1e-4):
            self._attn_configs = None
            self.plan.record("packed_attention", False, "check failed: block 0 differs from sdpa", failed_check=True)
            return False, plain
        self.plan.record("packed_attention", True, "block 0 matches sdpa")
        return True, fast

    def _split_edited_block(self, args: tuple, kwargs: dict):
        """The edited block's host-MLP input and its output without the bypass, when the block's output is
        that output plus the MLP's (pre-norm blocks: LLaMA, GPT-2, ...). A step then computes only
        ``base_out + bypass(mlp_in)`` there: the block's attention and host MLP never change.

        Checked, not assumed: the block runs once more with a random term added to the MLP's output,
        which must come out unchanged. Returns ``(None, None)`` otherwise (dropout in train mode, a norm
        after the MLP, ...): then every step runs the whole block."""
        block, bypass = self.blocks[self.handle.layer], self.handle.bypass
        store: dict = {}

        def grab(_mod, inputs, _out):
            store["x"] = inputs[0]

        with torch.no_grad(), self.handle.disabled():
            h = bypass.register_forward_hook(grab)
            try:
                base_out = _hidden(block(*args, **kwargs))
            finally:
                h.remove()
            if "x" not in store or not base_out.dtype.is_floating_point:
                self._split_reason = "the bypass was not reached or the block output is not float"
                return None, None
            gen = torch.Generator(device=base_out.device).manual_seed(0)
            delta = torch.randn(store["x"].shape[:-1] + base_out.shape[-1:], generator=gen, device=base_out.device,
                                dtype=torch.float32).mul_(base_out.float().std()).to(base_out.dtype)
            if delta.shape != base_out.shape:
                self._split_reason = "the MLP output and the block output differ in shape"
                return None, None
            h = bypass.register_forward_hook(lambda _m, _i, out: out + delta)
            try:
                moved = _hidden(block(*args, **kwargs))
            finally:
                h.remove()
        scale = float(base_out.abs().max()) + float(delta.abs().max())
        if not _agree(moved.float() - base_out.float(), delta.float(), rtol=0, scale=scale):
            self._split_reason = "check failed: the block output is not additive in the MLP output (e.g. post-norm)"
            return None, None
        self._split_reason = "the block output is additive in the MLP output"
        return store["x"], base_out

    def _suffix_plan(self, prefix: "Prefix", anchors) -> "Suffix | None":
        """Where only each sequence's suffix needs computing. The bypass acts on a token as a function of
        the edited block's host-MLP input (frozen) and the anchors: from the first token it acts on, a
        sequence's states change in every block above; before it they stay the unedited ones. So the
        upper blocks run on the suffix rows only (from the first active token, or the first target
        position if earlier), with the other rows' keys and values cached once. Checked against the
        whole computation before it is used."""
        plan = self.plan
        pk = prefix.packed
        why = ("no packed rows" if pk is None else "the edited block runs whole" if prefix.base_out is None else
               "checkpointing is on" if self.checkpoint else
               "the edited block is the last block" if len(self.blocks) - 1 <= self.handle.layer else None)
        if why is not None:
            plan.record("suffix_only", False, why)
            return None
        bypass = self.handle.bypass
        with self.handle.anchored(anchors=anchors, token_seq=pk.token_seq, token_mask=prefix.token_mask):
            active = bypass.active_tokens(prefix.mlp_in).cpu()
        seq = pk.token_seq.cpu()
        n, n_seq = seq.numel(), int(seq.max()) + 1
        index = torch.arange(n)
        start = torch.full((n_seq,), n, dtype=torch.long)
        start.scatter_reduce_(0, seq[active], index[active], reduce="amin")
        first_pred = pk.pred_abs[:, 0].cpu()
        start = torch.minimum(start, first_pred)
        in_suffix = index >= start[seq]
        rows = in_suffix.nonzero().squeeze(1)
        if rows.numel() > 0.8 * n:
            plan.record("suffix_only", False, "the bypass acts on most tokens")
            return None
        upper = self.blocks[self.handle.layer + 1:]
        kwargs = prefix.kwargs
        try:
            with torch.no_grad(), self.handle.disabled(), self._attention(kwargs):
                cached, hidden = [], prefix.base_out
                for block in upper:
                    cached.append(block_keys_values(block, hidden, kwargs))
                    hidden = _hidden(block(hidden, *prefix.args[1:], **kwargs))
        except NotImplementedError as exc:
            plan.record("suffix_only", False, f"an upper block is not LLaMA-style ({exc})")
            return None
        inverse = torch.full((n,), -1, dtype=torch.long)
        inverse[rows] = torch.arange(rows.numel())
        targets = inverse[prefix.rows.cpu()]
        suffix = Suffix(rows.to(prefix.mlp_in.device), cached, targets.to(prefix.mlp_in.device))
        # The check: the suffix path equals the whole computation, with the bypass as it is now.
        with torch.no_grad(), self._attention(kwargs), self._linears():
            with self.handle.anchored(anchors=anchors, token_seq=pk.token_seq, token_mask=prefix.token_mask):
                whole = self._upper(prefix, use_suffix=False)
            with self.handle.anchored(anchors=anchors, token_seq=pk.token_seq[rows], token_mask=None if
                                      prefix.token_mask is None else prefix.token_mask[rows]):
                part = self._upper_suffix(prefix, suffix)
        if not _agree(part, whole, rtol=1e-4):
            plan.record("suffix_only", False, "check failed: differs from the whole computation", failed_check=True)
            return None
        plan.record("suffix_only", True, f"{rows.numel()} of {n} rows run above the edited block")
        return suffix

    def _upper_suffix(self, prefix: "Prefix", suffix: "Suffix") -> torch.Tensor:
        rows = suffix.rows
        hidden = self.handle.bypass.add_to(prefix.mlp_in[0, rows], prefix.base_out[0, rows])
        for block, cached in zip(self.blocks[self.handle.layer + 1:], suffix.cached):
            hidden = block_at_suffix(block, hidden, rows, cached, prefix.kwargs)
        return hidden.index_select(0, suffix.targets)

    def _upper(self, prefix: "Prefix", use_suffix: bool = True) -> torch.Tensor:
        """The last block's output at the target rows ``(Nt, D)`` for one micro-batch, with the bypass
        (anchors must be set: for the suffix rows when the micro-batch runs its suffix only)."""
        if use_suffix and prefix.suffix is not None:
            return self._upper_suffix(prefix, prefix.suffix)
        layer = self.handle.layer
        args, kwargs = prefix.args, prefix.kwargs
        if prefix.base_out is not None:
            hidden = self.handle.bypass.add_to(prefix.mlp_in, prefix.base_out)
            blocks = self.blocks[layer + 1:]
        else:
            hidden = args[0]
            blocks = self.blocks[layer:]
        ckpt = self.checkpoint and torch.is_grad_enabled()
        if prefix.last_at_rows and len(blocks) > 0:
            # The last block's queries, output projection and MLP only at the rows the loss reads.
            hidden = _run_blocks(blocks[:-1], (hidden, *args[1:]), kwargs, checkpoint=ckpt, fused=prefix.fused)
            return block_at_rows(blocks[-1], hidden, prefix.rows, kwargs)
        hidden = _run_blocks(blocks, (hidden, *args[1:]), kwargs, checkpoint=ckpt, fused=prefix.fused)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, prefix.rows)

    def _anchors(self, prompts, subjects):
        key = (tuple(prompts), tuple(subjects), len(self.handle.bank.subjects) if self.handle.bank else 0)
        hit = self._anchor_cache.get(key)
        if hit is None:
            hit = self._anchor_cache[key] = self.handle.compute_anchors(list(prompts), list(subjects))
        return hit

    def prepare(self, requests) -> None:
        self._prefix = {}
        self.plan = EditPlan()
        if self.allocator is not None:
            self.plan.record("cpu_allocator_keeps_freed", *self.allocator)
        if self._prepacked is not None and not self._prepacked.current():
            self._prepacked = None  # a packed weight changed since the last call: pack again
        if self.prepack and self._prepacked is None:
            self._prepacked = PrepackedLinears([*self.blocks[self.handle.layer + 1:], self.model.get_output_embeddings()])

    def finish(self) -> None:
        # The cached states are freed after training; the packed weights are kept for the next call.
        self.prepacked_last = self._prepacked is not None and self._prepacked.active
        self.plan.record("prepacked_weights", self.prepacked_last,
                         "oneDNN packed copies of the upper blocks' linears" if self.prepacked_last else
                         "prepack=False" if not self.prepack else "not applicable (not CPU fp32, no oneDNN ops, or over the memory cap)")
        self._prefix = {}

    def release(self) -> None:
        """Free the packed weight copies kept between calls (the next call packs again)."""
        self._prepacked = None

    def _linears(self):
        return self._prepacked() if self._prepacked is not None else contextlib.nullcontext()

    def _chunks(self, batch, prompts, subjects) -> list:
        """The micro-batches of ``batch`` with their frozen prefixes, computed on its first step."""
        hit = self._prefix.get(id(batch))
        if hit is not None and hit[0] is batch:
            return hit[1]
        # Micro-batches of similar length, each trimmed to its own longest sequence: no step
        # spends work on padding.
        lengths = batch.attention_mask.sum(1)
        if self.config.aux_loss_weight == 0:
            # A sequence's last token (its last target token) predicts nothing that is scored, and in
            # a causal model no other position sees it: it is dropped from every forward. (With a
            # balance loss, its routing counts, so it stays.)
            lengths = lengths - 1
        lengths = lengths.tolist()
        chunks = []
        for idx in length_batches(lengths, self.micro_batch):
            sub = _select(batch, idx, [lengths[i] for i in idx])
            ps, ss = [prompts[i] for i in idx], [subjects[i] for i in idx]
            prefix = self._frozen_prefix(sub)
            anchors = self._anchors(ps, ss)
            prefix.token_mask = self._token_mask(prefix, anchors)
            prefix.suffix = self._suffix_plan(prefix, anchors)
            chunks.append((prefix, ps, ss))
        self._prefix[id(batch)] = (batch, chunks)
        return chunks

    def _token_mask(self, prefix: "Prefix", anchors):
        """The tokens of a micro-batch the bypass acts on (``bypass_positions``), in its layout."""
        if self.config.bypass_positions == "all":
            return None
        sub = prefix.sub
        if prefix.packed is None:
            return self.handle.token_mask(anchors, sub.input_ids, sub.attention_mask)
        real = sub.attention_mask.bool().cpu()
        ids = sub.input_ids.cpu()
        starts = torch.tensor(self.handle.active_starts(anchors, [ids[i][real[i]].tolist() for i in range(ids.shape[0])]))
        pos = prefix.packed.slots.cpu() % prefix.packed.length
        return pos >= starts[prefix.packed.token_seq]

    def backward_step(self, batch, prompts, subjects) -> float:
        chunks = self._chunks(batch, prompts, subjects)
        n_edit, n_neg = loss_totals(batch)
        n_seq = batch.input_ids.shape[0]
        loss_sum = 0.0
        for prefix, ps, ss in chunks:
            token_seq = None if prefix.packed is None else prefix.packed.token_seq
            token_mask = prefix.token_mask
            if prefix.suffix is not None:  # the bypass and the upper blocks run on the suffix rows only
                token_seq = token_seq[prefix.suffix.rows]
                token_mask = None if token_mask is None else token_mask[prefix.suffix.rows]
            # Both contexts span the backward too: checkpointing recomputes the forward there.
            with self._attention(prefix.kwargs), self._linears(), \
                    self.handle.anchored(anchors=self._anchors(ps, ss), token_seq=token_seq, token_mask=token_mask):
                hidden = self._upper(prefix)
                aux = self.handle.bypass.last_aux_loss
                # Final norm and LM head at the real target tokens only (no padded target slots).
                logp = torch.log_softmax(lm_head(self.model, hidden).float(), dim=-1)
                # This chunk's token losses normalised by the whole batch's token counts: the accumulated
                # gradient equals the one of a single pass over the batch.
                loss = row_loss(logp, prefix.targets, n_edit, n_neg, *prefix.negatives, self.config.negative_weight)
                if aux is not None and self.config.aux_loss_weight > 0:
                    loss = loss + self.config.aux_loss_weight * aux * prefix.sub.input_ids.shape[0] / n_seq
                loss.backward()  # one chunk's graph alive at a time
            loss_sum += loss.item()
        return loss_sum

    def eval_logits_fn(self):
        model = self.model

        def fn(batch):
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      use_cache=False).last_hidden_state
            return head_logits(model, hidden, batch.pred_pos, normed=True)

        return fn


class Prefix:
    """One micro-batch's frozen part: the inputs above the edited block's bypass, computed once."""

    def __init__(self, sub, args, kwargs, packed, mlp_in, base_out, rows, targets):
        self.sub = sub  # the micro-batch (right-padded, trimmed)
        self.args, self.kwargs = args, kwargs  # the edited block's inputs (packed when ``packed``)
        self.packed = packed  # Packed or None
        self.mlp_in = mlp_in  # the host MLP's input in the edited block (None: run the whole block)
        self.base_out = base_out  # the edited block's output without the bypass
        self.rows = rows  # (Nt,) rows of the flattened last-block states that predict target tokens
        self.targets = targets  # (Nt,) the target token at each of those rows
        self.last_at_rows = False  # the last block runs at ``rows`` only (checked by the editor)
        self.fused = None  # FrozenBlocks: the upper blocks as one autograd node each (checked by the editor)
        self.token_mask = None  # (N,) bool: the tokens the bypass acts on (None: all)
        self.suffix = None  # Suffix: run only each sequence's suffix above the edited block (checked)
        self.negatives = (None, None, None)  # per target row: negative?, unedited top ids, their log-probs


class Suffix:
    """The rows a micro-batch recomputes above the edited block, and what the others keep."""

    def __init__(self, rows: torch.Tensor, cached: list, targets: torch.Tensor):
        self.rows = rows  # (Ns,) packed rows from each sequence's first active (or first target) token on
        self.cached = cached  # per upper block: rotated keys and values (1, Hkv, N, d) of the unedited states
        self.targets = targets  # (Nt,) positions of the target rows within ``rows``


def _agree(got: torch.Tensor, want: torch.Tensor, rtol: float, ulps: int = 16, scale: float | None = None) -> bool:
    """``got`` equals ``want`` up to rounding: ``rtol``, plus ``ulps`` units of ``want``'s precision at
    ``scale`` (default: the largest magnitude in ``want``)."""
    scale = float(want.abs().max()) if scale is None else scale
    atol = ulps * torch.finfo(want.dtype).eps * scale
    return got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol)


def _layout(module) -> list:
    """The classes of a module and its submodules, in order: blocks with equal layouts compute alike."""
    return [type(m) for m in module.modules()]


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _run_blocks(blocks, args: tuple, kwargs: dict, checkpoint: bool = False, fused=None) -> torch.Tensor:
    hidden, rest = args[0], args[1:]
    for block in blocks:
        if fused is not None:
            out = fused(block, hidden)
        elif checkpoint:
            out = torch.utils.checkpoint.checkpoint(block, hidden, *rest, use_reentrant=False, **kwargs)
        else:
            out = block(hidden, *rest, **kwargs)
        hidden = _hidden(out)
    return hidden


def _select(batch, idx: list[int], lengths: list[int]):
    """Rows ``idx`` of a right-padded batch, each keeping its first ``lengths[i]`` tokens (the rest
    become padding), cut to the longest of them."""
    from ..metrics import Batch

    device = batch.input_ids.device
    rows = torch.tensor(idx, device=device)
    length = max(lengths)
    keep = (torch.arange(length, device=device) < torch.tensor(lengths, device=device).unsqueeze(1))
    sub = batch.rows(rows)
    mask = sub.attention_mask[:, :length] * keep.to(batch.attention_mask.dtype)
    return Batch(sub.input_ids[:, :length], mask, sub.pred_pos, sub.target_ids, sub.target_mask,
                 sub.negative, sub.ref_ids, sub.ref_logp)
