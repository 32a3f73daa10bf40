"""Prompts about an edited subject's *other* facts, built from the unedited model itself.

Locality in EasyEdit asks about other subjects, which the anchor scope never lets through; what users
meet after an edit is the edited subject asked about something else ("Tell me about X.", "Who founded
X?"). Two disjoint template sets serve two purposes:

* ``TRAIN_TEMPLATES``: same-subject *negatives* the editor trains to keep the unedited model's outputs
  (``MEMoEConfig.negatives``);
* ``EVAL_TEMPLATES``: held out from training, for the same-subject locality metric
  (:func:`memoe_fast.metrics.evaluate_user`).

The expected answers are the unedited model's own greedy continuations. A template whose unedited
continuation mentions the edit's old or new answer asks the edited relation itself, so it is dropped
for that edit (:func:`drop_same_relation`).
"""
from __future__ import annotations

TRAIN_TEMPLATES = (
    "{s} is",
    "Tell me about {s}.",
    "{s} is known for",
    "The most important fact about {s} is that",
    "{s} is located in",
    "People say that {s}",
    "Q: What is {s}? A:",
    "{s} has",
    "Here is a short description of {s}:",
    "{s} was born in",
    "The name {s} refers to",
    "Who founded {s}?",
)

EVAL_TEMPLATES = (
    "What do you know about {s}?",
    "{s} is famous for",
    "Who created {s}?",
    "Where is {s} from?",
    "A fact about {s}:",
    "{s} belongs to",
    "In short, {s} is",
    "Describe {s} in one sentence.",
)


def fill(template: str, subject: str) -> str:
    return template.replace("{s}", subject)


def subject_prompts(subject: str, templates, count: int, offset: int = 0) -> list[str]:
    """``count`` prompts about ``subject`` from ``templates``, starting at ``offset`` (rotating, so that a
    set of edits covers every template)."""
    if not subject or count <= 0:
        return []
    n = len(templates)
    return [fill(templates[(offset + j) % n], subject) for j in range(min(count, n))]


def relation_template(prompt: str, subject: str | None) -> str | None:
    """An edit prompt with its subject replaced by ``{s}`` (None when the subject is not in it): the
    relation it asks, ready to be asked of another subject."""
    if not subject or subject not in prompt or "{s}" in prompt:
        return None
    return prompt.replace(subject, "{s}", 1)


def negative_prompts(requests, count: int, seed: int = 0, other_relations: bool = False) -> list[tuple[int, str]]:
    """``(edit index, prompt)`` same-subject negatives: for each edit, ``count`` prompts about its subject
    that ask something else: from :data:`TRAIN_TEMPLATES`, and with ``other_relations`` half of them
    from the *other* edits' relations (their prompts with this subject put in). Another edit's relation
    can be this edit's own in other words, and then its negative fights the paraphrases: measured on the
    train splits it costs Generality (benchmarks/RESULTS.md), so it is off by default."""
    import random

    rng = random.Random(seed)
    own = [relation_template(r.prompt, r.subject) for r in requests]
    pool = sorted({t for t in own if t is not None})
    out = []
    for i, r in enumerate(requests):
        if not r.subject or count <= 0:
            continue
        n_other = count // 2 if other_relations else 0
        generic = subject_prompts(r.subject, TRAIN_TEMPLATES, count - n_other, offset=i * count)
        others = [t for t in pool if t != own[i]]
        picked = rng.sample(others, min(n_other, len(others)))
        prompts = generic + [fill(t, r.subject) for t in picked]
        out.extend((i, p) for p in dict.fromkeys(prompts))
    return out


def drop_same_relation(continuation: str, answers) -> bool:
    """Whether a same-subject prompt's unedited continuation mentions one of the edit's answers (old or
    new), i.e. the prompt asks the edited relation itself and is no same-subject *negative*."""
    text = continuation.lower()
    return any(a and a.strip().lower() in text for a in answers)
