"""Compile a kernel variant once, against fake tensors, into a TVM-FFI callable.

Batch size and pool size are symbolic, so one compiled function serves every batch. The callable
takes torch tensors (through DLPack) in the order of `argument_names(spec)` and launches on the
current torch stream. This module is the kernel layer's only entry point; it never imports torch.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

from ..spec import DTYPE_BYTES, KernelSpec
from .common import CUTLASS_DTYPES, vec_elems
from .klast import KLastDecode
from .kmajor import KMajorDecode
from .kmtp import KLastMTP
from .kmtp_mma import KLastMTPMma

# CTA shapes by (layout, regime, state dtype): (warps, rows per thread, lanes per row) for K-last,
# (warps, row lanes) for K-major, (warps, 16-row blocks per warp) for the tensor-core MTP kernel.
# Chosen on the H100 with benchmarks/tune.py (benchmarks/RESULTS.md); `KernelSpec.tile` overrides
# them. The MTP kernels use the "mtp" rows, "mtp_long" from LONG_MTP_TOKENS tokens on, "mtp_inter"
# when they write the intermediate states (these two hold only the shapes measured to differ from
# "mtp"; the others fall back to it) and "mtp_mma" for the tensor-core kernel. With
# intermediates the writes bound the kernel, and narrower rows per thread (more CTAs, shorter token
# chains) keep more stores in flight: 1.5-3.5 % faster at B >= 64. For long fp32 runs, 4 rows per
# thread halve the shared-memory reads of q/k per row and token: 1-11 % faster at B >= 64 (T = 8
# to 16, with the L2 prefetch), level at T = 5-7, slower at T <= 4 (tenth pass).
TILES = {
    ("klast", "small", "float32"): (4, 1, 16),
    ("klast", "large", "float32"): (4, 4, 16),
    ("klast", "small", "bfloat16"): (8, 1, 8),
    ("klast", "large", "bfloat16"): (4, 4, 8),
    ("mtp", "small", "float32"): (4, 2, 8),
    ("mtp", "large", "float32"): (4, 2, 8),
    ("mtp", "small", "bfloat16"): (4, 2, 8),
    ("mtp", "large", "bfloat16"): (2, 4, 8),
    ("mtp_long", "large", "float32"): (4, 4, 8),
    ("mtp_inter", "large", "float32"): (8, 1, 16),
    ("mtp_inter", "large", "bfloat16"): (4, 2, 16),
    ("mtp_mma", "large", "bfloat16"): (4, 2),
    ("kmajor", "small", "float32"): (4, 4),
    ("kmajor", "large", "float32"): (8, 2),
    ("kmajor", "small", "bfloat16"): (4, 4),
    ("kmajor", "large", "bfloat16"): (4, 2),
}


# Fewest tokens for which the tensor-core MTP kernel is used (large batch, bf16 state).
MMA_MIN_TOKENS = 5
# Fewest tokens for which the MTP kernel takes the "mtp_long" CTA shapes.
LONG_MTP_TOKENS = 8


def uses_mma(spec: KernelSpec) -> bool:
    """Whether kmtp_mma.KLastMTPMma (tensor cores) builds `spec`: MTP with a bf16 state and bf16
    q/k/v, no intermediates, in the large-batch regime from MMA_MIN_TOKENS tokens on. Measured on
    the H100 (benchmarks/RESULTS.md, seventh and eighth passes): 1.4-1.5x faster than kmtp at T = 8
    and 2.2x at T = 16 for B >= 16, 10 % at T = 6; slower at T <= 4 for B >= 64 (1.5-6 %), with
    intermediates (1.6-12 %) and at B = 1 (5-47 %). A 2-tuple `spec.tile` (tuning runs) asks for
    it, a 3-tuple for kmtp."""
    if not spec.multi_token or spec.state_dtype != "bfloat16" or spec.io_dtype != "bfloat16" or spec.has_intermediate:
        return False
    if spec.tile is not None:
        return len(spec.tile) == 2
    return spec.regime == "large" and spec.T >= MMA_MIN_TOKENS


def tile_for(spec: KernelSpec) -> tuple:
    if spec.tile is not None:
        return spec.tile
    if uses_mma(spec):
        warps, blocks = TILES[("mtp_mma", spec.regime, spec.state_dtype)]
        # One 16-row block per warp at K = 256: two hold 128 registers of state alone.
        blocks = 1 if spec.K > 128 else blocks
        return min(warps, spec.V // (16 * blocks)), blocks  # the CTA's warps share one head
    table = spec.layout
    if spec.multi_token:
        table = "mtp_inter" if spec.has_intermediate else "mtp_long" if spec.T >= LONG_MTP_TOKENS else "mtp"
        if (table, spec.regime, spec.state_dtype) not in TILES:
            table = "mtp"
    if spec.layout == "klast":
        warps, rows, lanes = TILES[(table, spec.regime, spec.state_dtype)]
        lanes = min(lanes, spec.K // vec_elems(spec.state_dtype))
        # Small head dims: keep at least one full tile per head.
        while warps * (32 // lanes) * rows > spec.V and rows > 1:
            rows //= 2
        while warps * (32 // lanes) * rows > spec.V:
            warps //= 2
        return warps, rows, lanes
    warps, row_lanes = TILES[(table, spec.regime, spec.state_dtype)]
    while (32 // row_lanes) * vec_elems(spec.state_dtype) > spec.V:
        row_lanes *= 2  # more row lanes, fewer column lanes: the column tile fits in V
    while warps * row_lanes > spec.K:
        warps //= 2
    return warps, row_lanes


def mtp_options(spec: KernelSpec, tile: tuple) -> dict:
    """The unchecked token loop (kmtp.KLastMTP), measured for the fp32 large-batch shape (4, 2, 8)
    without intermediates only (benchmarks/RESULTS.md, sixth pass): faster for 4 < T <= 8; slower
    at T = 16, neutral at T <= 4, slower for a bf16 state, at small batch, with intermediates and
    with the L2 prefetch (which it turns off). From LONG_MTP_TOKENS on the (4, 4, 8) shape with the
    prefetch is faster still (tenth pass), so only T = 5-7 take it."""
    if spec.state_dtype != "float32" or spec.regime != "large" or tile != (4, 2, 8) or spec.has_intermediate:
        return {}
    return dict(unchecked_loop=4 < spec.T <= 8)


# How far ahead, in bytes of state, a CTA prefetches a later CTA's state tile into L2
# (common.DecodeKernel.prefetch_later), by kernel. Measured on the H100 for the builds that
# prefetch_ctas turns it on for (benchmarks/RESULTS.md, ninth and tenth passes): 2-6 % faster at
# B = 64 and 2-4 % at B = 256 (K-last T = 1: 0.6-1.5 %); twice these distances are slower (the
# prefetched lines are evicted first). kmtp with at most SHORT_MTP_TOKENS tokens ("mtp_short")
# gains from 6 MiB: bf16 B = 64 1.3 % faster, fp32 0.5 %; from T = 3 on it is level or slower at
# B = 256 (twelfth pass).
PREFETCH_BYTES = {"kmajor": 8 << 20, "klast": 4 << 20, "mtp": 4 << 20, "mtp_short": 6 << 20, "mtp_mma": 4 << 20}
SHORT_MTP_TOKENS = 2


def prefetch_ctas(spec: KernelSpec, kernel) -> int:
    """The L2 prefetch distance of `kernel` in CTAs (0: none). On for the large-batch builds
    without intermediates of the K-last kernels (T = 1 and MTP) and of the bf16 K-major kernel
    with one CTA per head (its tile must be contiguous). Off where it measured slower or neutral:
    with intermediates (within 1 %), with the unchecked loop of the fp32 MTP builds (T = 5-8 on
    (4, 2, 8): 2-4 % slower) and where it was not measured (small batch, fp32 K-major)."""
    if spec.regime != "large" or spec.has_intermediate or not kernel.tile_bytes:
        return 0
    if isinstance(kernel, KLastMTPMma):
        key = "mtp_mma"
    elif isinstance(kernel, KLastMTP):
        if kernel.unchecked_loop:
            return 0
        key = "mtp_short" if spec.T <= SHORT_MTP_TOKENS else "mtp"
    elif isinstance(kernel, KLastDecode):
        key = "klast"
    elif isinstance(kernel, KMajorDecode) and spec.state_dtype == "bfloat16":
        key = "kmajor"
    else:
        return 0
    return max(1, PREFETCH_BYTES[key] // kernel.tile_bytes)


def prefetch_inputs(spec: KernelSpec, kernel) -> bool:
    """Whether the L2 prefetch also brings in the later CTA's q/k/v rows and gate inputs
    (common.DecodeKernel._prefetch_inputs): for the bf16-state MTP kernels from
    SHORT_MTP_TOKENS + 1 tokens on. Measured on the H100 (benchmarks/RESULTS.md, fourteenth pass):
    up to 1.6 µs faster at B = 64 (T = 8: 0-0.4) and up to 2.4 % at B = 256 (T = 16); slower at
    T = 2 (B = 256), level for an fp32 state at T = 4 and 1.9 % slower at T = 8, so off there."""
    # A TMA bulk prefetch moves whole 16-byte units: the CTA's v values must make some.
    v_bytes = kernel.tile_rows * DTYPE_BYTES[spec.io_dtype]
    return (isinstance(kernel, (KLastMTP, KLastMTPMma)) and spec.state_dtype == "bfloat16"
            and spec.T > SHORT_MTP_TOKENS and v_bytes > 0 and v_bytes % 16 == 0)


def make_kernel(spec: KernelSpec):
    tile = tile_for(spec)
    if uses_mma(spec):
        kernel = KLastMTPMma(spec, num_warps=tile[0], blocks_per_warp=tile[1])
    elif spec.layout == "klast":
        shape = dict(num_warps=tile[0], rows_per_thread=tile[1], lanes_per_row=tile[2])
        kernel = KLastMTP(spec, **shape, **mtp_options(spec, tile)) if spec.multi_token else KLastDecode(spec, **shape)
    else:
        kernel = KMajorDecode(spec, num_warps=tile[0], row_lanes=tile[1])
    kernel.prefetch_ctas = prefetch_ctas(spec, kernel)
    kernel.prefetch_inputs = prefetch_inputs(spec, kernel)
    return kernel


def argument_names(spec: KernelSpec) -> tuple[str, ...]:
    """Order of the compiled function's tensor arguments (None where a tensor is absent)."""
    return (
        "q", "k", "v", "a", "b", "A_log", "dt_bias", "state", "state_indices",
        "output_state_indices", "accepted_tokens", "intermediate_states", "output",
    )


def _strided(dtype, shape, divisibility: int, inner_static: tuple = (1,)):
    """Fake tensor whose trailing strides are static and whose leading strides are dynamic
    (64-bit, multiples of `divisibility` elements, so 16-byte accesses stay provably aligned)."""
    n_dyn = len(shape) - len(inner_static)
    stride = tuple(cute.sym_int64(divisibility=divisibility) for _ in range(n_dyn)) + tuple(inner_static)
    align = max(divisibility * dtype.width // 8, dtype.width // 8)
    return make_fake_tensor(dtype, shape, stride=stride, assumed_align=align)


def fake_arguments(spec: KernelSpec) -> tuple:
    io = CUTLASS_DTYPES[spec.io_dtype]
    st = CUTLASS_DTYPES[spec.state_dtype]
    gate = CUTLASS_DTYPES[spec.gate_dtype]
    B = cute.sym_int()
    T, H, HV, K, V = spec.T, spec.H, spec.HV, spec.K, spec.V
    io_div = vec_elems(spec.io_dtype)
    st_div = vec_elems(spec.state_dtype)
    q = _strided(io, (B, T, H, K), io_div)
    k = _strided(io, (B, T, H, K), io_div)
    v = _strided(io, (B, T, HV, V), io_div)
    a = _strided(gate, (B, T, HV), 1)
    b = _strided(gate, (B, T, HV), 1)
    a_log = make_fake_tensor(cutlass.Float32, (HV,), stride=(1,), assumed_align=4)
    dt_bias = make_fake_tensor(CUTLASS_DTYPES[spec.dt_bias_dtype], (HV,), stride=(1,))
    rows, cols = (V, K) if spec.layout == "klast" else (K, V)
    pool = cute.sym_int() if spec.pool else B
    state = _strided(st, (pool, HV, rows, cols), st_div, inner_static=(rows * cols, cols, 1))
    idx_t = CUTLASS_DTYPES[spec.index_dtype] if spec.pool else None
    idx = make_fake_tensor(idx_t, (B,), stride=(1,)) if spec.pool else None
    out_idx = make_fake_tensor(idx_t, (B,), stride=(1,)) if spec.has_out_indices else None
    acc = make_fake_tensor(cutlass.Int32, (B,), stride=(1,)) if spec.has_accepted else None
    inter = (
        _strided(st, (B, cute.sym_int(), HV, rows, cols), st_div, inner_static=(rows * cols, cols, 1))
        if spec.has_intermediate
        else None
    )
    out = _strided(io, (B, T, HV, V), 1)
    return (q, k, v, a, b, a_log, dt_bias, state, idx, out_idx, acc, inter, out)


def compile_kernel(spec: KernelSpec, *, keep_dir: Optional[str] = None) -> Callable:
    """Compile `spec` for `spec.arch`; returns the TVM-FFI callable (no GPU needed to compile)."""
    options = f"--enable-tvm-ffi --gpu-arch={spec.arch}"
    if keep_dir:
        options += f" --keep-ptx --keep-cubin --dump-dir={keep_dir}"
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(make_kernel(spec), *fake_arguments(spec), stream, options=options)


def timed_compile(spec: KernelSpec, **kw) -> tuple[Callable, float]:
    start = time.perf_counter()
    fn = compile_kernel(spec, **kw)
    return fn, time.perf_counter() - start
