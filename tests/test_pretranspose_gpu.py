"""Pretranspose (K-last) decode kernel against the reference (computed in fp64: the oracle), on the GPU."""
import itertools

import pytest
import torch

import flashgdn
from flashgdn import reference as ref
from helpers import assert_close_output, assert_close_state, make_inputs, make_state

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _cases():
    """Every B, GVA ratio, head size, state/io dtype, l2norm, dense/pool appears; not the full product."""
    Bs = (1, 2, 7, 32, 33, 64, 257)
    combos = list(itertools.product((64, 128, 256), (torch.float32, torch.bfloat16)))
    cases = []
    for i, (K, sdt) in enumerate(combos):
        for j, B in enumerate(Bs if K == 128 else Bs[i % 3 :: 3]):
            n = i + j
            cases.append(dict(
                B=B, K=K, sdt=sdt, ratio=(1, 2, 4)[n % 3], io=(torch.bfloat16, torch.float16)[n % 2],
                l2=(True, False)[(n // 2) % 2], pool=bool(n % 2), strided=(n % 4 == 3),
            ))
    return cases


CASES = _cases()


def _run_case(B, K, sdt, ratio, io, l2, pool, strided, out_slots=False, pad_every=0):
    H = 2
    HV, V = H * ratio, K
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, V, io, DEV, strided=strided)
    scale = None if l2 else 0.5 * K ** -0.5
    output = torch.full((B, 1, HV, V), float("nan"), dtype=io, device=DEV)
    if pool:
        P = 2 * B + 3
        pool_t = make_state(P, HV, V, K, sdt, DEV, pad=16 if strided else 0)
        idx = torch.randperm(P, device=DEV)[:B].to(torch.int32 if B % 2 else torch.int64)
        if pad_every:
            idx[::pad_every] = -1
        out_idx = None
        if out_slots:
            free = torch.tensor(sorted(set(range(P)) - set(idx.tolist())), device=DEV)
            out_idx = free[torch.randperm(free.numel(), device=DEV)[:B]].to(idx.dtype)
        before = pool_t.clone()
        ref_pool32 = before.double()
        o_ref, _ = ref.gated_delta_rule_decode_pretranspose(
            q, k, v, None, A_log, a, dt_bias, b, scale, None, l2, ref_pool32, idx, out_idx, compute_dtype=torch.float64)
        o, st = flashgdn.gated_delta_rule_decode_pretranspose(
            q, k, v, None, A_log, a, dt_bias, b, scale, output, l2, pool_t, idx, out_idx)
        assert o is output and st is pool_t
        written = (out_idx if out_idx is not None else idx)
        run = (idx >= 0)
        touched = torch.zeros(P, dtype=torch.bool, device=DEV)
        touched[written[run].long()] = True
        assert torch.equal(pool_t[~touched], before[~touched]), "untouched pool slots changed"
        assert_close_state(pool_t[touched], ref_pool32[touched])
        if pad_every:
            assert torch.all(o[~run] == 0), "padding rows must be zero"
        assert_close_output(o[run], o_ref[run])
    else:
        state = make_state(B, HV, V, K, sdt, DEV)
        ref_state = state.double().clone()
        o_ref, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, ref_state, A_log, a, dt_bias, b, scale, None, l2, compute_dtype=torch.float64)
        o, st = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale, output, l2)
        assert o is output and st is state
        assert_close_state(state, ref_state)
        assert_close_output(o, o_ref)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items()))
def test_pretranspose_matches_reference(case):
    _run_case(**case)


@pytest.mark.parametrize("B", [5, 64])
def test_pretranspose_padding_and_separate_write_slots(B):
    _run_case(B, 128, torch.float32, 2, torch.bfloat16, True, True, False, out_slots=True, pad_every=3)


def test_pretranspose_strided_inputs_noncontiguous_pool():
    _run_case(33, 128, torch.bfloat16, 2, torch.bfloat16, True, True, True, out_slots=False, pad_every=4)


def test_pretranspose_invalid_slot_gives_nan_and_keeps_state():
    B, H, HV, K = 4, 2, 4, 128
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, K, device=DEV)
    pool = make_state(6, HV, K, K, torch.float32, DEV)
    before = pool.clone()
    idx = torch.tensor([0, 99, 2, -1], dtype=torch.int32, device=DEV)
    o, _ = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, initial_state=pool,
                                                         initial_state_indices=idx)
    assert torch.isnan(o[1]).all() and torch.all(o[3] == 0) and not torch.isnan(o[[0, 2]]).any()
    assert torch.equal(pool[[1, 3, 4, 5]], before[[1, 3, 4, 5]])


def test_pretranspose_cuda_graph_replay_equals_eager():
    B, H, HV, K = 8, 2, 8, 128
    static = list(make_inputs(B, 1, H, HV, K, K, device=DEV))
    state = make_state(B, HV, K, K, torch.float32, DEV)
    out = torch.empty(B, 1, HV, K, dtype=torch.bfloat16, device=DEV)
    flashgdn.gated_delta_rule_decode_pretranspose(*static[:3], state.clone(), static[5], static[3], static[6], static[4])
    torch.cuda.synchronize()
    graph_state = state.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashgdn.gated_delta_rule_decode_pretranspose(static[0], static[1], static[2], graph_state, static[5],
                                                      static[3], static[6], static[4], output=out)
    for _ in range(2):
        fresh = make_inputs(B, 1, H, HV, K, K, device=DEV)
        for s, f in zip(static, fresh):
            s.copy_(f)
        eager_state = graph_state.clone()
        o_eager, _ = flashgdn.gated_delta_rule_decode_pretranspose(static[0], static[1], static[2], eager_state,
                                                                    static[5], static[3], static[6], static[4])
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, o_eager) and torch.equal(graph_state, eager_state)


def test_repeated_signature_reuses_the_compiled_function(monkeypatch):
    """A repeated call signature skips validation and the kernel lookup; its results stay right
    with new values (the remembered plan holds no data)."""
    from flashgdn import api

    def lookup_forbidden(spec):
        raise AssertionError(f"kernel lookup on a repeated signature: {spec.short_name()}")

    B, H, HV, K = 3, 2, 4, 128
    state = make_state(B, HV, K, K, torch.float32, DEV)
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, K, device=DEV)
    flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, state.clone(), A_log, a, dt_bias, b)
    monkeypatch.setattr(api.kernel_cache, "get", lookup_forbidden)
    for _ in range(2):
        q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, K, device=DEV)
        ref_state = state.double()
        o_ref, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, ref_state, A_log, a, dt_bias, b,
                                                            compute_dtype=torch.float64)
        o, _ = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b)
        assert_close_output(o, o_ref)
        assert_close_state(state, ref_state)


def test_pretranspose_duplicate_write_slot_rejected_with_index_checks(monkeypatch):
    """FLASHGDN_CHECK_INDICES=1: two rows writing one pool slot (a race otherwise) raise before the
    launch, nothing written; a padding row does not count as a write."""
    from flashgdn import api

    monkeypatch.setattr(api, "CHECK_INDICES", True)
    B, H, HV, K = 4, 2, 4, 128
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, K, device=DEV)
    pool = make_state(8, HV, K, K, torch.float32, DEV)
    before = pool.clone()
    output = torch.full((B, 1, HV, K), float("nan"), dtype=q.dtype, device=DEV)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    for idx, out_idx, name, slot in (
        (i32(0, 1, 2, 3), i32(5, 6, 7, 5), "output_state_indices", 5),
        (i32(2, 1, 2, -1), None, "initial_state_indices", 2),
    ):
        match = rf"^{name} must not repeat a written slot .*got slot {slot} in 2 rows"
        with pytest.raises(ValueError, match=match):
            flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, None, output, True,
                                                          pool, idx, out_idx)
        assert torch.equal(pool, before), "pool written by a call that failed the index check"
        assert torch.isnan(output).all(), "output written by a call that failed the index check"
    # Row 1 reads slot -1 (padding): its write slot 5 repeats row 0's, but it writes nothing.
    idx, out_idx = i32(0, -1, 2, 3), i32(5, 5, 6, 7)
    ref_pool = before.double()
    o_ref, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, None, None, True, ref_pool,
                                                        idx, out_idx, compute_dtype=torch.float64)
    o, _ = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, None, output, True,
                                                         pool, idx, out_idx)
    assert_close_output(o, o_ref)
    assert_close_state(pool, ref_pool)


def test_pretranspose_fp16_output_overflows_to_inf():
    """fp16 inputs: the fp32 output is converted without clamping, so beyond ±65504 it is ±inf;
    outputs inside the range stay right, and the fp32 state stays finite and right."""
    B, H, HV, K = 8, 2, 4, 128
    fp16_max, margin = 65504.0, 0.05
    scale = 64.0  # q = 64 * unit vector: a moderate state (|S| up to ~1e5) reaches the fp16 limit
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, K, torch.float16, DEV, seed=11)
    base = make_state(B, HV, K, K, torch.float32, DEV, seed=12)

    def reference(state64):  # fp64 inputs: the reference output stays fp64, unrounded and unclamped
        o, _ = ref.gated_delta_rule_decode_pretranspose(q.double(), k.double(), v.double(), state64, A_log, a,
                                                        dt_bias, b, scale, None, True, compute_dtype=torch.float64)
        return o

    # The output is the state's share (linear in the state) plus v's (small): scaling the state so
    # the median |o| sits at the fp16 limit makes many outputs overflow, and many not.
    state = base * float(fp16_max / reference(base.double()).abs().median())
    ref_state = state.double()
    o_ref = reference(ref_state)
    over = o_ref.abs() > fp16_max * (1 + margin)
    under = o_ref.abs() < fp16_max * (1 - margin)
    n = o_ref.numel()
    assert (o_ref.abs() > 7e4).sum() > n // 5 and (o_ref.abs() < 6e4).sum() > n // 5, "inputs do not straddle the limit"

    output = torch.full((B, 1, HV, K), float("nan"), dtype=torch.float16, device=DEV)
    o, st = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale, output, True)
    assert o is output and st is state
    assert not torch.isnan(o).any(), "NaN output (unwritten or wrong)"
    inf = torch.full_like(o[over], float("inf"))
    assert torch.equal(o[over], torch.where(o_ref[over] > 0, inf, -inf)), "outputs beyond the fp16 range must be ±inf"
    assert torch.isfinite(o[under]).all(), "outputs inside the fp16 range must be finite"
    assert_close_output(o[under], o_ref[under])
    assert torch.isfinite(state).all(), "state not finite"
    assert_close_state(state, ref_state)
