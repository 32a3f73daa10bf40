"""The metric definitions pinned on hand-computed cases (a toy tokenizer and a rule-based toy model)."""
from types import SimpleNamespace

import pytest
import torch

from memoe_fast.datasets import EditRequest
from memoe_fast.metrics import collate, encode_pair, evaluate, predict_targets

VOCAB = 32


class WordTokenizer:
    """Each whitespace-separated integer is one token; pad id 0."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


class RuleModel(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t``, except after tokens listed in ``overrides``."""

    def __init__(self, overrides=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.overrides = overrides or {}

    def forward(self, input_ids, attention_mask=None, **_):
        nxt = (input_ids + 1) % VOCAB
        for src, dst in self.overrides.items():
            nxt = torch.where(input_ids == src, torch.full_like(nxt, dst), nxt)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, VOCAB).float())


def test_encode_pair_splits_after_the_prompt():
    assert encode_pair(WordTokenizer(), "5 6 7", "8 10") == ([5, 6, 7], [8, 10])


class MergingTokenizer(WordTokenizer):
    """Like WordTokenizer, with a BOS token (1) and a merge across words: ``7 8`` is one token, 78."""

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        merged = []
        for i in ids:
            if merged and merged[-1] == 7 and i == 8:
                merged[-1] = 78
            else:
                merged.append(i)
        return {"input_ids": ([1] if add_special_tokens else []) + merged}


def test_encode_pair_tokenises_apart_where_the_boundary_merges():
    tok = MergingTokenizer()
    # "5 6 7 8 10" tokenises as [1, 5, 6, 78, 10]: its start is not the prompt's [1, 5, 6, 7].
    assert encode_pair(tok, "5 6 7", "8 10") == ([1, 5, 6, 7], [8, 10])
    # No merge: split after the prompt (the target gets no BOS either way).
    assert encode_pair(tok, "5 6 9", " 8 10 ") == ([1, 5, 6, 9], [8, 10])


def test_collate_positions_predict_the_targets():
    batch = collate([([5, 6, 7], [8, 10]), ([3], [4])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 10], [3, 4, 0, 0, 0]]
    assert batch.pred_pos.tolist() == [[2, 3], [0, 0]]
    assert batch.target_mask.tolist() == [[True, True], [True, False]]


def test_teacher_forced_accuracy_by_hand():
    # After 7 the model says 8 (right), after 8 it says 9 (target 10: wrong) -> 0.5.
    preds = predict_targets(RuleModel(), WordTokenizer(), ["5 6 7", "3"], ["8 10", "4"])
    assert [p.tolist() for p, _ in preds] == [[8, 9], [4]]


def test_evaluate_reliability_generality_locality_by_hand():
    reqs = [
        # Reliability 1/2 (8 right, 10 wrong); paraphrases: "1 7" -> [8, 9] vs [8, 10]: 1/2, "2" -> [3, 4]: 0/2.
        EditRequest("5 6 7", "8 10", rephrase=["1 7", "2"], locality_prompt="20", locality_answer="21 22 23"),
        # Reliability 1 (4 right); no paraphrase (generality None); locality below.
        EditRequest("3", "4", locality_prompt="11", locality_answer="12 9"),
    ]
    pre_model = RuleModel()
    pre = evaluate(pre_model, WordTokenizer(), reqs)
    assert pre["reliability"] == pytest.approx((0.5 + 1.0) / 2)
    assert pre["per_example"][0]["generality"] == pytest.approx((0.5 + 0.0) / 2)
    assert pre["per_example"][1]["generality"] is None
    assert pre["generality"] == pytest.approx(0.25)  # mean over examples that have paraphrases
    assert pre["locality"] == 1.0  # against itself
    # Post model: after 22 it says 0 instead of 23; after 12 it says 5 instead of 13.
    from memoe_fast.metrics import locality_tokens

    pre_loc = locality_tokens(pre_model, WordTokenizer(), reqs)
    assert [t.tolist() for t in pre_loc] == [[21, 22, 23], [12, 13]]
    post = evaluate(RuleModel({22: 0, 12: 5}), WordTokenizer(), reqs, pre_locality=pre_loc)
    # Locality: example 1 positions predict after 20, 21, 22 -> [21, 22, 0] vs [21, 22, 23]: 2/3;
    # example 2 after 11, 12 -> [12, 5] vs [12, 13]: 1/2.
    assert post["per_example"][0]["locality"] == pytest.approx(2 / 3)
    assert post["per_example"][1]["locality"] == pytest.approx(1 / 2)
    assert post["locality"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert post["reliability"] == pre["reliability"]
