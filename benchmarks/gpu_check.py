"""GPU check of the bypass-MoE kernels: a timing table at LLaMA2-7B block shapes, as CSV and markdown.

Run by ``benchmarks/gpu_check.sh`` (which first runs the kernel tests on CUDA). Standalone::

    python benchmarks/gpu_check.py --out /tmp/gpu_check           # on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke    # tiny shapes on CPU: checks the table code
    python benchmarks/gpu_check.py --compile-check                 # compile matrix, CI subset, no GPU needed
    python benchmarks/gpu_check.py --check-7b --out /tmp/gpu_check # bf16 7B correctness, real autotuning, chosen configs
    python benchmarks/gpu_check.py --make-shim /tmp/mf_shim        # import shim: memoe_fast from this checkout

Rows: provider ("triton", "torch", "loop", "bmm", "reference", "grouped_mm") x k x T x mode ("fwd",
"fwd+bwd") with median ms, TFLOP/s of the routed experts' matmuls, the fraction of a measured dense
bf16 matmul rate on the same card, and the weight-bandwidth roofline (every expert weight read once per
pass, and the gradients written once, at the measured device-to-device copy bandwidth: the honest floor
at editing token counts); then the gate kernel's bandwidth against the same copy.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIM_INIT = '''"""Import shim written by benchmarks/gpu_check.py: the package memoe_fast from the checkout {root}."""
import importlib.util as _u
import os as _os
import sys as _sys

_ROOT = {root!r}
__path__ = [_os.path.join(_ROOT, "memoe_fast")]
# setup.py maps the folder kernels/ to memoe_fast.kernels; register it before the real __init__ runs.
_spec = _u.spec_from_file_location(
    "memoe_fast.kernels", _os.path.join(_ROOT, "kernels", "__init__.py"),
    submodule_search_locations=[_os.path.join(_ROOT, "kernels")],
)
kernels = _u.module_from_spec(_spec)
_sys.modules["memoe_fast.kernels"] = kernels
_spec.loader.exec_module(kernels)
_init = _os.path.join(__path__[0], "__init__.py")
if _os.path.exists(_init):
    __file__ = _init
    with open(_init, encoding="utf-8") as _f:
        exec(compile(_f.read(), _init, "exec"))
'''


def make_import_shim(dest: str, root: str = ROOT) -> str:
    """Writes ``dest/memoe_fast/__init__.py`` so that ``PYTHONPATH=dest`` imports this checkout's package
    (and ``kernels/`` as ``memoe_fast.kernels``) without installing anything. Returns ``dest``."""
    pkg = os.path.join(dest, "memoe_fast")
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w", encoding="utf-8") as f:
        f.write(SHIM_INIT.format(root=root))
    return dest


def _ensure_importable() -> None:
    try:
        import memoe_fast.kernels  # noqa: F401
    except ImportError:
        shim = make_import_shim(os.path.join("/tmp", f"memoe_fast_shim_{os.getpid()}"))
        sys.path.insert(0, shim)


# --------------------------------------------------------------------------------------------------
# Timing helpers


def _median_ms(fn, dev, warmup: int = 2, reps: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def dense_matmul_tflops(dev, dtype) -> float:
    """Measured dense GEMM rate (TFLOP/s) on this device: the denominator of the 'fraction' column."""
    import torch

    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = _median_ms(lambda: a @ b, dev, warmup=3, reps=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(dev) -> float:
    """Measured device-to-device copy bandwidth (GB/s, read + write)."""
    import torch

    n = (1 << 28) if dev.type == "cuda" else (1 << 22)
    src = torch.empty(n, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), dev, warmup=3, reps=10)
    return 2 * n / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# Providers: each returns a callable running one forward (or forward + backward).


def _grouped_mm_fn():
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def grouped_mm_bypass(x, anchor, seq_idx, router_weight, gate_proj, up_proj, down_proj, top_k, host_out, **_):
    """Expert FFN by torch's grouped GEMM (``F.grouped_mm`` / ``torch._grouped_mm``): gate by torch,
    slots sorted by expert, three grouped GEMMs, weighted index_add into the host output."""
    import torch
    import torch.nn.functional as F

    from memoe_fast.ops.torch_path import gate_topk_torch

    gmm = _grouped_mm_fn()
    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, router_weight, top_k)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // top_k
    counts = torch.bincount(flat, minlength=up_proj.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, tok)
    h = gmm(xs, gate_proj.transpose(1, 2), offs=offs)
    u = gmm(xs, up_proj.transpose(1, 2), offs=offs)
    y = gmm(F.silu(h) * u, down_proj.transpose(1, 2), offs=offs)
    coef = weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    out = host_out.index_add(0, tok, y * coef)
    return out, probs, experts


def loop_bypass(x, anchor, seq_idx, router_weight, gate_proj, up_proj, down_proj, top_k, host_out, **_):
    """The eager per-expert loop: the tokens of each expert, its FFN, a weighted index_add."""
    import torch.nn.functional as F

    from memoe_fast.ops.torch_path import gate_topk_torch

    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, router_weight, top_k)
    out = host_out
    for e in range(up_proj.shape[0]):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        xe = x.index_select(0, tok)
        ye = F.linear(F.silu(F.linear(xe, gate_proj[e])) * F.linear(xe, up_proj[e]), down_proj[e])
        out = out.index_add(0, tok, ye * weights[tok, slot].unsqueeze(1).to(ye.dtype))
    return out, probs, experts


def bmm_bypass(x, anchor, seq_idx, router_weight, gate_proj, up_proj, down_proj, top_k, host_out, **_):
    """``torch.bmm`` over the stacked weights, every expert on a padded (E, C, D) batch of its tokens
    (C = the largest expert's count)."""
    import torch
    import torch.nn.functional as F

    from memoe_fast.ops.torch_path import gate_topk_torch

    weights, experts, probs = gate_topk_torch(x, anchor, seq_idx, router_weight, top_k)
    e_count = up_proj.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e_count)
    cap = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.numel(), device=x.device) - starts.repeat_interleave(counts)
    tok = order // top_k
    xb = x.new_zeros(e_count, cap, x.shape[1])
    xb = xb.index_put((flat[order], pos), x.index_select(0, tok))
    h = torch.bmm(xb, gate_proj.transpose(1, 2))
    u = torch.bmm(xb, up_proj.transpose(1, 2))
    yb = torch.bmm(F.silu(h) * u, down_proj.transpose(1, 2))
    y = yb[flat[order], pos]
    coef = weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return host_out.index_add(0, tok, y * coef), probs, experts


def roofline_ms(hidden, ffn, experts, elem_bytes, mode, copy_bw_gbs) -> float:
    """Weight-bandwidth floor: the forward reads the 3 expert weights once; forward + backward reads them
    twice more (dx, da) and writes the 3 gradients: 3x the forward's bytes. copy_bw counts read + write."""
    fwd = 3 * experts * ffn * hidden * elem_bytes
    nbytes = fwd if mode == "fwd" else 3 * fwd
    return nbytes / (copy_bw_gbs * 1e9) * 1e3


def make_case(dev, dtype, tokens, hidden, ffn, experts, top_k, seqs=8, anchor=None):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    anchor = anchor or hidden

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    t = dict(
        x=rnd(tokens, hidden), anchor=rnd(seqs, anchor),
        router_weight=rnd(experts, hidden + anchor, scale=(hidden + anchor) ** -0.5),
        gate_proj=rnd(experts, ffn, hidden, scale=hidden ** -0.5), down_proj=rnd(experts, hidden, ffn, scale=ffn ** -0.5),
        up_proj=rnd(experts, ffn, hidden, scale=hidden ** -0.5), host_out=rnd(tokens, hidden),
    )
    for v in t.values():
        v.requires_grad_(True)
    opts = dict(seq_idx=(torch.arange(tokens, device=dev) * seqs // tokens), top_k=top_k, activation="silu_glu")
    return t, opts


def provider_fn(name):
    from memoe_fast.ops import moe_bypass

    if name == "grouped_mm":
        if _grouped_mm_fn() is None:
            return None
        return lambda **kw: grouped_mm_bypass(**kw)
    if name == "loop":
        return lambda **kw: loop_bypass(**kw)
    if name == "bmm":
        return lambda **kw: bmm_bypass(**kw)
    return lambda **kw: moe_bypass(**kw, impl=name)


def run_row(name, dev, dtype, tokens, hidden, ffn, experts, top_k, mode, peak, reps, copy_bw=None):
    import torch

    from memoe_fast.ops.reference import moe_flops

    fn = provider_fn(name)
    row = dict(provider=name, dtype=str(dtype).replace("torch.", ""), T=tokens, D=hidden, F=ffn, E=experts, k=top_k,
               mode=mode, ms="", tflops="", frac_of_dense="", note="")
    if fn is None:
        row["note"] = "unavailable: torch has neither F.grouped_mm nor torch._grouped_mm"
        return row
    t, opts = make_case(dev, dtype, tokens, hidden, ffn, experts, top_k)
    grad = torch.randn_like(t["x"])
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(**{k: v.detach() for k, v in t.items()}, **opts)
    else:
        def step():
            for v in t.values():
                v.grad = None
            out, probs, _ = fn(**t, **opts)
            torch.autograd.backward([out, probs.sum()], [grad, None])
    try:
        ms = _median_ms(step, dev, warmup=2, reps=reps)
    except Exception as exc:  # report, never hide: a failing provider is a row with its error
        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    flops = moe_flops(tokens, hidden, ffn, top_k, glu=True, backward=mode != "fwd")
    tflops = flops / (ms * 1e-3) / 1e12
    row.update(ms=f"{ms:.3f}", tflops=f"{tflops:.1f}", frac_of_dense=f"{tflops / peak:.2f}")
    if copy_bw:
        floor = roofline_ms(hidden, ffn, experts, torch.empty((), dtype=dtype).element_size(), mode, copy_bw)
        row.update(roofline_ms=f"{floor:.3f}", x_roofline=f"{ms / floor:.2f}")
    return row


def gate_bandwidth_row(dev, dtype, tokens, hidden, experts, copy_bw, reps):
    """The gate kernel reads x once (plus the tiny weights): bytes / time against a D2D copy."""
    import torch

    row = dict(provider="triton-gate", dtype=str(dtype).replace("torch.", ""), T=tokens, D=hidden, F="", E=experts,
               k=1, mode="gate fwd", ms="", tflops="", frac_of_dense="", note="")
    try:
        from memoe_fast.ops.triton_path import gate_fwd
    except Exception as exc:
        row["note"] = f"failed: {type(exc).__name__}: {exc}"
        return row
    t, opts = make_case(dev, dtype, tokens, hidden, 64, experts, 1)
    x, anchor, w_gate = (t[k].detach() for k in ("x", "anchor", "router_weight"))
    ms = _median_ms(lambda: gate_fwd(x, anchor, opts["seq_idx"], w_gate, 1), dev, reps=reps)
    nbytes = x.numel() * x.element_size() + tokens * (8 + experts * 4 + 4 + 8)
    bw = nbytes / (ms * 1e-3) / 1e9
    row.update(ms=f"{ms:.3f}", note=f"{bw:.0f} GB/s = {bw / copy_bw:.2f} of D2D copy {copy_bw:.0f} GB/s")
    return row


# --------------------------------------------------------------------------------------------------
# Correctness at 7B shapes with real autotuning, and the configs each launch site chose


CHECK_TOL = {"out": 2e-2, "probs": 1e-4, "grad": 3e-2}  # relative Frobenius error, bf16 vs fp32 reference


def _case_7b(dev, dtype, tokens, activation, experts=4, top_k=2, seqs=8, d=4096, f=11008):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    glu = activation == "silu_glu"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(True)

    t = dict(x=rnd(tokens, d), anchor=rnd(seqs, d), router_weight=rnd(experts, 2 * d, scale=(2 * d) ** -0.5),
             up_proj=rnd(experts, f, d, scale=d ** -0.5), down_proj=rnd(experts, d, f, scale=f ** -0.5),
             host_out=rnd(tokens, d))
    if glu:
        t["gate_proj"] = rnd(experts, f, d, scale=d ** -0.5)
    else:
        t["up_bias"], t["down_bias"] = rnd(experts, f, scale=0.1), rnd(experts, d, scale=0.1)
    opts = dict(seq_idx=(torch.arange(tokens, device=dev) * seqs // tokens), top_k=top_k, activation=activation)
    return t, opts


def _fwd_bwd(fn, tensors, opts, seed=1):
    import torch

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out, probs, experts = fn(**leaves, **opts)
    g = torch.Generator(device="cpu").manual_seed(seed)
    r_out = torch.randn(out.shape, generator=g).to(out.device)
    r_probs = torch.randn(probs.shape, generator=g).to(out.device)
    ((out.float() * r_out).sum() + (probs * r_probs).sum()).backward()
    return out, probs, experts, {k: v.grad for k, v in leaves.items()}


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def chosen_configs(dev) -> list[dict]:
    """Per launch site: each autotune key's chosen config and its compiled kernel's registers, spills and
    shared memory on this device."""
    from memoe_fast.ops.triton_path import SITES

    rows = []
    for name, site in SITES.items():
        for key, cfg in site.chosen().items():
            row = dict(site=name, key=str(key), config=str(cfg.kwargs) + f" w{cfg.num_warps} s{cfg.num_stages}")
            try:
                ck = site.kernel.warmup(grid=(1,), **site.last_kwargs, **cfg.all_kwargs())
                if hasattr(ck, "_init_handles"):
                    ck._init_handles()
                row.update(registers=ck.n_regs, spills=ck.n_spills, shared=ck.metadata.shared)
            except Exception as exc:  # report, never hide
                row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
    return rows


def check_7b(out_dir: str, big_tokens: int = 16384, dev=None, dtype=None, dims=None, tokens: int = 512) -> int:
    """bf16 at LLaMA2-7B shapes with real autotuning: forward and every gradient against the fp32
    reference on the same rounded inputs (GLU k=2 and k=1, exact GELU with biases k=2, T=512); then
    a T=16384 call so that the second token bucket tunes; then the chosen configs. Stops at the first
    wrong result and says which (exit status 1)."""
    import json

    import torch

    from memoe_fast.ops import moe_bypass
    from memoe_fast.ops.reference import moe_bypass_reference
    from memoe_fast.ops.triton_tuning import LaunchSite

    LaunchSite.keep_last = True
    dev = dev or torch.device("cuda")
    dtype = dtype or torch.bfloat16
    dims = dims or {}
    os.makedirs(out_dir, exist_ok=True)
    for activation, top_k in (("silu_glu", 2), ("silu_glu", 1), ("gelu", 2)):
        label = f"{activation} k={top_k} T={tokens}"
        t0 = time.time()
        tensors, opts = _case_7b(dev, dtype, tokens, activation, top_k=top_k, **dims)
        got = _fwd_bwd(lambda **kw: moe_bypass(**kw, impl="triton"), tensors, opts)
        ref_t = {k: v.detach().float() for k, v in tensors.items()}
        ref = _fwd_bwd(moe_bypass_reference, ref_t, opts)
        if not torch.equal(got[2], ref[2]):
            print(f"WRONG: {label}: experts differ in {int((got[2] != ref[2]).sum())} places", flush=True)
            return 1
        checks = [("out", got[0], ref[0], CHECK_TOL["out"]), ("probs", got[1], ref[1], CHECK_TOL["probs"])]
        checks += [(f"d{k}", got[3][k], ref[3][k], CHECK_TOL["grad"]) for k in ref[3]]
        for name, a, b, tol in checks:
            if a is None or not torch.isfinite(a.float()).all() or _rel(a, b) > tol:
                err = "missing" if a is None else f"rel err {_rel(a, b):.3g} > {tol}"
                print(f"WRONG: {label}: {name}: {err}", flush=True)
                return 1
        print(f"ok   {label}: out and {len(ref[3])} gradients within tolerance "
              f"(max rel err {max(_rel(a, b) for _, a, b, _ in checks):.2e}) in {time.time() - t0:.0f} s", flush=True)
        del tensors, got, ref, ref_t
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    tensors, opts = _case_7b(dev, dtype, big_tokens, "silu_glu", top_k=2, **dims)
    t0 = time.time()
    out = _fwd_bwd(lambda **kw: moe_bypass(**kw, impl="triton"), tensors, opts)
    ok = all(torch.isfinite(v.float()).all() for v in [out[0]] + list(out[3].values()))
    print(f"{'ok  ' if ok else 'WRONG:'} silu_glu k=2 T={big_tokens}: forward+backward finite ({time.time() - t0:.0f} s)")
    if not ok:
        return 1
    del tensors, out
    rows = chosen_configs(dev)
    with open(os.path.join(out_dir, "chosen_configs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| site | autotune key | chosen config | registers | spills | shared |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['site']} | {r['key']} | {r['config']} | {r.get('registers', '')} | {r.get('spills', '')} | "
              f"{r.get('shared', '')} | {r.get('note', '')}")
    return 0


# --------------------------------------------------------------------------------------------------
# Hook for the 8-bit LLaMA2-7B editing benchmark (added later by another engineer).


def editing_benchmark_hook(args, dev, out_dir: str) -> list[dict]:
    """HOOK: the 8-bit LLaMA2-7B editing benchmark goes here. Return rows (dicts with the table's
    columns) to append to the table; it runs after the kernel rows, within the same time budget."""
    return []


# --------------------------------------------------------------------------------------------------


COLUMNS = ["provider", "dtype", "T", "D", "F", "E", "k", "mode", "ms", "tflops", "frac_of_dense", "roofline_ms",
           "x_roofline", "note"]


def write_tables(rows, out_dir, header_lines):
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "gpu_check.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    md = ["\n".join(header_lines), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    md_path = os.path.join(out_dir, "gpu_check.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return csv_path, md_path, "\n".join(md)


def compile_check() -> int:
    """The CI subset of the compile matrix (memoe_fast/ops/compile_matrix.py): every kept config of every
    launch site compiled for sm_89 in bf16, shared memory and spills checked. Needs no GPU."""
    os.environ.pop("TRITON_INTERPRET", None)
    from memoe_fast.ops.compile_matrix import main as matrix_main

    return matrix_main(["--subset", "ci", "--quiet"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    ap.add_argument("--tokens", default="110,1024,4096", help="comma-separated T values")
    ap.add_argument("--topk", default="1,2")
    ap.add_argument("--providers", default="triton,loop,bmm,grouped_mm,torch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop adding rows after this many seconds")
    ap.add_argument("--reference-max-tokens", type=int, default=4096,
                    help="skip the dense reference above this T (4x the FLOPs and the memory of the routed path)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks this script, not the GPU")
    ap.add_argument("--compile-check", action="store_true", help="compile the kernels for sm_90 (no GPU needed)")
    ap.add_argument("--check-7b", action="store_true",
                    help="bf16 correctness at 7B shapes with real autotuning, then the chosen configs")
    ap.add_argument("--make-shim", metavar="DIR", help="write the import shim into DIR and exit")
    args = ap.parse_args(argv)

    if args.make_shim:
        print(make_import_shim(args.make_shim))
        return 0
    _ensure_importable()
    if args.compile_check:
        return compile_check()
    if args.check_7b:
        return check_7b(args.out)

    import torch

    start = time.time()
    if args.cpu_smoke:
        dev = torch.device("cpu")
        dtype = torch.float32
        hidden, ffn, experts = 64, 128, 4
        tokens_list = [16, 64]
        providers = [p for p in args.providers.split(",") if p != "grouped_mm"]
        if os.environ.get("TRITON_INTERPRET") != "1":
            providers = [p for p in providers if p != "triton"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu-smoke (or --compile-check) on a machine without a GPU", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        dtype = getattr(torch, args.dtype)
        hidden, ffn, experts = 4096, 11008, 4  # LLaMA2-7B block, 4 bypass experts
        tokens_list = [int(t) for t in args.tokens.split(",")]
        providers = args.providers.split(",")

    peak = dense_matmul_tflops(dev, dtype)
    copy_bw = copy_bandwidth_gbs(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke test, not a measurement)"
    header = [
        f"## Bypass MoE kernels on {name}",
        "",
        f"torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}, D={hidden} F={ffn} E={experts}; "
        f"measured dense matmul {peak:.1f} TFLOP/s, D2D copy {copy_bw:.0f} GB/s. TFLOP/s count the routed "
        f"experts' matmuls only (backward = 2x forward). Command: python benchmarks/gpu_check.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    ]
    print("\n".join(header), flush=True)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for top_k in (int(k) for k in args.topk.split(",")):
            for tokens in tokens_list:
                for prov in providers:
                    base = dict(provider=prov, dtype=str(dtype).replace("torch.", ""), T=tokens, D=hidden, F=ffn,
                                E=experts, k=top_k, mode=mode)
                    if time.time() - start > args.budget_s:
                        rows.append(dict(base, note=f"skipped: time budget of {args.budget_s:.0f} s spent"))
                    elif prov == "reference" and tokens > args.reference_max_tokens:
                        rows.append(dict(base, note="skipped: the dense reference runs every expert on every token "
                                                    "(4x FLOPs and memory) and would eat the time budget"))
                    elif prov == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                        rows.append(dict(base, note="skipped: no CUDA"))
                    else:
                        rows.append(run_row(prov, dev, dtype, tokens, hidden, ffn, experts, top_k, mode, peak, args.reps,
                                            copy_bw))
                    r = rows[-1]
                    print(f"{r['provider']:>11s} k={top_k} T={tokens:>6d} {mode:>8s} {r.get('ms', ''):>10s} ms "
                          f"{r.get('tflops', ''):>7s} TFLOP/s {r.get('frac_of_dense', ''):>5s} {r.get('note', '')}", flush=True)
    if "triton" in providers:
        rows.append(gate_bandwidth_row(dev, dtype, max(tokens_list), hidden, experts, copy_bw, args.reps))
        print(rows[-1], flush=True)
    rows += editing_benchmark_hook(args, dev, args.out)
    csv_path, md_path, md = write_tables(rows, args.out, header)
    print(md)
    print(f"wrote {csv_path} and {md_path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
