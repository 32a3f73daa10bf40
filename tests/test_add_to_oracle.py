"""``MEMoEBypass.add_to`` against an oracle written as plain loops over tokens.

The oracle shares nothing with the module or the ops: for every token it finds its sequence (the row
of a ``(S, L, D)`` input, or ``token_seq`` for a packed row), leaves it alone when its sequence is out
of the edit scope, else scores every expert on ``concat(token, anchor)``, picks the top k, and adds
``λ · Σ g_e · expert_e(token)`` to the given output row. Computed in float64 from the module's weights.
"""
import math

import pytest
import torch
from transformers import GPT2Config, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from memoe_fast import MEMoEConfig
from memoe_fast.bypass import MEMoEBypass
from memoe_fast.testing import TOLERANCES, assert_close

D, F, A = 12, 20, 8  # hidden, ffn, anchor width


def _host(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))
    return GPT2MLP(F, GPT2Config(n_embd=D, n_head=2, activation_function="gelu_new"))


def _bypass(kind: str, **cfg) -> MEMoEBypass:
    bypass = MEMoEBypass(_host(kind), MEMoEConfig(**cfg), anchor_dim=A)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking experts: the down-projections start at zero
        for p in bypass.bypass_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return bypass.eval()


def _act(h: float, kind: str) -> float:
    if kind == "llama":
        return h / (1.0 + math.exp(-h))
    return 0.5 * h * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def _expert(bp: MEMoEBypass, e: int, x: list[float], kind: str) -> list[float]:
    def rows(p):
        return None if p is None else p[e].detach().double().tolist()

    w1, w2, w3, b1, b2 = rows(bp.w1), rows(bp.w2), rows(bp.w3), rows(bp.b1), rows(bp.b2)
    hid = []
    for f in range(F):
        h = sum(w1[f][d] * x[d] for d in range(D)) + (b1[f] if b1 is not None else 0.0)
        if w3 is not None:
            hid.append(_act(h, kind) * sum(w3[f][d] * x[d] for d in range(D)))
        else:
            hid.append(_act(h, kind))
    return [sum(w2[d][f] * hid[f] for f in range(F)) + (b2[d] if b2 is not None else 0.0) for d in range(D)]


def oracle(bp: MEMoEBypass, x: torch.Tensor, out: torch.Tensor, anchors: torch.Tensor,
           scope: list[bool] | None, token_seq: list[int] | None, kind: str) -> torch.Tensor:
    cfg = bp.config
    xs = x.reshape(-1, D).double().tolist()
    rows = out.reshape(-1, D).double().tolist()
    per_seq = len(xs) // x.shape[0] if x.dim() == 3 else len(xs)
    gate = bp.w_gate.detach().double().tolist()
    for t, tok in enumerate(xs):
        s = token_seq[t] if token_seq is not None else t // per_seq
        if cfg.anchor_scope and scope is not None and not scope[s]:
            continue
        feat = tok + anchors[s].double().tolist()
        logits = [sum(w * v for w, v in zip(gate[e], feat)) for e in range(cfg.num_experts)]
        top = max(logits)
        z = sum(math.exp(v - top) for v in logits)
        probs = [math.exp(v - top) / z for v in logits]
        chosen = sorted(range(cfg.num_experts), key=lambda e: -probs[e])[: cfg.top_k]
        weights = [probs[e] for e in chosen]
        if cfg.renormalize:
            weights = [w / sum(weights) for w in weights]
        for w, e in zip(weights, chosen):
            y = _expert(bp, e, tok, kind)
            for d in range(D):
                rows[t][d] += cfg.scale * w * y[d]
    return torch.tensor(rows, dtype=torch.float64).view(out.shape)


def _check(bp, x, out, anchors, scope, token_seq, kind):
    bp.set_anchors(anchors, None if scope is None else torch.tensor(scope),
                   None if token_seq is None else torch.tensor(token_seq))
    with torch.no_grad():
        got = bp.add_to(x, out)
    want = oracle(bp, x, out, anchors, scope, token_seq, kind)
    assert_close("add_to", got, want, *TOLERANCES[torch.float32])
    return got


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("top_k,renormalize,scale", [(1, True, 0.37), (2, False, 2.5), (3, True, 1.0)],
                         ids=["k1-lambda0.37", "k2-norenorm-lambda2.5", "k3-lambda1"])
def test_padded_rows_with_scope(impl, kind, top_k, renormalize, scale):
    bp = _bypass(kind, num_experts=4, top_k=top_k, renormalize=renormalize, scale=scale, impl=impl)
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)
    anchors = torch.randn(3, A, generator=g)
    got = _check(bp, x, out, anchors, [True, False, True], None, kind)
    assert torch.equal(got[1], out[1]), "an out-of-scope sequence must come back bit for bit"
    assert not torch.allclose(got[0], out[0]), "in-scope rows must change (the oracle check is not vacuous)"


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_row_with_token_seq(impl, kind):
    """Several sequences in one row, unequal lengths, interleaved scope."""
    bp = _bypass(kind, num_experts=3, top_k=2, scale=0.6, impl=impl)
    g = torch.Generator().manual_seed(3)
    token_seq = [0] * 4 + [1] * 2 + [2] * 5 + [3] * 1
    x, out = torch.randn(1, len(token_seq), D, generator=g), torch.randn(1, len(token_seq), D, generator=g)
    anchors = torch.randn(4, A, generator=g)
    got = _check(bp, x, out, anchors, [False, True, False, True], token_seq, kind)
    out_rows = [t for t, s in enumerate(token_seq) if s in (0, 2)]
    assert torch.equal(got[0, out_rows], out[0, out_rows])


def test_scope_off_routes_every_sequence():
    bp = _bypass("llama", num_experts=4, top_k=1, scale=0.8, anchor_scope=False, impl="torch")
    g = torch.Generator().manual_seed(4)
    x, out = torch.randn(2, 3, D, generator=g), torch.randn(2, 3, D, generator=g)
    got = _check(bp, x, out, torch.randn(2, A, generator=g), [False, False], None, "llama")
    assert not torch.allclose(got[1], out[1])


def test_nothing_in_scope_returns_the_output_unchanged():
    bp = _bypass("llama", num_experts=2, impl="torch")
    x, out = torch.randn(2, 3, D), torch.randn(2, 3, D)
    got = _check(bp, x, out, torch.randn(2, A), [False, False], None, "llama")
    assert torch.equal(got, out)


def test_lambda_scales_the_bypass_linearly():
    """The bypass term ``add_to(x, out) - out`` is proportional to λ (same weights, same routing)."""
    g = torch.Generator().manual_seed(5)
    x, out, anchors = torch.randn(2, 4, D, generator=g), torch.randn(2, 4, D, generator=g), torch.randn(2, A, generator=g)
    deltas = {}
    for scale in (1.0, 0.25, 3.0):
        bp = _bypass("llama", num_experts=4, top_k=2, scale=scale, impl="torch")
        bp.set_anchors(anchors)
        with torch.no_grad():
            deltas[scale] = bp.add_to(x, out).double() - out.double()
    assert deltas[1.0].abs().max() > 0.1
    for scale in (0.25, 3.0):
        assert_close(f"delta(λ={scale})", deltas[scale], scale * deltas[1.0], *TOLERANCES[torch.float32])


def test_input_must_match_the_anchors():
    bp = _bypass("llama", impl="torch")
    bp.set_anchors(torch.randn(2, A))
    with pytest.raises(RuntimeError, match="anchors were given for 2 sequences but the input has 3"):
        bp.add_to(torch.randn(3, 4, D), torch.randn(3, 4, D))
    bp.set_anchors(torch.randn(2, A), token_seq=torch.tensor([0, 0, 1]))
    with pytest.raises(RuntimeError, match="token_seq has 3 entries but the input has 4 tokens"):
        bp.add_to(torch.randn(1, 4, D), torch.randn(1, 4, D))
