"""Knowledge anchors: which entities, which vectors, which scope."""
import pytest
import torch

from memoe_fast.anchors import AnchorBank


@pytest.fixture
def bank(embedded):
    model, tokenizer = embedded
    return AnchorBank(tokenizer, model.get_input_embeddings())


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


def test_positions_pooling_uses_the_offset_mapping(embedded):
    model, tokenizer = embedded
    bank = AnchorBank(tokenizer, model.get_input_embeddings(), pooling="positions")
    text = "Where was Angela Merkel born?"
    got = bank([text]).vectors[0]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index("Angela")
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len("Angela Merkel") and b > start]
    rows = model.get_input_embeddings().weight[[enc["input_ids"][i] for i in pos]].float().mean(0)
    torch.testing.assert_close(got, rows / rows.pow(2).mean().sqrt())


def test_scope_matches_edited_subjects_only(bank):
    bank.add_subjects(["Angela Merkel"])
    a = bank(["Where was Angela Merkel born?", "Who wrote Hamlet?", "Tell me about the weather."])
    assert a.scope.tolist() == [True, False, False]


def test_ner_is_cached_per_text(embedded):
    model, tokenizer = embedded
    calls = []
    from memoe_fast.anchors import load_spacy

    nlp = load_spacy()

    def counting(text):
        calls.append(text)
        return nlp(text)

    bank = AnchorBank(tokenizer, model.get_input_embeddings(), nlp=counting)
    bank(["Who founded Microsoft?"] * 3)
    bank(["Who founded Microsoft?"])
    assert calls == ["Who founded Microsoft?"]
