"""Every config the autotuner can choose, forward and every gradient against the reference.

The other kernel tests run one small tile; here each selectable config of every launch site (kept by
the pruner on at least one target GPU) is pinned in turn. On CPU the kernels run under the Triton
interpreter (set before triton is imported), at tiny shapes with ragged edges: D and F not multiples
of any tile, E not a power of two, an expert without tokens, k = 1 and 2.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from memoe_fast.ops import triton_path  # noqa: E402
from memoe_fast.ops.reference import moe_bypass_reference  # noqa: E402
from memoe_fast.ops.triton_path import SITES, moe_bypass_triton  # noqa: E402
from memoe_fast.ops.triton_tuning import config_id, pinned, selectable  # noqa: E402
from memoe_fast.testing import TOLERANCES, assert_close, make_moe_inputs, moe_outputs_and_grads  # noqa: E402

ON_CUDA = torch.cuda.is_available()
pytestmark = [] if ON_CUDA else [pytest.mark.interpret]
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET was set to something other than 1"))

FP32 = TOLERANCES[torch.float32]
GEMM_SITES = [name for name, site in SITES.items() if site.gemm]
GATE_SITES = ["gate_fwd", "gate_bwd", "gate_wgrad"]
EXPERTS = 5  # not a power of two


def _union(names, nargs=None):
    configs = {}
    for name in names:
        for cfg in selectable(SITES[name], nargs):
            configs.setdefault(config_id(cfg), cfg)
    return configs


GEMM_CONFIGS = _union(GEMM_SITES)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(triton_path, "POISON", True)


def _check(tensors, options):
    ref, ref_g = moe_outputs_and_grads(moe_bypass_reference, tensors, options)
    got, got_g = moe_outputs_and_grads(moe_bypass_triton, tensors, options)
    assert torch.equal(got["experts"], ref["experts"]), "experts differ"
    assert_close("out", got["out"], ref["out"], *FP32)
    assert_close("probs", got["probs"], ref["probs"], *FP32)
    assert set(got_g) == set(ref_g)
    for name in ref_g:
        assert_close(f"d{name}", got_g[name], ref_g[name], *FP32)


CASES = [
    # GLU experts with every bias, k = 2 (atomic combine and dx), E = 5 with the last expert empty,
    # D = 24 and F = 40 ragged for every tile.
    pytest.param(dict(tokens=37, hidden=24, ffn=40, activation="silu_glu", expert_bias=True, router_bias=True,
                      route="skip_last", top_k=2, token_scale=True, host_out=True), id="glu-k2-empty-expert"),
    # 2-layer exact-GELU experts with biases, k = 1 (plain-store combine), no renormalisation.
    pytest.param(dict(tokens=23, hidden=20, ffn=36, activation="gelu", top_k=1, renormalize=False,
                      host_out=True), id="gelu-k1"),
]


def _inputs(case):
    case = dict(case)
    top_k, renormalize = case.pop("top_k"), case.pop("renormalize", True)
    tensors, options = make_moe_inputs(case.pop("tokens"), case.pop("hidden"), case.pop("ffn"), EXPERTS, **case)
    return tensors, dict(options, top_k=top_k, renormalize=renormalize)


def test_every_site_has_selectable_configs():
    for name in GEMM_SITES + GATE_SITES:
        assert selectable(SITES[name], {"E": EXPERTS}), name
    # The space reaches the tiles production autotuning picks, not only small ones.
    assert any(c.kwargs["BLOCK_M"] >= 128 and c.kwargs["BLOCK_N"] >= 128 for c in GEMM_CONFIGS.values())
    assert any(c.kwargs["BLOCK_K"] == 128 for c in GEMM_CONFIGS.values())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg_id", sorted(GEMM_CONFIGS))
def test_gemm_config(cfg_id, case):
    cfg = GEMM_CONFIGS[cfg_id]
    pins = {name: cfg for name in GEMM_SITES if any(config_id(c) == cfg_id for c in selectable(SITES[name]))}
    assert pins
    with pinned(pins):
        _check(*_inputs(case))


def _gate_tile(cfg):
    bt, inner = cfg.kwargs.values()
    return bt, inner, cfg.num_warps


GATE_TILES = sorted({_gate_tile(c) for name in GATE_SITES for c in selectable(SITES[name], {"E": EXPERTS})})


@pytest.mark.parametrize("tile", GATE_TILES, ids=[f"T{t}-inner{k}-w{w}" for t, k, w in GATE_TILES])
def test_gate_config(tile):
    pins = {name: c for name in GATE_SITES for c in selectable(SITES[name], {"E": EXPERTS}) if _gate_tile(c) == tile}
    assert pins
    with pinned(pins):
        _check(*_inputs(CASES[0].values[0]))
