"""Launch sites of the Triton kernels: autotune spaces, per-device pruning, pinning and capture.

Every place that launches a kernel is a :class:`LaunchSite` with its own autotuner, hence its own
cache: the forward and the backward of one GEMM never share a tile, and a site's key includes the
bucketed token count (``T_BUCKET``). Before anything is compiled, the candidate configs are pruned for
the device by an estimate of their shared memory and registers per thread (:meth:`LaunchSite.kept`);
``tests/test_compile_matrix.py`` checks the estimate against the compiler's own figures.

Environment:
    MEMOE_TRITON_CONFIG          pins one config for every grouped-GEMM site, e.g.
                                 ``BLOCK_M=64,BLOCK_N=128,BLOCK_K=32,GROUP_M=8,num_warps=4,num_stages=3``.
    MEMOE_TRITON_CONFIG_<SITE>   pins one site (upper-case site name, e.g. ``MEMOE_TRITON_CONFIG_EXPERT_DX_GLU``).
    TRITON_INTERPRET=1           runs the kernels on CPU tensors (tests): no autotuning, the site's
                                 small interpreter config unless one is pinned.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

CONFIG_ENV = "MEMOE_TRITON_CONFIG"
MAX_T_BUCKET = 1 << 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def t_bucket(n: int) -> int:
    """The autotune key of a token (or slot) count: the next power of two, at least 16, at most 65536."""
    return min(MAX_T_BUCKET, triton.next_power_of_2(max(16, int(n))))


@dataclass(frozen=True)
class DeviceLimits:
    """What a config must fit: opt-in shared memory per block and registers per thread."""

    name: str
    shared_bytes: int
    max_regs: int = 255


# Opt-in shared memory per block of the architectures the kernels target (CUDA programming guide,
# "Technical specifications per compute capability").
ARCH_LIMITS = {
    80: DeviceLimits("sm_80", 166912),
    86: DeviceLimits("sm_86", 101376),
    89: DeviceLimits("sm_89", 101376),
    90: DeviceLimits("sm_90", 232448),
}


def device_limits(device: torch.device) -> DeviceLimits | None:
    """The limits of a CUDA device from the driver; None off CUDA (the interpreter has no limits)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(idx)
    major, minor = torch.cuda.get_device_capability(idx)
    return DeviceLimits(f"sm_{major}{minor}", int(props["max_shared_mem"]))


@dataclass(frozen=True)
class Footprint:
    """Per K step, a GEMM site loads ``n_a`` tiles of (BLOCK_M, BLOCK_K) and ``n_b`` of (BLOCK_K, BLOCK_N)
    and keeps ``n_acc`` fp32 accumulators of (BLOCK_M, BLOCK_N). ``acc_cost`` is the registers per
    accumulator element of a thread: 1.5 for an epilogue that stores rows in place, 3.5 for one that
    scatters to token rows (64-bit offsets, masks and the coefficients live beside the accumulator);
    fitted to ``ptxas -v`` over the compile matrix (tests/test_compile_matrix.py)."""

    n_a: int = 1
    n_b: int = 1
    n_acc: int = 1
    acc_cost: float = 3.5


def gemm_shared_bytes(cfg: triton.Config, fp: Footprint, elem_bytes: int) -> int:
    """Shared memory of a pipelined GEMM config: one buffer per stage for every operand tile, or the
    epilogue's layout conversion of the accumulators, whichever is larger."""
    m, n, k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    pipeline = cfg.num_stages * (fp.n_a * m * k + fp.n_b * k * n) * elem_bytes
    return max(pipeline + 8192, m * n * 4)


def gemm_registers(cfg: triton.Config, fp: Footprint, elem_bytes: int) -> int:
    """Registers per thread: the fp32 accumulators and what the epilogue keeps beside them, the operand
    fragments of one K step, and a fixed allowance for addresses, masks and loop state.

    16-bit operands: every tile of the K step, packed two to a register. fp32 operands (tf32x3): each
    element is held as loaded, as its tf32 high part, its residual and the residual's tf32 part, so
    four registers per element, and a larger allowance for the split's temporaries; a site's dots run
    one after the other, so only one dot's pair of tiles counts. Fitted to ``ptxas -v`` over the fp32
    compile matrix on sm_89 and sm_90, where the 16-bit model (fp32 counted twice) kept 13 GEMM configs
    that spill (benchmarks/RESULTS.md)."""
    m, n, k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    threads = 32 * cfg.num_warps
    acc = int(fp.acc_cost * fp.n_acc * m * n / threads)
    if elem_bytes == 4:
        return acc + 4 * (m * k + k * n) // threads + 72
    operands = (fp.n_a * m * k + fp.n_b * k * n) * elem_bytes // 4 // threads
    return acc + operands + 48


def _cfg(bm, bn, bk, gm, w, s) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}, num_warps=w, num_stages=s)


def gemm_candidates() -> list[triton.Config]:
    """The search space of the grouped-GEMM sites (before pruning): small row tiles for editing-sized
    calls (tens of slots per expert), wide ones for long prefills; BLOCK_K up to 128; grouped order."""
    return [
        _cfg(16, 64, 64, 1, 4, 3), _cfg(16, 64, 128, 1, 4, 3), _cfg(16, 128, 64, 1, 4, 4), _cfg(32, 64, 64, 8, 4, 3),
        _cfg(32, 64, 32, 8, 4, 2), _cfg(32, 64, 64, 8, 4, 4), _cfg(32, 128, 64, 8, 4, 3), _cfg(64, 64, 32, 8, 4, 4),
        _cfg(64, 64, 64, 8, 4, 3), _cfg(64, 128, 32, 8, 4, 4), _cfg(64, 128, 64, 8, 4, 3), _cfg(128, 64, 64, 8, 4, 3),
        _cfg(128, 128, 32, 8, 8, 3), _cfg(128, 128, 64, 8, 8, 3), _cfg(128, 256, 64, 8, 8, 3), _cfg(64, 256, 32, 8, 8, 4),
        _cfg(64, 64, 128, 8, 4, 3), _cfg(128, 128, 128, 8, 8, 2),
    ]


def gate_candidates(inner: str = "BLOCK_K") -> list[triton.Config]:
    """Token tiles of the gate kernels; ``inner`` names the second tile (the reduction over D, or the
    dx / weight-gradient column tile)."""
    return [triton.Config({"BLOCK_T": bt, inner: bk}, num_warps=w, num_stages=2)
            for bt, bk, w in ((16, 64, 4), (16, 128, 4), (32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 8),
                              (128, 32, 8))]


def gate_cost(inner: str, fp32_product: float = 1.0):
    """(shared bytes, registers per thread) of a gate config: the (BLOCK_T, BLOCK_E, inner) fp32 product
    that the broadcast-and-reduce keeps in registers, and its cross-warp reduction in shared memory.
    ``fp32_product`` scales the product's registers when the site's operand is fp32."""

    def cost(cfg: triton.Config, elem_bytes: int, nargs: dict):
        block_e = max(2, triton.next_power_of_2(int(nargs.get("E", 16))))
        threads = 32 * cfg.num_warps
        elems = cfg.kwargs.get("BLOCK_T", cfg.kwargs.get("BLOCK_S", 16)) * block_e * cfg.kwargs[inner]
        per_thread = elems // threads
        if elem_bytes == 4:
            per_thread = int(per_thread * fp32_product)
        return elems // 2 + 4096, per_thread + 96

    return cost


def parse_config(spec: str) -> triton.Config:
    """``"BLOCK_M=64,BLOCK_N=128,num_warps=4"`` -> a Config (launch options by name, the rest meta-parameters)."""
    try:
        kv = dict(item.split("=") for item in spec.replace(" ", "").split(",") if item)
        launch = {k: int(kv.pop(k)) for k in ("num_warps", "num_stages") if k in kv}
        return triton.Config({k: int(v) for k, v in kv.items()}, **launch)
    except ValueError as exc:
        raise ValueError(f"{CONFIG_ENV}: cannot parse {spec!r} as KEY=INT,...: {exc}") from None


_PINNED: dict[str, triton.Config] = {}
_CAPTURE: list | None = None


@contextlib.contextmanager
def pinned(configs: dict):
    """Pins ``{site name: Config}`` for the duration (tests run every selectable config this way)."""
    old = dict(_PINNED)
    _PINNED.update(configs)
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(old)


@contextlib.contextmanager
def capture_launches():
    """Records ``(site, kwargs)`` of every launch instead of running it (the compile matrix drives the
    real launchers with meta tensors this way, so it compiles exactly what the runtime would)."""
    global _CAPTURE
    old, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = old


class LaunchSite:
    """One launch site: a kernel, its candidate configs, its autotune key and its own autotuner.

    ``cost(cfg, elem_bytes) -> (shared bytes, registers per thread)`` is the pruning estimate;
    ``dtype_arg`` names the argument whose dtype sets the operand size; ``restore`` the outputs an
    autotuning trial accumulates into (restored between trials).
    """

    def __init__(self, name: str, kernel, candidates: list, key: list, cost, dtype_arg: str,
                 interpret_config: triton.Config, restore: tuple = (), gemm: bool = True):
        self.name = name
        self.kernel = kernel
        self.candidates = candidates
        self.key = key
        self.cost = cost
        self.dtype_arg = dtype_arg
        self.interpret_config = interpret_config
        self.restore = list(restore)
        self.gemm = gemm
        self._tuner = None
        self.last_kwargs = None

    def fits(self, cfg: triton.Config, limits: DeviceLimits, elem_bytes: int, nargs: dict | None = None) -> bool:
        shared, regs = self.cost(cfg, elem_bytes, nargs or {})
        return shared <= limits.shared_bytes and regs <= limits.max_regs

    def kept(self, limits: DeviceLimits | None, elem_bytes: int, nargs: dict | None = None) -> list:
        """The candidates that fit ``limits``; at least the cheapest one, so the site can always launch.
        ``nargs`` are the launch's arguments by name (the gate sites' cost depends on E)."""
        if limits is None:
            return list(self.candidates)
        nargs = nargs or {}
        kept = [c for c in self.candidates if self.fits(c, limits, elem_bytes, nargs)]
        if not kept:
            kept = [min(self.candidates, key=lambda c: self.cost(c, elem_bytes, nargs))]
        return kept

    def _prune(self, configs, named_args, **kwargs):
        t = named_args[self.dtype_arg]
        return self.kept(device_limits(t.device), t.element_size(), {**named_args, **kwargs})

    @property
    def tuner(self):
        if self._tuner is None:
            self._tuner = triton.autotune(
                self.candidates, key=self.key, prune_configs_by={"early_config_prune": self._prune},
                restore_value=self.restore or None,
            )(self.kernel)
        return self._tuner

    def pinned_config(self) -> triton.Config | None:
        if self.name in _PINNED:
            return _PINNED[self.name]
        spec = os.environ.get(f"{CONFIG_ENV}_{self.name.upper()}")
        if spec is None and self.gemm:
            spec = os.environ.get(CONFIG_ENV)
        return parse_config(spec) if spec else None

    def chosen(self) -> dict:
        """{autotune key: chosen Config} so far (empty until the site has been autotuned)."""
        return dict(self._tuner.cache) if self._tuner is not None else {}

    # Set by benchmarks/gpu_check.py: each site keeps its latest launch arguments, so that the compiled
    # kernel of a chosen config can be looked up for its on-device registers, spills and shared memory.
    keep_last = False

    def launch(self, grid, **kwargs) -> None:
        if LaunchSite.keep_last:
            self.last_kwargs = kwargs
        if _CAPTURE is not None:
            _CAPTURE.append((self, kwargs))
            return
        cfg = self.pinned_config()
        if cfg is None and interpreting():
            cfg = self.interpret_config
        if cfg is not None:
            self.kernel[grid](**kwargs, **cfg.all_kwargs())
        else:
            self.tuner[grid](**kwargs)


def gemm_site(name: str, kernel, footprint: Footprint, key: list, dtype_arg: str, restore: tuple = ()) -> LaunchSite:
    return LaunchSite(
        name, kernel, gemm_candidates(), key + ["T_BUCKET"],
        cost=lambda cfg, es, _nargs: (gemm_shared_bytes(cfg, footprint, es), gemm_registers(cfg, footprint, es)),
        dtype_arg=dtype_arg, interpret_config=_cfg(16, 16, 16, 2, 4, 2), restore=restore,
    )


__all__ = [
    "ARCH_LIMITS", "CONFIG_ENV", "DeviceLimits", "Footprint", "LaunchSite", "capture_launches", "device_limits",
    "gate_candidates", "gate_cost", "gemm_candidates", "gemm_registers", "gemm_shared_bytes", "gemm_site", "interpreting",
    "config_id", "parse_config", "pinned", "selectable", "t_bucket",
]


def selectable(site: LaunchSite, nargs: dict | None = None) -> list:
    """The configs the autotuner of ``site`` can choose on some target: kept on at least one of
    ARCH_LIMITS for 16-bit or fp32 operands (the interpreter tests run every one of them)."""
    out = []
    for cfg in site.candidates:
        if any(site.fits(cfg, limits, es, nargs) for limits in ARCH_LIMITS.values() for es in (2, 4)):
            out.append(cfg)
    return out


def config_id(cfg: triton.Config) -> str:
    return "-".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in cfg.kwargs.items()) + \
        f"-w{cfg.num_warps}-s{cfg.num_stages}"
