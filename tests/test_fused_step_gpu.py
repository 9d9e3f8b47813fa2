"""gdn_fused_decode_step on the GPU against the composed fp64 reference: both conv-state layouts,
padding and out-of-range slots, padded page and slot strides, fp32 and bf16 state, conv bias or
none, the models' geometries (Qwen3-Next and Qwen3.5 at TP1 and TP4) and odd ones, a dynamic
batch compiled once, and CUDA graph replay equal to eager.

Each call is checked in two stages, because the conv output and the projection are rounded to
bf16 (as the models store them) and an fp32 kernel and an fp64 oracle round a value lying on a
bf16 rounding boundary differently: (1) the conv/gate launch's workspace rows (post-conv
q | k | v, b | a) against the oracle within one bf16 step, and the conv pool bit for bit (the
window shift is exact); (2) the output and the ssm pool against the fp64 decode oracle run on
those workspace rows; the output also end to end against the oracle from scratch.
"""
import pytest
import torch

import flashgdn
from flashgdn import fused_step
from flashgdn import reference as ref
from flashgdn.cache import kernel_cache
from flashgdn.spec import StepSpec
from helpers import (BF16, F32, assert_close_output, assert_close_state, bf16_ulp, clone_fused, graph_replay_equals_eager,
                     make_fused_inputs, use_h200_table, use_table)

pytestmark = pytest.mark.gpu
DEV = "cuda"
F64 = torch.float64

# (id, H, HV, D, hidden, width, bias)
GEOMETRIES = [
    ("qwen3next-tp1", 16, 32, 128, 2048, 4, False),
    ("qwen3next-tp4", 4, 8, 128, 2048, 4, True),
    ("qwen35-tp4", 4, 12, 128, 5120, 4, False),
    ("d64-hv6-w3", 2, 6, 64, 192, 3, True),
    ("d256-w2", 1, 2, 256, 256, 2, True),
]


def _convs(specs):
    """The conv/gate builds of the fused steps among looked-up specs."""
    return [s.conv for s in specs if isinstance(s, StepSpec)]


def _decodes(specs):
    """The decode builds of the fused steps among looked-up specs."""
    return [s.decode for s in specs if isinstance(s, StepSpec)]


def _slots(B, P, pad, invalid, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(P, generator=gen)[:B].to(torch.int32)
    if pad:
        idx[1::3] = -1
    if invalid and B > 2:
        idx[2] = P + 3  # past both pools: NaN output row, nothing written
    return idx


def _check_bf16_close(actual, expected, what):
    """Within one bf16 rounding step (a value on a rounding boundary may round either way)."""
    err = (actual.float() - expected.float()).abs()
    tol = bf16_ulp(expected.float()) + 1e-6
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} values beyond one bf16 step, max {err.max():.3g}"


def _poisoned_workspaces(qkv_dim, HV):
    """This stream's workspaces of the geometry (one per form of the projection: fused_step._Workspace),
    their rows set to NaN, so that the one a step writes shows (_written_workspace)."""
    stream = fused_step._current_stream(torch.device(DEV, torch.cuda.current_device()))
    found = {key: ws for key, ws in fused_step._WORKSPACES.items() if key[1:4] == (stream, qkv_dim, HV)}
    for ws in found.values():
        ws.qkv.fill_(float("nan"))
        ws.ba.fill_(float("nan"))
    return found


def _written_workspace(before, qkv_dim, HV, B):
    """(qkv rows, b | a rows as the decode reads them, partial sums) of the workspace the step just
    wrote: every row of its projection is written (padding rows too). From the split projection's
    fp32 partial sums, b | a is their sum in order, rounded to bf16, as the decode adds them up."""
    stream = fused_step._current_stream(torch.device(DEV, torch.cuda.current_device()))
    written = [(key[4], ws) for key, ws in fused_step._WORKSPACES.items()
               if key[1:4] == (stream, qkv_dim, HV) and (key not in before or not ws.ba[..., :B, :].isnan().any())]
    assert len(written) == 1, f"one workspace written, found {len(written)}"
    parts, ws = written[0]
    if not parts:
        return ws.qkv[:B], ws.ba[:B], parts
    acc = ws.ba[0, :B].clone()
    for s in range(1, parts):
        acc += ws.ba[s, :B]
    return ws.qkv[:B], acc.to(BF16), parts


def run_and_check(kw, *, out=None, gemm=False, w_ba_param=False):
    """Run the fused step on `kw` (GPU tensors) and check everything against the fp64 oracle. With
    `gemm` (the "gemm" conv/gate regime) the b | a rows are cuBLAS's: checked against torch.mm of the
    same tensors (cuBLAS may reduce in bf16 where the oracle does not round). `w_ba_param`: the step
    gets w_ba as an nn.Parameter (it requires grad; no torch.no_grad around the call)."""
    B = kw["hidden_states"].shape[0]
    HV, D = kw["A_log"].shape[0], kw["ssm_state"].shape[-1]
    qkv_dim = kw["mixed_qkv"].shape[1]
    H = (qkv_dim - HV * D) // (2 * D)
    P = kw["ssm_state"].shape[0]
    idx = kw["state_indices"].long()
    run = (idx >= 0) & (idx < P)
    pad = idx < 0
    invalid = idx >= P

    oracle = clone_fused(kw)
    before = clone_fused(kw)
    o_ref, _, _ = ref.gdn_fused_decode_step(**oracle, out=None, compute_dtype=F64)
    if out is None:
        out = torch.full((B, 1, HV, D), float("nan"), dtype=BF16, device=DEV)
    call = dict(kw, w_ba=torch.nn.Parameter(kw["w_ba"])) if w_ba_param else kw
    workspaces = _poisoned_workspaces(qkv_dim, HV)
    o, conv_state, ssm_state = flashgdn.gdn_fused_decode_step(**call, out=out)
    torch.cuda.synchronize()
    assert o is out and conv_state is kw["conv_state"] and ssm_state is kw["ssm_state"]

    # Stage 1: the conv/gate launch.
    qkv, ba, parts = _written_workspace(workspaces, qkv_dim, HV, B)
    assert not gemm or not parts, "the gemm regime's projection is cuBLAS's bf16 one"
    y_ref = ref.conv_update(before["mixed_qkv"], before["conv_weight"], before["conv_bias"],
                            clone_fused(before)["conv_state"], before["state_indices"], F64)
    ba_ref = (torch.mm(before["hidden_states"], before["w_ba"]) if gemm
              else (before["hidden_states"].to(F64) @ before["w_ba"].to(F64)).to(BF16))
    _check_bf16_close(qkv[run], y_ref[run], "conv output (q | k | v)")
    _check_bf16_close(ba, ba_ref, "b | a projection")
    assert torch.equal(conv_state, oracle["conv_state"]), "conv_state differs from the reference"

    # Stage 2: the decode on the kernel's own workspace rows.
    dec_pool = before["ssm_state"].to(F64)
    q = qkv[:, : H * D].reshape(B, 1, H, D)
    k = qkv[:, H * D : 2 * H * D].reshape(B, 1, H, D)
    v = qkv[:, 2 * H * D :].reshape(B, 1, HV, D)
    o_dec, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, kw["A_log"], ba[:, None, HV:], kw["dt_bias"], ba[:, None, :HV],
        scale=kw["scale"] or None, use_qk_l2norm=True, initial_state=dec_pool,
        initial_state_indices=kw["state_indices"], compute_dtype=F64,
    )
    assert torch.all(o[pad] == 0), "a padding row's output is zero"
    assert torch.isnan(o[invalid]).all(), "a row whose slot is past the pools has a NaN output"
    assert_close_output(o[run], o_dec[run], "output (decode stage)")
    assert_close_output(o[run], o_ref[run], "output (end to end)")
    written = torch.zeros(P, dtype=torch.bool, device=DEV)
    written[idx[run]] = True
    assert_close_state(ssm_state[written], dec_pool[written], "ssm_state (written slots)")
    assert torch.equal(ssm_state[~written], before["ssm_state"][~written]), "an unnamed ssm slot changed"
    assert torch.equal(conv_state[~written], before["conv_state"][~written]), "an unnamed conv slot changed"
    return o


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("layout", ["SD", "DS"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_reference(geom, layout, sdt):
    _, H, HV, D, hidden, width, bias = geom
    for n, B in enumerate((1, 7, 70)):
        P = 2 * B + 5
        kw = make_fused_inputs(B, H, HV, D, hidden, width, P=P, state_dtype=sdt, conv_layout=layout, bias=bias,
                               slots=_slots(B, P, pad=B > 1, invalid=B > 2, seed=n), device=DEV, seed=10 + n)
        run_and_check(kw)


# The split regime from B * HV > 132 for any w_ba and state dtype.
SPLIT_ANY = dict(conv_gate_split_heads_per_sm=1, conv_gate_split_min_bytes=0, conv_gate_split_max_bytes={},
                 conv_gate_split_state_dtypes=("float32", "bfloat16"))


# Both regimes at one CTA size; batch rows per gate CTA for any w_ba size.
@pytest.mark.parametrize("change", [dict(conv_gate_threads=1024, conv_gate_threads_small=1024),
                                    dict(conv_gate_threads=512, conv_gate_threads_small=512, conv_gate_prefetch=True),
                                    dict(conv_gate_threads=256, conv_gate_threads_small=256, conv_gate_rows=3,
                                         conv_gate_rows_min_bytes=0),
                                    dict(conv_gate_threads=128, conv_gate_threads_small=128, conv_gate_rows=4,
                                         conv_gate_rows_min_bytes=0, conv_gate_prefetch=True),
                                    dict(conv_gate_threads_small=512, conv_gate_threads=512, **SPLIT_ANY,
                                         conv_gate_split_rows=1024),
                                    dict(conv_gate_threads=128, conv_gate_threads_small=128, **SPLIT_ANY,
                                         conv_gate_split_rows=1728, conv_gate_split_batch_rows=3)],
                         ids=["1024", "512-prefetch", "256-rows3", "128-rows4-prefetch", "512-split1024",
                              "128-split1728-rows3"])
@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g[0] in ("qwen35-tp4", "d64-hv6-w3", "qwen3next-tp4")],
                         ids=lambda g: g[0])
def test_matches_reference_with_conv_gate_settings(monkeypatch, change, geom):
    """The conv/gate CTA sizes, batch rows per gate CTA, L2 prefetch and split projection (hidden
    slices of partial sums, the decode adding them up; the split regime from B * HV > 132 on) that the
    timing scripts compare: the same results as the reference (B = 70 leaves a partial last group of
    rows; slices of 1728 rows of hidden 5120 a partial last slice; w_ba rows of 2, 3 and 6 column
    blocks)."""
    from flashgdn.kernels import policy

    specs = use_h200_table(monkeypatch, **change)
    _, H, HV, D, hidden, width, bias = geom
    for n, B in enumerate((1, 70)):
        P = 2 * B + 5
        kw = make_fused_inputs(B, H, HV, D, hidden, width, P=P, state_dtype=BF16, conv_layout="SD", bias=bias,
                               slots=_slots(B, P, pad=B > 1, invalid=B > 1, seed=n), device=DEV, seed=20 + n)
        run_and_check(kw)
    built = _convs(specs)
    assert built and all(policy.ConvGateConfig.for_spec(s).threads == change["conv_gate_threads"] for s in built)


def test_matches_reference_with_the_h200_table_at_qwen35_tp1(monkeypatch):
    """The H200 table's own conv/gate builds at the Qwen3.5 TP1 shape (a 960 KiB w_ba): 512 threads
    at small batch (B = 1, 16), 4 batch rows per gate CTA at B = 45 (the large regime, B * HV = 2160
    of 1056-2640 heads on 132 SMs; a partial last group)."""
    from flashgdn.kernels import policy

    specs = use_h200_table(monkeypatch)
    for n, B in enumerate((1, 16, 45)):
        P = 2 * B + 5
        kw = make_fused_inputs(B, 16, 48, 128, 5120, 4, P=P, state_dtype=BF16, conv_layout="SD", bias=False,
                               slots=_slots(B, P, pad=B > 1, invalid=B > 1, seed=n), device=DEV, seed=30 + n)
        run_and_check(kw)
    built = {(c.threads, c.gate_rows) for c in map(policy.ConvGateConfig.for_spec, _convs(specs))}
    assert built == {(512, 1), (128, 4)}


def test_matches_reference_with_the_h100_tables_split_at_qwen35_tp1(monkeypatch):
    """The H100 table's split regime at the Qwen3.5 TP1 shape (a 960 KiB w_ba), a bf16 state: two
    batch rows per gate CTA (conv_gate_split_batch_rows), B = 16 and 21 (a partial last group)."""
    from flashgdn.kernels import policy

    specs = use_table(monkeypatch, "sm90-hbm3")
    for B in (16, 21):
        P = 2 * B + 5
        kw = make_fused_inputs(B, 16, 48, 128, 5120, 4, P=P, state_dtype=BF16, conv_layout="SD", bias=True,
                               slots=_slots(B, P, pad=True, invalid=True, seed=B), device=DEV, seed=90 + B)
        run_and_check(kw)
    built = {s.regime: policy.ConvGateConfig.for_spec(s) for s in _convs(specs)}
    assert set(built) == {"split"} and (built["split"].gate_rows, built["split"].partial_sums) == (2, 20)


@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_reference_with_the_split_projection_at_qwen35_tp1(monkeypatch, sdt):
    """The split regime at the Qwen3.5 TP1 shape (12 column blocks of w_ba, padded to 16 lanes; 20
    slices of 256 rows of hidden 5120), as the tables build it, from B * HV > 3 per SM (B = 16, 22)
    up to 8 (B = 1 stays small), and with 4 batch rows per gate CTA (B = 22: a partial last group);
    for an fp32 state too, which the tables leave in the small regime."""
    from flashgdn.kernels import policy

    for n, rows in enumerate((1, 4)):
        specs = use_h200_table(monkeypatch, conv_gate_split_batch_rows=rows, conv_gate_split_max_bytes={},
                               conv_gate_split_state_dtypes=("float32", "bfloat16"))
        for B in (1, 16, 22):
            P = 2 * B + 5
            kw = make_fused_inputs(B, 16, 48, 128, 5120, 4, P=P, state_dtype=sdt, conv_layout="SD", bias=False,
                                   slots=_slots(B, P, pad=B > 1, invalid=B > 1, seed=B), device=DEV, seed=60 + B + n)
            run_and_check(kw)
        built = {s.regime: policy.ConvGateConfig.for_spec(s) for s in _convs(specs)}
        assert set(built) == {"small", "split"} and built["small"].partial_sums == 0
        assert (built["split"].threads, built["split"].partial_sums, built["split"].gate_rows) == (512, 20, rows)
        assert {s.gate_parts for s in _decodes(specs)} == {0, 20}


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_one_launch_equals_two_launches(monkeypatch, geom, sdt):
    """The one-launch step (policy.fused_step_one_launch: the decode's CTAs in the conv/gate grid,
    waiting on a counter) leaves bit for bit the two-launch step's outputs and pools, call after call
    on the same pools (each launch leaves its counters at zero, which the next one needs), at B = 1
    and at a batch of several waves of CTAs (B = 130 at 8 value heads: 1040 heads, the small regime,
    2080 decode CTAs of 128 threads), padding and out-of-range slots included; and the reference's
    results (run_and_check). A spec whose decode CTAs do not fill whole CTAs stays two launches."""
    from flashgdn.kernels import policy

    _, H, HV, D, hidden, width, bias = geom
    one_launches = 0
    for n, B in enumerate((1, 130 if HV <= 8 else 24)):
        P = 2 * B + 5
        kw = make_fused_inputs(B, H, HV, D, hidden, width, P=P, state_dtype=sdt, conv_layout="SD", bias=bias,
                               slots=_slots(B, P, pad=B > 1, invalid=B > 1, seed=n), device=DEV, seed=70 + n)
        results = {}
        for one in (False, True):  # one launch last: run_and_check below runs it
            specs = use_h200_table(monkeypatch, fused_step_one_launch=("small", "split") if one else ())
            call = clone_fused(kw)
            outs = [flashgdn.gdn_fused_decode_step(**call)[0] for _ in range(3)]
            torch.cuda.synchronize()
            results[one] = (*outs, call["conv_state"], call["ssm_state"])
            steps = [s for s in specs if isinstance(s, StepSpec)]
            # where the decode's CTAs do not fill whole CTAs of the launch, the step stays two launches
            fits = [one and policy.one_launch_fits(s.conv, s.decode) for s in steps]
            assert steps and [s.one_launch for s in steps] == fits, [s.short_name() for s in steps]
            one_launches += sum(fits)
            counters = [ws.sync for key, ws in fused_step._WORKSPACES.items() if key[-1]]  # one-launch workspaces
            assert (counters or not one) and not any(c.any() for c in counters), "counters left non-zero"
        for one, two in zip(results[True], results[False]):
            assert torch.equal(one.nan_to_num(7.0), two.nan_to_num(7.0)), "one launch differs from two"
        run_and_check(clone_fused(kw))
    assert one_launches, "no batch size ran one launch"


GEMM_REGIME = dict(conv_gate_gemm_heads_per_sm=2, conv_gate_small_heads_per_sm=0)  # from B * HV > 264


@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g[0] in ("qwen3next-tp1", "qwen35-tp4", "d64-hv6-w3")],
                         ids=lambda g: g[0])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("conv", [{}, dict(conv_gate_gemm_conv_rows=4),
                                  dict(conv_gate_gemm_conv_rows=3, conv_gate_gemm_threads=512)],
                         ids=["table", "conv4", "conv3-512"])
def test_matches_reference_in_the_gemm_regime(monkeypatch, geom, sdt, conv):
    """The "gemm" conv/gate regime (the b/a projection by torch.mm into the workspace, then the step's
    compiled function: a conv-only conv/gate kernel and the decode as its programmatic dependent): the
    same results as the reference, padding and an out-of-range slot included, in the DS and SD
    layouts; the second call's w_ba requires grad (an nn.Parameter), outside torch.no_grad. With
    several batch rows per conv thread, B = 70 and 130 leave a partial last group of rows."""
    from flashgdn.kernels import policy

    specs = use_h200_table(monkeypatch, **GEMM_REGIME, **conv)
    _, H, HV, D, hidden, width, bias = geom
    for n, (B, layout) in enumerate(((70, "SD"), (130, "DS"))):
        P = 2 * B + 5
        kw = make_fused_inputs(B, H, HV, D, hidden, width, P=P, state_dtype=sdt, conv_layout=layout, bias=bias,
                               slots=_slots(B, P, pad=True, invalid=True, seed=n), device=DEV, seed=50 + n)
        run_and_check(kw, gemm=True, w_ba_param=n == 1)
    convs = _convs(specs)
    assert convs and all(s.regime == "gemm" for s in convs)
    built = [policy.ConvGateConfig.for_spec(s) for s in convs]
    assert all(c.gate_ctas == 0 and c.conv_rows == conv.get("conv_gate_gemm_conv_rows", 1) for c in built)


@pytest.mark.parametrize("layout", ["SD", "DS"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_padded_page_and_slot_strides(layout, sdt):
    B, P = 9, 23
    kw = make_fused_inputs(B, 4, 8, 128, 2048, 4, P=P, state_dtype=sdt, conv_layout=layout, bias=True,
                           page_pad=40, slot_pad=64, slots=_slots(B, P, True, True, 3), device=DEV, seed=4)
    assert not kw["ssm_state"].is_contiguous() and not kw["conv_state"].is_contiguous()
    run_and_check(kw)


def test_scale_and_strided_rows():
    """An explicit scale; hidden_states, mixed_qkv and w_ba as views of wider rows."""
    B, H, HV, D, hidden = 5, 4, 8, 128, 2048
    kw = make_fused_inputs(B, H, HV, D, hidden, 4, state_dtype=F32, device=DEV, seed=8)
    wide = lambda t, extra: torch.cat([t, torch.randn(t.shape[0], extra, device=DEV).to(BF16)], 1)[:, : t.shape[1]]  # noqa: E731
    kw.update(hidden_states=wide(kw["hidden_states"], 64), mixed_qkv=wide(kw["mixed_qkv"], 24),
              w_ba=wide(kw["w_ba"], 16), scale=0.05)
    run_and_check(kw)


def test_out_none_and_batch_dynamic_compiles_once():
    H, HV, D, hidden = 2, 4, 128, 512
    specs = lambda: {s for s in _convs(kernel_cache._fns) if s.hidden == hidden}  # noqa: E731
    for B in (1, 3, 130, 17):
        kw = make_fused_inputs(B, H, HV, D, hidden, 4, P=B + 2, device=DEV, seed=B)
        oracle = clone_fused(kw)
        o, _, _ = flashgdn.gdn_fused_decode_step(**kw)
        o_ref, _, _ = ref.gdn_fused_decode_step(**oracle, compute_dtype=F64)
        assert o.shape == (B, 1, HV, D) and o.dtype == BF16
        assert_close_output(o, o_ref)
    assert len(specs()) == 1, "one conv/gate build serves every batch size"


@pytest.mark.parametrize("mode", ["conv-gate", "one-launch", "gemm"])
def test_cuda_graph_replay_equals_eager(monkeypatch, mode):
    """New hidden states, inputs and slots (padding rows included) per replay, as a decode step;
    also as one launch (its counters back to zero after each replay) and in the "gemm" conv/gate regime
    (torch.mm captured with the two kernels)."""
    gemm = mode == "gemm"
    if gemm:
        use_h200_table(monkeypatch, **GEMM_REGIME)
    elif mode == "one-launch":
        specs = use_h200_table(monkeypatch, fused_step_one_launch=("small", "split"))
    B, H, HV, D, hidden = (40 if gemm else 9), 4, 8, 128, 2048
    P = 2 * B + 3
    kw = make_fused_inputs(B, H, HV, D, hidden, 4, P=P, state_dtype=F32, conv_layout="SD", page_pad=8,
                           slot_pad=32, device=DEV, seed=20)
    static = [kw["hidden_states"], kw["mixed_qkv"], kw["state_indices"]]

    def fresh(i):
        f = make_fused_inputs(B, H, HV, D, hidden, 4, P=P, device=DEV, seed=30 + i,
                              slots=_slots(B, P, True, False, 40 + i))
        return [f["hidden_states"], f["mixed_qkv"], f["state_indices"]]

    def call(t):
        o, _, _ = flashgdn.gdn_fused_decode_step(**{**kw, **t})
        return o

    bufs = dict(conv_state=kw["conv_state"], ssm_state=kw["ssm_state"],
                out=torch.zeros(B, 1, HV, D, dtype=BF16, device=DEV))
    graph_replay_equals_eager(call, static, fresh, bufs)
    if mode == "one-launch":
        assert any(isinstance(s, StepSpec) and s.one_launch for s in specs)
