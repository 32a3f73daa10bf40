"""Editing metrics, computed as EasyEdit computes them.

* Reliability / Generality: teacher-forced token accuracy of the target. The input is
  ``prompt + " " + target``; at each target position the argmax of the logits is compared with the
  target token; an example scores the mean over its target tokens (over its paraphrases too, for
  Generality), and the metric is the mean over examples.
* Locality: for an unrelated ``locality_prompt + " " + locality_answer``, the fraction of the
  answer's token positions where the edited model's argmax equals the unedited model's; mean over
  examples.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of `` target`` as they stand in ``prompt + " " + target``.

    The joint string is tokenised and split after the prompt's tokens (EasyEdit's way); where the
    tokeniser merges across the boundary, the two parts are tokenised separately instead.
    """
    target = target.strip()
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + " " + target, add_special_tokens=True)["input_ids"]
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids):]
    return p_ids, tokenizer(" " + target, add_special_tokens=False)["input_ids"]


@dataclass
class Batch:
    """Right-padded ``prompt + target`` sequences and where their targets are."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pred_pos: torch.Tensor  # (B, Tt) logit positions that predict the target tokens (0 where padded)
    target_ids: torch.Tensor  # (B, Tt)
    target_mask: torch.Tensor  # (B, Tt) bool
    # Same-subject negatives (MEMoEConfig.negatives): which rows are negatives, and for their target
    # slots the unedited model's top tokens and log-probabilities, which training keeps (KL).
    negative: torch.Tensor | None = None  # (B,) bool
    ref_ids: torch.Tensor | None = None  # (B, Tt, K)
    ref_logp: torch.Tensor | None = None  # (B, Tt, K)

    def to(self, device) -> "Batch":
        return Batch(*(None if x is None else x.to(device) for x in (
            self.input_ids, self.attention_mask, self.pred_pos, self.target_ids, self.target_mask,
            self.negative, self.ref_ids, self.ref_logp)))

    def rows(self, idx) -> "Batch":
        """Rows ``idx`` (a list or tensor of indices) of the batch."""
        return Batch(*(None if x is None else x[idx] for x in (
            self.input_ids, self.attention_mask, self.pred_pos, self.target_ids, self.target_mask,
            self.negative, self.ref_ids, self.ref_logp)))


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device=None) -> Batch:
    length = max(len(p) + len(t) for p, t in pairs)
    tlen = max(len(t) for _, t in pairs)
    n = len(pairs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros(n, length, dtype=torch.long)
    pred_pos = torch.zeros(n, tlen, dtype=torch.long)
    target_ids = torch.zeros(n, tlen, dtype=torch.long)
    target_mask = torch.zeros(n, tlen, dtype=torch.bool)
    for i, (p, t) in enumerate(pairs):
        seq = p + t
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        pred_pos[i, : len(t)] = torch.arange(len(p) - 1, len(p) - 1 + len(t))
        target_ids[i, : len(t)] = torch.tensor(t)
        target_mask[i, : len(t)] = True
    batch = Batch(input_ids, attention, pred_pos, target_ids, target_mask)
    if device is not None:
        batch = Batch(*(x.to(device) for x in (input_ids, attention, pred_pos, target_ids, target_mask)))
    return batch


def target_logits(model, batch: Batch) -> torch.Tensor:
    """Logits ``(B, Tt, V)`` at the positions that predict the target tokens (full-vocabulary head)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.gather(1, batch.pred_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` in batches of ``batch_size``, shortest first: batches of similar
    length waste little on padding (callers put each result back at its index)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_targets(model, tokenizer, prompts: list[str], targets: list[str], handle=None,
                    subjects: list[str | None] | None = None, batch_size: int = 32,
                    logits_fn=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced argmax tokens at the target positions: a list of ``(predicted, target)`` id tensors.

    With a MEMoE ``handle`` the anchors come from the prompts alone, so that a target never routes
    its own prompt. ``logits_fn(batch) -> (B, Tt, V)`` replaces :func:`target_logits` (the fast editor
    passes one that runs the LM head only at the target positions).
    """
    logits_fn = logits_fn or (lambda b: target_logits(model, b))
    device = next(model.parameters()).device
    subjects = subjects if subjects is not None else [None] * len(prompts)
    all_pairs = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    out: list = [None] * len(all_pairs)
    for idx in length_batches([len(p) + len(t) for p, t in all_pairs], batch_size):
        pairs = [all_pairs[i] for i in idx]
        batch = collate(pairs, tokenizer.pad_token_id, device)
        if handle is not None and handle.bypass.enabled:
            # Only prompt tokens may match a key: the target never decides whether its own prompt is edited.
            prompt_len = torch.tensor([len(p) for p, _ in pairs])
            key_tokens = torch.arange(batch.input_ids.shape[1]) < prompt_len.unsqueeze(1)
            with handle.anchored([prompts[i] for i in idx], [subjects[i] for i in idx],
                                 input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 key_tokens=key_tokens):
                logits = logits_fn(batch)
        else:
            logits = logits_fn(batch)
        pred = logits.argmax(-1).cpu()
        for row, (i, (_, t)) in enumerate(zip(idx, pairs)):
            out[i] = (pred[row, : len(t)], torch.tensor(t))
    return out


def token_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean of ``pred == target`` over the target tokens of one example."""
    return (pred == target).float().mean().item()


def locality_agreement(post: torch.Tensor, pre: torch.Tensor) -> float:
    """Fraction of the locality answer's positions where the edited argmax equals the unedited one."""
    return (post == pre).float().mean().item()


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def evaluate(model, tokenizer, requests, handle=None, pre_locality: list | None = None,
             batch_size: int = 32, logits_fn=None) -> dict:
    """Reliability, Generality and Locality of ``requests`` on the model as it is now.

    ``pre_locality`` are the unedited model's locality argmax tokens (from :func:`locality_tokens`);
    without them Locality is measured against the model itself and is 1.0 by definition.
    Returns the three means and ``per_example`` scores (None where a request lacks that prompt).
    """
    subjects = [r.subject for r in requests]
    rel = predict_targets(model, tokenizer, [r.prompt for r in requests], [r.target for r in requests],
                          handle, subjects, batch_size, logits_fn)
    reliability = [token_accuracy(p, t) for p, t in rel]
    para_prompts, para_targets, para_subjects, owner = [], [], [], []
    for i, r in enumerate(requests):
        for q in r.rephrase:
            para_prompts.append(q), para_targets.append(r.target), para_subjects.append(r.subject), owner.append(i)
    gen_scores: list[list[float]] = [[] for _ in requests]
    for (p, t), i in zip(predict_targets(model, tokenizer, para_prompts, para_targets, handle, para_subjects,
                                         batch_size, logits_fn), owner):
        gen_scores[i].append(token_accuracy(p, t))
    generality = [mean(s) for s in gen_scores]
    if pre_locality is not None and handle is not None and not handle.bypass.enabled:
        post_loc = pre_locality  # the unedited model measured against itself: nothing to recompute
    else:
        post_loc = locality_tokens(model, tokenizer, requests, handle, batch_size, logits_fn)
    pre_loc = pre_locality if pre_locality is not None else post_loc
    locality = [None if a is None else locality_agreement(a, b) for a, b in zip(post_loc, pre_loc)]
    return {
        "reliability": mean(reliability),
        "generality": mean(generality),
        "locality": mean(locality),
        "per_example": [
            {"case_id": r.case_id, "reliability": a, "generality": b, "locality": c}
            for r, a, b, c in zip(requests, reliability, generality, locality)
        ],
    }


def locality_tokens(model, tokenizer, requests, handle=None, batch_size: int = 32, logits_fn=None) -> list:
    """Argmax tokens over each request's locality answer (None where the request has none)."""
    idx = [i for i, r in enumerate(requests) if r.locality_prompt and r.locality_answer]
    preds = predict_targets(model, tokenizer, [requests[i].locality_prompt for i in idx],
                            [requests[i].locality_answer for i in idx], handle, None, batch_size, logits_fn)
    out: list = [None] * len(requests)
    for i, (p, _) in zip(idx, preds):
        out[i] = p
    return out


# Metrics as users meet the edited model: greedy generation, the edited subject's other facts, the chat
# template, portability. The model is called as a user calls it (anchors computed from the input text by
# the handle's hook), never with the edit request's fields.

@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
                         chat: bool = False) -> list[list[int]]:
    """Greedy continuation ids of each prompt (``model.generate``, left-padded batches of similar
    length). With ``chat`` each prompt is a user turn in the tokenizer's chat template."""
    device = next(model.parameters()).device
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    out: list = [None] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for idx in length_batches(list(map(len, encoded)), batch_size):
        length = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, length - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, length - len(encoded[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, min_new_tokens=max_new_tokens)
        for row, i in enumerate(idx):
            out[i] = gen[row, length:].tolist()
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def starts_with_target(tokenizer, continuation: list[int], target: str) -> bool:
    """Whether a greedy continuation starts with the target (case and spacing ignored)."""
    text = tokenizer.decode(continuation, skip_special_tokens=True)
    return _norm(text).startswith(_norm(target))


def contains_target(tokenizer, continuation: list[int], target: str) -> bool:
    return _norm(target) in _norm(tokenizer.decode(continuation, skip_special_tokens=True))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def same_subject_cases(model, tokenizer, requests, handle=None, per_edit: int = 4, tokens: int = 5,
                       batch_size: int = 32) -> list[dict]:
    """Held-out prompts about each edited subject's other facts, with the unedited model's greedy
    continuation as the expected answer (``EVAL_TEMPLATES``; never trained on). Run on the unedited
    model (the handle's bypass off). Prompts whose unedited answer mentions the edit's old or new
    answer ask the edited relation itself and are dropped."""
    from .specificity import EVAL_TEMPLATES, drop_same_relation, subject_prompts

    prompts, owner = [], []
    for i, r in enumerate(requests):
        for p in subject_prompts(r.subject, EVAL_TEMPLATES, per_edit, offset=i):
            prompts.append(p), owner.append(i)
    ctx = handle.disabled() if handle is not None else contextlib.nullcontext()
    with ctx:
        conts = greedy_continuations(model, tokenizer, prompts, tokens, batch_size)
    cases = []
    for p, i, c in zip(prompts, owner, conts):
        r = requests[i]
        text = tokenizer.decode(c, skip_special_tokens=True)
        if not c or drop_same_relation(text, [r.target, r.ground_truth]):
            continue
        cases.append({"owner": i, "prompt": p, "subject": r.subject, "expected": c, "text": text})
    return cases


@torch.no_grad()
def evaluate_user(model, tokenizer, requests, handle=None, same_subject: list[dict] | None = None,
                  pre_portability: list | None = None, batch_size: int = 32, logits_fn=None,
                  chat: bool = True) -> dict:
    """Metrics as a user meets the edited model (the model as it is now, anchors from the input text):

    * ``greedy_reliability`` / ``greedy_generality``: the greedy continuation of the edit prompt / its
      paraphrases starts with the target;
    * ``same_subject_locality``: teacher-forced argmax agreement with the unedited model on held-out
      prompts about the edited subject's other facts (``same_subject`` from :func:`same_subject_cases`),
      and ``same_subject_greedy``: the fraction of those whose greedy continuation is unchanged;
    * ``chat_reliability``: the edit prompt, when it is a question, asked as a user turn in the chat
      template: the reply contains the target (None without a chat template or questions);
    * ``portability``: teacher-forced token accuracy on the data's portability questions.
    """
    out: dict = {}
    n = len(requests)
    tlen = [len(encode_pair(tokenizer, r.prompt, r.target)[1]) for r in requests]
    conts = greedy_continuations(model, tokenizer, [r.prompt for r in requests], max(tlen) + 1, batch_size)
    rel = [starts_with_target(tokenizer, c, r.target) for c, r in zip(conts, requests)]
    out["greedy_reliability"] = mean([float(v) for v in rel])
    para, owner = [], []
    for i, r in enumerate(requests):
        for q in r.rephrase:
            para.append(q), owner.append(i)
    gen_scores: list[list[float]] = [[] for _ in requests]
    if para:
        conts = greedy_continuations(model, tokenizer, para, max(tlen) + 1, batch_size)
        for c, i in zip(conts, owner):
            gen_scores[i].append(float(starts_with_target(tokenizer, c, requests[i].target)))
    out["greedy_generality"] = mean([mean(s) for s in gen_scores])
    per_same: list[list[float]] = [[] for _ in requests]
    per_same_greedy: list[list[float]] = [[] for _ in requests]
    if same_subject:
        # No handle and the full model call: the anchors come from the input text, as for a user.
        preds = predict_targets(model, tokenizer, [c["prompt"] for c in same_subject],
                                [c["text"] for c in same_subject], None, None, batch_size, None)
        tokens = max(len(c["expected"]) for c in same_subject)
        conts = greedy_continuations(model, tokenizer, [c["prompt"] for c in same_subject], tokens, batch_size)
        for case, (pred, _), cont in zip(same_subject, preds, conts):
            # The expected continuation re-tokenised after a space may differ from the generated ids;
            # agreement is measured against the unedited model's argmax on the same input.
            want = case.get("expected_argmax")
            agree = locality_agreement(pred, want) if want is not None else float("nan")
            per_same[case["owner"]].append(agree)
            per_same_greedy[case["owner"]].append(float(cont[: len(case["expected"])] == case["expected"]))
    out["same_subject_locality"] = mean([mean(s) for s in per_same]) if same_subject else None
    out["same_subject_greedy"] = mean([mean(s) for s in per_same_greedy]) if same_subject else None
    out["chat_reliability"] = None
    questions = [i for i, r in enumerate(requests) if r.prompt.rstrip().endswith("?")]
    if chat and questions and has_chat_template(tokenizer):
        conts = greedy_continuations(model, tokenizer, [requests[i].prompt for i in questions],
                                     max(tlen[i] for i in questions) + 8, batch_size, chat=True)
        out["chat_reliability"] = mean([float(contains_target(tokenizer, c, requests[i].target))
                                        for c, i in zip(conts, questions)])
    port = [(i, q, a) for i, r in enumerate(requests) for q, a in r.portability]
    out["portability"] = None
    if port:
        preds = predict_targets(model, tokenizer, [q for _, q, _ in port], [a for _, _, a in port], handle,
                                None, batch_size, logits_fn)
        out["portability"] = mean([token_accuracy(p, t) for p, t in preds])
    out["per_example"] = [
        {"greedy_reliability": float(rel[i]), "greedy_generality": mean(gen_scores[i]),
         "same_subject_locality": mean(per_same[i]), "same_subject_greedy": mean(per_same_greedy[i])}
        for i in range(n)
    ]
    return out


@torch.no_grad()
def attach_expected_argmax(model, tokenizer, cases: list[dict], handle=None, batch_size: int = 32,
                           logits_fn=None) -> None:
    """The unedited model's teacher-forced argmax on each same-subject case (``expected_argmax``), the
    reference of ``same_subject_locality``."""
    if not cases:
        return
    ctx = handle.disabled() if handle is not None else contextlib.nullcontext()
    with ctx:
        preds = predict_targets(model, tokenizer, [c["prompt"] for c in cases], [c["text"] for c in cases],
                                None, None, batch_size, None)
    for case, (pred, _) in zip(cases, preds):
        case["expected_argmax"] = pred


@torch.no_grad()
def routing_analysis(model, tokenizer, handle, requests, same_subject: list[dict] | None = None,
                     batch_size: int = 32) -> dict:
    """Where inputs go in the edited model: for the edit prompts, their paraphrases, the locality prompts
    and the same-subject prompts, the fraction that *reach* the experts (in scope, and past the key gate
    when it is on) and each one's expert; the fraction of paraphrases routed to their edit's expert; the
    expert load (edit prompts per expert).

    An input's expert is its forced route (lifelong editing) or the gate's choice from its anchor (the
    gate's token half stays zero unless the gate trains, so that choice is the routing)."""
    bypass = handle.bypass
    hidden = bypass.hidden_size

    def run(texts: list[str]) -> tuple[list[bool], list[int]]:
        reach, expert = [], []
        for start in range(0, len(texts), batch_size):
            part = texts[start:start + batch_size]
            enc = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in part]
            batch = collate([(ids, []) for ids in enc], tokenizer.pad_token_id, next(model.parameters()).device)
            with handle.anchored(part, input_ids=batch.input_ids, attention_mask=batch.attention_mask) as anchors:
                bypass.last_latched = None
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            scope = anchors.scope.clone()
            if bypass.config.key_threshold is not None:
                latched = bypass.last_latched
                scope &= latched if latched is not None else torch.zeros_like(scope)
            logits = anchors.vectors.to(bypass.w_gate.device) @ bypass.w_gate[:, hidden:].t().float()
            if bypass.b_gate is not None:
                logits = logits + bypass.b_gate.float()
            chosen = logits.argmax(-1).cpu()
            if anchors.route is not None:
                chosen = torch.where(anchors.route >= 0, anchors.route, chosen)
            reach += scope.tolist()
            expert += chosen.tolist()
        return reach, expert

    out: dict = {}
    edit_reach, edit_expert = run([r.prompt for r in requests])
    para = [(i, q) for i, r in enumerate(requests) for q in r.rephrase]
    para_reach, para_expert = run([q for _, q in para]) if para else ([], [])
    loc = [r.locality_prompt for r in requests if r.locality_prompt]
    loc_reach, _ = run(loc) if loc else ([], [])
    same_reach, _ = run([c["prompt"] for c in same_subject]) if same_subject else ([], [])
    frac = lambda xs: mean([float(x) for x in xs])
    out["reach"] = {"edit": frac(edit_reach), "paraphrase": frac(para_reach), "locality": frac(loc_reach),
                    "same_subject": frac(same_reach)}
    out["paraphrase_same_expert"] = frac([para_expert[j] == edit_expert[i] for j, (i, _) in enumerate(para)])
    load = [0] * bypass.num_experts
    for e, reached in zip(edit_expert, edit_reach):
        if reached:
            load[e] += 1
    out["expert_load"] = load
    return out
