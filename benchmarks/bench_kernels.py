"""Bypass-MoE block, forward + backward: "floor" vs "reference" vs "torch" (vs "triton" on CUDA); and
the bypass layer alone at editing-sized calls (110 tokens): "torch" vs "reference" vs "loop", the plain
eager per-expert loop a user would write (``python benchmarks/bench_kernels.py`` prints that table).

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

from memoe_fast.ops.cpu_allocator import keep_freed_cpu_memory
from memoe_fast.ops import moe_bypass
from memoe_fast.ops.reference import load_balance_loss
from memoe_fast.ops.torch_path import gate_topk_torch
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


def loop_bypass(x, anchor, seq_idx, *, router_weight, gate_proj, up_proj, down_proj, top_k, host_out, **_):
    """The plain eager baseline: the same gate, then for each expert the tokens that chose it, its
    LLaMA FFN on them, and a weighted index_add into the host output (autograd does the backward).
    The expert weights are lists of per-expert tensors, as an ``nn.ModuleList`` of experts holds them."""
    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, router_weight, top_k)
    out = host_out
    for e in range(len(up_proj)):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)
        ye = F.linear(F.silu(F.linear(xe, gate_proj[e])) * F.linear(xe, up_proj[e]), down_proj[e])
        out = out.index_add(0, tok, ye * weights[tok, slot].unsqueeze(1).to(ye.dtype))
    return out, probs, experts


# The bypass layer of an edit at SmolLM2-135M widths: 110 tokens (a batch of edit prompts), E=4, k=1.
EDIT_SHAPE = dict(tokens=110, hidden=576, ffn=1536, experts=4, top_k=1, seqs=4)
EDIT_PROVIDERS = ("torch", "loop", "reference")


def make_layer_step(provider: str, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, seqs: int,
                    dtype=torch.float32, dev=None):
    """Forward + backward of the bypass layer alone (the host output is an input), as in editing: the
    expert weights and the gate train, the tokens are a frozen prefix."""
    dev = dev or device()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(grad)

    x = rnd(tokens, hidden)
    host_out = rnd(tokens, hidden)
    grad_out = rnd(tokens, hidden)
    args = dict(
        router_weight=rnd(experts, 2 * hidden, scale=(2 * hidden) ** -0.5, grad=True),
        gate_proj=rnd(experts, ffn, hidden, scale=hidden ** -0.5, grad=True),
        up_proj=rnd(experts, ffn, hidden, scale=hidden ** -0.5, grad=True),
        down_proj=rnd(experts, hidden, ffn, scale=ffn ** -0.5, grad=True),
    )
    anchors = rnd(seqs, hidden)
    seq_idx = torch.arange(tokens, device=dev) * seqs // tokens
    if provider == "loop":
        args.update({k: [args[k].detach()[e].clone().requires_grad_(True) for e in range(experts)]
                     for k in ("gate_proj", "up_proj", "down_proj")})
    params = [p for v in args.values() for p in (v if isinstance(v, list) else [v])]
    if provider == "loop":
        def fn(**kw):
            return loop_bypass(x, anchors, seq_idx, top_k=top_k, host_out=host_out, **kw)
    else:
        def fn(**kw):
            return moe_bypass(x, anchors, seq_idx, top_k=top_k, activation="silu_glu", host_out=host_out,
                              impl=provider, **kw)

    def step():
        for p in params:
            p.grad = None
        out, probs, chosen = fn(**args)
        torch.autograd.backward([out, load_balance_loss(probs, chosen, experts)], [grad_out, None])
    return step


def interleaved_medians(steps: dict, rounds: int) -> dict:
    """Median seconds per provider, the providers alternated round by round (a busy neighbour on a
    shared machine slows all of them alike). The order rotates every round: a provider that always ran
    right after the dense reference would pay for the memory the reference just released."""
    import statistics
    import time

    times = {p: [] for p in steps}
    for s in steps.values():  # warm-up
        s()
        s()
    names = list(steps)
    for r in range(rounds):
        for p in names[r % len(names):] + names[:r % len(names)]:
            s = steps[p]
            _sync()
            t0 = time.perf_counter()
            s()
            _sync()
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(v) for p, v in times.items()}


def test_interleaved_editing_layer(benchmark, bench_ratios):
    """The bypass layer at an editing-sized call (110 tokens): torch vs the plain per-expert loop, in a
    process with the CPU allocator setting the editors train with (both providers alike)."""
    allocator = keep_freed_cpu_memory()
    steps = {p: make_layer_step(p, **EDIT_SHAPE) for p in EDIT_PROVIDERS}
    med = {}

    def run():
        med.update(interleaved_medians(steps, int(os.environ.get("MEMOE_BENCH_ROUNDS", 30))))

    benchmark.group = "interleaved bypass layer T={tokens} D={hidden} F={ffn} E={experts} k={top_k}".format(**EDIT_SHAPE)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    group = bench_ratios.group("editing layer")
    for p, v in med.items():
        group[p] = v * 1e3
    benchmark.extra_info.update(median_ms={p: v * 1e3 for p, v in med.items()}, torch_over_loop=med["torch"] / med["loop"],
                                allocator=allocator[1], loadavg_1min=round(os.getloadavg()[0], 2))
    print("\n" + format_layer_table(med, EDIT_SHAPE))


def format_layer_table(med: dict, shape: dict) -> str:
    lines = ["bypass layer fwd+bwd, T={tokens} D={hidden} F={ffn} E={experts} k={top_k}, interleaved medians".format(**shape),
             "| provider | ms | loop / provider |", "|---|---|---|"]
    for p, v in med.items():
        lines.append(f"| {p} | {v * 1e3:.2f} | {med['loop'] / v:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="bypass layer at editing shapes, interleaved providers")
    ap.add_argument("--tokens", type=int, nargs="+", default=[110])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--providers", nargs="+", default=list(EDIT_PROVIDERS), choices=EDIT_PROVIDERS)
    ap.add_argument("--hidden", type=int, default=EDIT_SHAPE["hidden"])
    ap.add_argument("--ffn", type=int, default=EDIT_SHAPE["ffn"])
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's thresholds alone (the editors raise them while training on the CPU)")
    a = ap.parse_args()
    if not a.default_allocator:
        print("allocator:", keep_freed_cpu_memory()[1])
    if a.threads:
        torch.set_num_threads(a.threads)
    for t in a.tokens:
        shape = dict(EDIT_SHAPE, tokens=t, top_k=a.top_k, hidden=a.hidden, ffn=a.ffn)
        steps = {p: make_layer_step(p, **shape) for p in a.providers}
        print(format_layer_table(interleaved_medians(steps, a.rounds), shape))
