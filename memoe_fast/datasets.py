"""Edit requests and their loaders (ZsRE and CounterFact in EasyEdit format, CounterFact in ROME format)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EditRequest:
    """One fact to edit.

    ``prompt`` + " " + ``target`` is what the edited model must produce; ``rephrase`` are paraphrases
    of the prompt (Generality); ``locality_prompt`` / ``locality_answer`` an unrelated prompt and its
    answer, teacher-forced to compare the edited model with the unedited one (Locality).
    """

    prompt: str
    target: str
    subject: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    ground_truth: str | None = None
    case_id: str | None = None


class DataFormatError(ValueError):
    """A malformed data file or record; the message names the file, the record index and the field."""
