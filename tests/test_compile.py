"""Compile-only tests (no GPU): every kernel variant the API can ask for compiles for Hopper
(sm_90a) and Blackwell (sm_100a) into a TVM-FFI callable.

Each compile takes about 0.3 to 2.5 s; the lists below stay at about 40 variants per arch.
"""
from __future__ import annotations

import itertools

import pytest

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")

from flashgdn.kernels.build import compile_kernel  # noqa: E402
from flashgdn.spec import KernelSpec  # noqa: E402

ARCHS = ("sm_90a", "sm_100a")
SCALE = 128 ** -0.5


def spec(arch, layout="klast", T=1, state="float32", regime="small", H=16, HV=32, K=128, V=128, io="bfloat16",
         gate="bfloat16", dt_bias="float32", scale=SCALE, l2norm=True, **kw) -> KernelSpec:
    return KernelSpec(layout, H, HV, K, V, T, io, state, gate, dt_bias, scale, l2norm, arch, regime, **kw)


# (id, keyword arguments of `spec`)
VARIANTS = [
    # K-last (pretranspose) T=1, dense state
    *[(f"klast-T1-dense-{r}-{s}", dict(regime=r, state=s))
      for r in ("small", "large") for s in ("float32", "bfloat16")],
    # K-last T=1, pool with int64 indices and separate write slots
    ("klast-T1-pool-int64-outidx-small-float32",
     dict(regime="small", state="float32", index_dtype="int64", has_out_indices=True)),
    ("klast-T1-pool-int64-outidx-large-bfloat16",
     dict(regime="large", state="bfloat16", index_dtype="int64", has_out_indices=True)),
    # the fused step's decode: a padded pool, launched as a programmatic dependent of the conv/gate kernel
    ("klast-T1-pool-int32-strided-pdl-large-float32",
     dict(regime="large", state="float32", index_dtype="int32", strided_state=True, pdl_wait=True)),
    # ... adding up the split projection's fp32 partial sums of b | a (10 slices)
    ("klast-T1-pool-int32-pdl-parts10-small-bfloat16",
     dict(regime="small", state="bfloat16", index_dtype="int32", pdl_wait=True, gate="float32", gate_parts=10)),
    # K-major (nontranspose) T=1
    *[(f"kmajor-T1-{r}-{s}", dict(layout="kmajor", regime=r, state=s))
      for r in ("small", "large") for s in ("float32", "bfloat16")],
    # MTP: T=4, int32 indices, intermediate states, accepted tokens
    *[(f"mtp-T4-inter-accepted-large-{s}",
       dict(T=4, regime="large", state=s, index_dtype="int32", has_intermediate=True, has_accepted=True))
      for s in ("float32", "bfloat16")],
    ("mtp-T4-inter-accepted-outidx-small-float32",
     dict(T=4, regime="small", state="float32", index_dtype="int32", has_intermediate=True, has_accepted=True,
          has_out_indices=True)),
    ("mtp-T4-noupdate-inter-keeppad-outfp32-large-float32",
     dict(T=4, regime="large", state="float32", index_dtype="int32", has_intermediate=True, update_state=False,
          zero_padding_output=False, out_dtype="float32")),
    # per-token state slots (ssm_state_indices)
    ("mtp-T4-tokslots-keeppad-large-bfloat16",
     dict(T=4, regime="large", state="bfloat16", index_dtype="int32", has_token_slots=True, zero_padding_output=False)),
    ("mtp-T8-tokslots-strided-small-float32",
     dict(T=8, state="float32", index_dtype="int64", has_token_slots=True, strided_state=True)),
    ("mtp-T16-small-bfloat16", dict(T=16, regime="small", state="bfloat16", index_dtype="int64")),
    ("mtp-T2-large-float32-gva1", dict(T=2, regime="large", state="float32", index_dtype="int32", H=32, HV=32)),
    # fp32 large batch: T=6 (the unchecked token loop), T=8 (the "mtp_long" shape, L2 prefetch)
    ("mtp-T8-accepted-large-float32", dict(T=8, regime="large", state="float32", index_dtype="int32", has_accepted=True)),
    ("mtp-T6-large-float32", dict(T=6, regime="large", state="float32", index_dtype="int32")),
    # bf16 state, large batch, T >= 5: the tensor-core MTP kernel (kmtp_mma)
    ("mtp-mma-T8-accepted-outidx-large-bfloat16",
     dict(T=8, regime="large", state="bfloat16", index_dtype="int32", has_accepted=True, has_out_indices=True)),
    ("mtp-mma-T16-noupdate-strided-keeppad-large-bfloat16",
     dict(T=16, regime="large", state="bfloat16", index_dtype="int64", update_state=False, strided_state=True,
          zero_padding_output=False)),
    ("mtp-mma-T5-K256V256-nol2norm-large-bfloat16",
     dict(T=5, K=256, V=256, regime="large", state="bfloat16", index_dtype="int32", l2norm=False, scale=0.25)),
    # T not a multiple of the warps, nor T x rows of the CTA of its threads: the padded staging paths
    ("mtp-T3-large-bfloat16", dict(T=3, regime="large", state="bfloat16", index_dtype="int32")),
    # The H200 table's own choices: the (8, 2, 16) fp32 tile (its small (4, 2, 16) one has the same two
    # rows per thread), the tensor cores at T = 3 for a bf16 state (from T = 8 for an fp32 one: the
    # ReplaySSM variants)
    ("klast-T1-dense-large-float32-h200", dict(regime="large", state="float32", device_class="sm90-hbm3e")),
    ("mtp-mma-T3-large-bfloat16-h200",
     dict(T=3, regime="large", state="bfloat16", index_dtype="int32", device_class="sm90-hbm3e")),
    ("mtp-T5-K256V256-small-float32", dict(T=5, K=256, V=256, state="float32", index_dtype="int32")),
    # the tensor cores by the tuning runs' 2-tuple tile: a state per token (intermediates with accepted
    # counts, at SGLang's buffer row table; token slots), an fp32 state (hi + lo operands, fp32 update)
    ("mtp-mma-T4-inter-accepted-interrows-tile42-large-bfloat16",
     dict(T=4, regime="large", state="bfloat16", index_dtype="int32", has_intermediate=True, has_accepted=True,
          intermediate_rows="int64", tile=(4, 2))),
    ("mtp-mma-T8-tokslots-tile41-large-float32",
     dict(T=8, regime="large", state="float32", index_dtype="int64", has_token_slots=True, zero_padding_output=False,
          tile=(4, 1))),
    # T=1 through the MTP entry point (intermediates, accepted counts build the multi-token kernel), K=64,
    # the intermediates at a row table (SGLang's target verify)
    ("mtp-T1-inter-accepted-interrows-K64V64-small-float32",
     dict(T=1, K=64, V=64, state="float32", index_dtype="int32", has_intermediate=True, has_accepted=True,
          intermediate_rows="int32")),
    # SGLang's EAGLE-tree verify: each token from its parent's stored state (the token loop only)
    ("mtp-T5-interrows-tree-noupdate-large-bfloat16",
     dict(T=5, regime="large", state="bfloat16", index_dtype="int64", has_intermediate=True,
          intermediate_rows="int32", tree_parents="int64", update_state=False)),
    # head dims
    ("klast-T1-K64V64-small-float32", dict(K=64, V=64)),
    ("klast-T1-K256V256-small-float32", dict(K=256, V=256)),
    ("kmajor-T1-K64V64-large-bfloat16", dict(layout="kmajor", regime="large", state="bfloat16", K=64, V=64)),
    ("kmajor-T1-strided-outfp16-large-bfloat16",
     dict(layout="kmajor", regime="large", state="bfloat16", strided_state=True, out_dtype="float16")),
    # dtypes and options
    ("klast-T1-fp16io-nol2norm-small-float32",
     dict(io="float16", gate="float16", l2norm=False, scale=0.25)),
    # ... and the engines' rows as they pass them (the launch views them): vLLM's packed decode (raw
    # gates, its slot rule: token slots [B], slot <= 0 padding), SGLang's (strided slot indices) and
    # SGLang's varlen one-token decode (q, k, v, output [1, B, ...], 2-D gates)
    ("klast-T1-vllm-packed-fp32gates-bf16dtbias-large-bfloat16",
     dict(regime="large", state="bfloat16", gate="float32", dt_bias="bfloat16", index_dtype="int64",
          has_token_slots=True, vllm_slots=True, row_form="packed")),
    ("klast-T1-packed-int32-small-float32", dict(index_dtype="int32", row_form="packed")),
    ("klast-T1-flat-int64-large-bfloat16", dict(regime="large", state="bfloat16", index_dtype="int64", row_form="flat")),
    ("kmajor-T1-softplus-custom-small-float32",
     dict(layout="kmajor", softplus_beta=2.0, softplus_threshold=10.0)),
    # ReplaySSM verify: kmtp (windows written by its staging): fp16 q/k/v into the bf16 windows, GVA 1,
    # T not a multiple of the warps; the tensor-core kernel (windows written from its registers) for a
    # bf16 state at large batch: T = 8 with K = 64 (two warps), T = 3 on the H200 table (four warps,
    # 64-bit indices)
    ("mtp-replay-T3-fp16io-int64-gva1-keeppad-small-float32",
     dict(T=3, io="float16", gate="float16", H=32, HV=32, state="float32", index_dtype="int64", update_state=False,
          zero_padding_output=False, replay_cache=True)),
    ("mtp-mma-replay-T8-outidx-K64V64-large-bfloat16",
     dict(T=8, K=64, V=64, regime="large", state="bfloat16", index_dtype="int32", has_out_indices=True,
          update_state=False, zero_padding_output=False, replay_cache=True)),
    ("mtp-mma-replay-T3-int64-keeppad-large-bfloat16-h200",
     dict(T=3, regime="large", state="bfloat16", index_dtype="int64", update_state=False, zero_padding_output=False,
          replay_cache=True, device_class="sm90-hbm3e")),
    # an fp32 checkpoint from T = 8 on the H200 table: its (2, 1) tensor-core build
    ("mtp-mma-replay-T8-large-float32-h200",
     dict(T=8, regime="large", state="float32", index_dtype="int32", update_state=False, zero_padding_output=False,
          replay_cache=True, device_class="sm90-hbm3e")),
    # ... and from T = 6 on the H100 table (mma_min_tokens_frozen): its (4, 1) build
    ("mtp-mma-replay-T6-large-float32",
     dict(T=6, regime="large", state="float32", index_dtype="int32", update_state=False, zero_padding_output=False,
          replay_cache=True)),
]

# ReplaySSM commit variants (CommitSpec: H, HV, K, V, T, state dtype, l2norm, arch, regime, ...)
COMMIT_VARIANTS = [
    ("commit-T4-large-float32", dict(T=4)),
    ("commit-T8-track-null0-large-bfloat16", dict(T=8, state_dtype="bfloat16", has_track=True, null_block_id=0)),
    ("commit-T16-K256V256-nol2norm-small-float32", dict(T=16, K=256, V=256, use_l2norm=False, regime="small")),
    ("commit-T2-K64V64-gva1-small-bfloat16", dict(T=2, K=64, V=64, H=32, state_dtype="bfloat16", regime="small")),
    # on the tensor cores (a 2-tuple tile): T not a multiple of 8 with a track write, GVA 1 and K = 64;
    # two token blocks (T > 8) of an fp32 checkpoint at K = 256
    ("commit-mma-T5-K64V64-gva1-track-null0-tile22-large-bfloat16",
     dict(T=5, K=64, V=64, H=32, state_dtype="bfloat16", has_track=True, null_block_id=0, tile=(2, 2))),
    ("commit-mma-T16-K256V256-nol2norm-tile21-large-float32",
     dict(T=16, K=256, V=256, use_l2norm=False, tile=(2, 1))),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [pytest.param(kw, id=vid) for vid, kw in VARIANTS])
def test_compiles(monkeypatch, arch, kw):
    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    s = spec(arch, **kw)
    fn = compile_kernel(s)
    assert fn is not None and callable(fn), f"{s.short_name()}: compile returned {fn!r}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw, heads, expected", [
    (dict(T=2, state="bfloat16"), 1, 1),
    (dict(T=5, state="float32", io="float16", H=32, HV=32), 8, 8),
    (dict(T=16, state="bfloat16", H=4, HV=12, K=256, V=256), 8, 2),  # 8 vectors a thread: two heads of T = 16
    (dict(T=4, state="float32", H=4, HV=12), 8, 6),  # the largest divisor of HV up to 8
], ids=["T2-bfloat16", "T5-fp16io-gva1-8heads-float32", "T16-K256-hv12-bfloat16", "T4-hv12-gva3-float32"])
def test_verify_with_window_ctas_compiles(monkeypatch, arch, kw, heads, expected):
    """A ReplaySSM verify whose windows go to CTAs of their own (policy.BuildConfig.window_heads),
    one per row and group of value heads."""
    import dataclasses

    from flashgdn.kernels import policy

    table = "sm90-hbm3e"
    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    monkeypatch.setitem(policy.DEVICE_TABLES, table, dataclasses.replace(
        policy.DEVICE_TABLES[table], verify_window_ctas=("float32", "bfloat16"), verify_window_heads=heads))
    s = spec(arch, **kw, index_dtype="int64", update_state=False, replay_cache=True, device_class=table)
    assert policy.BuildConfig.for_spec(s).window_heads == expected
    assert callable(compile_kernel(s))


# The fused step's conv/gate kernel (flashgdn.gdn_fused_decode_step): Qwen3-Next at TP1 and a TP4
# shard; its decode launch is the klast pool variants above (fp32 and bf16 state).
CONV_GATE_VARIANTS = [
    ("convgate-qwen3next-tp1-w4-bias", dict(H=16, HV=32, D=128, hidden=2048, width=4, has_bias=True)),
    ("convgate-tp4-w2-nobias", dict(H=4, HV=8, D=128, hidden=2048, width=2, has_bias=False)),
    ("convgate-hv6-d64-w3-odd-hidden", dict(H=2, HV=6, D=64, hidden=192, width=3, has_bias=True)),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [pytest.param(kw, id=vid) for vid, kw in CONV_GATE_VARIANTS])
def test_conv_gate_compiles(monkeypatch, arch, kw):
    from flashgdn.spec import ConvGateSpec

    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    s = ConvGateSpec(arch=arch, **kw)
    fn = compile_kernel(s)
    assert fn is not None and callable(fn), f"{s.short_name()}: compile returned {fn!r}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("regime, kw, change, expected", [
    # Three batch rows per gate CTA and the L2 prefetch, at a hidden size with a partial last pass.
    ("large", dict(CONV_GATE_VARIANTS)["convgate-hv6-d64-w3-odd-hidden"],
     dict(conv_gate_prefetch=True, conv_gate_rows=3, conv_gate_rows_min_bytes=0), (128, 3, True)),
    # The H200 table's own builds at the Qwen3.5 shape: 512 threads at small batch, 4 rows per
    # gate CTA (a 960 KiB w_ba) at large batch.
    ("small", dict(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True), {}, (512, 1, False)),
    ("large", dict(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True), {}, (128, 4, False)),
    # 1024-thread CTAs at small batch (device_check.sh small times them), 32 registers a thread.
    ("small", dict(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True), dict(conv_gate_threads_small=1024),
     (1024, 1, False)),
    # The "gemm" regime: conv CTAs only (the b/a projection is a cuBLAS GEMM before it).
    ("gemm", dict(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True), dict(conv_gate_gemm_heads_per_sm=16),
     (128, 1, False)),
    # ...with 512 threads of 3 batch rows each (partial last groups of rows), at an odd hidden size.
    ("gemm", dict(CONV_GATE_VARIANTS)["convgate-hv6-d64-w3-odd-hidden"],
     dict(conv_gate_gemm_heads_per_sm=16, conv_gate_gemm_threads=512, conv_gate_gemm_conv_rows=3), (512, 1, False)),
    # The split regime: 12 column blocks padded to 16 lanes (one butterfly step), 20 slices, 4 batch
    # rows; 2 blocks (four steps) with a partial last slice; 3 blocks of 4 columns, 3 rows.
    ("split", dict(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True),
     dict(conv_gate_split_batch_rows=4), (512, 4, False)),
    ("split", dict(CONV_GATE_VARIANTS)["convgate-tp4-w2-nobias"], dict(conv_gate_split_rows=768), (512, 1, False)),
    ("split", dict(CONV_GATE_VARIANTS)["convgate-hv6-d64-w3-odd-hidden"],
     dict(conv_gate_threads_small=128, conv_gate_split_rows=64, conv_gate_split_batch_rows=3), (128, 3, False)),
], ids=["rows3-prefetch", "h200-small", "h200-large-rows4", "small-1024", "h200-gemm", "gemm-512-conv3",
        "split20-rows4", "split768-tp4", "split64-hv6-rows3"])
def test_conv_gate_table_builds_compile(monkeypatch, arch, regime, kw, change, expected):
    """The conv/gate kernel as the H200 table (sm90-hbm3e) builds it, with `change` applied."""
    import dataclasses

    from flashgdn.kernels import policy
    from flashgdn.spec import ConvGateSpec

    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    name = "sm90-hbm3e"
    s = ConvGateSpec(arch=arch, device_class=name, regime=regime, **kw)
    monkeypatch.setitem(policy.DEVICE_TABLES, name, dataclasses.replace(policy.DEVICE_TABLES[name], **change))
    config = policy.ConvGateConfig.for_spec(s)
    assert (config.threads, config.gate_rows, config.gate_prefetch) == expected
    assert (config.gate_ctas == 0) == (regime == "gemm")
    assert config.conv_rows == change.get("conv_gate_gemm_conv_rows", 1)
    fn = compile_kernel(s)
    assert fn is not None and callable(fn), f"{s.short_name()}: compile returned {fn!r}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("state, H, HV, hidden, regime", [
    ("float32", 4, 8, 2048, "small"),  # the TP4 shard: the bf16 projection, read as [B, 1, HV] views
    ("bfloat16", 16, 48, 5120, "large"),  # Qwen3.5 TP1: every conv/gate build of the large decode
], ids=["tp4-fp32-small", "qwen35-bf16-large"])
def test_fused_step_compiles(monkeypatch, arch, state, H, HV, hidden, regime):
    """The fused step's compiled functions (StepSpec: the conv/gate kernel and the decode on views
    of its workspace, one TVM-FFI function) as the H200 table lays them out on sm_90a and the arch's
    own on sm_100a: the split projection's partial sums, read as [parts, B, 1, HV] views, and the one
    launch of the small and split regimes (switched on here) included."""
    import dataclasses

    import torch

    from flashgdn import engine_specs
    from flashgdn.device import DeviceFacts
    from flashgdn.kernels import policy
    from flashgdn.spec import StepSpec
    from flashgdn.validation import Problem

    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    facts = DeviceFacts(arch, 132, "sm90-hbm3e" if arch == "sm_90a" else None)
    # the one launch, off in the tables (slower than two launches on the H100)
    for name, table in policy.DEVICE_TABLES.items():
        monkeypatch.setitem(policy.DEVICE_TABLES, name, dataclasses.replace(table, fused_step_one_launch=("small",
                                                                                                          "split")))
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[state]
    specs = engine_specs.kernel_specs("fused-step", Problem(1, 1, H, HV, 128, 128), facts, io=torch.bfloat16,
                                      state=dtype, hidden=hidden, use_l2norm=True, regime=regime)
    steps = [s for s in specs if isinstance(s, StepSpec)]
    assert steps and (regime == "small" or any(s.decode.gate_parts for s in steps) or arch != "sm_90a")
    # the small conv/gate regime's step is one launch (its decode CTAs waiting on a counter)
    assert any(s.one_launch for s in steps) and all(s.one_launch == (s.conv.regime != "large") for s in steps
                                                    if s.conv.regime != "gemm")
    for s in steps:
        fn = compile_kernel(s)
        assert fn is not None and callable(fn), f"{s.short_name()}: compile returned {fn!r}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [pytest.param(kw, id=vid) for vid, kw in COMMIT_VARIANTS])
def test_commit_compiles(monkeypatch, arch, kw):
    from flashgdn.spec import CommitSpec

    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    s = CommitSpec(**(dict(H=16, HV=32, K=128, V=128, state_dtype="float32", use_l2norm=True, arch=arch,
                           regime="large") | kw))
    fn = compile_kernel(s)
    assert fn is not None and callable(fn), f"{s.short_name()}: compile returned {fn!r}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T, kernel", [(8, "ReplayCommitMma"), (4, "ReplayCommit")])
def test_commit_with_an_l2_prefetch_compiles(monkeypatch, arch, T, kernel):
    """Both commit kernels with a table's L2 prefetch distance (a bf16 checkpoint on the H200 table)."""
    import dataclasses

    from flashgdn.kernels import policy
    from flashgdn.spec import CommitSpec

    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    table = policy.SM90_HBM3E
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", dataclasses.replace(
        table, prefetch_bytes={**table.prefetch_bytes, "commit:bfloat16": 4 << 20, "commit_mma": 4 << 20}))
    s = CommitSpec(16, 32, 128, 128, T, "bfloat16", True, arch, "large", has_track=True, device_class="sm90-hbm3e")
    assert policy.BuildConfig.for_spec(s).kernel == kernel and policy.BuildConfig.for_spec(s).prefetch_bytes
    assert callable(compile_kernel(s))


def config(**kw):
    from flashgdn.kernels.policy import BuildConfig

    return BuildConfig.for_spec(spec("sm_90a", **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_host_floor_compiles(arch):
    """flashgdn-bench --host's floor rows: one compiled function of one and of two empty launches,
    with one tensor and with several."""
    from flashgdn.bench.host import FLOOR_CASES
    from flashgdn.kernels.floor import EmptyLaunches, compile_floor

    assert all(callable(compile_floor(n, arch, t)) for n, t in {(n, t) for n, t, _ in FLOOR_CASES})
    with pytest.raises(ValueError, match="launches must be at least 1"):
        EmptyLaunches(0)
    with pytest.raises(ValueError, match="tensors must be at least 1"):
        compile_floor(1, arch, 0)


def test_unchecked_loop_follows_the_measured_cases():
    """The fp32 large-batch MTP knobs apply only to the shape and token counts they were measured on."""
    def unchecked(**kw):
        return config(index_dtype="int32", **kw).unchecked_loop

    assert unchecked(T=5, regime="large") and unchecked(T=7, regime="large")
    assert not unchecked(T=4, regime="large")
    assert unchecked(T=8, regime="large", tile=(4, 2, 8))
    # From long_mtp_tokens on, the fp32 large-batch build is (4, 4, 8) with the L2 prefetch instead.
    assert not unchecked(T=8, regime="large") and not unchecked(T=16, regime="large")
    assert not unchecked(T=8, regime="small")
    assert not unchecked(T=8, regime="large", state="bfloat16")
    assert not unchecked(T=8, regime="large", tile=(4, 4, 8))
    assert not unchecked(T=8, regime="large", has_intermediate=True)


def test_mtp_with_intermediates_takes_its_own_tiles():
    """MTP builds that write the intermediate states take the "mtp_inter" CTA shapes at large batch
    (narrower rows per thread, measured faster there), the "mtp" ones otherwise."""
    def tile(**kw):
        return config(index_dtype="int32", **kw).tile

    assert tile(T=8, regime="large", has_intermediate=True) == (8, 1, 16)
    assert tile(T=4, regime="large", state="bfloat16", has_intermediate=True) == (4, 2, 16)
    assert tile(T=4, regime="large", state="bfloat16") == (2, 4, 8)
    assert tile(T=4, regime="small", has_intermediate=True) == tile(T=4, regime="small") == (4, 2, 8)
    # Lanes capped at K / (elements per 16-byte load); the CTA stays within one head.
    assert tile(T=4, regime="large", state="bfloat16", has_intermediate=True, K=64, V=64) == (4, 2, 8)


def test_mma_kernel_follows_the_measured_cases():
    """The tensor-core MTP kernel builds only what it was measured faster on: bf16 state and q/k/v,
    no intermediates, large batch, T >= 5; a 2-tuple tile asks for it, a 3-tuple for kmtp."""
    from flashgdn.kernels.build import make_kernel
    from flashgdn.kernels.kmtp_mma import KLastMTPMma
    from flashgdn.kernels.policy import KMTP_MMA, BuildConfig

    def mma(**kw):
        kw = dict(T=8, regime="large", state="bfloat16", index_dtype="int32") | kw
        return config(**kw).kernel == KMTP_MMA

    assert mma() and mma(T=5) and mma(T=16) and mma(has_accepted=True) and mma(update_state=False)
    assert not mma(T=4) and not mma(regime="small") and not mma(has_intermediate=True)
    # An fp32 state only by tile in the H100 table (mma_min_tokens_fp32 None), from T = 8 with the
    # (2, 1) shape in the H200's; a state per token only by tile in both; never vLLM's slot rule.
    assert not mma(state="float32") and mma(state="float32", tile=(4, 1)) and not mma(state="float32", tile=(4, 2, 8))
    h200 = dict(state="float32", device_class="sm90-hbm3e")
    assert config(T=8, regime="large", index_dtype="int32", **h200) == BuildConfig(KMTP_MMA, (2, 1), 8 << 20)
    assert not mma(T=7, **h200) and not mma(T=8, regime="small", **h200) and mma(T=16, **h200)
    assert not mma(T=8, has_intermediate=True, **h200)
    assert not mma(has_intermediate=True) and mma(has_intermediate=True, tile=(4, 2))
    # MTP that leaves the state as it is from the table's mma_min_tokens_frozen on: in the H100 table
    # from T = 3 for a bf16 state and T = 6 for an fp32 one; the H200 table names no dtype there.
    frozen = dict(update_state=False)
    assert mma(T=3, **frozen) and not mma(T=3) and not mma(T=2, **frozen) and not mma(T=3, regime="small", **frozen)
    assert mma(T=6, state="float32", **frozen) and not mma(T=5, state="float32", **frozen)
    assert not mma(T=6, state="float32") and not mma(T=7, **frozen, **h200) and mma(T=8, **frozen, **h200)
    assert not mma(T=3, io="float16", **frozen)
    with pytest.raises(ValueError, match="2-tuple tile asks for the tensor-core MTP kernel"):
        mma(has_token_slots=True, zero_padding_output=False, tile=(4, 2), vllm_slots=True)
    assert not mma(io="float16") and not mma(T=1, has_accepted=True)
    assert mma(T=2, regime="small", tile=(1, 1)) and not mma(tile=(2, 4, 8))
    assert isinstance(make_kernel(spec("sm_90a", T=8, regime="large", state="bfloat16", index_dtype="int32")),
                      KLastMTPMma)
    # (warps, 16-row blocks): a CTA's warps share one head, so they cover at most V rows.
    for (K, V), tile in {(128, 128): (4, 2), (64, 64): (2, 2), (256, 256): (4, 1), (256, 64): (4, 1)}.items():
        kernel = make_kernel(spec("sm_90a", T=8, K=K, V=V, regime="large", state="bfloat16", index_dtype="int32"))
        assert (kernel.num_warps, kernel.mb) == tile and kernel.rows_per_cta <= V
        # The update's k loads early up to K = 128; at K = 256 its registers would cost occupancy.
        assert kernel.early_k == (K <= 128)
    for bad in (spec("sm_90a", T=8, state="bfloat16", io="float16", gate="float16", index_dtype="int32"),
                spec("sm_90a", T=8, state="bfloat16", index_dtype="int32", has_token_slots=True, vllm_slots=True,
                     zero_padding_output=False)):
        with pytest.raises(ValueError, match="bf16 q/k/v, not vLLM's slot rule"):
            KLastMTPMma(bad, config(T=8, state="bfloat16", index_dtype="int32", tile=(1, 2)))
    # one lane runs the recurrence of one row: at most two 16-row blocks per warp
    with pytest.raises(ValueError, match="16-row blocks per warp must be 1 or 2, got 4"):
        make_kernel(spec("sm_90a", T=8, regime="large", state="bfloat16", index_dtype="int32", tile=(2, 4)))


def test_replay_verify_follows_plain_mtp():
    """A ReplaySSM verify is built as plain MTP without a state update is (kernel class, tile,
    prefetch): the tensor-core kernel where that one runs it (bf16 state, large batch, from the
    table's mma_min_tokens on), kmtp elsewhere."""
    from flashgdn.kernels import policy

    import dataclasses

    kernels = set()
    for T, regime, state, table in itertools.product((2, 3, 4, 8), ("small", "large"), ("float32", "bfloat16"),
                                                     ("sm90-hbm3", "sm90-hbm3e")):
        plain = dict(T=T, regime=regime, state=state, index_dtype="int32", update_state=False, device_class=table)
        replay = config(**plain, replay_cache=True, zero_padding_output=False)
        assert dataclasses.replace(replay, window_heads=0) == config(**plain), plain
        # window CTAs where the table asks for them on the token loop, without an L2 prefetch
        assert bool(replay.window_heads) == (replay.kernel == policy.KMTP and regime == "small"
                                             and state in policy.DEVICE_TABLES[table].verify_window_ctas), plain
        kernels.add(replay.kernel)
    assert kernels == {policy.KMTP, policy.KMTP_MMA}
    assert config(T=3, regime="large", state="bfloat16", index_dtype="int32", update_state=False,
                  replay_cache=True, device_class="sm90-hbm3e").kernel == policy.KMTP_MMA


def test_every_kernel_class_is_built_by_name():
    """The policy names the kernel class; the kernel layer maps each name to one class."""
    from flashgdn.kernels import policy
    from flashgdn.kernels.build import KERNELS

    assert set(KERNELS) == {policy.KLAST, policy.KMAJOR, policy.KMTP, policy.KMTP_MMA, policy.REPLAY_COMMIT,
                            policy.REPLAY_COMMIT_MMA}
    assert config().kernel == policy.KLAST
    assert config(layout="kmajor").kernel == policy.KMAJOR
    assert config(T=4, index_dtype="int32").kernel == policy.KMTP


def test_device_classes_fall_back_to_the_nearest_table():
    """Every known device and an unknown one resolve to a tuning table that exists; the table's
    name (not the device's) enters the spec, so devices sharing a table share compiled code."""
    from flashgdn.kernels import policy

    for d in policy.KNOWN_DEVICES:
        assert policy.device_class(d.arch, d.sm_count, d.memory_gib) == d.table
        assert d.table in policy.DEVICE_TABLES
    assert policy.device_class("sm_90a", 114, 80) in policy.DEVICE_TABLES  # H100 PCIe: nearest SM90
    assert policy.device_class("sm_100a", 160, 192) in policy.DEVICE_TABLES
    named = spec("sm_90a", device_class=policy.device_class("sm_90a", 132, 80))
    assert policy.BuildConfig.for_spec(named) == policy.BuildConfig.for_spec(spec("sm_90a"))


def test_h200_table_takes_its_measured_choices():
    """The H200 (HBM3e) table: the tensor cores from T = 3 for a bf16 state at large batch, the
    (8, 2, 16) fp32 K-last tile and the 8 MiB prefetch; the H100's choices stay as they were."""
    from flashgdn.kernels import policy

    h200 = policy.device_class("sm_90a", 132, 141)
    assert h200 != policy.device_class("sm_90a", 132, 80)

    def on(device_class, **kw):
        return policy.BuildConfig.for_spec(spec("sm_90a", device_class=device_class, **kw))

    mtp3 = dict(T=3, regime="large", state="bfloat16", index_dtype="int32")
    assert on(h200, **mtp3).kernel == policy.KMTP_MMA and on("sm90-hbm3", **mtp3).kernel == policy.KMTP
    assert on(h200, T=2, regime="large", state="bfloat16", index_dtype="int32").kernel == policy.KMTP
    assert on(h200, regime="large").tile == (8, 2, 16) and on("sm90-hbm3", regime="large").tile == (4, 4, 16)
    assert on(h200, regime="large").prefetch_bytes == 2 * on("sm90-hbm3", regime="large").prefetch_bytes


def test_per_token_writes_follow_intermediates():
    """Token slots (ssm_state_indices) write a state per token like intermediates: kmtp (never the
    tensor-core kernel), the "mtp_inter" tiles, no L2 prefetch beyond T = short_mtp_tokens; a
    strided state prefetches as a packed one (row by row)."""
    from flashgdn.kernels import policy

    tok = config(T=8, regime="large", state="bfloat16", index_dtype="int32", has_token_slots=True)
    inter = config(T=8, regime="large", state="bfloat16", index_dtype="int32", has_intermediate=True)
    assert tok.kernel == inter.kernel == policy.KMTP and tok.tile == inter.tile and tok.prefetch_bytes == 0
    # ...but for token slots of at most short_mtp_tokens tokens: the table's "mtp_slots" distance
    # (4 MiB in the H100 and H200 tables).
    for sdt in ("float32", "bfloat16"):
        short = dict(T=2, regime="large", state=sdt, index_dtype="int32")
        assert config(**short, has_token_slots=True).prefetch_bytes == policy.SM90_HBM3.prefetch_bytes["mtp_slots"] > 0
        assert config(**short, has_intermediate=True).prefetch_bytes == 0
        on_h200 = policy.BuildConfig.for_spec(spec("sm_90a", device_class="sm90-hbm3e", has_token_slots=True, **short))
        assert on_h200.prefetch_bytes == policy.SM90_HBM3E.prefetch_bytes["mtp_slots"] == 4 << 20
    strided = config(regime="large", state="bfloat16", index_dtype="int32", strided_state=True)
    assert strided.prefetch_bytes == config(regime="large", state="bfloat16", index_dtype="int32").prefetch_bytes
    assert config(regime="large", state="bfloat16", index_dtype="int32").prefetch_bytes > 0
    with pytest.raises(ValueError, match="token slots need a pool"):
        spec("sm_90a", T=4, has_token_slots=True)


def test_l2_prefetch_follows_the_measured_cases():
    """The L2 prefetch of a later CTA's state tile is on only for the large-batch builds it was measured
    faster on, at the table's prefetch distance (a whole number of CTA tiles, at least one)."""
    from flashgdn.kernels.build import make_kernel

    def ahead(**kw):
        return make_kernel(spec("sm_90a", **(dict(regime="large") | kw))).prefetch_ctas

    mib = 1 << 20
    # bf16 K-major, one CTA per 32 KiB head: 8 MiB ahead; a K=64 head is 8 KiB.
    assert ahead(layout="kmajor", state="bfloat16") == 8 * mib // (32 << 10)
    assert ahead(layout="kmajor", state="bfloat16", K=64, V=64) == 8 * mib // (8 << 10)
    # MTP, 4 MiB ahead: kmtp bf16 (2, 4, 8) tiles of 32 rows x 256 B, fp32 (4, 2, 8) 32 rows x 512 B,
    # the tensor-core kernel's 128 rows x 256 B; kmtp at T = 2, 6 MiB ahead.
    assert ahead(T=4, state="bfloat16", index_dtype="int32") == 4 * mib // (32 * 256)
    assert ahead(T=3, state="float32", index_dtype="int32") == 4 * mib // (32 * 512)
    assert ahead(T=2, state="bfloat16", index_dtype="int32") == 6 * mib // (32 * 256)
    assert ahead(T=2, state="float32", index_dtype="int32") == 6 * mib // (32 * 512)
    assert ahead(T=8, state="bfloat16", index_dtype="int32") == 4 * mib // (128 * 256)
    # K-last T = 1, 4 MiB ahead: bf16 (4, 4, 8) tiles of 64 rows x 256 B, fp32 (4, 4, 16) 32 rows x 512 B.
    assert ahead(state="bfloat16") == ahead(state="float32", index_dtype="int32") == 4 * mib // (16 << 10)
    # Off: small batch, intermediates, the fp32 MTP builds with the unchecked loop,
    # fp32 K-major (two CTAs per head: the tile is not contiguous), bf16 K-major at K = 256.
    assert ahead(regime="small", layout="kmajor", state="bfloat16") == 0
    assert ahead(regime="small", state="bfloat16") == 0
    assert ahead(T=4, state="bfloat16", index_dtype="int32", has_intermediate=True) == 0
    assert ahead(T=6, state="float32", index_dtype="int32") == 0
    # fp32 MTP from long_mtp_tokens on: (4, 4, 8) tiles of 64 rows x 512 B.
    assert ahead(T=8, state="float32", index_dtype="int32") == 4 * mib // (64 * 512)
    assert ahead(layout="kmajor", state="float32") == 0
    assert ahead(layout="kmajor", state="bfloat16", K=256, V=256) == 0


def test_input_prefetch_follows_the_measured_cases():
    """The later CTA's q/k/v and gates come with its state only for the bf16 MTP builds from T = 3
    on (kmtp and the tensor-core kernel); not at T <= 2, for an fp32 state or for T = 1."""
    from flashgdn.kernels.build import make_kernel

    def inputs(**kw):
        return make_kernel(spec("sm_90a", **(dict(regime="large", index_dtype="int32") | kw))).prefetch_inputs

    assert inputs(T=3, state="bfloat16") and inputs(T=4, state="bfloat16") and inputs(T=8, state="bfloat16")
    assert inputs(T=16, state="bfloat16", has_accepted=True)
    assert not inputs(T=2, state="bfloat16") and not inputs(T=4, state="float32")
    assert not inputs(T=8, state="float32") and not inputs(state="bfloat16")


def test_variant_ids_are_unique():
    ids = [vid for vid, _ in VARIANTS + COMMIT_VARIANTS + CONV_GATE_VARIANTS]
    assert len(ids) == len(set(ids))
    assert len(ids) * len(ARCHS) <= 112  # about 1 s of CI per compile on 2 cores

