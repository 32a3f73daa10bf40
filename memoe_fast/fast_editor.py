"""The fast editor: the least work the method allows.

* Frozen prefix computed once: blocks below the edited one never change, so the hidden states (and
  every other input, e.g. rotary embeddings and the attention mask) that enter the edited block are
  captured once per training batch and reused by every step; a step runs only the edited block and the
  blocks above it.
* Logits only where they are needed: the final norm and LM head run at the target positions only,
  for training and for the metrics, never as a (tokens x vocabulary) tensor for the whole batch.
* No graph below the edited block and no weight gradients for frozen parameters; optional activation
  checkpointing of the upper blocks for long batches.
* Anchors and tokenisation computed once per text.
* No work on padding: each micro-batch runs as one packed row of its real tokens, with a
  block-diagonal causal mask and per-sequence positions (sequences of a ZsRE batch differ in length by
  up to 2x, so a padded batch computes up to half its tokens for nothing).

It computes the same function as :class:`~memoe_fast.editor.MEMoEEditor` (tests compare the losses).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from .editor import MEMoEEditor, nll_loss
from .integration import transformer_blocks


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
    return model.get_output_embeddings()(picked if normed else final_norm(model)(picked))


class FastMEMoEEditor(MEMoEEditor):
    """:class:`MEMoEEditor` with a cached frozen prefix and target-only logits.

    Extra args:
        checkpoint: recompute the upper blocks' activations in backward (less memory, ~30% more time).
        micro_batch: sequences per forward inside one training step (gradients are accumulated).
        pack: run each micro-batch as one packed row of its real tokens (no padding), with a
            block-diagonal causal mask, instead of a padded ``(B, L)`` batch.
    """

    def __init__(self, *args, checkpoint: bool = False, micro_batch: int = 64, pack: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.pack = pack
        self.checkpoint = checkpoint
        self.micro_batch = micro_batch
        self.blocks = transformer_blocks(self.model)
        self._anchor_cache: dict = {}

    def _capture(self, batch) -> tuple[tuple, dict]:
        """Inputs of the edited block for ``batch``, computed once with no graph."""
        store: dict = {}

        def hook(_mod, args, kwargs):
            store["args"], store["kwargs"] = args, kwargs
            raise _StopForward

        h = self.blocks[self.handle.layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad(), self.handle.disabled():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
        if "args" not in store:
            raise RuntimeError("the edited block was never reached while capturing the frozen prefix")
        return store["args"], store["kwargs"]

    def _upper(self, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, rest = args[0], args[1:]
        for block in self.blocks[self.handle.layer:]:
            if self.checkpoint and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(block, hidden, *rest, use_reentrant=False, **kwargs)
            else:
                out = block(hidden, *rest, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _anchors(self, prompts, subjects):
        key = (tuple(prompts), tuple(subjects), len(self.handle.bank.subjects) if self.handle.bank else 0)
        hit = self._anchor_cache.get(key)
        if hit is None:
            hit = self._anchor_cache[key] = self.handle.compute_anchors(list(prompts), list(subjects))
        return hit

    def prepare(self, requests) -> None:
        self._prefix = None

    def backward_step(self, batch, prompts, subjects) -> float:
        if self._prefix is None or self._prefix[0] is not batch:
            # Micro-batches of similar length, each trimmed to its own longest sequence: no step
            # spends work on padding.
            lengths = batch.attention_mask.sum(1).tolist()
            order = sorted(range(len(lengths)), key=lambda i: lengths[i])
            chunks = []
            for s in range(0, len(order), self.micro_batch):
                idx = order[s:s + self.micro_batch]
                sub = _select(batch, idx, max(lengths[i] for i in idx))
                args, kwargs = self._capture(sub)
                if self.pack:
                    args, kwargs, packed = pack_block_inputs(args, kwargs, sub)
                else:
                    packed = None
                chunks.append((sub, (args, kwargs, packed), [prompts[i] for i in idx], [subjects[i] for i in idx]))
            self._prefix = (batch, chunks)
        total_tokens = batch.target_mask.sum().clamp_min(1)
        n_seq = batch.input_ids.shape[0]
        loss_sum = 0.0
        for sub, (args, kwargs, packed), ps, ss in self._prefix[1]:
            token_seq = None if packed is None else packed.token_seq
            with self.handle.anchored(anchors=self._anchors(ps, ss), token_seq=token_seq):
                hidden = self._upper(args, kwargs)
                aux = self.handle.bypass.last_aux_loss
            if packed is None:
                logits = head_logits(self.model, hidden, sub.pred_pos)
            else:
                logits = lm_head(self.model, hidden[0][packed.pred_abs])
            # This chunk's token NLLs normalised by the whole batch's token count: the accumulated
            # gradient equals the one of a single pass over the batch.
            loss = nll_loss(logits, sub) * sub.target_mask.sum() / total_tokens
            if aux is not None and self.config.aux_loss_weight > 0:
                loss = loss + self.config.aux_loss_weight * aux * sub.input_ids.shape[0] / n_seq
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


def _select(batch, idx: list[int], length: int):
    """Rows ``idx`` of a right-padded batch, cut to ``length`` positions."""
    from .metrics import Batch

    rows = torch.tensor(idx, device=batch.input_ids.device)
    return Batch(batch.input_ids[rows, :length], batch.attention_mask[rows, :length], batch.pred_pos[rows],
                 batch.target_ids[rows], batch.target_mask[rows])


class Packed:
    """Where the tokens of a packed micro-batch came from."""

    def __init__(self, token_seq: torch.Tensor, pred_abs: torch.Tensor):
        self.token_seq = token_seq  # (N,) CPU: the sequence of every packed token
        self.pred_abs = pred_abs  # (B, Tt): packed positions that predict the target tokens


def pack_block_inputs(args: tuple, kwargs: dict, batch):
    """Turn the captured inputs of a block for a right-padded ``(B, L)`` batch into one packed row.

    Tensors laid out ``(B, L, ...)`` keep their real tokens (``(1, N, ...)``); position tensors laid out
    ``(1, L, ...)`` (rotary tables, position ids) are gathered at each token's own position; the 4-D
    attention mask becomes block-diagonal causal. Returns the inputs unchanged (and ``None``) when the
    batch has no padding or no attention mask to rebuild: then packing saves nothing.
    """
    mask = batch.attention_mask.bool()
    n_seq, length = mask.shape
    lengths = mask.sum(1)
    if bool((lengths == length).all()):
        return args, kwargs, None
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
        return args, kwargs, None
    starts = torch.cumsum(lengths, 0) - lengths
    pred_abs = (starts.unsqueeze(1) + batch.pred_pos).clamp(max=n - 1)
    return new_args, new_kwargs, Packed(rows.cpu(), pred_abs.to(device))
