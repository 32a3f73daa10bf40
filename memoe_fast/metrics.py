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
    # Batches of similar length waste little on padding; results come back in the input order.
    order = sorted(range(len(all_pairs)), key=lambda i: len(all_pairs[i][0]) + len(all_pairs[i][1]))
    out: list = [None] * len(all_pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        pairs = [all_pairs[i] for i in idx]
        batch = collate(pairs, tokenizer.pad_token_id, device)
        if handle is not None and handle.bypass.enabled:
            with handle.anchored([prompts[i] for i in idx], [subjects[i] for i in idx]):
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
