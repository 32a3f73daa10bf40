"""Compile matrix of the Triton kernels, without a GPU: every launch site x every config its pruner
keeps x dtype x target architecture, compiled with the signature the runtime specialises.

The real launchers run on ``meta`` tensors at LLaMA2-7B shapes (D=4096, F=11008) inside
:func:`~memoe_fast.ops.triton_tuning.capture_launches`, forward and backward, so the captured keyword
arguments are exactly those of a real call. Each captured launch is specialised by triton's own binder
for the target (ints equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get the
divisibility hint), compiled to a cubin, and measured: shared memory from the compiler's metadata,
registers and spills from ``ptxas -v`` (the ptxas bundled with triton). Results are cached by the
kernel's source hash, target and options, so a second run only compiles what changed.

Run the whole matrix and print the table (needs no GPU; run with TRITON_INTERPRET unset)::

    python -m memoe_fast.ops.compile_matrix --all --markdown

``--subset ci`` is the part ``tests/test_compile_matrix.py`` runs; ``--subset table`` makes the sm_89/sm_90
tables of ``benchmarks/RESULTS.md``; ``--dtypes``, ``--archs`` and ``--sites`` narrow a subset, e.g.::

    python -m memoe_fast.ops.compile_matrix --subset table --dtypes float32 --markdown
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

D, F = 4096, 11008  # LLaMA2-7B block
ARCHS = (80, 86, 89, 90)
DTYPES = ("bfloat16", "float16", "float32")
# Variants of one call: (activation, top_k, number of experts). GLU and 2-layer experts take different
# sites; k = 1 stores, k > 1 takes the atomic combine and dx.
VARIANTS = (("silu_glu", 2, 8), ("silu_glu", 1, 4), ("gelu", 2, 8), ("gelu", 1, 4))
SUBSETS = {
    # CI: the GLU call at k = 2 (the sites with the largest footprints, and the atomic ones) in bf16 on
    # sm_89, the tightest target (99 KiB of shared memory); about 70 compiles, a minute or two cold and
    # seconds from the cache.
    "ci": dict(archs=(89,), dtypes=("bfloat16",), variants=(("silu_glu", 2, 8),)),
    # The table in benchmarks/RESULTS.md: every variant and dtype on sm_89 and sm_90.
    "table": dict(archs=(89, 90), dtypes=DTYPES, variants=VARIANTS),
    "all": dict(archs=ARCHS, dtypes=DTYPES, variants=VARIANTS),
}
# Spills accepted by name: (site, arch, dtype) -> reason. Empty: every kept config must be spill-free.
ACCEPTED_SPILLS: dict = {}


def _cache_path() -> str:
    base = os.environ.get("MEMOE_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memoe_fast")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, "compile_matrix.json")


@dataclass
class Row:
    site: str
    arch: int
    dtype: str
    variant: str
    config: str
    shared: int
    shared_limit: int
    registers: int
    spill_bytes: int
    est_shared: int
    est_registers: int
    seconds: float
    cached: bool


def capture_calls(dtype_name: str, activation: str, top_k: int, experts: int, tokens: int = 512):
    """[(site, kwargs)] of one forward + backward of the Triton path on meta tensors."""
    import torch

    from .triton_path import moe_bypass_triton
    from .triton_tuning import capture_launches

    dtype = getattr(torch, dtype_name)
    meta = torch.device("meta")
    glu = activation == "silu_glu"

    def p(*shape, dt=dtype):
        return torch.empty(*shape, device=meta, dtype=dt).requires_grad_(dt.is_floating_point)

    args = dict(
        router_weight=p(experts, 2 * D, dt=torch.float32), up_proj=p(experts, F, D), down_proj=p(experts, D, F),
        gate_proj=p(experts, F, D) if glu else None, up_bias=None if glu else p(experts, F),
        down_bias=None if glu else p(experts, D), activation=activation, top_k=top_k,
        token_scale=torch.empty(tokens, device=meta, dtype=dtype), host_out=p(tokens, D),
    )
    x, anchor = p(tokens, D), p(8, D)
    seq = torch.empty(tokens, device=meta, dtype=torch.int64)
    with capture_launches() as launches:
        out, probs, _ = moe_bypass_triton(x, anchor, seq, **args)
        (out.float().sum() + probs.sum()).backward()
    return launches


def _specialise(kernel, kwargs: dict, cfg, target):
    """(ASTSource, options) as ``JITFunction.run`` builds them for ``target``."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs, **cfg.all_kwargs())
    kw["debug"] = False
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(**kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores", log)
    return regs, int(spill.group(1)) if spill else 0


def compile_one(site, kwargs, cfg, arch: int, cache: dict) -> tuple[int, int, int, bool, float]:
    """(shared bytes, registers, spill bytes, cached, seconds) of one site x config on ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    src, options = _specialise(site.kernel, kwargs, cfg, target)
    key = hashlib.sha256(json.dumps([triton.__version__, src.hash(), arch, sorted(
        (k, str(v)) for k, v in options.__dict__.items())]).encode()).hexdigest()
    if key in cache:
        c = cache[key]
        return c["shared"], c["registers"], c["spill"], True, 0.0
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    regs, spill = _ptxas_stats(compiled.asm["ptx"], arch)
    cache[key] = dict(shared=int(compiled.metadata.shared), registers=regs, spill=spill)
    return compiled.metadata.shared, regs, spill, False, time.time() - t0


def _config_str(cfg) -> str:
    kw = "x".join(str(v) for v in cfg.kwargs.values())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def run_matrix(subset: str = "ci", budget_s: float | None = None, log=print, dtypes=None, archs=None,
               sites=None) -> list[Row]:
    """Every (site, kept config, dtype, arch) of ``subset``; the cache is read and written. ``dtypes``,
    ``archs`` and ``sites`` (names) narrow the subset."""
    import torch

    from .triton_tuning import ARCH_LIMITS

    spec = dict(SUBSETS[subset])
    if dtypes:
        spec["dtypes"] = tuple(dtypes)
    if archs:
        spec["archs"] = tuple(archs)
    path = _cache_path()
    cache = {}
    if os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    rows: list[Row] = []
    start = time.time()
    seen = set()
    try:
        for dtype_name in spec["dtypes"]:
            es = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
            for activation, top_k, experts in spec["variants"]:
                variant = f"{activation} k={top_k} E={experts}"
                for site, kwargs in capture_calls(dtype_name, activation, top_k, experts):
                    if sites and site.name not in sites:
                        continue
                    sig = (site.name, dtype_name, kwargs.get("ATOMIC"), kwargs.get("TOP_K"), kwargs.get("E"),
                           tuple(k for k, v in kwargs.items() if v is None))
                    if sig in seen:
                        continue
                    seen.add(sig)
                    for arch in spec["archs"]:
                        limits = ARCH_LIMITS[arch]
                        for cfg in site.kept(limits, es, kwargs):
                            if budget_s is not None and time.time() - start > budget_s:
                                raise TimeoutError(f"compile matrix: time budget of {budget_s:.0f} s spent")
                            shared, regs, spill, cached, secs = compile_one(site, kwargs, cfg, arch, cache)
                            if not cached and len(rows) % 10 == 0:
                                _save(path, cache)  # an interrupted run keeps what it compiled
                            est_shared, est_regs = site.cost(cfg, es, kwargs)
                            rows.append(Row(site.name, arch, dtype_name, variant, _config_str(cfg), shared,
                                            limits.shared_bytes, regs, spill, est_shared, est_regs, round(secs, 1),
                                            cached))
                            log(f"{site.name:20s} sm_{arch} {dtype_name:8s} {_config_str(cfg):22s} smem {shared:6d}"
                                f"/{limits.shared_bytes} regs {regs:3d} spill {spill:4d}"
                                f"{' (cached)' if cached else f' {secs:.1f} s'}")
    finally:
        _save(path, cache)
    return rows


def _save(path: str, cache: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)


def problems(rows: list[Row]) -> list[str]:
    """Kept configs that do not fit by the compiler's figures (shared memory, or spills not accepted)."""
    out = []
    for r in rows:
        if r.shared > r.shared_limit:
            out.append(f"{r.site} sm_{r.arch} {r.dtype} {r.config}: shared {r.shared} > {r.shared_limit}")
        if r.spill_bytes and (r.site, r.arch, r.dtype) not in ACCEPTED_SPILLS:
            out.append(f"{r.site} sm_{r.arch} {r.dtype} {r.config}: {r.spill_bytes} bytes of register spills "
                       f"({r.registers} registers)")
    return out


def markdown(rows: list[Row], archs=(89, 90), dtypes=("bfloat16",)) -> str:
    """One line per (site, dtype, config) the pruner keeps; per architecture the compiler's shared memory
    (KiB), ptxas registers and spill bytes ("-": pruned for that architecture). Where several variants
    share a site (k = 1 and 2, E = 4 and 8, with or without biases) the line shows the worst of them."""
    cells: dict = {}
    for r in rows:
        if r.arch in archs and r.dtype in dtypes:
            cell = cells.setdefault((r.site, r.dtype, r.config), {})
            old = cell.get(r.arch)
            if old is None or (r.spill_bytes, r.registers, r.shared) > (old.spill_bytes, old.registers, old.shared):
                cell[r.arch] = r
    head = "| site | dtype | config (BLOCK_M x N x K x GROUP_M, warps, stages) | " + " | ".join(
        f"sm_{a} smem KiB / regs / spill" for a in archs) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(archs)]
    for (site, dtype, config), by_arch in sorted(cells.items()):
        cols = [f"{by_arch[a].shared / 1024:.0f} / {by_arch[a].registers} / {by_arch[a].spill_bytes}" if a in by_arch
                else "-" for a in archs]
        lines.append(f"| {site} | {dtype} | {config} | " + " | ".join(cols) + " |")
    limits = ", ".join(f"sm_{a} {r.shared_limit // 1024} KiB" for a in archs
                       for r in [next((x for x in rows if x.arch == a), None)] if r is not None)
    lines.append(f"\nShared-memory limits per block: {limits}; 255 registers per thread.")
    return "\n".join(lines)


def _csv(value: str | None) -> list[str] | None:
    return [x for x in value.split(",") if x] if value else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", default="ci", choices=sorted(SUBSETS))
    ap.add_argument("--all", action="store_true", help="the whole matrix (same as --subset all)")
    ap.add_argument("--dtypes", default=None, help="comma-separated dtypes instead of the subset's " + ",".join(DTYPES))
    ap.add_argument("--archs", default=None, help="comma-separated compute capabilities instead of the subset's: 89,90")
    ap.add_argument("--sites", default=None, help="comma-separated launch-site names (default: every site)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--markdown", action="store_true", help="print the sm_89/sm_90 table")
    ap.add_argument("--markdown-dtypes", default="bfloat16", help="comma-separated dtypes of the table")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_matrix: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    from .triton_path import SITES

    dtypes, sites = _csv(args.dtypes), _csv(args.sites)
    archs = [int(a) for a in _csv(args.archs)] if args.archs else None
    unknown = (sorted(set(dtypes or ()) - set(DTYPES)) + sorted(set(archs or ()) - set(ARCHS))
               + sorted(set(sites or ()) - set(SITES)))
    if unknown:
        ap.error(f"unknown dtype, arch or site: {unknown}")
    rows = run_matrix("all" if args.all else args.subset, args.budget_s, dtypes=dtypes, archs=archs, sites=sites,
                      log=(lambda *a: None) if args.quiet else print)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f)
    if args.markdown:
        print(markdown(rows, dtypes=tuple(dtypes or args.markdown_dtypes.split(","))))
    bad = problems(rows)
    for b in bad:
        print("DOES NOT FIT:", b)
    print(f"compile matrix: {len(rows)} compiled configs, {len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
