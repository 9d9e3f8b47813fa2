"""Kernel selection: every rule that picks the kernel class, CTA tile, L2 prefetch and token loop
of a build, and the batch regime. Nothing else decides these; the measured numbers they read are
the device tables of kernels/device_tables.py.

Plain Python (no torch, no CuTe): the API layer asks it for the regime and the device class, the
kernel layer for a BuildConfig. The numbers come from measurements; each constant cites the
heading of benchmarks/RESULTS.md ("Measurement-backed constants") that holds them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple, Union

from ..spec import CommitSpec, ConvGateSpec, KernelSpec, conv_gate_blocks, vec_elems
# The tables these rules read; their names stay reachable here, where the tests and the timing
# scripts switch a device's table (DEVICE_TABLES[name]).
from .device_tables import DEVICE_TABLES, KNOWN_DEVICES, SM90_HBM3, SM90_HBM3E, DeviceClass, DeviceTable  # noqa: F401

# Kernel classes (names of the kernel layer's classes, kernels.build.KERNELS).
KLAST, KMAJOR, KMTP, KMTP_MMA = "KLastDecode", "KMajorDecode", "KLastMTP", "KLastMTPMma"
REPLAY_COMMIT, REPLAY_COMMIT_MMA = "ReplayCommit", "ReplayCommitMma"


def device_class(arch: str, sm_count: int, memory_gib: float) -> str:
    """Name of the tuning table for a device: that of the nearest known device of the same arch
    (by SM count, then memory), else of the nearest of any arch."""
    def distance(d: DeviceClass):
        return (d.arch != arch, abs(d.sm_count - sm_count), abs(d.memory_gib - memory_gib))

    return min(KNOWN_DEVICES, key=distance).table


def _table(spec: Union[KernelSpec, CommitSpec]) -> DeviceTable:
    return _table_of(spec.device_class, spec.arch)


def _table_of(device_class: Optional[str], arch: str) -> DeviceTable:
    """The table of a device class, or (None) the reference table of `arch`."""
    return DEVICE_TABLES[device_class] if device_class is not None else _arch_table(arch)


def regime(batch: int, HV: int, sm_count: int, device_class_name: Optional[str] = None) -> str:
    """"small" or "large": the batch regime of a call (a compile-time choice, so one call
    signature uses at most two builds)."""
    table = DEVICE_TABLES[device_class_name] if device_class_name else SM90_HBM3
    return "small" if batch * HV <= table.small_regime_heads_per_sm * sm_count else "large"


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How a KernelSpec is built: the kernel class and its static options."""

    kernel: str  # KLAST, KMAJOR, KMTP, KMTP_MMA, REPLAY_COMMIT or REPLAY_COMMIT_MMA
    tile: Tuple[int, ...]  # CTA shape, in the kernel's own terms (see DeviceTable.tiles)
    # L2 prefetch of a later CTA's state tile, this many bytes of state ahead (0: none); the
    # kernel turns it into whole CTA tiles and skips it where its tile is not contiguous.
    prefetch_bytes: int = 0
    # The prefetch also brings in the later CTA's q/k/v rows and gate inputs.
    prefetch_inputs: bool = False
    # kmtp: a second token loop without the per-token rescale test, for CTAs whose decays cannot
    # reach the rescale bound.
    unchecked_loop: bool = False
    # kmtp, a ReplaySSM verify: value heads of each window CTA, CTAs after the decode CTAs that store
    # the windows (0: the decode CTAs store them; _window_heads).
    window_heads: int = 0

    @classmethod
    def for_spec(cls, spec: Union[KernelSpec, CommitSpec]) -> "BuildConfig":
        table = _table(spec)
        if isinstance(spec, CommitSpec):
            kernel = _commit_kernel(spec, table)
            return cls(kernel=kernel, tile=_commit_tile(spec, table, kernel),
                       prefetch_bytes=_commit_prefetch_bytes(spec, table, kernel))
        kernel = _kernel(spec, table)
        tile = _tile(spec, table, kernel)
        unchecked = _unchecked_loop(spec, kernel, tile)
        prefetch = _prefetch_bytes(spec, table, kernel, unchecked)
        return cls(
            kernel=kernel,
            tile=tile,
            prefetch_bytes=prefetch,
            prefetch_inputs=_prefetch_inputs(spec, table, kernel),
            unchecked_loop=unchecked,
            window_heads=_window_heads(spec, table, kernel, tile, prefetch),
        )


def _kernel(spec: KernelSpec, table: DeviceTable) -> str:
    """The tensor-core MTP kernel serves bf16 q/k/v in the large-batch regime from a table's token
    threshold on: mma_min_tokens for a bf16 state without per-token state writes, mma_min_tokens_fp32
    for an fp32 state, mma_min_tokens_writes for intermediates or token slots (None: the token loop
    serves them), mma_min_tokens_frozen (by state dtype) for MTP that leaves the state as it is.
    Measured for a bf16 state, on the H100: 1.4-1.5x faster than kmtp at T = 8 and 2.2x at T = 16
    for B >= 16, 10 % at T = 6; slower at T <= 4 for B >= 64 (1.5-6 %), with intermediates (1.6-12 %)
    and at B = 1 (5-47 %) (RESULTS.md "Tensor cores for MTP"); without a state update faster from
    T = 3 for a bf16 state and T = 6 for an fp32 one (the H100 table's mma_min_tokens_frozen). For an
    fp32 state on the H200 with its (2, 1) shape: 1.07-1.13x faster than the token loop at T = 8 for
    B = 16-256, 0.90-0.97x at T = 4 (RESULTS.md "Tensor cores for an fp32 state"); with per-token
    writes at T = 4 the token loop is faster for both state dtypes. On the H200, where the token loop
    is compute-bound, from T = 3 for a bf16 state: 1.05x at T = 3 and 1.2x at T = 4 for B = 16-256,
    slower at T = 2 (RESULTS.md "H200 tables"). A 2-tuple `spec.tile` (tuning runs) asks for it, a
    3-tuple for kmtp. vLLM's slot rule and varlen builds take kmtp (the tensor-core kernel addresses
    tokens as [B, T] rows), and so do EAGLE trees (its closed form is a chain). A ReplaySSM verify
    (replay_cache) follows the same choice as plain MTP without a state update: both kernels store
    the windows from the raw inputs they load."""
    if spec.layout == "kmajor":
        return KMAJOR
    if not spec.multi_token:
        return KLAST
    mma_ok = (spec.state_dtype in ("bfloat16", "float32") and spec.io_dtype == "bfloat16" and not spec.vllm_slots
              and spec.varlen is None and spec.tree_parents is None)
    if spec.tile is not None:
        if len(spec.tile) == 2 and not mma_ok:
            raise ValueError(f"a 2-tuple tile asks for the tensor-core MTP kernel, which does not serve {spec}")
        return KMTP_MMA if len(spec.tile) == 2 else KMTP
    if spec.writes_states:
        min_tokens = table.mma_min_tokens_writes
    elif not spec.update_state and spec.state_dtype in table.mma_min_tokens_frozen:
        min_tokens = table.mma_min_tokens_frozen[spec.state_dtype]
    else:
        min_tokens = table.mma_min_tokens if spec.state_dtype == "bfloat16" else table.mma_min_tokens_fp32
    return (KMTP_MMA if mma_ok and min_tokens is not None and spec.regime == "large" and spec.T >= min_tokens
            else KMTP)


def _tile(spec: KernelSpec, table: DeviceTable, kernel: str) -> Tuple[int, ...]:
    if spec.tile is not None:
        return spec.tile
    tiles = table.tiles
    if kernel == KMTP_MMA:
        return _mma_tile(spec, *tiles[("mtp_mma", spec.regime, spec.state_dtype)])
    name = spec.layout
    if kernel == KMTP:
        name = "mtp_inter" if spec.writes_states else "mtp_long" if spec.T >= table.long_mtp_tokens else "mtp"
        if (name, spec.regime, spec.state_dtype) not in tiles:
            name = "mtp"
    if kernel == KMAJOR:
        warps, row_lanes = tiles[(name, spec.regime, spec.state_dtype)]
        while (32 // row_lanes) * vec_elems(spec.state_dtype) > spec.V:
            row_lanes *= 2  # more row lanes, fewer column lanes: the column tile fits in V
        while warps * row_lanes > spec.K:
            warps //= 2
        return warps, row_lanes
    return _fit_rows(spec, *tiles[(name, spec.regime, spec.state_dtype)])


def _fit_rows(spec: Union[KernelSpec, CommitSpec], warps: int, rows: int, lanes: int) -> Tuple[int, int, int]:
    """A K-last register tile (warps, rows per thread, lanes per row) capped to the head dims:
    lanes to the 16-byte chunks of a row; small head dims keep at least one full tile per head."""
    lanes = min(lanes, spec.K // vec_elems(spec.state_dtype))
    while warps * (32 // lanes) * rows > spec.V and rows > 1:
        rows //= 2
    while warps * (32 // lanes) * rows > spec.V:
        warps //= 2
    return warps, rows, lanes


def _mma_tile(spec: Union[KernelSpec, CommitSpec], warps: int, blocks: int) -> Tuple[int, int]:
    """A tensor-core tile (warps, 16-row blocks per warp) capped to the head dims."""
    # One 16-row block per warp at K = 256: two hold 128 registers of state alone.
    blocks = 1 if spec.K > 128 else blocks
    return min(warps, spec.V // (16 * blocks)), blocks  # the CTA's warps share one head


def _commit_kernel(spec: CommitSpec, table: DeviceTable) -> str:
    """The tensor-core commit for a 2-tuple spec.tile (tuning runs), and in the large regime from
    the table's commit_mma_min_tokens of the checkpoint dtype on; else the token loop."""
    if spec.tile is not None:
        return REPLAY_COMMIT_MMA if len(spec.tile) == 2 else REPLAY_COMMIT
    min_tokens = table.commit_mma_min_tokens.get(spec.state_dtype)
    mma = min_tokens is not None and spec.regime == "large" and spec.T >= min_tokens
    return REPLAY_COMMIT_MMA if mma else REPLAY_COMMIT


def _commit_tile(spec: CommitSpec, table: DeviceTable, kernel: str) -> Tuple[int, ...]:
    """The ReplaySSM commit kernel's tile: the table's "commit" shape, else its "mtp" one (not yet
    measured apart), for the token loop ((warps, rows per thread, lanes per row) of klast's register
    layout); "commit_mma", else "mtp_mma", for the tensor cores; fitted to the head dims."""
    if spec.tile is not None:
        return spec.tile
    own, shared = ("commit_mma", "mtp_mma") if kernel == REPLAY_COMMIT_MMA else ("commit", "mtp")
    tile = table.tiles.get((own, spec.regime, spec.state_dtype)) or table.tiles[(shared, spec.regime, spec.state_dtype)]
    return _mma_tile(spec, *tile) if kernel == REPLAY_COMMIT_MMA else _fit_rows(spec, *tile)


def _unchecked_loop(spec: KernelSpec, kernel: str, tile: Tuple[int, ...]) -> bool:
    """Measured for the fp32 large-batch shape (4, 2, 8) without intermediates only: faster for
    4 < T <= 8; slower at T = 16, neutral at T <= 4, slower for a bf16 state, at small batch, with
    intermediates and with the L2 prefetch (which it turns off). From long_mtp_tokens on the
    (4, 4, 8) shape with the prefetch is faster still, so only T = 5-7 take it by default
    (RESULTS.md "Unchecked token loop")."""
    return (kernel == KMTP and spec.state_dtype == "float32" and spec.regime == "large" and tile == (4, 2, 8)
            and not spec.writes_states and 4 < spec.T <= 8)


def _window_heads(spec: KernelSpec, table: DeviceTable, kernel: str, tile: Tuple[int, ...], prefetch: int) -> int:
    """Value heads per window CTA of a ReplaySSM verify on the token loop in the small regime, for the
    table's verify_window_ctas state dtypes (never with an L2 prefetch, which counts CTAs as tiles): the
    table's verify_window_heads, or the largest divisor of HV up to it that leaves a thread at most 8
    16-byte vectors of v and of k to copy. 0: the decode CTAs store the windows."""
    if not (spec.replay_cache and kernel == KMTP and not prefetch and spec.regime == "small"
            and spec.state_dtype in table.verify_window_ctas):
        return 0
    fits = 8 * tile[0] * 32 * vec_elems(spec.io_dtype) // (spec.T * max(spec.K, spec.V))  # heads of 8 vectors a thread
    return max(g for g in range(1, max(1, min(table.verify_window_heads, fits)) + 1) if spec.HV % g == 0)


def _prefetch_bytes(spec: KernelSpec, table: DeviceTable, kernel: str, unchecked_loop: bool) -> int:
    """On for the large-batch builds without intermediates of the K-last kernels (T = 1 and MTP)
    and of the bf16 K-major kernel: 2-6 % faster at B = 64 and 2-4 % at B = 256 (K-last T = 1:
    0.6-1.5 %); kmtp with at most short_mtp_tokens tokens gains from 6 MiB (bf16 B = 64 1.3 %,
    fp32 0.5 %). Off where it measured slower or neutral: with intermediates (within 1 %), with the
    unchecked loop (2-4 % slower) and where it was not measured (small batch, fp32 K-major).
    Per-token state writes are bound by the writes, as intermediates are, but for token slots of
    at most short_mtp_tokens tokens, where a table's "mtp_slots" distance (absent: none) measured
    faster: 4 MiB at T = 2, B = 64 and 256, on the H100 fp32 1.1-1.8 % and bf16 1.2-2.1 %, on the
    H200 fp32 7.7-9.2 % and bf16 2.5-3.5 % (6 MiB no better). A strided state
    (a padded pool) prefetches row by row (RESULTS.md "L2 prefetch distance", "Padded pools")."""
    if spec.regime != "large" or unchecked_loop:
        return 0
    if spec.writes_states:
        short_slots = kernel == KMTP and not spec.has_intermediate and spec.T <= table.short_mtp_tokens
        return table.prefetch_bytes.get("mtp_slots", 0) if short_slots else 0
    if kernel == KMAJOR and spec.state_dtype != "bfloat16":
        return 0
    name = {KLAST: "klast", KMAJOR: "kmajor", KMTP_MMA: "mtp_mma"}.get(kernel)
    if kernel == KMTP:
        name = "mtp_short" if spec.T <= table.short_mtp_tokens else "mtp"
    return table.prefetch_bytes[name]


def _commit_prefetch_bytes(spec: CommitSpec, table: DeviceTable, kernel: str) -> int:
    """The ReplaySSM commit's L2 prefetch of a later CTA's checkpoint tile, in the large regime: a
    table's "commit" (token loop) or "commit_mma" (tensor cores) distance, the "<name>:<checkpoint
    dtype>" entry where the table has one; none where it has neither."""
    if spec.regime != "large":
        return 0
    name = "commit_mma" if kernel == REPLAY_COMMIT_MMA else "commit"
    return table.prefetch_bytes.get(f"{name}:{spec.state_dtype}", table.prefetch_bytes.get(name, 0))


def _prefetch_inputs(spec: KernelSpec, table: DeviceTable, kernel: str) -> bool:
    """For the bf16-state MTP kernels from short_mtp_tokens + 1 tokens on: up to 1.6 µs faster at
    B = 64 (T = 8: 0-0.4) and up to 2.4 % at B = 256 (T = 16); slower at T = 2 (B = 256), level
    for an fp32 state at T = 4 and 1.9 % slower at T = 8 (RESULTS.md "Input prefetch"). Not for
    varlen builds: a later CTA's token rows wait for its cu_seqlens entries."""
    return (kernel in (KMTP, KMTP_MMA) and spec.state_dtype == "bfloat16" and spec.T > table.short_mtp_tokens
            and spec.varlen is None)


def conv_gate_regime(batch: int, HV: int, sm_count: int, device_class_name: Optional[str], arch: str,
                     regime: Optional[str] = None, split: bool = True) -> str:
    """"small", "split", "large" or "gemm": the conv/gate kernel's batch regime, by B * HV per SM
    against its own thresholds (_conv_gate_ranges; the decode's regime is `regime`; `split`: whether
    the split regime serves the call, split_serves). A given `regime` (a precompile) is kept where the
    table has it, else "small" for "split" (the small regime covers its range), else "large"."""
    ranges = _conv_gate_ranges(_table_of(device_class_name, arch), split)
    if regime is not None:
        fallback = "small" if regime == "split" and "small" in ranges else "large"
        return regime if regime in ranges else fallback
    heads = batch * HV
    return next(r for r, (lo, hi) in ranges.items() if lo * sm_count < heads <= hi * sm_count)


def conv_gate_regimes(device_class_name: Optional[str], arch: str, regime: str, split: bool = True) -> Tuple[str, ...]:
    """The conv/gate regimes a call in the decode's batch regime `regime` can meet (a precompile
    builds each; `split` as in conv_gate_regime): those whose range of B * HV per SM meets the decode
    regime's (the decode's small regime ends at small_regime_heads_per_sm). In the H100 and H200
    tables the conv/gate's small regime reaches past the decode's (8 heads per SM against 2), so a
    large decode can follow it."""
    table = _table_of(device_class_name, arch)
    edge = table.small_regime_heads_per_sm
    lo, hi = (0, edge) if regime == "small" else (edge, math.inf)
    return tuple(r for r, (a, b) in _conv_gate_ranges(table, split).items() if a < hi and b > lo)


def _w_ba_bytes(hidden: int, HV: int) -> int:
    """The bytes of the fused step's bf16 w_ba [hidden, 2 HV], which the conv/gate thresholds compare."""
    return hidden * 2 * HV * 2


def split_serves(device_class_name: Optional[str], arch: str, hidden: int, HV: int, state_dtype: str) -> bool:
    """Whether the split regime serves a step of this w_ba and state dtype (DeviceTable
    .conv_gate_split_min_bytes, conv_gate_split_max_bytes, conv_gate_split_state_dtypes)."""
    table = _table_of(device_class_name, arch)
    w_ba = _w_ba_bytes(hidden, HV)
    return (table.conv_gate_split_min_bytes <= w_ba <= table.conv_gate_split_max_bytes.get(state_dtype, w_ba)
            and state_dtype in table.conv_gate_split_state_dtypes)


def _conv_gate_ranges(table: DeviceTable, split_ok: bool = True) -> Dict[str, Tuple[float, float]]:
    """The conv/gate regimes of `table` in batch order, each with its range (lo, hi] of B * HV per SM
    (without the split regime where `split_ok` is False: the small one covers its range)."""
    small, split, gemm = (table.conv_gate_small_heads_per_sm, table.conv_gate_split_heads_per_sm,
                          table.conv_gate_gemm_heads_per_sm)
    split = split if small and split < small and split_ok else 0
    ranges = {"small": (0, split or small), "split": (split, small), "large": (small, gemm or math.inf),
              "gemm": (gemm, math.inf)}
    kept = {"small": small, "split": split, "large": True, "gemm": gemm}
    return {r: bounds for r, bounds in ranges.items() if kept[r]}


@dataclasses.dataclass(frozen=True)
class ConvGateConfig:
    """How a ConvGateSpec is built: CTA threads and how many CTAs of each kind serve a batch row."""

    threads: int
    conv_ctas: int  # CTAs of conv channels per batch row, one channel per thread
    # CTAs of the b/a projection per group of gate_rows batch rows (0: no projection): one w_ba column
    # block (gate_vec) each over the whole hidden dimension, or with split_rows one slice of it each
    gate_ctas: int
    gate_prefetch: bool  # DeviceTable.conv_gate_prefetch
    gate_rows: int  # batch rows per gate CTA (DeviceTable.conv_gate_rows, conv_gate_split_batch_rows)
    split_rows: int = 0  # hidden rows per gate CTA of the split projection (0: column-block CTAs)
    conv_rows: int = 1  # batch rows per conv thread (DeviceTable.conv_gate_gemm_conv_rows; no gate CTAs)

    def __post_init__(self) -> None:
        if self.conv_rows < 1 or (self.conv_rows > 1 and self.gate_ctas):
            raise ValueError(f"conv_rows ({self.conv_rows}) must be 1, or more in a kernel without gate CTAs "
                             f"(gate_ctas {self.gate_ctas})")

    @property
    def partial_sums(self) -> int:
        """How many fp32 partial sums of each b/a value the split projection leaves for the decode
        to add up (KernelSpec.gate_parts); 0: the kernel writes the bf16 projection itself."""
        return self.gate_ctas if self.split_rows else 0

    @classmethod
    def for_spec(cls, spec: ConvGateSpec) -> "ConvGateConfig":
        """The table's choices for the spec's regime: conv_gate_threads_small and one batch row per
        gate CTA in the small one; conv_gate_threads and, for a w_ba of conv_gate_rows_min_bytes or
        more, conv_gate_rows in the large one. Measured on the H200 (RESULTS.md "Fused step: conv/gate
        CTAs"): 512 threads against 128 1.23-1.97x at B = 1, 1.00-1.57x at B * HV = 512-768, 0.96-1.03x
        from B * HV = 2048 on; 4 rows per gate CTA 1.05-1.22x for hidden 5120, HV 48 (a 960 KiB w_ba)
        from B = 64 on, 0.77-1.00x for a w_ba of 256 KiB or less and 0.64-0.96x at B <= 16. The "split"
        regime: the small one's CTA size, the split projection (DeviceTable.conv_gate_split_heads_per_sm;
        column-block gate CTAs where a w_ba row's padded blocks outnumber the threads). The "gemm"
        regime: conv CTAs only, conv_gate_gemm_threads (or conv_gate_threads) each, conv_gate_gemm_conv_rows
        batch rows per thread (the projection is cuBLAS's)."""
        table = _table_of(spec.device_class, spec.arch)
        own_threads = {"small": table.conv_gate_threads_small, "split": table.conv_gate_threads_small,
                       "gemm": table.conv_gate_gemm_threads}
        threads = own_threads.get(spec.regime) or table.conv_gate_threads
        conv_ctas = -(-spec.qkv_dim // threads)
        if spec.regime == "gemm":
            return cls(threads=threads, conv_ctas=conv_ctas, gate_ctas=0, gate_prefetch=False, gate_rows=1,
                       conv_rows=table.conv_gate_gemm_conv_rows)
        split = split_gate_rows(spec.hidden, spec.HV, threads, table.conv_gate_split_rows) if spec.regime == "split" else 0
        w_ba_bytes = _w_ba_bytes(spec.hidden, spec.HV)
        if split:
            rows = table.conv_gate_split_batch_rows if w_ba_bytes >= table.conv_gate_split_batch_rows_min_bytes else 1
            return cls(threads=threads, conv_ctas=conv_ctas, gate_ctas=-(-spec.hidden // split), gate_prefetch=False,
                       gate_rows=rows, split_rows=split)
        rows = table.conv_gate_rows if spec.regime == "large" and w_ba_bytes >= table.conv_gate_rows_min_bytes else 1
        return cls(threads=threads, conv_ctas=conv_ctas, gate_ctas=conv_gate_blocks(spec.HV)[0],
                   gate_prefetch=table.conv_gate_prefetch, gate_rows=rows)


def split_gate_rows(hidden: int, HV: int, threads: int, rows: int) -> int:
    """Hidden rows per gate CTA of the split projection: `rows` rounded up to whole passes of
    threads // CBp rows (the w_ba row's 2 HV / gate_vec column blocks padded to CBp, a power of two,
    so that the threads of one column block sit at a fixed lane offset in every warp: the kernel adds
    their sums with butterfly shuffles), at most the passes that cover `hidden`. 0 where `rows` is
    0 or a row's padded blocks outnumber the threads."""
    per_pass = threads // conv_gate_blocks(HV)[1]
    if not rows or not per_pass:
        return 0
    return min(-(-rows // per_pass), -(-hidden // per_pass)) * per_pass


def klast_lanes_per_row(tile: Tuple[int, ...], K: int, state_dtype: str) -> int:
    """Lanes that share one state row in a K-last CTA of `tile` (warps, rows per thread, lanes per row):
    fewer where K has fewer 16-byte chunks."""
    return min(tile[2], K // vec_elems(state_dtype))


def klast_cta_rows(tile: Tuple[int, ...], K: int, state_dtype: str) -> int:
    """State rows of a K-last CTA of `tile`: each warp holds 32 / lanes_per_row rows per row of each thread."""
    warps, rows_per_thread, _ = tile
    return warps * (32 // klast_lanes_per_row(tile, K, state_dtype)) * rows_per_thread


def fused_step_one_launch(conv: ConvGateSpec, decode: KernelSpec) -> bool:
    """Whether the fused step of these two kernels is one launch: in the table's fused_step_one_launch
    regimes, where its CTAs fit one launch (one_launch_fits)."""
    return conv.regime in _table(decode).fused_step_one_launch and one_launch_fits(conv, decode)


def one_launch_fits(conv: ConvGateSpec, decode: KernelSpec) -> bool:
    """Whether the K-last decode's CTA (its table tile) divides the conv/gate CTA into whole decode CTAs and
    a batch row's decode CTAs fill whole conv/gate-sized CTAs: the one launch's grid (kernels/step.py)."""
    config = BuildConfig.for_spec(decode)
    if config.kernel != KLAST:
        return False
    threads = ConvGateConfig.for_spec(conv).threads
    decode_threads = config.tile[0] * 32
    per_row = decode.HV * (decode.V // klast_cta_rows(config.tile, decode.K, decode.state_dtype))
    return threads % decode_threads == 0 and per_row % (threads // decode_threads) == 0


def fused_step_pdl(device_class: Optional[str], arch: str) -> bool:
    """Whether the fused step's decode waits on its conv/gate kernel programmatically (DeviceTable.fused_step_pdl)."""
    return _table_of(device_class, arch).fused_step_pdl


def _arch_table(arch: str) -> DeviceTable:
    return DEVICE_TABLES[next(d.table for d in KNOWN_DEVICES if d.arch == arch)]
