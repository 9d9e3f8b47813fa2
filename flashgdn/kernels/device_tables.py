"""The device tables: the measured choices (CTA shapes, thresholds, prefetch distances, the fused
step's regimes) of each class of device, and the known devices that name them. Data only: the rules
that read them are kernels/policy.py's. Each constant cites the heading of benchmarks/RESULTS.md
("Measurement-backed constants") that holds its measurements.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple


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
    # The gemm regime's conv-only CTAs: threads (None: conv_gate_threads) and batch rows per thread. A
    # thread loads its channel's weights once and every row's window and input at once, so that
    # more of its loads are in flight per DRAM round trip. RESULTS.md "Fused step: the gemm regime's conv".
    conv_gate_gemm_threads: Optional[int] = None
    conv_gate_gemm_conv_rows: int = 1
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
    # Four batch rows per conv thread there: with one, the conv kernel took 25.4 / 20.4 µs at Qwen3.5 /
    # Qwen3-Next TP1 B = 256 where FLA's Triton conv update takes 19.4 / 16.1, and the step ran 0.98-0.99x
    # the composed path; with four, 1.01-1.02x faster (level with it). 512 threads: no faster than 128.
    conv_gate_gemm_conv_rows=4,
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
    # One batch row per conv thread in the gemm regime, as timed here (four are the H100's choice; not
    # timed on the H200).
    conv_gate_gemm_conv_rows=1,
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
