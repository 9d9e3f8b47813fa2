"""Kernel selection: every rule that picks the kernel class, CTA tile, L2 prefetch and token loop
of a build, the batch regime, and the device tables they read. Nothing else decides these.

Plain Python (no torch, no CuTe): the API layer asks it for the regime and the device class, the
kernel layer for a BuildConfig. The numbers come from measurements; each constant cites the
heading of benchmarks/RESULTS.md ("Measurement-backed constants") that holds them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple, Union

from ..spec import CommitSpec, ConvGateSpec, KernelSpec, conv_gate_blocks, vec_elems

# Kernel classes (names of the kernel layer's classes, kernels.build.KERNELS).
KLAST, KMAJOR, KMTP, KMTP_MMA = "KLastDecode", "KMajorDecode", "KLastMTP", "KLastMTPMma"
REPLAY_COMMIT, REPLAY_COMMIT_MMA = "ReplayCommit", "ReplayCommitMma"


@dataclasses.dataclass(frozen=True)
class DeviceTable:
    """The measured choices for one class of device."""

    # CTA shapes by (table, regime, state dtype): (warps, rows per thread, lanes per row) for
    # K-last, (warps, row lanes) for K-major, (warps, 16-row blocks per warp) for the tensor-core
    # MTP kernel. MTP builds take "mtp", "mtp_long" from long_mtp_tokens tokens on and "mtp_inter"
    # when they write a state per token (intermediates or token slots); these two hold only the
    # shapes that differ from "mtp". "mtp_mma" serves the tensor-core kernel. The ReplaySSM commit
    # takes "commit" where the table has it, else "mtp" (its per-token work is kmtp's without q), and
    # on the tensor cores "commit_mma", else "mtp_mma". RESULTS.md "CTA shapes".
    tiles: Dict[Tuple[str, str, str], Tuple[int, ...]]
    # Below this many (sequence, value head) pairs per SM the "small" regime (more, smaller CTAs)
    # wins. RESULTS.md "Batch regime threshold".
    small_regime_heads_per_sm: int
    # Fewest tokens for which the tensor-core MTP kernel serves a bf16 state at large batch.
    # RESULTS.md "Tensor cores for MTP".
    mma_min_tokens: int
    # Fewest tokens for which MTP takes the "mtp_long" CTA shapes.
    long_mtp_tokens: int
    # Most tokens of a "short" MTP build (its own prefetch distance, no input prefetch).
    short_mtp_tokens: int
    # How far ahead, in bytes of state, a CTA prefetches a later CTA's state tile into L2, by
    # kernel; twice these distances measured slower (the prefetched lines are evicted first).
    # RESULTS.md "L2 prefetch distance". The ReplaySSM commit's "commit" / "commit_mma" entries
    # are optional (absent: no prefetch; RESULTS.md "ReplaySSM"); an entry "commit:<checkpoint
    # dtype>" overrides "commit" for that dtype.
    prefetch_bytes: Dict[str, int]
    # Threads of a conv/gate CTA (the fused step's first launch: one CTA per batch row and block of
    # conv channels, or per batch row and 16-byte column block of w_ba) in the "large" conv/gate
    # regime, and in the "small" one (None: the same): up to B * HV <= conv_gate_small_heads_per_sm
    # * SMs (0: never small). More threads keep more of the GEMV's w_ba loads in flight, which pays
    # while a few CTAs per SM leave the DRAM latency exposed. RESULTS.md "Fused step: conv/gate CTAs".
    conv_gate_threads: int = 128
    conv_gate_threads_small: Optional[int] = None
    conv_gate_small_heads_per_sm: int = 0
    # A gate CTA first prefetches into L2 every w_ba row it reads and the batch row's hidden_states:
    # its loads keep only two rows in flight per thread (ptxas interleaves them with the products),
    # a chain of DRAM round trips at small batch. Measured slower on the H200 (0.71-0.93x from B = 4).
    conv_gate_prefetch: bool = False
    # Batch rows of one gate CTA in the "large" conv/gate regime, where w_ba has at least
    # conv_gate_rows_min_bytes: each w_ba row it loads serves that many hidden rows, so w_ba is read
    # B / conv_gate_rows times instead of B times (from L2: at B = 256 and hidden 5120, 250 MB at one
    # row per CTA). The small regime keeps one row per CTA (fewer gate CTAs cost more there).
    conv_gate_rows: int = 1
    conv_gate_rows_min_bytes: int = 0
    # The "split" conv/gate regime, the upper part of the small one: from B * HV >
    # conv_gate_split_heads_per_sm * SMs (0: never) up to the small threshold. Its gate CTAs split
    # the projection over the hidden dimension: each serves conv_gate_split_rows hidden rows (whole
    # passes: split_gate_rows) of conv_gate_split_batch_rows batch rows for every column of w_ba,
    # its threads reading whole w_ba rows side by side (coalesced, every 32-byte sector used) with all
    # their loads in flight at once, and writes fp32 partial sums, which the decode adds up
    # (KernelSpec.gate_parts: two loads per slice). The column-block gate CTAs of the other regimes
    # read w_ba once per batch row and 16-byte column block (half of each sector), each thread walking
    # hidden / threads rows two loads at a time. RESULTS.md "Fused step: the split projection".
    conv_gate_split_heads_per_sm: int = 0
    conv_gate_split_rows: int = 256
    # (one batch row where w_ba has fewer than conv_gate_split_batch_rows_min_bytes)
    conv_gate_split_batch_rows: int = 1
    conv_gate_split_batch_rows_min_bytes: int = 0
    # ...for calls whose w_ba has at least conv_gate_split_min_bytes and, where conv_gate_split_max_bytes
    # names their state dtype, at most that many, and whose state dtype is listed (split_serves; other
    # calls stay in the small regime there).
    conv_gate_split_min_bytes: int = 0
    conv_gate_split_max_bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    conv_gate_split_state_dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    # From B * HV > conv_gate_gemm_heads_per_sm * SMs (0: never) the "gemm" conv/gate regime: the b/a
    # projection is one cuBLAS GEMM (torch.mm into the workspace) launched before a conv-only conv/gate
    # kernel, as the composed path an engine runs does it: the kernel's GEMV, one batch row (or
    # conv_gate_rows) per gate CTA, reads w_ba B / conv_gate_rows times from L2. On the H200 it pays
    # from about 20 heads per SM (1.02-1.18x over the large regime) and costs 5-6 % at 15.5
    # (RESULTS.md "Fused step: conv/gate CTAs"). At least small_regime_heads_per_sm
    # (fused_step.kernel_specs' precompile pairs rely on it).
    conv_gate_gemm_heads_per_sm: int = 0
    # Fewest tokens for which the tensor-core MTP kernel serves an fp32 state at large batch; None:
    # the token loop serves it (a tuning run asks for the tensor cores by tile). RESULTS.md "Tensor
    # cores for an fp32 state".
    mma_min_tokens_fp32: Optional[int] = None
    # Fewest tokens for which it serves a call that writes a state per token (intermediates or
    # token slots), either state dtype; None: the token loop serves them (faster at T = 4 on the
    # H200: fp32 1.33-1.46x, bf16 1.06-1.07x; RESULTS.md "Tensor cores for an fp32 state").
    mma_min_tokens_writes: Optional[int] = None
    # Fewest tokens for which it serves MTP that leaves the state as it is (disable_state_update:
    # frozen MTP and the ReplaySSM verify), by state dtype; a dtype not named: the thresholds above.
    # With no state to store, the token loop is bound by its arithmetic at fewer tokens.
    mma_min_tokens_frozen: Dict[str, int] = dataclasses.field(default_factory=dict)
    # Fewest tokens of a window for which the tensor-core commit (ReplayCommitMma) replays it in the
    # large regime, by checkpoint dtype; a dtype not named: the token loop (ReplayCommit). On the H200
    # the token loop is faster for an fp32 checkpoint at T = 2-8 (92-93 % of copy bandwidth against
    # 87-88 %) and a bf16 one at T = 2-4 (T = 4: 89.9-90.6 % against 88.9-89.4 %); for a bf16 one at
    # T = 8 the token loop is compute-bound (61 %) and the tensor cores run at 87.5-87.9 %, 1.17-1.18x
    # faster; on the H100 there 79-82 % against 92.6-93.0 %, 1.17-1.19x. T = 5-7 are not measured
    # (RESULTS.md "ReplaySSM").
    commit_mma_min_tokens: Dict[str, int] = dataclasses.field(default_factory=dict)
    # State dtypes whose ReplaySSM verify in the small regime (the token loop) has its windows stored
    # by CTAs of their own after the decode CTAs, one per sequence and verify_window_heads value heads
    # (BuildConfig.window_heads), instead of by the decode CTAs, whose critical path each window
    # lengthens (about 0.05 us at B = 1).
    verify_window_ctas: Tuple[str, ...] = ()
    verify_window_heads: int = 1
    # The fused step's decode launches as a programmatic dependent (PDL) of its conv/gate kernel
    # (KernelSpec.pdl_wait): its slot indices and state load while that kernel ends, and the launch
    # gap between the two closes: 1.02-1.12x over plain stream order on the H200 (RESULTS.md "Fused
    # decode step").
    fused_step_pdl: bool = True
    # Conv/gate regimes in which the fused step is one launch (kernels/step.py): the decode's CTAs run
    # in the conv/gate kernel's grid and wait on a counter of finished conv/gate CTAs instead of that
    # grid's end, so the host makes one launch and no launch gap lies between them (fused_step_one_launch).
    # None in either table: on the H100 it runs 0.70-0.91x the speed of two launches with PDL at the TP1 and
    # TP4 shapes, B = 1-64 (RESULTS.md "Fused decode step"); its GPU tests switch it on.
    fused_step_one_launch: Tuple[str, ...] = ()


# Tuned on the H100 (SM90, 132 SMs, HBM3).
SM90_HBM3 = DeviceTable(
    tiles={
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
        # frozen MTP from T = 6 (mma_min_tokens_frozen); other shapes not measured here
        ("mtp_mma", "large", "float32"): (4, 1),
        ("kmajor", "small", "float32"): (4, 4),
        ("kmajor", "large", "float32"): (8, 2),
        ("kmajor", "small", "bfloat16"): (4, 4),
        ("kmajor", "large", "bfloat16"): (4, 2),
    },
    small_regime_heads_per_sm=2,
    mma_min_tokens=5,
    long_mtp_tokens=8,
    short_mtp_tokens=2,
    # The ReplaySSM commit's L2 prefetch, 2 MiB ahead on either kernel: the token loop ("commit") 0.8-1.5 %
    # faster on the H100 where it is memory-bound (B = 64 and 256), the tensor cores ("commit_mma") 0.2-0.6
    # points of copy bandwidth; 4 and 8 MiB slower. RESULTS.md "ReplaySSM".
    prefetch_bytes={"kmajor": 8 << 20, "klast": 4 << 20, "mtp": 4 << 20, "mtp_short": 6 << 20, "mtp_mma": 4 << 20,
                    "mtp_slots": 4 << 20, "commit": 2 << 20, "commit_mma": 2 << 20},
    commit_mma_min_tokens={"bfloat16": 8},
    # Frozen MTP on the tensor cores against the token loop on the H100, B = 16 / 64 / 256 (timed in
    # turns with the verify): bf16 T = 2 0.97 / 1.01 / 1.05x, T = 3 1.09 / 1.09 / 1.32x, T = 4 1.19 /
    # 1.23 / 1.48x; fp32 T = 4 0.97 / 1.02 / 1.11x, T = 6 1.07 / 1.14 / 1.23x, T = 8 1.21 / 1.22 /
    # 1.29x. The verify's overhead over it follows: bf16 T = 3 and 4 1-4 % against 6-9 % on the
    # token loop, fp32 T = 8 2-4 % against 5 % (RESULTS.md "Tensor cores for MTP").
    mma_min_tokens_frozen={"bfloat16": 3, "float32": 6},
    # On the H100 at B = 1-8, the verify's overhead over frozen MTP with window CTAs against without, bf16:
    # T = 2 B = 1 2.0 % against 5.0-5.5 %, T = 8 B = 8 0.9-1.7 % against 9.4-10.2 %, T = 16 0.4-0.8 %
    # against 5.3-8.7 %, the other cells within 0.9 points; fp32: 0.5-3.2 points slower. Window CTAs
    # of 4 or 8 value heads: level with one (RESULTS.md "ReplaySSM").
    verify_window_ctas=("bfloat16",),
    # The conv/gate kernel's small regime as the H200's: on the H100 its kernel takes 4.9 µs at
    # Qwen3.5 TP1 B = 1 against 13.4 at 128 threads (RESULTS.md "Fused step: conv/gate CTAs").
    conv_gate_threads_small=512,
    conv_gate_small_heads_per_sm=8,
    # The split regime from 3 value heads per SM (B = 16 at the TP1 shapes) for a w_ba of 256 KiB or
    # more, up to 512 KiB for an fp32 state, as the H200 table (measured on the H100 at the TP1 shapes,
    # B = 16: bf16 1.08-1.12x; fp32 1.03x at a 256 KiB w_ba, 1.01x at 960 KiB, where the H200 measured
    # 1.07x and 0.93x; RESULTS.md "Fused step: the split projection").
    conv_gate_split_heads_per_sm=3,
    conv_gate_split_min_bytes=256 << 10,
    conv_gate_split_max_bytes={"float32": 512 << 10},
    # Two batch rows per split gate CTA for a w_ba of 512 KiB or more: on the H100 at Qwen3.5 TP1 (960
    # KiB, bf16 state) B = 12 / 16 / 20 1.03 / 1.04 / 1.03-1.05x over one (4 rows 0.96-0.98x, 8 rows
    # 0.95-1.01x); at Qwen3-Next TP1 (256 KiB) 0.99-1.00x (RESULTS.md "Fused step: the split projection").
    conv_gate_split_batch_rows=2,
    conv_gate_split_batch_rows_min_bytes=512 << 10,
    # The gemm regime from 20 heads per SM (the H200 table's too): on the H100 at Qwen3.5 TP1 (a 960 KiB
    # w_ba) B = 64 and 256 1.11-1.30x over the large regime, which ran 0.77-0.87x the composed path
    # there; at 3072 heads and more of the other shapes 1.01-1.05x; at 2048 heads level. On the H200
    # 1.02-1.18x from 3072 heads, 0.94-1.01x at 2048 (RESULTS.md "Fused step: conv/gate CTAs").
    conv_gate_gemm_heads_per_sm=20,
)

# Tuned on the H200 (SM90, 132 SMs, HBM3e: 1.4x the H100's copy bandwidth), where the H100's
# choices leave the token loop compute-bound at T = 3-4 for a bf16 state and the fp32 K-last
# kernel behind FLA at large batch. RESULTS.md "H200 tables".
SM90_HBM3E = dataclasses.replace(
    SM90_HBM3,
    tiles={**SM90_HBM3.tiles, ("klast", "large", "float32"): (8, 2, 16), ("klast", "small", "float32"): (4, 2, 16),
           ("mtp_mma", "large", "float32"): (2, 1)},
    mma_min_tokens=3,
    mma_min_tokens_fp32=8,
    # Frozen MTP takes the thresholds above: the H100's lower ones for it are not measured here.
    mma_min_tokens_frozen={},
    # The ReplaySSM commit's L2 prefetch: the token loop 4 MiB ahead for an fp32 checkpoint (91.5-92.4 %
    # of copy bandwidth without it, 95.2-95.6 % with it at T = 4 and 8) and none for a bf16 one (every
    # distance from 1 MiB slows its commit of all T tokens at T = 4: 85.7-88.1 % against 89.7-90.6 %);
    # the tensor cores 6 MiB ahead (bf16 T = 8: 87.5-88.0 % without, 89.6-89.9 % with; 8 MiB level).
    # RESULTS.md "ReplaySSM".
    prefetch_bytes={**SM90_HBM3.prefetch_bytes, "klast": 8 << 20, "mtp_mma": 8 << 20, "commit": 4 << 20,
                    "commit:bfloat16": 0, "commit_mma": 6 << 20},
    conv_gate_rows=4,
    conv_gate_rows_min_bytes=512 << 10,
    # The split regime (the H100 table's): at B = 16 (3-8 value heads per SM) 1.12-1.13x for a bf16
    # state at the TP1 shapes (w_ba 256 and 960 KiB); for an fp32 state 1.07x at 256 KiB and 0.93x at
    # 960 KiB, which stays in the small regime, as do the TP4 shapes (w_ba 64 and 240 KiB, B = 64:
    # 0.80-0.95x). One batch row per split gate CTA, as timed here (two are the H100's choice; not timed
    # on the H200).
    conv_gate_split_batch_rows=1,
    conv_gate_split_batch_rows_min_bytes=0,
)

# Tuning tables by device-class name: the name is what enters the cache key.
DEVICE_TABLES: Dict[str, DeviceTable] = {"sm90-hbm3": SM90_HBM3, "sm90-hbm3e": SM90_HBM3E}


@dataclasses.dataclass(frozen=True)
class DeviceClass:
    """A known device: its target, SM count and memory (GiB, the bandwidth class: HBM3 parts
    carry 80-96 GiB, HBM3e parts 141 GiB and more), and the table it uses."""

    name: str
    arch: str
    sm_count: int
    memory_gib: int
    table: str


KNOWN_DEVICES = (
    DeviceClass("H100 SXM", "sm_90a", 132, 80, "sm90-hbm3"),
    DeviceClass("H200", "sm_90a", 132, 141, "sm90-hbm3e"),
    # Blackwell: compiled, not yet run; the Hopper table until one is measured.
    DeviceClass("B200", "sm_100a", 148, 180, "sm90-hbm3"),
    DeviceClass("B300", "sm_103a", 148, 270, "sm90-hbm3"),
)


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
        regime: conv CTAs only, conv_gate_threads each (the projection is cuBLAS's)."""
        table = _table_of(spec.device_class, spec.arch)
        small = spec.regime in ("small", "split")
        threads = (table.conv_gate_threads_small or table.conv_gate_threads) if small else table.conv_gate_threads
        conv_ctas = -(-spec.qkv_dim // threads)
        if spec.regime == "gemm":
            return cls(threads=threads, conv_ctas=conv_ctas, gate_ctas=0, gate_prefetch=False, gate_rows=1)
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
