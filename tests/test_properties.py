"""Property-based tests (hypothesis) over request shapes and config values."""
import dataclasses

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from memoe_fast import MEMoEConfig, MEMoEHyperParams  # noqa: E402
from memoe_fast.bypass import MEMoEBypass  # noqa: E402
from memoe_fast.datasets import DataFormatError, EditRequest  # noqa: E402
from memoe_fast.easyedit import requests_from_dicts  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality", "portability")

text = st.one_of(st.text(max_size=12), st.sampled_from(["", "  ", "Paris", " Danielle Darrieux ", "東京"]))
value = st.one_of(text, st.none(), st.integers(), st.lists(text, max_size=3))
locality = st.one_of(
    st.none(), value,
    st.dictionaries(st.sampled_from(["neighborhood", "forgetfulness", "x"]),
                    st.one_of(value, st.fixed_dictionaries({}, optional={"prompt": value, "ground_truth": value})),
                    max_size=3),
)
request = st.fixed_dictionaries({}, optional={**{f: value for f in FIELDS[:5]}, "locality": locality,
                                              "portability": st.one_of(st.none(), value, st.dictionaries(text, text, max_size=2))})


@SETTINGS
@given(st.lists(request, min_size=1, max_size=4))
def test_request_dicts_convert_or_name_record_and_field(dicts):
    """Any request dicts either become EditRequests with the documented invariants, or raise a
    DataFormatError naming the record and the field; nothing else."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = requests_from_dicts(dicts)
    except DataFormatError as exc:
        msg = str(exc)
        assert msg.startswith("requests: record ") and ("field '" in msg or "must be" in msg), msg
        return
    assert len(out) == len(dicts)
    for req, d in zip(out, dicts):
        assert isinstance(req, EditRequest)
        for s in (req.prompt, req.target, req.subject):
            assert isinstance(s, str) and s and s == s.strip()
        assert req.target == d["target_new"].strip()
        assert all(isinstance(r, str) and r and r == r.strip() for r in req.rephrase)
        assert (req.locality_prompt is None) == (req.locality_answer is None)
        if isinstance(d.get("locality"), dict) and d["locality"]:
            first = next(iter(d["locality"].values()))
            assert req.locality_prompt == first["prompt"].strip()


config_values = st.fixed_dictionaries({}, optional={
    "num_experts": st.integers(-1, 9), "top_k": st.integers(-1, 9), "lr": st.floats(-1, 1, allow_nan=False),
    "steps": st.integers(-2, 50), "scope_threshold": st.floats(-2, 2, allow_nan=False),
    "expert_activation": st.sampled_from(["host", "silu_glu", "gelu", "gelu_tanh", "relu", "tanh"]),
    "gate_bias": st.booleans(), "expert_ffn": st.one_of(st.none(), st.integers(-1, 64)),
    "lr_schedule": st.sampled_from(["cosine", "constant", "linear"]), "anchor_scope": st.booleans(),
})


@SETTINGS
@given(config_values)
def test_config_values_validate_or_round_trip(values):
    try:
        cfg = MEMoEConfig(**values)
    except ValueError as exc:
        assert any(k in str(exc) for k in ("num_experts", "top_k", "lr", "steps", "scope_threshold", "expert_activation",
                                           "expert_ffn", "lr_schedule")), str(exc)
        return
    assert 1 <= cfg.top_k <= cfg.num_experts and cfg.lr > 0 and cfg.steps >= 0
    assert MEMoEConfig.from_json(cfg.to_json()) == cfg


@SETTINGS
@given(config_values, st.sampled_from([{}, {"num_steps": 3}, {"scope": False}, {"experts": 2}, {"layers": [1, 2]}]))
def test_hparams_accept_exactly_the_valid_configs(values, extra):
    data = {"alg_name": "MEMoE", "model_name": "m", "layers": [1], **values, **extra}
    try:
        hp = MEMoEHyperParams.from_dict(data)
    except ValueError as exc:
        assert str(exc).startswith("hparams: ")
        # It fails exactly when the config or an EasyEdit key is invalid.
        alias_twice = ("num_steps" in extra and "steps" in values) or ("scope" in extra and "anchor_scope" in values)
        bad_extra = "experts" in extra or "layers" in extra or alias_twice
        if not bad_extra:
            with pytest.raises(ValueError):
                MEMoEConfig(**values)
        return
    assert hp.to_config() == MEMoEConfig(layer=1, **{**values, **{
        {"num_steps": "steps", "scope": "anchor_scope"}[k]: v for k, v in extra.items()}})


class _Host(nn.Module):
    def __init__(self, d, f, bias):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


shapes = st.fixed_dictionaries({
    "experts": st.integers(1, 5), "k": st.integers(1, 5), "batch": st.integers(1, 3), "length": st.integers(1, 4),
    "d": st.sampled_from([4, 7, 8]), "f": st.sampled_from([3, 6]), "bias": st.booleans(), "gate_bias": st.booleans(),
    "activation": st.sampled_from(["host", "relu", "gelu", "gelu_tanh"]),
})


@SETTINGS
@given(shapes, st.integers(0, 2**16))
def test_bypass_is_the_host_at_init_and_torch_equals_reference(s, seed):
    torch.manual_seed(seed)
    k = min(s["k"], s["experts"])
    host = _Host(s["d"], s["f"], s["bias"])
    cfg = MEMoEConfig(num_experts=s["experts"], top_k=k, anchor_scope=False, expert_activation=s["activation"],
                      gate_bias=s["gate_bias"], impl="torch")
    bypass = MEMoEBypass(host, cfg)
    x, anchors = torch.randn(s["batch"], s["length"], s["d"]), torch.randn(s["batch"], s["d"])
    with torch.no_grad():
        assert torch.equal(bypass(x, anchors), host(x))  # zero down-projections: exactly the host
        for p in bypass.bypass_parameters().values():
            p.add_(torch.randn_like(p) * 0.5)
        got = bypass(x, anchors)
        bypass.impl = "reference"
        torch.testing.assert_close(got, bypass(x, anchors), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_anchors_for_another_batch_size_always_raise(n_anchors, batch, pin):
    host = _Host(8, 6, False)
    bypass = MEMoEBypass(host, MEMoEConfig(num_experts=2, anchor_scope=False, impl="reference"))
    bypass.set_anchors(torch.randn(n_anchors, 8), pin=pin)
    x = torch.randn(batch, 3, 8)
    if n_anchors != batch:
        with pytest.raises(RuntimeError, match="sequences but the input has"):
            bypass(x)
    else:
        bypass(x)
        assert (bypass.pending_anchors is not None) == pin  # unpinned anchors serve one forward


@SETTINGS
@given(st.integers(1, 5), st.sampled_from([3, 5]), st.booleans(), st.booleans(), st.sampled_from(["x_anchor", "anchor_x"]),
       st.integers(1, 9), st.integers(0, 2**16))
def test_from_modules_to_modules_is_bit_exact(experts, f, bias, gate_bias, order, anchor_dim, seed):
    torch.manual_seed(seed)
    d = 8
    host = _Host(d, 6, False)
    mods = nn.ModuleList(_Host(d, f, bias) for _ in range(experts))
    gate = nn.Linear(d + anchor_dim, experts, bias=gate_bias)
    bypass = MEMoEBypass.from_modules(host, gate=gate, experts=mods, gate_input=order,
                                      config=MEMoEConfig(num_experts=experts, top_k=1))
    g2, m2 = bypass.to_modules()
    for a, b in ((gate, g2), (mods, m2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert dataclasses.asdict(bypass.config)["expert_ffn"] == (None if f == 6 else f)
