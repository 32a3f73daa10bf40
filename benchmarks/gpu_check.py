"""GPU check of the bypass-MoE kernels: a timing table at LLaMA2-7B block shapes, as CSV and markdown.

Run by ``benchmarks/gpu_check.sh`` (which first runs the kernel tests on CUDA). Standalone::

    python benchmarks/gpu_check.py --out /tmp/gpu_check           # on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke    # tiny shapes on CPU: checks the table code
    python benchmarks/gpu_check.py --compile-check                 # compile every kernel for sm_90, no GPU needed
    python benchmarks/gpu_check.py --make-shim /tmp/mf_shim        # import shim: memoe_fast from this checkout

Rows: provider ("triton", "torch", "reference", "grouped_mm") x k x T x mode ("fwd", "fwd+bwd") with
median ms, TFLOP/s of the routed experts' matmuls and the fraction of a measured dense bf16 matmul
rate on the same card; then the gate kernel's bandwidth against a measured device-to-device copy.
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
    return lambda **kw: moe_bypass(**kw, impl=name)


def run_row(name, dev, dtype, tokens, hidden, ffn, experts, top_k, mode, peak, reps):
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
# Hook for the 8-bit LLaMA2-7B editing benchmark (added later by another engineer).


def editing_benchmark_hook(args, dev, out_dir: str) -> list[dict]:
    """HOOK: the 8-bit LLaMA2-7B editing benchmark goes here. Return rows (dicts with the table's
    columns) to append to the table; it runs after the kernel rows, within the same time budget."""
    return []


# --------------------------------------------------------------------------------------------------


COLUMNS = ["provider", "dtype", "T", "D", "F", "E", "k", "mode", "ms", "tflops", "frac_of_dense", "note"]


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
    """Compiles every kernel specialisation the launchers use for sm_90 (cubin through ptxas), which
    needs no GPU: it catches the type errors that the interpreter lets through."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from memoe_fast.kernels.gating import _gate_bwd_kernel, _gate_fwd_kernel
    from memoe_fast.kernels.grouped_ffn import (
        _grouped_down_kernel, _grouped_up_bwd_kernel, _grouped_up_fwd_kernel, _grouped_wgrad_kernel,
    )

    target = GPUTarget("cuda", 90, 32)
    fails = 0

    def attempt(label, fn, ptrs, consts):
        nonlocal fails
        sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in fn.arg_names}
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                           options=dict(num_warps=4, num_stages=3))
            print("ok  ", label)
        except Exception as exc:
            fails += 1
            print("FAIL", label, type(exc).__name__, str(exc)[:2000])

    blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    for dt, prec in (("fp32", "ieee"), ("bf16", "tf32"), ("fp16", "tf32")):
        def p(*names, t=dt):
            return {n: f"*{t}" for n in names}
        for fin in (False, True):
            ptrs = dict(p("x_ptr", "w_ptr", "noise_ptr"), **p("table_ptr", "logits_ptr", "probs_ptr", "weights_ptr", t="fp32"),
                        seq_ptr="*i64", experts_ptr="*i64", counts_ptr="*i32")
            attempt(f"gate_fwd {dt} finalize={fin}", _gate_fwd_kernel, ptrs,
                    dict(HAS_TABLE=fin, HAS_NOISE=fin, FINALIZE=fin, RENORM=True, TOP_K=2, BLOCK_N=32, BLOCK_K=64, BLOCK_E=16))
        ptrs = dict(p("w_ptr", "dx_ptr"), **p("probs_ptr", "weights_ptr", "dprobs_ptr", "dweights_ptr", "dlogits_ptr", t="fp32"),
                    experts_ptr="*i64")
        attempt(f"gate_bwd {dt}", _gate_bwd_kernel, ptrs, dict(HAS_DPROBS=True, HAS_DWEIGHTS=True, RENORM=True, NEED_DX=True,
                                                               TOP_K=2, BLOCK_T=32, BLOCK_D=64, BLOCK_E=16))
        for glu, tanh in ((True, False), (False, True), (False, False)):
            ptrs = dict(p("x_ptr", "w1_ptr", "w3_ptr", "b1_ptr", "h_ptr", "u_ptr", "a_ptr"), tok_ptr="*i64", offs_ptr="*i64")
            attempt(f"up_fwd {dt} glu={glu} tanh={tanh}", _grouped_up_fwd_kernel, ptrs,
                    dict(GLU=glu, ACT_TANH=tanh, HAS_B1=not glu, SAVE=True, DOT_PRECISION=prec, **blocks))
            ptrs = dict(p("g_ptr", "w2_ptr", "h_ptr", "u_ptr", "y_ptr", "dh_ptr", "du_ptr"), tok_ptr="*i64", offs_ptr="*i64",
                        coef_ptr="*fp32", dcoef_ptr="*fp32")
            attempt(f"up_bwd {dt} glu={glu} tanh={tanh}", _grouped_up_bwd_kernel, ptrs,
                    dict(GLU=glu, ACT_TANH=tanh, NEED_DCOEF=True, DOT_PRECISION=prec, **blocks))
        for atomic in (False, True):
            ptrs = dict(p("a_ptr", "a2_ptr", "w_ptr", "w2nd_ptr", "bias_ptr", "y_ptr", "host_ptr"), tok_ptr="*i64",
                        offs_ptr="*i64", coef_ptr="*fp32", out_ptr="*fp32" if atomic else f"*{dt}")
            attempt(f"down {dt} atomic={atomic}", _grouped_down_kernel, ptrs,
                    dict(HAS_SECOND=True, HAS_BIAS=True, HAS_COEF=True, SAVE_Y=True, HAS_HOST=not atomic, ATOMIC=atomic,
                         DOT_PRECISION=prec, **blocks))
        for lg, rg, ls in ((False, True, False), (True, False, True)):
            ptrs = dict(p("l_ptr", "r_ptr", "dw_ptr", "db_ptr"), tok_ptr="*i64", offs_ptr="*i64", coef_ptr="*fp32")
            attempt(f"wgrad {dt} l_gather={lg}", _grouped_wgrad_kernel, ptrs,
                    dict(L_GATHER=lg, R_GATHER=rg, L_SCALE=ls, HAS_DB=True, DOT_PRECISION=prec, **blocks))
    print(f"compile check: {fails} failure(s), triton {triton.__version__}")
    return 1 if fails else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    ap.add_argument("--tokens", default="512,4096,32768", help="comma-separated T values")
    ap.add_argument("--topk", default="1,2")
    ap.add_argument("--providers", default="triton,torch,reference,grouped_mm")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop adding rows after this many seconds")
    ap.add_argument("--reference-max-tokens", type=int, default=4096,
                    help="skip the dense reference above this T (4x the FLOPs and the memory of the routed path)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks this script, not the GPU")
    ap.add_argument("--compile-check", action="store_true", help="compile the kernels for sm_90 (no GPU needed)")
    ap.add_argument("--make-shim", metavar="DIR", help="write the import shim into DIR and exit")
    args = ap.parse_args(argv)

    if args.make_shim:
        print(make_import_shim(args.make_shim))
        return 0
    _ensure_importable()
    if args.compile_check:
        return compile_check()

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
                        rows.append(run_row(prov, dev, dtype, tokens, hidden, ffn, experts, top_k, mode, peak, args.reps))
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
