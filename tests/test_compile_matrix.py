"""The kernels compile for every target GPU, fit it, and tune each launch site on its own — no GPU needed.

``test_ci_compile_matrix`` compiles every config the pruner keeps for the CI subset of the matrix
(bf16 LLaMA2-7B GLU experts, k = 2, sm_89) in a subprocess without the interpreter and checks the
compiler's own figures; ``test_fp32_sites_that_spilled_compile_without_spills`` does the same for
the two fp32 (tf32x3) sites that spilled there before the fp32 register model. The whole matrix is
``python -m memoe_fast.ops.compile_matrix --all``; the fp32 table of benchmarks/RESULTS.md is
``python -m memoe_fast.ops.compile_matrix --subset table --dtypes float32 --markdown`` (6 minutes cold).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# The in-process parts only capture launches, and the interpreter must be chosen before triton is first
# imported by any test file (the matrix itself compiles in a subprocess without it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be compiled")

from memoe_fast.ops.compile_matrix import ARCHS, capture_calls  # noqa: E402
from memoe_fast.ops.triton_tuning import ARCH_LIMITS, Footprint, gemm_shared_bytes, t_bucket  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sites(activation="silu_glu", top_k=2, experts=8, dtype="bfloat16"):
    return {site.name: (site, kwargs) for site, kwargs in capture_calls(dtype, activation, top_k, experts)}


def test_forward_and_backward_dx_tune_separately():
    # Defect: the down-projection forward and the backward dx shared one autotuner (one cache entry), so
    # dx reused the forward's tile although it loads twice the operands (dh·W1 + du·W3) per K step.
    sites = _sites()
    fwd, fwd_kw = sites["expert_down_fwd"]
    dx, dx_kw = sites["expert_dx_glu"]
    assert fwd is not dx and fwd.kernel is not dx.kernel
    assert fwd.tuner is not dx.tuner, "forward and backward dx must not share an autotune cache"
    # dx is pruned by its own footprint: on sm_89 in bf16 it keeps strictly fewer configs than the
    # forward, and every one it keeps fits the shared memory of its two operand pairs.
    sm89 = ARCH_LIMITS[89]
    kept_fwd = {str(c) for c in fwd.kept(sm89, 2, fwd_kw)}
    kept_dx = dx.kept(sm89, 2, dx_kw)
    assert {str(c) for c in kept_dx} < kept_fwd
    for c in kept_dx:
        assert gemm_shared_bytes(c, Footprint(n_a=2, n_b=2), 2) <= sm89.shared_bytes, str(c)


def test_every_site_has_its_own_tuner_and_a_token_bucket_key():
    seen = {}
    for variant in (("silu_glu", 2, 8), ("silu_glu", 1, 4), ("gelu", 2, 8), ("relu", 1, 4)):
        for name, (site, kwargs) in _sites(*variant).items():
            seen.setdefault(name, site)
            assert seen[name] is site
            if name != "gate_anchor":  # (S, A) small: one fixed config
                assert "T_BUCKET" in site.key, name
                assert "T_BUCKET" in kwargs, name
    tuners = [s.tuner for s in seen.values()]
    assert len({id(t) for t in tuners}) == len(tuners)
    assert t_bucket(512) != t_bucket(16384) and t_bucket(1) == 16 and t_bucket(10 ** 7) == 1 << 16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_pruner_keeps_a_config_per_launch(arch, dtype):
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for variant in (("silu_glu", 2, 8), ("gelu", 1, 4)):
        for name, (site, kwargs) in _sites(*variant, dtype=dtype).items():
            kept = [c for c in site.candidates if site.fits(c, ARCH_LIMITS[arch], es, kwargs)]
            assert kept, f"{name}: no config fits sm_{arch} in {dtype}"


def _compile_matrix(tmp_path, *args) -> list[dict]:
    """Rows of ``python -m memoe_fast.ops.compile_matrix --subset ci *args`` run without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "memoe_fast.ops.compile_matrix", "--subset", "ci", "--quiet",
                          "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


def test_fp32_sites_that_spilled_compile_without_spills(tmp_path):
    # With fp32 counted as twice a 16-bit operand, the pruner kept configs that spill on sm_89 here:
    # expert_down_fwd 32x64x64 and 64x64x32 (44 and 48 bytes), gate_fwd 64x32 (16 bytes). A few compiles.
    rows = _compile_matrix(tmp_path, "--dtypes", "float32", "--sites", "expert_down_fwd,gate_fwd")
    assert {r["site"] for r in rows} == {"expert_down_fwd", "gate_fwd"}
    for r in rows:
        assert r["shared"] <= r["shared_limit"], r
        assert r["spill_bytes"] == 0, r


def test_ci_compile_matrix(tmp_path):
    rows = _compile_matrix(tmp_path)
    compiled_sites = {r["site"] for r in rows}
    assert compiled_sites == set(_sites()), "every launch site of the call compiles at least one config"
    for r in rows:
        assert r["shared"] <= r["shared_limit"], r
        assert r["spill_bytes"] == 0, r
        # The pruning estimate is conservative: never below the compiler's shared memory.
        assert r["est_shared"] >= r["shared"], r
