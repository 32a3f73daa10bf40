"""MEMoEBypass as a drop-in for another MEMoE adapter: from_modules / to_modules / key map, and the
mlp_bias host in every implementation."""
import copy
import os

# The Triton case runs under the interpreter on a machine without CUDA (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.bypass import MEMoEBypass
from memoe_fast.integration import transformer_blocks
from memoe_fast.testing import TOLERANCES, assert_close

D, FF, E = 48, 80, 4


class LlamaExpert(nn.Module):
    def __init__(self, d, f, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class FC(nn.Module):
    def __init__(self, d, f, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, f), nn.Linear(f, d), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GPT2Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj = Conv1D(f, d), Conv1D(d, f)
        for m in (self.c_fc, self.c_proj):
            nn.init.normal_(m.weight, std=0.2)
            nn.init.normal_(m.bias, std=0.1)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class MoEAdapter(nn.Module):
    """A researcher's own MEMoE adapter: ModuleList experts, a Linear gate on cat([x, anchor])."""

    def __init__(self, experts, gate_bias=False, order="x_anchor", top_k=1, anchor_dim=D, n=None):
        super().__init__()
        self.experts = experts
        self.gate = nn.Linear(D + anchor_dim, n or len(experts), bias=gate_bias)
        self.order, self.top_k = order, top_k

    def route(self, x, anchor):
        a = anchor[:, None, :].expand(*x.shape[:-1], anchor.shape[-1])
        z = torch.cat([x, a], -1) if self.order == "x_anchor" else torch.cat([a, x], -1)
        probs = torch.softmax(self.gate(z).float(), -1)
        w, idx = probs.topk(self.top_k, -1)
        return w / w.sum(-1, keepdim=True), idx

    def forward(self, x, anchor):
        w, idx = self.route(x, anchor)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            out = out + (w * (idx == e)).sum(-1, keepdim=True) * expert(x).float()
        return out.to(x.dtype)


class StackedAdapter(MoEAdapter):
    """The same routing over stacked expert tensors (a dict, or transformers' Experts module)."""

    def __init__(self, experts, activation, layout="out_in", **kw):
        n = (experts.down_proj if isinstance(experts, nn.Module) else experts["down_proj"]).shape[0]
        super().__init__(nn.ModuleList(), n=n, **kw)
        self.stacked, self.activation, self.layout = experts, activation, layout

    def forward(self, x, anchor):
        w, idx = self.route(x, anchor)
        flat, wf, idxf = x.reshape(-1, D), w.reshape(-1, self.top_k), idx.reshape(-1, self.top_k)
        if isinstance(self.stacked, nn.Module):
            return self.stacked(flat, idxf, wf.to(x.dtype)).view(x.shape)
        t = self.stacked

        def lin(h, name, e):
            wt = t[name][e] if self.layout == "out_in" else t[name][e].t()
            return F.linear(h, wt, t[name + "_bias"][e] if name + "_bias" in t else None)

        out = torch.zeros_like(flat)
        for e in range(t["down_proj"].shape[0]):
            up = lin(flat, "up_proj", e)
            h = {"relu": F.relu, "gelu": F.gelu}[self.activation](up)
            out = out + (wf * (idxf == e)).sum(-1, keepdim=True) * lin(h, "down_proj", e)
        return out.view(x.shape)


def _host(bias=False):
    torch.manual_seed(1)
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers import LlamaConfig

    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=FF, num_attention_heads=4, mlp_bias=bias))


def _train(adapter, host, steps=3):
    """A few Adam steps so that no weight is at its initial value (down-projections included)."""
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, a = torch.randn(2, 5, D, generator=g), torch.randn(2, D, generator=g)
        loss = (host(x) + adapter(x, a)).pow(2).mean() + adapter.gate(torch.cat([x[:, 0], a], -1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.zero_grad(set_to_none=True)
    return adapter


def _foreign_grads(bypass):
    return bypass.foreign_state_dict({n: p.grad for n, p in bypass.bypass_parameters().items()})


def _exact_or_close(name, actual, expected, exact):
    if exact:
        assert torch.equal(actual, expected), f"{name}: max abs err {(actual - expected).abs().max().item():.3g}"
    else:
        assert_close(name, actual, expected, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", [
    pytest.param(dict(top_k=1, order="x_anchor", gate_bias=False), id="top1-x_anchor"),
    pytest.param(dict(top_k=2, order="x_anchor", gate_bias=False), id="top2-x_anchor"),
    pytest.param(dict(top_k=1, order="anchor_x", gate_bias=True), id="top1-anchor_x-gatebias"),
])
def test_ported_adapter_matches_outputs_and_gradients(case):
    """Top-1: outputs and every gradient identical (the gate's weight is exactly 1); top-2: within fp32
    rounding (the gate's product is summed in another order)."""
    host = _host()
    adapter = _train(MoEAdapter(nn.ModuleList(LlamaExpert(D, FF) for _ in range(E)), gate_bias=case["gate_bias"],
                                order=case["order"], top_k=case["top_k"]), host)
    cfg = MEMoEConfig(num_experts=E, top_k=case["top_k"], impl="reference", anchor_scope=False)
    bypass = MEMoEBypass.from_modules(host, gate=adapter.gate, experts=adapter.experts, config=cfg,
                                      gate_input=case["order"])
    x, anchors = torch.randn(3, 6, D), torch.randn(3, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = bypass(xa, anchors)
    theirs = host(xb) + adapter(xb, anchors)
    exact = case["top_k"] == 1 and case["order"] == "x_anchor"
    _exact_or_close("out", ours, theirs, exact or case["top_k"] == 1)
    with torch.no_grad():  # the adapter's own forward(x, anchor), swapped in one line
        _exact_or_close("moe_output", bypass.moe_output(x, anchors), adapter(x, anchors), exact or case["top_k"] == 1)
    grad_out = torch.randn_like(ours)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    _exact_or_close("dx", xa.grad, xb.grad, exact)
    grads = _foreign_grads(bypass)
    for key, p in adapter.state_dict(keep_vars=True).items():
        if key.startswith("gate.") and case["top_k"] == 1:
            continue  # top-1 renormalised: the gate's gradient is p/p rounding noise in both
        _exact_or_close(f"d{key}", grads[key], p.grad, exact)


def test_port_keeps_anchors_through_apply_memoe_saves_reloads_exports(tmp_path):
    """The must-show path: a trained adapter in a model via apply_memoe with the caller's anchors,
    saved, reloaded into a fresh port, exported back bit-exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    host = transformer_blocks(model)[1].mlp
    adapter = _train(MoEAdapter(nn.ModuleList(LlamaExpert(D, FF) for _ in range(E))), host)
    trained = copy.deepcopy(adapter.state_dict())
    ids = torch.randint(0, 1000, (2, 7))
    mine = torch.randn(2, D)
    hook = host.register_forward_hook(lambda m, i, out: out + adapter(i[0], mine))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    hook.remove()

    cfg = MEMoEConfig(layer=1, num_experts=E, impl="reference", anchor_scope=False)
    bypass = MEMoEBypass.from_modules(host, gate=adapter.gate, experts=adapter.experts, config=cfg)
    handle = apply_memoe(model, bypass=bypass)
    assert handle.anchor_mode == "manual" and transformer_blocks(model)[1].mlp is bypass
    bypass.set_anchors(mine)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    handle.save(str(tmp_path / "edit"))
    handle.remove()

    fresh = MoEAdapter(nn.ModuleList(LlamaExpert(D, FF) for _ in range(E)))  # other weights
    bypass2 = MEMoEBypass.from_modules(host, gate=fresh.gate, experts=fresh.experts, config=cfg)
    handle2 = apply_memoe(model, bypass=bypass2)
    handle2.load_weights(str(tmp_path / "edit"))
    with torch.no_grad(), handle2.anchored(anchors=mine):
        assert torch.equal(model(input_ids=ids).logits, expected)
    gate, experts = bypass2.to_modules()
    exported = {**{f"gate.{k}": v for k, v in gate.state_dict().items()},
                **{f"experts.{k}": v for k, v in experts.state_dict().items()}}
    assert exported.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(exported[k], v) and exported[k].dtype == v.dtype, k
    assert isinstance(experts[0], LlamaExpert) and experts[0] is not fresh.experts[0]
    handle2.remove()

    # A plain apply_memoe with the saved config loads the same edit too (no adapter needed).
    from memoe_fast.integration import read_edit_meta

    handle3 = apply_memoe(model, MEMoEConfig.from_dict(read_edit_meta(str(tmp_path / "edit"))["config"]))
    handle3.load_weights(str(tmp_path / "edit"))
    with torch.no_grad(), handle3.anchored(anchors=mine):
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_load_state_dict_of_a_foreign_checkpoint_and_bypass_only():
    host = _host()
    adapter = _train(MoEAdapter(nn.ModuleList(LlamaExpert(D, FF) for _ in range(E)), gate_bias=True), host)
    other = MoEAdapter(nn.ModuleList(LlamaExpert(D, FF) for _ in range(E)), gate_bias=True)
    cfg = MEMoEConfig(num_experts=E, impl="reference", anchor_scope=False)
    bypass = MEMoEBypass.from_modules(host, gate=other.gate, experts=other.experts, config=cfg)
    x, anchors = torch.randn(2, 5, D), torch.randn(2, D)
    bypass.load_state_dict(adapter.state_dict())  # the adapter's own names, through the key map
    assert torch.equal(bypass(x, anchors), host(x) + adapter(x, anchors))
    rows = bypass.key_map()
    assert {"key": "experts.2.up_proj.weight", "foreign_index": "[]", "param": "w3", "param_index": "[2]",
            "transpose": False} in rows
    assert {r["key"] for r in rows} == set(adapter.state_dict())
    # bypass_state_dict has no host weights; loading it (strict) leaves the host as it is.
    own = bypass.bypass_state_dict()
    assert not any(k.startswith("base_layer") for k in own) and "b_gate" in own
    host_before = copy.deepcopy(host.state_dict())
    fresh = MEMoEBypass.from_modules(host, gate=other.gate, experts=other.experts, config=cfg)
    fresh.load_state_dict(own)
    assert torch.equal(fresh(x, anchors), bypass(x, anchors))
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in host_before.items())
    with pytest.raises(KeyError, match="missing keys"):
        fresh.load_foreign_state_dict({"gate.weight": adapter.gate.weight})


def _qwen_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    ex = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=24, num_experts=E))
    nn.init.normal_(ex.gate_up_proj, std=0.2)
    nn.init.normal_(ex.down_proj, std=0.2)
    return ex


def _stacked_dict(layout):
    g = torch.Generator().manual_seed(5)
    t = {"up_proj": torch.randn(E, 24, D, generator=g) * 0.2, "up_proj_bias": torch.randn(E, 24, generator=g) * 0.1,
         "down_proj": torch.randn(E, D, 24, generator=g) * 0.2, "down_proj_bias": torch.randn(E, D, generator=g) * 0.1}
    if layout == "in_out":
        t = {k: v.transpose(-1, -2).contiguous() if v.dim() == 3 else v for k, v in t.items()}
    return t


LAYOUTS = [
    pytest.param(lambda: MoEAdapter(nn.ModuleList(LlamaExpert(D, 24, bias=True) for _ in range(E)), gate_bias=True),
                 {}, id="llama-list-bias-F24"),
    pytest.param(lambda: MoEAdapter(nn.ModuleList(MixtralExpert(D, FF) for _ in range(E)), order="anchor_x"),
                 {"gate_input": "anchor_x"}, id="mixtral-w1w3w2-anchor_x"),
    pytest.param(lambda: MoEAdapter(nn.ModuleList(FC(D, 32, nn.ReLU()) for _ in range(E))), {}, id="fc1fc2-relu"),
    pytest.param(lambda: MoEAdapter(nn.ModuleList(GPT2Expert(D, 32) for _ in range(E)), top_k=2), {},
                 id="gpt2-conv1d-gelu_tanh-top2"),
    pytest.param(lambda: MoEAdapter(nn.ModuleList(nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
                                                  for _ in range(E)), anchor_dim=8), {}, id="sequential-gelu-A8"),
    pytest.param(lambda: StackedAdapter(_qwen_experts(), "silu_glu", top_k=2), {}, id="qwen3moe-stacked-module"),
    pytest.param(lambda: StackedAdapter(_stacked_dict("in_out"), "relu", layout="in_out"),
                 {"activation": "relu"}, id="dict-in_out-relu-bias"),
    pytest.param(lambda: StackedAdapter(_stacked_dict("out_in"), "gelu", gate_bias=True),
                 {"activation": "gelu", "layout": "out_in"}, id="dict-out_in-gelu"),
]


@pytest.mark.parametrize("make, kwargs", LAYOUTS)
def test_from_modules_layouts_match_and_export_back(make, kwargs):
    host = _host()
    adapter = make()
    experts = adapter.stacked if isinstance(adapter, StackedAdapter) else adapter.experts
    cfg = MEMoEConfig(num_experts=E, top_k=adapter.top_k, impl="reference", anchor_scope=False)
    bypass = MEMoEBypass.from_modules(host, gate=adapter.gate, experts=experts, config=cfg, **kwargs)
    x, anchors = torch.randn(2, 5, D), torch.randn(2, adapter.gate.in_features - D)
    with torch.no_grad():
        assert_close("out", bypass(x, anchors), host(x) + adapter(x, anchors), *TOLERANCES[torch.float32])
    # Every weight moves, then comes back bit-exact through to_modules and the key map.
    with torch.no_grad():
        for p in bypass.bypass_parameters().values():
            p.add_(0.01)
    gate, exported = bypass.to_modules()
    bypass.load_state_dict({f"gate.{k}": v for k, v in adapter.gate.state_dict().items()}
                           | _experts_state(experts))
    with torch.no_grad():
        assert_close("out after reload", bypass(x, anchors), host(x) + adapter(x, anchors), *TOLERANCES[torch.float32])
    for k, v in gate.state_dict().items():
        assert torch.equal(v, adapter.gate.state_dict()[k] + 0.01), k
    for k, v in _experts_state(exported).items():
        assert torch.equal(v, _experts_state(experts)[k] + 0.01), k


def _experts_state(experts):
    if isinstance(experts, dict):
        return {f"experts.{k}": v for k, v in experts.items()}
    return {f"experts.{k}": v for k, v in experts.state_dict().items()}


@pytest.mark.parametrize("make, kwargs, message", [
    pytest.param(lambda: nn.ModuleList(nn.Linear(D, D) for _ in range(E)), {}, "none of the known layouts", id="unknown"),
    pytest.param(lambda: nn.ModuleList(FC(D, 16, nn.Tanh()) for _ in range(E)), {}, "pass activation=", id="no-act"),
    pytest.param(lambda: nn.ModuleList(LlamaExpert(D, 16) for _ in range(E)), {"activation": "relu"}, "does not fit",
                 id="glu-as-relu"),
    pytest.param(lambda: nn.ModuleList(LlamaExpert(D + 1, 16) for _ in range(E)), {}, "hidden size 48", id="width"),
    pytest.param(lambda: nn.ModuleList(LlamaExpert(D, 16) for _ in range(E + 1)), {}, "4 outputs but there are 5",
                 id="count"),
    pytest.param(lambda: {"up_proj": torch.zeros(E, D, D), "down_proj": torch.zeros(E, D, D)}, {"activation": "relu"},
                 "F == D", id="ambiguous"),
    pytest.param(lambda: {"up_proj": torch.zeros(E, 8, D), "down_proj": torch.zeros(E, D, 8), "scale": torch.zeros(E)},
                 {"activation": "relu"}, "not understood", id="extra-tensor"),
])
def test_from_modules_errors_name_the_problem(make, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        MEMoEBypass.from_modules(_host(), gate=nn.Linear(2 * D, E), experts=make(), **kwargs)


def test_to_modules_needs_a_ported_bypass():
    bypass = MEMoEBypass(_host(), MEMoEConfig(num_experts=E))
    with pytest.raises(RuntimeError, match="from_modules"):
        bypass.to_modules()


IMPLS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["host", "relu", "gelu"])
def test_mlp_bias_host_equals_reference_in_every_impl(impl, activation):
    """LLaMA with mlp_bias=True: up_proj's bias reaches the experts (b3), in every implementation."""
    host = _host(bias=True)
    cfg = MEMoEConfig(num_experts=E, top_k=2, anchor_scope=False, expert_activation=activation, gate_bias=True)
    bypass = MEMoEBypass(host, cfg)
    names = set(bypass.bypass_parameters())
    assert {"b1", "b2", "b_gate"} <= names and (("b3" in names) == (activation == "host"))
    with torch.no_grad():
        for p in bypass.bypass_parameters().values():
            p.add_(torch.randn_like(p) * 0.2)
    x, anchors = torch.randn(2, 5, D), torch.randn(2, D)
    if activation == "host":
        # The host's own function: with copies of its weights and a zero gate on one expert, the bypass
        # adds host(x) once more, up_proj's bias included.
        twin = MEMoEBypass(host, MEMoEConfig(num_experts=1, anchor_scope=False, impl=impl))
        with torch.no_grad():
            twin.w2.copy_(host.down_proj.weight[None])
            twin.b2.copy_(host.down_proj.bias[None])
            assert_close("2 host", twin(x, anchors), 2 * host(x), *TOLERANCES[torch.float32])
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = []
    for impl_, xi in zip(("reference", impl), xs):
        bypass.impl = impl_
        bypass.zero_grad()
        out = bypass(xi, anchors)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad, {n: p.grad.clone() for n, p in bypass.bypass_parameters().items()}))
    (ref, ref_dx, ref_g), (got, dx, g) = outs
    assert_close("out", got, ref, *TOLERANCES[torch.float32])
    assert_close("dx", dx, ref_dx, *TOLERANCES[torch.float32])
    for name in ref_g:
        assert_close(f"d{name}", g[name], ref_g[name], *TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", ["silu_glu", "gelu", "gelu_tanh", "relu"])
def test_expert_activation_on_every_host(tiny_model, activation):
    """Any expert activation on a LLaMA or a GPT-2 host: the base model at init, torch == reference after."""
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, impl="torch", top_k=2, anchor_scope=False,
                                                 expert_activation=activation))
    bypass = handle.bypass
    assert bypass.activation == activation and (bypass.w3 is not None) == (activation == "silu_glu")
    anchors = torch.randn(2, bypass.anchor_dim)
    with torch.no_grad(), handle.anchored(anchors=anchors):
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, base, rtol=0, atol=0)
        for p in bypass.bypass_parameters().values():
            p.add_(torch.randn_like(p) * 0.2)
        fast = tiny_model(input_ids=ids).logits
        handle.set_impl("reference")
        assert_close("logits", fast, tiny_model(input_ids=ids).logits, *TOLERANCES[torch.float32])
    assert not torch.allclose(fast, base)


def test_unedited_model_checkpoint_loads_into_the_edited_model(tiny_model):
    """model.load_state_dict(the unedited model's state dict) reaches the host MLP under the bypass and
    leaves the bypass as it is."""
    base_sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    handle = apply_memoe(tiny_model, MEMoEConfig(layer=1, anchor_scope=False))
    bypass_before = {k: v.clone() for k, v in handle.bypass.bypass_state_dict().items()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(0.5)
    missing, unexpected = tiny_model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("mlp.w" in k or "mlp.b" in k for k in missing), (missing, unexpected)
    for k, v in transformer_blocks(tiny_model)[1].mlp.base_layer.state_dict().items():
        assert torch.equal(v, base_sd[f"{_mlp_prefix(tiny_model)}.{k}"]), k
    for k, v in handle.bypass.bypass_state_dict().items():
        assert torch.equal(v, bypass_before[k] * 0.5), k  # untouched by the load (only by the scaling)


def _mlp_prefix(model):
    return "model.layers.1.mlp" if hasattr(model, "model") else "transformer.h.1.mlp"
