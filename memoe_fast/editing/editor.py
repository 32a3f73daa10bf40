"""The MEMoE editor: train the bypass on edit requests, in one batch or in sequential batches.

This is the reference editor: every training step runs the whole model on ``prompt + target`` with a
full-vocabulary head. It is kept as the yardstick for the fast editor.
"""
from __future__ import annotations

import math
import os
import time
import warnings

import torch

from ..config import MEMoEConfig
from ..integration import MEMoEHandle, apply_memoe
from ..ops.cpu_allocator import keep_freed_cpu_memory
from ..metrics import (Batch, attach_expected_argmax, collate, encode_pair, evaluate, evaluate_user,
                       greedy_continuations, length_batches, locality_tokens, routing_analysis,
                       same_subject_cases, target_logits)

REF_TOPK = 32  # unedited tokens per negative position that the KL keeps


class _Captured(Exception):
    """Raised by a forward hook once it holds what it needs: the rest of the forward is skipped."""

MODES = ("batch", "sequential")


def user_sample(requests, limit: int) -> list:
    """At most ``limit`` requests, evenly spaced (all of them when there are fewer): the metrics as users
    meet the model generate text, which at thousands of edits would cost more than the editing."""
    n = len(requests)
    if limit <= 0 or n <= limit:
        return list(requests)
    return [requests[(i * n) // limit] for i in range(limit)]


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def nll_loss(logits: torch.Tensor, batch, negative_weight: float = 1.0) -> torch.Tensor:
    """The training loss of a padded batch from its target-slot logits ``(B, Tt, V)`` (see :func:`row_loss`)."""
    rows = batch.target_mask
    neg = None if batch.negative is None else batch.negative.unsqueeze(1).expand_as(rows)[rows]
    return row_loss(torch.log_softmax(logits[rows].float(), dim=-1), batch.target_ids[rows], *loss_totals(batch),
                    neg, None if batch.ref_ids is None else batch.ref_ids[rows],
                    None if batch.ref_logp is None else batch.ref_logp[rows], negative_weight)


def loss_totals(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit target tokens, negative target tokens) of a whole batch: the loss's normalisers."""
    mask = batch.target_mask
    if batch.negative is None:
        return mask.sum().clamp_min(1), mask.new_zeros(()).sum()
    neg = mask & batch.negative.unsqueeze(1)
    return (mask & ~neg).sum().clamp_min(1), neg.sum().clamp_min(1)


def row_loss(logp: torch.Tensor, targets: torch.Tensor, n_edit, n_neg, negative=None, ref_ids=None,
             ref_logp=None, negative_weight: float = 1.0) -> torch.Tensor:
    """Loss over target rows ``logp`` ``(N, V)`` (fp32 log-probabilities): the mean NLL of the edit
    targets over the batch's ``n_edit`` edit tokens, plus ``negative_weight`` times the mean KL, over
    its ``n_neg`` negative tokens, from the unedited model's top tokens (``ref_ids``/``ref_logp``,
    ``(N, K)``) to the edited model's distribution. Sums over a chunk's rows divided by the whole batch's
    counts, so that chunks accumulate to the batch's loss."""
    if negative is None or not bool(negative.any()):
        return -logp.gather(-1, targets.unsqueeze(-1)).sum() / n_edit
    edit = ~negative
    loss = -logp[edit].gather(-1, targets[edit].unsqueeze(-1)).sum() / n_edit
    ref = ref_logp[negative]
    q = logp[negative].gather(-1, ref_ids[negative])
    return loss + negative_weight * (ref.exp() * (ref - q)).sum() / n_neg


def chat_pair(tokenizer, config, r) -> tuple[str, str, tuple[list[int], list[int]]] | None:
    """``(text, subject, (prompt ids, target ids))`` of a question-shaped edit ``r`` asked as a user turn in
    the tokenizer's chat template, the reply being the target; None without ``config.chat_augment``, a
    chat template, or a question."""
    if not config.chat_augment or not getattr(tokenizer, "chat_template", None) or not r.prompt.rstrip().endswith("?"):
        return None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    # The anchors' text is what the model's own hook sees: the ids decoded without special tokens
    # (character offsets of the subject must refer to that text).
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, r.subject, (ids, tokenizer(r.target, add_special_tokens=False)["input_ids"])


# Openings of the context texts (ROME's context templates): the unedited model continues each. (A
# single word is too little for a small chat model: from "The" SmolLM2 writes "-the-world-is-a-world".)
CONTEXT_SEEDS = ("The weather", "My friend told me that", "According to the report,", "Yesterday I",
                 "Scientists have found that", "The city council", "In 1990,", "Many people believe that",
                 "The history of", "When I was young,")


def write_context_texts(model, tokenizer, tokens: int, batch_size: int = 32) -> list[str]:
    """The context texts: ``model``'s greedy continuation of each of :data:`CONTEXT_SEEDS` (``tokens``
    tokens), on one line, ending in a full stop. Call it on the unedited model."""
    conts = greedy_continuations(model, tokenizer, list(CONTEXT_SEEDS), tokens, batch_size)
    texts = []
    for seed, c in zip(CONTEXT_SEEDS, conts):
        t = " ".join((seed + tokenizer.decode(c, skip_special_tokens=True)).split())
        texts.append(t.rstrip(" .,;:") + ".")
    return texts


def context_pairs(tokenizer, requests, contexts: list[str], k: int) -> list[tuple[str, str, tuple[list[int], list[int]]]]:
    """``(text, subject, (prompt ids, target ids))`` of each edit with a subject asked after ``k`` of
    ``contexts``, rotating through them (edit ``i`` takes texts ``i*k .. i*k+k-1``, modulo their number),
    so that a batch sees every context text whatever ``k`` is."""
    out = []
    for i, r in enumerate(requests):
        if not r.subject:
            continue
        for j in range(min(k, len(contexts))):
            text = f"{contexts[(i * k + j) % len(contexts)]} {r.prompt}"
            out.append((text, r.subject, encode_pair(tokenizer, text, r.target)))
    return out


def augmented_pairs(tokenizer, config, requests, contexts: list[str]) -> list[tuple[str, str, tuple[list[int], list[int]]]]:
    """Every extra form the edits ``requests`` train in, each with its own key: the chat form
    (``config.chat_augment``), and each edit after ``config.context_prefixes`` of ``contexts``."""
    out = [pair for pair in (chat_pair(tokenizer, config, r) for r in requests) if pair is not None]
    if config.context_prefixes > 0:
        out += context_pairs(tokenizer, requests, contexts, config.context_prefixes)
    return out


def _fused_adam_ok(params) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
               for p in params)


class MEMoEEditor:
    """Edits a frozen causal LM with a MEMoE bypass.

    Args:
        model, tokenizer: the backbone (float or 8-bit) and its tokenizer.
        config: :class:`MEMoEConfig`.
        handle: an existing :class:`MEMoEHandle` (one is created with :func:`apply_memoe` otherwise).
        progress: show progress bars.

    Example::

        editor = MEMoEEditor(model, tokenizer, MEMoEConfig())
        results = editor.edit(load_demo(), mode="batch")
        print(results["post"]["reliability"])
    """

    def __init__(self, model, tokenizer, config: MEMoEConfig | None = None, handle: MEMoEHandle | None = None,
                 progress: bool = False, nlp=None, eval_batch_size: int = 32, user_metrics_max: int = 200):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or MEMoEConfig()
        self.handle = handle or apply_memoe(model, self.config, tokenizer, nlp=nlp)
        self.progress = progress
        self.eval_batch_size = eval_batch_size
        self.user_metrics_max = user_metrics_max  # requests the user-facing metrics are measured on (a sample)
        self.device = next(model.parameters()).device
        self.history: list[dict] = []
        self.allocator: tuple[bool, str] | None = None  # the CPU allocator setting training applied
        self._contexts: list[str] | None = None

    # Hooks the fast editor overrides: backward_step, prepare, finish, eval_logits_fn.
    def backward_step(self, batch, prompts, subjects) -> float:
        """Loss of one training step, with its gradients put into the bypass parameters."""
        with self.handle.anchored(prompts, subjects, input_ids=batch.input_ids, attention_mask=batch.attention_mask):
            logits = target_logits(self.model, batch)
            loss = nll_loss(logits, batch, self.config.negative_weight)
            aux = self.handle.bypass.last_aux_loss
        if aux is not None and self.config.aux_loss_weight > 0:
            loss = loss + self.config.aux_loss_weight * aux
        loss.backward()
        return loss.item()

    def prepare(self, requests) -> None:
        """Called once per training batch before its steps (the fast editor caches here)."""

    def finish(self) -> None:
        """Called once per training batch after its steps (the fast editor frees its caches here)."""

    def evaluate(self, requests, pre_locality=None) -> dict:
        return evaluate(self.model, self.tokenizer, requests, self.handle, pre_locality,
                        self.eval_batch_size, self.eval_logits_fn())

    def eval_logits_fn(self):
        return None

    def pre_locality(self, requests) -> list:
        with self.handle.disabled():
            return locality_tokens(self.model, self.tokenizer, requests, None, self.eval_batch_size, self.eval_logits_fn())

    @torch.no_grad()
    def negatives(self, requests) -> list[dict]:
        """Same-subject negatives of ``requests`` (``config.negatives`` each): prompts about the edited
        subject's other relations (:data:`~memoe_fast.specificity.TRAIN_TEMPLATES`), the unedited model's
        greedy continuation as the target slots, and its top tokens and log-probabilities there."""
        from ..specificity import drop_same_relation, negative_prompts

        if self.config.negatives <= 0:
            return []
        pairs = negative_prompts(requests, self.config.negatives, self.config.seed,
                                 self.config.negative_other_relations)
        if not pairs:
            return []
        owner, prompts = (list(t) for t in zip(*pairs))
        with self.handle.disabled():
            conts = greedy_continuations(self.model, self.tokenizer, prompts, self.config.negative_tokens,
                                         self.eval_batch_size)
        out = []
        for p, i, c in zip(prompts, owner, conts):
            r = requests[i]
            if c and not drop_same_relation(self.tokenizer.decode(c, skip_special_tokens=True), [r.target, r.ground_truth]):
                out.append({"prompt": p, "subject": r.subject, "owner": i,
                            "pair": (self.tokenizer(p, add_special_tokens=True)["input_ids"], c)})
        logits_fn = self.eval_logits_fn() or (lambda b: target_logits(self.model, b))
        for start in range(0, len(out), self.eval_batch_size):
            part = out[start:start + self.eval_batch_size]
            batch = collate([n["pair"] for n in part], self.tokenizer.pad_token_id, self.device)
            with self.handle.disabled():
                logp = torch.log_softmax(logits_fn(batch).float(), dim=-1)
            top = logp.topk(REF_TOPK, dim=-1)
            for row, n in enumerate(part):
                t = len(n["pair"][1])
                n["ref_ids"], n["ref_logp"] = top.indices[row, :t].cpu(), top.values[row, :t].cpu()
        return out

    def _training_batches(self, requests, negatives: list[dict]) -> list[tuple]:
        """``(batch, prompts, subjects)`` per optimiser update: all edits at once, or groups of
        ``config.update_batch`` edits (shuffled once, with their negatives)."""
        n = len(requests)
        size = self.config.update_batch
        if size <= 0 or n <= size:
            groups = [list(range(n))]
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed)).tolist()
            groups = [perm[i:i + size] for i in range(0, n, size)]
        by_owner: dict[int, list[dict]] = {}
        for neg in negatives:
            by_owner.setdefault(neg["owner"], []).append(neg)
        out = []
        for group in groups:
            edits = [requests[i] for i in group]
            negs = [g for i in group for g in by_owner.get(i, [])]
            prompts = [r.prompt for r in edits]
            subjects = [r.subject for r in edits]
            pairs = [encode_pair(self.tokenizer, r.prompt, r.target) for r in edits]
            for text, subject, pair in self._augmented_pairs(edits):
                prompts.append(text), subjects.append(subject), pairs.append(pair)
            n_pos = len(pairs)
            pairs += [g["pair"] for g in negs]
            batch = collate(pairs, self.tokenizer.pad_token_id)
            if negs:
                b, tt = batch.target_ids.shape
                negative = torch.zeros(b, dtype=torch.bool)
                negative[n_pos:] = True
                ref_ids = torch.zeros(b, tt, REF_TOPK, dtype=torch.long)
                ref_logp = torch.zeros(b, tt, REF_TOPK)
                for row, g in enumerate(negs, start=n_pos):
                    t = g["ref_ids"].shape[0]
                    ref_ids[row, :t], ref_logp[row, :t] = g["ref_ids"], g["ref_logp"]
                batch = Batch(batch.input_ids, batch.attention_mask, batch.pred_pos, batch.target_ids,
                              batch.target_mask, negative, ref_ids, ref_logp)
            prompts += [g["prompt"] for g in negs]
            subjects += [g["subject"] for g in negs]
            out.append((batch.to(self.device), prompts, subjects))
        return out

    def balanced_owners(self, requests) -> dict[int, list[str]]:
        """``{expert: subjects}`` for the subjects of ``requests`` that no expert owns yet, each given in
        turn (most edits first) to the expert that then holds the fewest (``expert_assignment=
        "balanced"``). Load is counted in prompt keys (an edit, its chat form and its context forms), so
        subjects owned already, from earlier calls, count with the keys they hold."""
        bank, bypass = self.handle.bank, self.handle.bypass
        n = bypass.num_experts
        weight: dict[str, int] = {}
        contexts = min(self.config.context_prefixes, len(self.context_texts()))
        for r in requests:
            if r.subject and r.subject.strip():
                s = r.subject.strip()
                weight[s] = weight.get(s, 0) + 1 + (chat_pair(self.tokenizer, self.config, r) is not None) + contexts
        load = [int(bypass.key_owner.eq(e).sum()) for e in range(n)]
        owned = {s for s, o in zip(bank.subjects, bank.owners.tolist()) if 0 <= o < n}
        out: dict[int, list[str]] = {}
        for s in sorted((s for s in weight if s not in owned), key=lambda s: -weight[s]):  # stable: first seen first
            e = min(range(n), key=lambda e: (load[e], e))
            load[e] += weight[s]
            out.setdefault(e, []).append(s)
        return out

    @torch.no_grad()
    def add_prompt_keys(self, requests, owner: int = -1) -> None:
        """With ``config.key_threshold``: store each edit prompt's host-MLP input at its last token (and the
        chat-form prompt's, with ``chat_augment``) as a key of the edit's subject (the key gate), after,
        with ``config.key_subject_rank``, the subspace of each new subject (:meth:`subject_bases`)."""
        bank = self.handle.bank
        if self.config.key_threshold is None or bank is None:
            return
        texts, subjects, encoded = [], [], []
        for r in requests:
            if r.subject:
                texts.append(r.prompt), subjects.append(r.subject)
                encoded.append(self.tokenizer(r.prompt, add_special_tokens=True)["input_ids"])
        for text, subject, (ids, _) in self._augmented_pairs(requests):
            texts.append(text), subjects.append(subject), encoded.append(ids)
        if not texts:
            return
        bypass = self.handle.bypass
        if self.config.key_subject_rank > 0:
            known = set(bypass.basis_subject.tolist())
            new = [s for s in dict.fromkeys(subjects) if bank.subject_index(s) not in known]
            if new:
                bypass.add_subject_basis(torch.tensor([bank.subject_index(s) for s in new]), self.subject_bases(new))
        states = [x[-1] for x in self._mlp_inputs(encoded)]
        index = torch.tensor([bank.subject_index(s) for s in subjects])
        # A key's expert: the batch's (lifelong editing), else its subject's owner (-1: the gate decides).
        owners = torch.full((len(states),), owner, dtype=torch.long) if owner >= 0 else bank.owners[index]
        bypass.add_keys(torch.stack(states), index, owners)

    def subject_bases(self, subjects: list[str]) -> torch.Tensor:
        """``(len(subjects), r, D)``: per subject, the top ``r = config.key_subject_rank`` (at most D/4) right singular
        vectors of the unedited host-MLP inputs at every (non-special) token of the
        :data:`~memoe_fast.specificity.TRAIN_TEMPLATES` prompts about it: the directions its questions
        share whatever they ask."""
        from ..specificity import TRAIN_TEMPLATES, fill

        special = set(self.tokenizer.all_special_ids)
        encoded = [self.tokenizer(fill(t, s), add_special_tokens=True)["input_ids"]
                   for s in subjects for t in TRAIN_TEMPLATES]
        states = self._mlp_inputs(encoded)
        # At most a quarter of the width: the gate needs most of the space left to compare questions in.
        n_t, rank = len(TRAIN_TEMPLATES), min(self.config.key_subject_rank, self.handle.bypass.hidden_size // 4)
        out = []
        for i in range(len(subjects)):
            rows = torch.cat([x[[t not in special for t in ids]]
                              for ids, x in zip(encoded[i * n_t:(i + 1) * n_t], states[i * n_t:(i + 1) * n_t])])
            basis = torch.linalg.svd(rows.double(), full_matrices=False).Vh[:rank].float()
            if basis.shape[0] < rank:  # fewer token states than the rank: pad with zero rows (no direction)
                basis = torch.cat([basis, basis.new_zeros(rank - basis.shape[0], basis.shape[1])])
            out.append(basis)
        return torch.stack(out)

    def _mlp_inputs(self, encoded: list[list[int]]) -> list[torch.Tensor]:
        """The unedited host-MLP input of the edited block at every token of each id list, ``(L, D)`` each."""
        bypass = self.handle.bypass
        store: dict = {}

        def grab(_m, args):
            store["x"] = args[0]
            # The blocks above the edited one are not needed. (The bypass is disabled here, so the handle
            # set no anchors that the skipped part of the forward would have consumed.)
            raise _Captured

        # Length-sorted batches: padding was about a third of the work otherwise.
        out = [None] * len(encoded)
        hook = bypass.register_forward_pre_hook(grab)
        try:
            for idx in length_batches(list(map(len, encoded)), self.eval_batch_size):
                part = [encoded[i] for i in idx]
                batch = collate([(ids, []) for ids in part], self.tokenizer.pad_token_id, self.device)
                try:
                    with torch.no_grad(), self.handle.disabled():
                        self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                              use_cache=False)
                except _Captured:
                    pass
                x = store.pop("x").float().cpu()
                for row, (i, ids) in enumerate(zip(idx, part)):
                    out[i] = x[row, :len(ids)]
        finally:
            hook.remove()
        return out

    def _augmented_pairs(self, requests) -> list[tuple[str, str, tuple[list[int], list[int]]]]:
        """:func:`augmented_pairs` of ``requests``: the forms besides the edit prompt, each with its own key."""
        return augmented_pairs(self.tokenizer, self.config, requests, self.context_texts())

    def context_texts(self) -> list[str]:
        """:func:`write_context_texts` of the unedited model (made once per editor, when the config asks for
        them; empty otherwise)."""
        if self.config.context_prefixes <= 0:
            return []
        if self._contexts is None:
            with torch.no_grad(), self.handle.disabled():
                self._contexts = write_context_texts(self.model, self.tokenizer, self.config.context_tokens,
                                                     self.eval_batch_size)
        return self._contexts

    def check_context(self, requests) -> None:
        """Refuse requests with a text that training or evaluation would feed beyond the model's context
        (``max_position_embeddings``; GPT-2 calls it ``n_positions``), before anything runs: past it,
        learned positions fail with an index error and rotary ones give meaningless losses."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if not context:
            return
        where = [f"request {i}" + (f" (case_id {r.case_id})" if r.case_id is not None else "")
                 for i, r in enumerate(requests)]
        names, texts = [], []
        for w, r in zip(where, requests):
            pairs = [("prompt + target", r.prompt, r.target)]
            pairs += [(f"rephrase[{j}] + target", p, r.target) for j, p in enumerate(r.rephrase)]
            if r.locality_prompt and r.locality_answer:
                pairs.append(("locality_prompt + locality_answer", r.locality_prompt, r.locality_answer))
            pairs += [(f"portability[{j}] question + answer", q, a) for j, (q, a) in enumerate(r.portability)]
            for what, prompt, target in pairs:
                names.append(f"{w}: {what}")
                texts.append(prompt + " " + target.strip())  # as encode_pair tokenises it
        found = list(zip(names, map(len, self.tokenizer(texts, add_special_tokens=True)["input_ids"])))
        for w, r in zip(where, requests):  # training also asks a question in the chat template
            chat = chat_pair(self.tokenizer, self.config, r)
            if chat is not None:
                found.append((f"{w}: prompt in the chat template + target", len(chat[2][0]) + len(chat[2][1])))
        contexts = self.context_texts()
        if contexts:  # and after context texts: checked with the longest one
            longest = max(contexts, key=lambda c: len(self.tokenizer(c, add_special_tokens=False)["input_ids"]))
            for w, r in zip(where, requests):
                if r.subject:
                    p, t = encode_pair(self.tokenizer, f"{longest} {r.prompt}", r.target)
                    found.append((f"{w}: prompt after a context text + target", len(p) + len(t)))
        over = [f"{name} is {n} tokens" for name, n in found if n > context]
        if over:
            more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
            raise ValueError(f"{over[0]}, longer than the model's context of {context} tokens{more}")

    def train(self, requests, desc: str = "editing", owner: int = -1) -> list[float]:
        """Train the bypass on ``requests`` for ``config.steps`` steps; returns the loss of each step
        (with ``update_batch``, a step is one pass over the groups and its loss their mean).
        ``owner``: the expert these edits are routed to (lifelong editing; -1: the gate decides)."""
        negatives = self.negatives(requests)
        if owner < 0 and self.config.expert_assignment == "balanced":
            for expert, subjects in self.balanced_owners(requests).items():
                self.handle.add_subjects(subjects, expert)
        self.handle.add_subjects([r.subject for r in requests], owner)
        self.add_prompt_keys(requests, owner)
        if self.device.type == "cpu":
            self.allocator = keep_freed_cpu_memory()  # every step reallocates the same weight gradients
        self.prepare(requests)
        batches = self._training_batches(requests, negatives)
        params = self.handle.parameters()
        # The fused Adam (one kernel over all tensors) takes ~1/4 of the default's time on the CPU.
        opt = torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                               fused=_fused_adam_ok(params))
        sched = None
        if self.config.lr_schedule == "cosine" and self.config.steps > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.steps * len(batches))
        bypass = self.handle.bypass
        bypass.train(True)
        losses = []
        try:
            last = [math.inf] * len(batches)  # each group's loss at its last update
            for step in _progress(range(self.config.steps), self.progress, desc=desc, leave=False):
                for g, (batch, prompts, subjects) in enumerate(batches):
                    if len(batches) > 1 and last[g] < self.config.stop_loss:
                        continue  # this group is learned: learned edits stop costing work
                    opt.zero_grad(set_to_none=True)
                    loss = self.backward_step(batch, prompts, subjects)
                    if not math.isfinite(loss):
                        # Nothing of this step has been applied: the bypass keeps its last good weights.
                        raise FloatingPointError(f"training diverged: loss {loss} at step {step} ({desc})")
                    last[g] = loss
                    opt.step()
                    if sched is not None:
                        sched.step()
                losses.append(sum(last) / len(last))
                if losses[-1] < self.config.stop_loss:
                    break  # every target is already near-certain: more steps only cost time
        finally:
            bypass.train(False)
            self.finish()
        return losses

    def edit(self, requests, mode: str = "batch", batch_size: int | None = None, evaluate: bool = True,
             user_metrics: bool = False, checkpoint_dir: str | None = None, resume: bool = False) -> dict:
        """Edit ``requests`` and measure Reliability / Generality / Locality before and after.

        Args:
            requests: a list of :class:`~memoe_fast.datasets.EditRequest`.
            mode: ``"batch"`` (all edits trained together) or ``"sequential"`` (batches of
                ``batch_size`` one after another, metrics after each batch and at the end).
            evaluate: measure the metrics (skipped when False: only the losses and timings come back).
            user_metrics: also measure the metrics as users meet the model
                (:func:`~memoe_fast.metrics.evaluate_user`: greedy, same-subject, chat, portability), on
                an evenly spaced sample of at most ``user_metrics_max`` requests (all of them up to 200).
            checkpoint_dir: sequential mode: save the edits there after every batch (atomically).
            resume: continue from the last batch saved in ``checkpoint_dir`` (same requests, same config).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not requests:
            raise ValueError("no edit requests given")
        if any(isinstance(r, dict) for r in requests):
            if not all(isinstance(r, dict) for r in requests):
                raise ValueError("requests: give either EditRequest objects or EasyEdit request dicts, not both")
            # EasyEdit's request dicts (prompt, target_new, subject, rephrase_prompt, nested locality ...).
            from ..easyedit import requests_from_dicts

            requests = requests_from_dicts(list(requests))
        if mode == "sequential" and (batch_size is None or batch_size < 1):
            raise ValueError("sequential editing needs batch_size >= 1")
        if mode == "batch" and not self.config.replay and self.handle.bank is not None and self.handle.bank.subjects:
            warnings.warn(
                "edit(mode='batch') on a model that already holds edits: this call trains the experts those edits "
                "share on the new requests alone, so earlier edits can be overwritten (10 facts edited one batch "
                "call at a time kept Reliability 0.45). Edit them in one call, or use mode='sequential' (each "
                "batch gets an expert of its own) for edits that arrive over time.", stacklevel=2)
        self.check_context(requests)
        torch.manual_seed(self.config.seed)
        timings: dict[str, float] = {}
        result: dict = {"n_edits": len(requests), "mode": mode, "batch_size": batch_size if mode == "sequential" else len(requests)}
        t0 = time.perf_counter()
        same = None
        if evaluate:
            pre_loc = self.pre_locality(requests)
            with self.handle.disabled():
                result["pre"] = self.evaluate(requests, pre_loc)
                if user_metrics:
                    sample = user_sample(requests, self.user_metrics_max)
                    result["user_metrics_n"] = len(sample)
                    same = same_subject_cases(self.model, self.tokenizer, sample, self.handle,
                                              batch_size=self.eval_batch_size)
                    attach_expected_argmax(self.model, self.tokenizer, same, self.handle, self.eval_batch_size)
                    result["pre"].update(self._user(sample, same))
            timings["eval_pre_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        batches = [requests] if mode == "batch" else [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
        losses, per_batch, done = [], [], 0
        if checkpoint_dir and resume and os.path.exists(os.path.join(checkpoint_dir, "memoe.json")):
            meta = self.handle.load_weights(checkpoint_dir)
            done, losses, per_batch = meta["batches_done"], meta["losses"], meta["per_batch"]
            if meta.get("n_edits") != len(requests) or meta.get("batch_size") != result["batch_size"]:
                raise ValueError(f"{checkpoint_dir}: the checkpoint was written for {meta.get('n_edits')} edits in "
                                 f"batches of {meta.get('batch_size')}, not {len(requests)} in batches of {result['batch_size']}")
        per_batch_experts = mode == "sequential" and self.config.sequential_experts == "per_batch"
        for b, chunk in enumerate(_progress(batches, self.progress and len(batches) > 1, desc="batches")):
            if b < done:
                continue
            tb = time.perf_counter()
            owner = -1
            bypass = self.handle.bypass
            if per_batch_experts:
                # Each batch gets an expert of its own, routed by its subjects' keys; the earlier ones freeze.
                # The count carries over calls (and saves): a later call's batches never retrain an expert
                # that an earlier call's batch holds.
                owner = bypass.owned_experts
                if owner >= bypass.num_experts:
                    bypass.add_experts(owner + 1 - bypass.num_experts)
                bypass.freeze_experts(owner)
            # With replay, each batch trains together with the edits before it, so that a later batch
            # cannot overwrite an expert that an earlier edit relies on.
            seen = [r for c in batches[:b] for r in c] if self.config.replay else []
            losses.append(self.train(seen + chunk, desc=f"batch {b + 1}/{len(batches)}", owner=owner))
            if per_batch_experts:
                bypass.owned_experts = owner + 1
            entry = {"batch": b, "n": len(chunk), "train_s": time.perf_counter() - tb}
            if mode == "sequential" and evaluate:
                offset = sum(len(c) for c in batches[:b])
                m = self.evaluate(chunk, pre_loc[offset:offset + len(chunk)])
                entry.update({k: m[k] for k in ("reliability", "generality", "locality")})
            if mode == "sequential":
                per_batch.append(entry)
            if checkpoint_dir and mode == "sequential":
                self.handle.save(checkpoint_dir, extra={"batches_done": b + 1, "losses": losses, "per_batch": per_batch,
                                                        "n_edits": len(requests), "batch_size": result["batch_size"]})
        self.handle.bypass.freeze_experts(0)
        timings["edit_s"] = time.perf_counter() - t1
        result["losses"] = losses
        if per_batch:
            result["per_batch"] = per_batch
        if evaluate:
            t2 = time.perf_counter()
            result["post"] = self.evaluate(requests, pre_loc)
            if same is not None:
                result["post"].update(self._user(sample, same))
                result["routing"] = routing_analysis(self.model, self.tokenizer, self.handle, sample, same,
                                                     self.eval_batch_size)
            if mode == "sequential" and len(batches) > 1:
                first = self.evaluate(batches[0], pre_loc[:len(batches[0])])
                result["first_batch_final"] = {k: first[k] for k in ("reliability", "generality", "locality")}
            timings["eval_post_s"] = time.perf_counter() - t2
        result["timings"] = timings
        self.history.append(result)
        return result

    def _user(self, requests, same) -> dict:
        """:func:`~memoe_fast.metrics.evaluate_user` on the model as it is now, per-example scores aside."""
        m = evaluate_user(self.model, self.tokenizer, requests, self.handle, same, batch_size=self.eval_batch_size,
                          logits_fn=self.eval_logits_fn())
        per = m.pop("per_example")
        m["per_example_user"] = per
        return m
