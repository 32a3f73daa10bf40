"""Bypass-MoE block, forward + backward: "floor" vs "reference" vs "torch" (vs "triton" on CUDA).

The block is the host LLaMA MLP (frozen) plus the bypass (gating + experts, trainable); the floor is
the host MLP plus one dense trainable host-sized FFN over the same tokens, i.e. the same matmul work
as the bypass at k = 1 without any routing. Run with::

    pytest benchmarks/bench_kernels.py --benchmark-only

The ratio of each provider's median to the floor's is printed at the end of the session.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from memoe_fast.ops import moe_bypass
from memoe_fast.ops.reference import load_balance_loss
from memoe_fast.testing import device

# SmolLM2-135M block: D=576, F=1536; the bypass has E=4 experts, top-1.
SHAPE = dict(tokens=int(os.environ.get("MEMOE_BENCH_T", 4096)), hidden=576, ffn=1536, experts=4, top_k=1, seqs=8, anchor=576)
PROVIDERS = ["floor", "reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])
if os.environ.get("MEMOE_BENCH_THREADS"):
    # On a shared machine one thread per process avoids the barrier stalls that a busy neighbour
    # inflicts on every parallel region (the grouped path has more, smaller GEMMs than the floor).
    torch.set_num_threads(int(os.environ["MEMOE_BENCH_THREADS"]))


def llama_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def make_step(provider: str, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, seqs: int, anchor: int,
              dtype=torch.float32, dev=None):
    """One forward + backward of the block for ``provider``; the same setup serves speed and memory."""
    dev = dev or device()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(grad)

    x = rnd(tokens, hidden, grad=True)
    host = [rnd(ffn, hidden, scale=hidden ** -0.5), rnd(ffn, hidden, scale=hidden ** -0.5), rnd(hidden, ffn, scale=ffn ** -0.5)]
    grad_out = rnd(tokens, hidden)
    if provider == "floor":
        ffn_w = [rnd(ffn, hidden, scale=hidden ** -0.5, grad=True), rnd(ffn, hidden, scale=hidden ** -0.5, grad=True),
                 rnd(hidden, ffn, scale=ffn ** -0.5, grad=True)]

        def step():
            out = llama_mlp(x, *host) + llama_mlp(x, *ffn_w)
            out.backward(grad_out)
        return step

    anchors = rnd(seqs, anchor)
    seq_idx = torch.arange(tokens, device=dev) * seqs // tokens
    w_gate = rnd(experts, hidden + anchor, scale=(hidden + anchor) ** -0.5, grad=True)
    w1 = rnd(experts, ffn, hidden, scale=hidden ** -0.5, grad=True)
    w3 = rnd(experts, ffn, hidden, scale=hidden ** -0.5, grad=True)
    w2 = rnd(experts, hidden, ffn, scale=ffn ** -0.5, grad=True)

    def step():
        host_out = llama_mlp(x, *host)
        out, probs, chosen = moe_bypass(x, anchors, seq_idx, router_weight=w_gate, gate_proj=w1, up_proj=w3,
                                        down_proj=w2, top_k=top_k, renormalize=True, activation="silu_glu",
                                        host_out=host_out, impl=provider)
        torch.autograd.backward([out, load_balance_loss(probs, chosen, experts)], [grad_out, None])
    return step


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_fwd_bwd(benchmark, provider, bench_ratios):
    step = make_step(provider, **SHAPE)
    step()  # warm-up: allocator, Triton autotune and compile caches
    step()
    _sync()
    benchmark.group = "bypass block fwd+bwd T={tokens} D={hidden} F={ffn} E={experts} k={top_k}".format(**SHAPE)
    benchmark.extra_info.update(provider=provider, **SHAPE)

    def timed():
        step()
        _sync()

    rounds = int(os.environ.get("MEMOE_BENCH_ROUNDS", 5))
    # The dense reference runs every expert on every token (about 3x the floor): fewer rounds.
    benchmark.pedantic(timed, rounds=max(2, rounds // 2) if provider == "reference" else rounds, iterations=1,
                       warmup_rounds=0)
    bench_ratios[provider] = benchmark.stats.stats.median * 1e3


def test_interleaved_torch_vs_floor(benchmark, bench_ratios):
    """torch/floor with the two steps alternated round by round, so that a busy neighbour on a shared
    machine slows both alike (the sequential benchmarks above each see a different load)."""
    import statistics
    import time

    steps = {p: make_step(p, **SHAPE) for p in ("floor", "torch")}
    steps["floor"]()  # warm-up
    times = {p: [] for p in steps}

    def interleaved():
        for s in steps.values():
            s()
        for _ in range(int(os.environ.get("MEMOE_BENCH_ROUNDS", 5))):
            for p, s in steps.items():
                _sync()
                t0 = time.perf_counter()
                s()
                _sync()
                times[p].append(time.perf_counter() - t0)

    benchmark.group = "interleaved torch vs floor (total time of all rounds)"
    benchmark.pedantic(interleaved, rounds=1, iterations=1, warmup_rounds=0)
    med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    benchmark.extra_info.update(median_ms=med, ratio=med["torch"] / med["floor"], loadavg_1min=round(os.getloadavg()[0], 2))
    interleaved_group = bench_ratios.group("interleaved")
    interleaved_group["floor"] = med["floor"]
    interleaved_group["torch"] = med["torch"]
    print(f"\ninterleaved medians: floor {med['floor']:.1f} ms, torch {med['torch']:.1f} ms, "
          f"torch/floor {med['torch'] / med['floor']:.3f}")
