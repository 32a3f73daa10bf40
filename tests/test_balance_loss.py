"""The Switch-Transformer balance loss ``E · Σ_e f_e · P_e`` on hand-computed cases: ``f_e`` is the
fraction of the T·k routing slots that go to expert e, ``P_e`` the mean gate probability of e."""
import pytest
import torch

from memoe_fast.ops import load_balance_loss


def test_perfect_balance_is_one_for_any_k():
    probs = torch.full((2, 4), 0.25)
    assert load_balance_loss(probs, torch.tensor([[0, 1], [2, 3]]), 4).item() == pytest.approx(1.0)
    assert load_balance_loss(torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]), 4).item() == pytest.approx(1.0)


def test_collapse_onto_one_expert_is_e():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert load_balance_loss(probs, torch.tensor([[0], [0]]), 3).item() == pytest.approx(3.0)


def test_hand_computed_top2():
    # Slots: expert 0 three times, expert 1 once, expert 2 twice, of 6 -> f = (1/2, 1/6, 1/3).
    experts = torch.tensor([[0, 2], [0, 1], [2, 0]])
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.6, 0.3, 0.1], [0.4, 0.1, 0.5]])  # P = (0.5, 0.2, 0.3)
    want = 3 * (0.5 * 0.5 + 0.2 / 6 + 0.3 / 3)
    assert load_balance_loss(probs, experts, 3).item() == pytest.approx(want, rel=1e-6)


def test_no_tokens_gives_zero_with_a_gradient_path():
    probs = torch.zeros(0, 4, requires_grad=True)
    loss = load_balance_loss(probs, torch.zeros(0, 1, dtype=torch.long), 4)
    assert loss.item() == 0.0 and loss.requires_grad
