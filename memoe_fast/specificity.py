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


def subject_prompts(subject: str, templates, count: int, offset: int = 0) -> list[str]:
    """``count`` prompts about ``subject`` from ``templates``, starting at ``offset`` (rotating, so that a
    set of edits covers every template)."""
    if not subject or count <= 0:
        return []
    n = len(templates)
    return [templates[(offset + j) % n].format(s=subject) for j in range(min(count, n))]


def drop_same_relation(continuation: str, answers) -> bool:
    """Whether a same-subject prompt's unedited continuation mentions one of the edit's answers (old or
    new), i.e. the prompt asks the edited relation itself and is no same-subject *negative*."""
    text = continuation.lower()
    return any(a and a.strip().lower() in text for a in answers)
