"""Knowledge anchors: which entities, which vectors, which scope."""
import pytest
import torch

from memoe_fast.anchors import SPACY_MODELS, AnchorBank
from memoe_fast.testing import require

# The entity spans below are what this spaCy model finds; another model (or version) may find others.
PINNED_SPACY = "3.8.0"


@pytest.fixture(scope="module")
def nlp():
    """spaCy's small English model at the pinned version, under either name the library loads it by."""
    import spacy

    for name in SPACY_MODELS:
        try:
            loaded = spacy.load(name, disable=["lemmatizer"])
        except OSError:
            continue
        if loaded.meta.get("version") == PINNED_SPACY:
            return loaded
    require(False, f"spaCy model {' or '.join(SPACY_MODELS)} version {PINNED_SPACY} (the NER spans are pinned to it)")


@pytest.fixture
def bank(embedded, nlp):
    model, tokenizer = embedded
    return AnchorBank(tokenizer, model.get_input_embeddings(), nlp=nlp)


def test_ner_finds_the_entity(bank):
    assert bank.entity_spans("What is the product made by UniFirst?") == [("UniFirst", 28, 36)]


def test_dates_and_numbers_are_not_anchors(bank):
    ents = [e for e, _, _ in bank.entity_spans("In 1991 Apple sold two million computers.")]
    assert "Apple" in ents and "1991" not in ents and "two million" not in ents


def test_edited_subjects_come_first_and_match_case_insensitively(bank):
    bank.add_subjects(["unifirst"])
    assert [e for e, _, _ in bank.entity_spans("Who owns UniFirst today, asked Paris?")] == ["UniFirst"]


def test_fallbacks_subject_then_noun_chunks_then_text(bank):
    text = "what does the small red cat eat"
    assert bank.entity_spans(text, subject="red cat")[0][0] == "red cat"
    assert [e for e, _, _ in bank.entity_spans(text)] == ["what", "the small red cat"]
    assert bank.entity_spans("eat") == [("eat", 0, 3)]


def test_same_entity_gives_the_same_anchor_anywhere(bank):
    a = bank(["Angela Merkel was born in", "Where was Angela Merkel born?"])
    assert a.entities == [["Angela Merkel"], ["Angela Merkel"]]
    torch.testing.assert_close(a.vectors[0], a.vectors[1])
    assert a.vectors[0].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)  # unit RMS


def test_positions_pooling_uses_the_tokens_of_the_input(embedded, nlp):
    """``positions`` pools the input's own tokens of the entity: mid-sentence they are the tokens of
    `` Angela Merkel`` (the canonical vector); at the start of a text, those of ``Angela Merkel`` without
    the space, which BPE splits differently."""
    model, tokenizer = embedded
    emb = model.get_input_embeddings().weight.detach().float()
    canonical = AnchorBank(tokenizer, model.get_input_embeddings(), nlp=nlp)
    positions = AnchorBank(tokenizer, model.get_input_embeddings(), pooling="positions", nlp=nlp)
    mid, start = "Where was Angela Merkel born?", "Angela Merkel was born in"
    torch.testing.assert_close(positions([mid]).vectors[0], canonical([mid]).vectors[0], rtol=0, atol=0)

    def unit_rms(v):
        return v / v.pow(2).mean().sqrt()

    bare = tokenizer("Angela Merkel", add_special_tokens=False)["input_ids"]
    spaced = tokenizer(" Angela Merkel", add_special_tokens=False)["input_ids"]
    assert bare != spaced
    torch.testing.assert_close(positions([start]).vectors[0], unit_rms(emb[bare].mean(0)))
    torch.testing.assert_close(canonical([start]).vectors[0], unit_rms(emb[spaced].mean(0)))


def test_scope_matches_edited_subjects_only(bank):
    bank.add_subjects(["Angela Merkel"])
    a = bank(["Where was Angela Merkel born?", "Who wrote Hamlet?", "Tell me about the weather."])
    assert a.scope.tolist() == [True, False, False]
    bank.add_subjects(["Hamlet"])  # a text is in scope when it matches any one of the keys
    a = bank(["Where was Angela Merkel born?", "Who wrote Hamlet?", "Tell me about the weather."])
    assert a.scope.tolist() == [True, True, False]


def test_ner_is_cached_per_text(embedded, nlp):
    model, tokenizer = embedded
    calls = []

    def counting(text):
        calls.append(text)
        return nlp(text)

    bank = AnchorBank(tokenizer, model.get_input_embeddings(), nlp=counting)
    bank(["Who founded Microsoft?"] * 3)
    bank(["Who founded Microsoft?"])
    assert calls == ["Who founded Microsoft?"]
