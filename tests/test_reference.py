"""CPU tests of flashgdn.reference against an independent, deliberately naive implementation.

`naive_head` below is written from the math alone (one value head, one token at a time, float64,
explicit matrix-vector products, explicit softplus-with-threshold and sigmoid); it shares no code
with flashgdn.reference. Every reference feature the kernels are tested against (layouts, GVA,
pools, padding, separate write slots, intermediate states, accepted tokens, invalid slots, bf16
state rounding, softplus threshold) is checked here, so a GPU test failure points at the kernel.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashgdn import reference as ref
from helpers import make_inputs, make_state

F64 = torch.float64


# ----------------------------------------------------------------------------- independent oracle


def naive_softplus(x: float, beta: float = 1.0, threshold: float = 20.0) -> float:
    if beta * x > threshold:
        return x
    return math.log1p(math.exp(beta * x)) / beta


def naive_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def naive_l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * (1.0 / math.sqrt(float(torch.dot(x, x)) + 1e-6))


def naive_head(q, k, v, a, b, A_log, dt_bias, S, scale, use_l2norm=True, sp_beta=1.0, sp_threshold=20.0):
    """One value head over T tokens. q, k [T, K]; v [T, V]; a, b [T]; A_log, dt_bias floats;
    S [K, V] (any dtype, copied to float64). Returns (outputs [T, V], states: list of [K, V])."""
    S = S.to(F64).clone()
    outs, states = [], []
    for t in range(q.shape[0]):
        qt, kt, vt = q[t].to(F64), k[t].to(F64), v[t].to(F64)
        if use_l2norm:
            qt, kt = naive_l2norm(qt), naive_l2norm(kt)
        qt = qt * scale
        x = float(a[t]) + float(dt_bias)
        g = math.exp(-math.exp(float(A_log)) * naive_softplus(x, sp_beta, sp_threshold))
        beta = naive_sigmoid(float(b[t]))
        S = g * S
        u = (vt - torch.mv(S.t(), kt)) * beta
        S = S + torch.outer(kt, u)
        outs.append(torch.mv(S.t(), qt))
        states.append(S.clone())
    return torch.stack(outs), states


def naive_seq(q, k, v, a, b, A_log, dt_bias, S0, layout, scale=None, use_l2norm=True, sp_beta=1.0,
              sp_threshold=20.0):
    """One sequence, all value heads. q, k [T, H, K]; v [T, HV, V]; a, b [T, HV];
    S0 [HV, V, K] ("klast") or [HV, K, V] ("kmajor"). Returns (o [T, HV, V] f64, states [T, HV, K, V] f64)."""
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    scale = K ** -0.5 if scale is None else scale
    o = torch.empty(T, HV, V, dtype=F64)
    st = torch.empty(T, HV, K, V, dtype=F64)
    for hv in range(HV):
        h = hv // (HV // H)
        S = S0[hv].t() if layout == "klast" else S0[hv]
        oh, sts = naive_head(q[:, h], k[:, h], v[:, hv], a[:, hv], b[:, hv], A_log[hv], dt_bias[hv], S,
                             scale, use_l2norm, sp_beta, sp_threshold)
        o[:, hv] = oh
        for t, s in enumerate(sts):
            st[t, hv] = s
    return o, st


def stored(S_kv: torch.Tensor, layout: str) -> torch.Tensor:
    """[.., K, V] state in the storage layout."""
    return S_kv.transpose(-1, -2) if layout == "klast" else S_kv


def close(actual, expected, atol=1e-4, rtol=1e-4, msg=""):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def inputs(B, T, H, HV, K, V, dtype=torch.float32, seed=0, **kw):
    return make_inputs(B, T, H, HV, K, V, dtype=dtype, seed=seed, **kw)


# ----------------------------------------------------------------------------- dense layouts


@pytest.mark.parametrize("K,V", [(64, 128), (128, 64), (128, 128)], ids=lambda x: str(x))
def test_pretranspose_dense(K, V):
    B, H, HV = 3, 2, 4
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=1)
    state = make_state(B, HV, V, K, torch.float32, seed=2)
    before = state.clone()
    out, st = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b)
    assert st is state and out.shape == (B, 1, HV, V) and out.dtype == q.dtype
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(state[i], stored(s[-1], "klast"), msg=f"state row {i}")


@pytest.mark.parametrize("K,V", [(64, 128), (128, 64)], ids=lambda x: str(x))
def test_nontranspose_dense(K, V):
    B, H, HV = 3, 2, 4
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=3)
    state = make_state(B, HV, K, V, torch.float32, seed=4)
    before = state.clone()
    out, st = ref.gated_delta_rule_decode(q, k, v, state, A_log, a, dt_bias, b)
    assert st is state and out.shape == (B, 1, HV, V)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="kmajor")
        close(out[i], o, msg=f"output row {i}")
        close(state[i], s[-1], msg=f"state row {i}")


def test_layouts_agree():
    """The same problem with the state stored [V, K] and [K, V] gives the same result."""
    B, H, HV, K, V = 2, 2, 2, 64, 128
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=5)
    s_kv = make_state(B, HV, K, V, torch.float32, seed=6)
    s_vk = s_kv.transpose(-1, -2).contiguous()
    o1, _ = ref.gated_delta_rule_decode(q, k, v, s_kv, A_log, a, dt_bias, b)
    o2, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, s_vk, A_log, a, dt_bias, b)
    close(o1, o2, atol=1e-5, rtol=1e-5, msg="output")
    close(s_kv, s_vk.transpose(-1, -2), atol=1e-5, rtol=1e-5, msg="state")


def test_bf16_inputs():
    """bf16 q/k/v/a/b: the reference upcasts exactly and rounds the output once to bf16."""
    B, H, HV, K, V = 2, 2, 4, 128, 128
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, dtype=torch.bfloat16, seed=7)
    state = make_state(B, HV, V, K, torch.float32, seed=8)
    before = state.clone()
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b)
    assert out.dtype == torch.bfloat16
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="klast")
        # one bf16 rounding step (2^-8 relative) of the fp64 value
        close(out[i], o, atol=1e-3, rtol=2 ** -8, msg=f"output row {i}")
        close(state[i], stored(s[-1], "klast"), msg=f"state row {i}")


def test_output_argument_is_filled_and_returned():
    B, H, HV, K, V = 2, 2, 2, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=9)
    state = make_state(B, HV, V, K, torch.float32, seed=10)
    s2 = state.clone()
    output = torch.full((B, 1, HV, V), float("nan"))
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b, output=output)
    assert out is output
    o2, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, s2, A_log, a, dt_bias, b)
    assert torch.equal(out, o2)


# ----------------------------------------------------------------------------- GVA


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_gva_head_mapping(ratio):
    B, H, K, V = 2, 2, 64, 64
    HV = H * ratio
    q, k, v, a, b, A_log, dt_bias = inputs(B, 2, H, HV, K, V, seed=11 + ratio)
    P = 4
    pool = make_state(P, HV, V, K, torch.float32, seed=20 + ratio)
    before = pool.clone()
    idx = torch.tensor([2, 0], dtype=torch.int32)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, disable_state_update=False)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(pool[idx[i]], stored(s[-1], "klast"), msg=f"state row {i}")


# ----------------------------------------------------------------------------- MTP


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mtp_equals_single_steps(T, sdt):
    """T tokens at once == T calls of the reference's own one-token pretranspose function, and
    both match the naive oracle. (bf16 pool: single steps round the state after every token,
    MTP only at the end, so only the fp32 comparison is exact-ish.)"""
    B, H, HV, K, V = 3, 2, 4, 64, 128
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=30 + T)
    P = 5
    pool = make_state(P, HV, V, K, sdt, seed=40 + T)
    before = pool.clone()
    idx = torch.tensor([3, 0, 4], dtype=torch.int64)
    out_mtp, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, disable_state_update=False)

    steps = before.clone()
    outs = []
    for t in range(T):
        sl = slice(t, t + 1)
        o, _ = ref.gated_delta_rule_decode_pretranspose(
            q[:, sl], k[:, sl], v[:, sl], None, A_log, a[:, sl], dt_bias, b[:, sl],
            initial_state=steps, initial_state_indices=idx,
        )
        outs.append(o)
    out_steps = torch.cat(outs, 1)
    if sdt == torch.float32:
        close(out_mtp, out_steps, atol=1e-5, rtol=1e-5, msg="output mtp vs steps")
        close(pool, steps, atol=1e-5, rtol=1e-5, msg="pool mtp vs steps")
    untouched = torch.ones(P, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(steps[untouched], before[untouched])
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out_mtp[i], o, msg=f"mtp output row {i}")
        tol = dict(atol=1e-4, rtol=1e-4) if sdt == torch.float32 else dict(atol=1e-5, rtol=2 ** -8)
        close(pool[idx[i]], stored(s[-1], "klast"), msg=f"mtp state row {i}", **tol)


# ----------------------------------------------------------------------------- pools


@pytest.mark.parametrize("given", [True, False], ids=["output-given", "output-none"])
def test_padding_rows(given):
    """Negative index (MTP): no pool slot touched, the row's output left as it was (FlashInfer's
    MTP rule): a caller's buffer keeps its values, an allocated one its zeros."""
    B, H, HV, K, V = 4, 2, 4, 64, 64
    T = 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=50)
    P = 6
    pool = make_state(P, HV, V, K, torch.float32, seed=51)
    before = pool.clone()
    idx = torch.tensor([-1, 4, -1, 1], dtype=torch.int32)
    out = torch.full((B, T, HV, V), float("nan")) if given else None
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, output=out,
                                      disable_state_update=False)
    for i in (0, 2):
        if given:
            assert torch.isnan(out[i]).all(), f"padding row {i}: the caller's output was overwritten"
        else:
            assert torch.equal(out[i], torch.zeros_like(out[i])), f"padding row {i}: not zero"
    for i in (1, 3):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(pool[idx[i]], stored(s[-1], "klast"), msg=f"state row {i}")
    for slot in (0, 2, 3, 5):
        assert torch.equal(pool[slot], before[slot]), f"slot {slot} changed"


def test_padding_t1_pretranspose_pool():
    B, H, HV, K, V = 3, 2, 2, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=52)
    pool = make_state(4, HV, V, K, torch.bfloat16, seed=53)
    before = pool.clone()
    idx = torch.tensor([-1, -5, -1], dtype=torch.int64)
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, initial_state=pool,
                                                      initial_state_indices=idx)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(pool, before)


def test_negative_write_index_stores_no_state():
    """A negative output_state_indices entry with a valid read index (FlashInfer's rule): the row
    runs, its output is computed, and its state is stored nowhere."""
    B, H, HV, K, V = 2, 2, 2, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=54)
    pool = make_state(4, HV, V, K, torch.float32, seed=55)
    before = pool.clone()
    out, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, A_log, a, dt_bias, b, initial_state=pool,
        initial_state_indices=torch.tensor([1, 2], dtype=torch.int32),
        output_state_indices=torch.tensor([-1, 3], dtype=torch.int32),
    )
    assert torch.equal(pool[:3], before[:3])
    o, _ = naive_seq(q[0], k[0], v[0], a[0], b[0], A_log, dt_bias, before[1], layout="klast")
    close(out[0], o)
    o, s = naive_seq(q[1], k[1], v[1], a[1], b[1], A_log, dt_bias, before[2], layout="klast")
    close(out[1], o)
    close(pool[3], stored(s[-1], "klast"))


@pytest.mark.parametrize("fn", ["pretranspose", "mtp"])
def test_separate_output_state_indices(fn):
    """Read slot stays untouched, write slot gets the state computed from the read slot."""
    B, H, HV, K, V = 3, 2, 4, 64, 128
    T = 1 if fn == "pretranspose" else 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=60)
    P = 7
    pool = make_state(P, HV, V, K, torch.float32, seed=61)
    before = pool.clone()
    read = torch.tensor([0, 2, 4], dtype=torch.int32)
    write = torch.tensor([1, 3, 6], dtype=torch.int32)
    if fn == "pretranspose":
        out, _ = ref.gated_delta_rule_decode_pretranspose(
            q, k, v, None, A_log, a, dt_bias, b, initial_state=pool, initial_state_indices=read,
            output_state_indices=write)
    else:
        out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, read, A_log, a, dt_bias, b, output_state_indices=write,
                                          disable_state_update=False)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[read[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(pool[write[i]], stored(s[-1], "klast"), msg=f"write slot of row {i}")
    for slot in (0, 2, 4, 5):
        assert torch.equal(pool[slot], before[slot]), f"slot {slot} changed"


@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_intermediate_states_slot_by_slot(sdt):
    B, H, HV, K, V, T = 2, 2, 4, 64, 128, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=70)
    pool = make_state(3, HV, V, K, sdt, seed=71)
    before = pool.clone()
    idx = torch.tensor([2, 0], dtype=torch.int32)
    Tbuf = T + 2  # buffer longer than T: the extra slots stay untouched
    ibuf = torch.full((B, Tbuf, HV, V, K), 7.0, dtype=sdt)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, intermediate_states_buffer=ibuf,
                                      disable_state_update=False)
    assert torch.all(ibuf[:, T:] == 7.0)
    tol = dict(atol=1e-4, rtol=1e-4) if sdt == torch.float32 else dict(atol=1e-5, rtol=2 ** -8)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        for t in range(T):
            close(ibuf[i, t], stored(s[t], "klast"), msg=f"row {i} state after token {t + 1}", **tol)
        # the committed state is the last intermediate one
        assert torch.equal(pool[idx[i]], ibuf[i, T - 1])


def test_intermediate_padding_rows_untouched():
    B, H, HV, K, V, T = 2, 2, 2, 64, 64, 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=72)
    pool = make_state(2, HV, V, K, torch.float32, seed=73)
    ibuf = torch.full((B, T, HV, V, K), 7.0)
    ref.gated_delta_rule_mtp(q, k, v, pool, torch.tensor([-1, 1], dtype=torch.int32), A_log, a, dt_bias, b,
                             intermediate_states_buffer=ibuf, disable_state_update=False)
    assert torch.all(ibuf[0] == 7.0)
    assert not torch.all(ibuf[1] == 7.0)


@pytest.mark.parametrize("with_ibuf", [False, True])
def test_disable_state_update(with_ibuf):
    B, H, HV, K, V, T = 3, 2, 4, 64, 64, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=80)
    pool = make_state(4, HV, V, K, torch.float32, seed=81)
    before = pool.clone()
    idx = torch.tensor([1, 3, 0], dtype=torch.int32)
    ibuf = torch.zeros(B, T, HV, V, K) if with_ibuf else None
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, intermediate_states_buffer=ibuf,
                                      disable_state_update=True)
    assert torch.equal(pool, before), "pool changed with disable_state_update=True"
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        if with_ibuf:
            for t in range(T):
                close(ibuf[i, t], stored(s[t], "klast"), msg=f"row {i} token {t + 1}")


@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accepted_tokens(sdt):
    """The pool gets the state after accepted[b] tokens (0 .. T); outputs are for all T tokens."""
    B, H, HV, K, V, T = 5, 2, 2, 64, 64, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=90)
    P = 6
    pool = make_state(P, HV, V, K, sdt, seed=91)
    before = pool.clone()
    idx = torch.tensor([5, 0, 2, 3, 1], dtype=torch.int32)
    acc = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, accepted_tokens=acc,
                                      disable_state_update=False)
    tol = dict(atol=1e-4, rtol=1e-4) if sdt == torch.float32 else dict(atol=1e-5, rtol=2 ** -8)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        n = int(acc[i])
        if n == 0:
            assert torch.equal(pool[idx[i]], before[idx[i]]), f"row {i}: accepted 0 must keep the state"
        else:
            close(pool[idx[i]], stored(s[n - 1], "klast"), msg=f"row {i}: state after {n} tokens", **tol)
    assert torch.equal(pool[4], before[4])


def test_accepted_tokens_with_separate_write_slot():
    B, H, HV, K, V, T = 2, 2, 2, 64, 64, 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=92)
    pool = make_state(4, HV, V, K, torch.float32, seed=93)
    before = pool.clone()
    read = torch.tensor([0, 1], dtype=torch.int64)
    write = torch.tensor([2, 3], dtype=torch.int64)
    acc = torch.tensor([0, 1], dtype=torch.int32)
    ref.gated_delta_rule_mtp(q, k, v, pool, read, A_log, a, dt_bias, b, accepted_tokens=acc,
                             output_state_indices=write, disable_state_update=False)
    assert torch.equal(pool[:2], before[:2])
    assert torch.equal(pool[2], before[0])  # 0 accepted: the read state is copied to the write slot
    _, s = naive_seq(q[1], k[1], v[1], a[1], b[1], A_log, dt_bias, before[1], layout="klast")
    close(pool[3], stored(s[0], "klast"))


# ----------------------------------------------------------------------------- invalid rows


@pytest.mark.parametrize("which", ["read", "write"])
def test_out_of_range_slot_gives_nan_and_keeps_pool(which):
    B, H, HV, K, V, T = 3, 2, 2, 64, 64, 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=100)
    P = 4
    pool = make_state(P, HV, V, K, torch.float32, seed=101)
    before = pool.clone()
    read = torch.tensor([1, P, 2], dtype=torch.int32) if which == "read" else torch.tensor([1, 0, 2], dtype=torch.int32)
    write = None if which == "read" else torch.tensor([1, P + 3, 2], dtype=torch.int32)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, read, A_log, a, dt_bias, b, output_state_indices=write,
                                      disable_state_update=False)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[[0, 2]]).any()
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[3], before[3])
    for i in (0, 2):
        _, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[read[i]], layout="klast")
        close(pool[read[i]], stored(s[-1], "klast"))


def test_out_of_range_slot_t1_pretranspose():
    B, H, HV, K, V = 2, 2, 2, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=102)
    pool = make_state(3, HV, V, K, torch.bfloat16, seed=103)
    before = pool.clone()
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, initial_state=pool,
                                                      initial_state_indices=torch.tensor([3, 100]))
    assert torch.isnan(out).all()
    assert torch.equal(pool, before)


@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_accepted_gives_nan(bad):
    B, H, HV, K, V, T = 2, 2, 2, 64, 64, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=104)
    pool = make_state(2, HV, V, K, torch.float32, seed=105)
    before = pool.clone()
    acc = torch.tensor([bad, 2], dtype=torch.int32)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, torch.tensor([0, 1], dtype=torch.int32), A_log, a, dt_bias, b,
                                      accepted_tokens=acc, disable_state_update=False)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
    assert torch.equal(pool[0], before[0])
    _, s = naive_seq(q[1], k[1], v[1], a[1], b[1], A_log, dt_bias, before[1], layout="klast")
    close(pool[1], stored(s[1], "klast"))


# ----------------------------------------------------------------------------- bf16 state rounding


def test_bf16_state_rounded_once_at_the_end():
    """bf16 pool, T=3: the stored state is the fp32 recurrence rounded once (not after every
    token); intermediate states are rounded copies that do not feed back."""
    B, H, HV, K, V, T = 2, 2, 2, 64, 64, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=110)
    pool16 = make_state(2, HV, V, K, torch.bfloat16, seed=111)
    start = pool16.clone()
    idx = torch.tensor([1, 0], dtype=torch.int32)
    ibuf16 = torch.zeros(B, T, HV, V, K, dtype=torch.bfloat16)
    out16, _ = ref.gated_delta_rule_mtp(q, k, v, pool16, idx, A_log, a, dt_bias, b,
                                        intermediate_states_buffer=ibuf16, disable_state_update=False)

    pool32 = start.float()
    ibuf32 = torch.zeros(B, T, HV, V, K)
    out32, _ = ref.gated_delta_rule_mtp(q, k, v, pool32, idx, A_log, a, dt_bias, b,
                                        intermediate_states_buffer=ibuf32, disable_state_update=False)
    assert torch.equal(out16, out32)
    assert torch.equal(pool16, pool32.to(torch.bfloat16)), "bf16 pool is not the fp32 result rounded once"
    assert torch.equal(ibuf16, ibuf32.to(torch.bfloat16))

    # Rounding after every token gives a different state: the check above is discriminating.
    per_step = start.clone()
    for t in range(T):
        sl = slice(t, t + 1)
        ref.gated_delta_rule_decode_pretranspose(q[:, sl], k[:, sl], v[:, sl], None, A_log, a[:, sl], dt_bias,
                                                 b[:, sl], initial_state=per_step, initial_state_indices=idx)
    assert not torch.equal(per_step, pool16)

    for i in range(B):
        _, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, start[idx[i]], layout="klast")
        close(pool16[idx[i]], stored(s[-1], "klast"), atol=1e-5, rtol=2 ** -8)


def test_bf16_state_nontranspose_t1():
    B, H, HV, K, V = 2, 2, 2, 64, 128
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=112)
    s16 = make_state(B, HV, K, V, torch.bfloat16, seed=113)
    s32 = s16.float()
    ref.gated_delta_rule_decode(q, k, v, s16, A_log, a, dt_bias, b)
    ref.gated_delta_rule_decode(q, k, v, s32, A_log, a, dt_bias, b)
    assert torch.equal(s16, s32.to(torch.bfloat16))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("fn", ["pretranspose", "nontranspose", "mtp"])
def test_no_l2norm_custom_scale(fn):
    B, H, HV, K, V = 2, 2, 4, 64, 64
    T = 2 if fn == "mtp" else 1
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=120)
    q, k = q * 0.1, k * 0.1  # keep |k|^2 moderate without normalisation
    scale = 0.37
    layout = "kmajor" if fn == "nontranspose" else "klast"
    state = make_state(B, HV, V, K, torch.float32, seed=121)
    before = state.clone()
    if fn == "pretranspose":
        out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale=scale,
                                                          use_qk_l2norm=False)
    elif fn == "nontranspose":
        out, _ = ref.gated_delta_rule_decode(q, k, v, state, A_log, a, dt_bias, b, scale=scale, use_qk_l2norm=False)
    else:
        out, _ = ref.gated_delta_rule_mtp(q, k, v, state, torch.arange(B, dtype=torch.int32), A_log, a, dt_bias, b,
                                          scale=scale, use_qk_l2norm=False, disable_state_update=False)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout, scale=scale,
                         use_l2norm=False)
        close(out[i], o, msg=f"output row {i}")
        close(state[i], stored(s[-1], layout), msg=f"state row {i}")
    # and it differs from the default (l2norm, K^-0.5) result: the options are honoured
    o_def, _ = ref.gated_delta_rule_decode_pretranspose(q[:, :1], k[:, :1], v[:, :1], before.clone() if layout == "klast"
                                                        else before.transpose(-1, -2).contiguous(), A_log,
                                                        a[:, :1], dt_bias, b[:, :1])
    assert not torch.allclose(o_def, out[:, :1], atol=1e-3)


def test_softplus_threshold_branch_default():
    """a + dt_bias > 20 on some heads (linear branch of softplus), no inf/NaN anywhere."""
    B, H, HV, K, V, T = 2, 2, 4, 64, 64, 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=130)
    A_log = torch.tensor([-6.0, -5.0, -4.0, 0.5])  # small exp(A_log): g stays representable
    dt_bias = torch.tensor([25.0, 0.3, 80.0, 150.0])  # heads 0, 2, 3 take the linear branch
    state = make_state(B, HV, V, K, torch.float32, seed=131)
    before = state.clone()
    out, _ = ref.gated_delta_rule_mtp(q, k, v, state, torch.arange(B, dtype=torch.int32), A_log, a, dt_bias, b,
                                      disable_state_update=False)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(state[i], stored(s[-1], "klast"), msg=f"state row {i}")


@pytest.mark.parametrize("sp_beta,sp_threshold", [(1.0, 0.5), (2.0, 3.0), (0.5, 20.0)])
def test_softplus_beta_threshold_custom(sp_beta, sp_threshold):
    """Custom softplus beta/threshold: here the linear branch differs visibly from log1p(exp)."""
    B, H, HV, K, V = 2, 2, 4, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=140)
    A_log = torch.full((HV,), -1.0)
    dt_bias = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    state = make_state(B, HV, V, K, torch.float32, seed=141)
    before = state.clone()
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b,
                                                      softplus_beta=sp_beta, softplus_threshold=sp_threshold)
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="klast",
                         sp_beta=sp_beta, sp_threshold=sp_threshold)
        close(out[i], o, msg=f"output row {i}")
        close(state[i], stored(s[-1], "klast"), msg=f"state row {i}")


def test_naive_softplus_threshold_is_discriminating():
    assert naive_softplus(1.0, 1.0, 0.5) == 1.0
    assert abs(naive_softplus(1.0, 1.0, 20.0) - math.log1p(math.e)) < 1e-15
    assert naive_softplus(1000.0) == 1000.0  # no overflow in exp


@pytest.mark.parametrize("fn", ["pretranspose", "nontranspose", "mtp"])
def test_compute_dtype_float64_agrees(fn):
    B, H, HV, K, V = 3, 2, 4, 128, 128
    T = 3 if fn == "mtp" else 1
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=150)
    s32 = make_state(4, HV, V, K, torch.float32, seed=151)
    s64 = s32.clone()
    idx = torch.tensor([3, 1, 0], dtype=torch.int32)
    outs = []
    for st, cd in ((s32, torch.float32), (s64, torch.float64)):
        if fn == "pretranspose":
            o, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, initial_state=st,
                                                            initial_state_indices=idx, compute_dtype=cd)
        elif fn == "nontranspose":
            o, _ = ref.gated_delta_rule_decode(q, k, v, st[:B], A_log, a, dt_bias, b, compute_dtype=cd)
        else:
            o, _ = ref.gated_delta_rule_mtp(q, k, v, st, idx, A_log, a, dt_bias, b, compute_dtype=cd,
                                            disable_state_update=False)
        outs.append(o)
    assert outs[0].dtype == outs[1].dtype == torch.float32 and s64.dtype == torch.float32
    close(outs[0], outs[1], msg="output fp32 vs fp64 compute")
    close(s32, s64, msg="state fp32 vs fp64 compute")
    assert not torch.equal(s32, s64)  # fp64 really computed differently


def test_write_index_unused_without_a_state_update():
    """disable_state_update=True stores no state, so the write index is not used (FlashInfer's MTP):
    one past the pool or negative gives the same outputs as the read index alone; nothing written."""
    B, H, HV, K, V, T, P = 3, 2, 2, 64, 64, 2, 4
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=104)
    pool = make_state(P, HV, V, K, torch.float32, seed=105)
    before = pool.clone()
    read = torch.tensor([1, 0, 2], dtype=torch.int32)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, read, A_log, a, dt_bias, b, disable_state_update=True,
                                      output_state_indices=torch.tensor([P + 5, -1, 3], dtype=torch.int32))
    plain, _ = ref.gated_delta_rule_mtp(q, k, v, pool, read, A_log, a, dt_bias, b, disable_state_update=True)
    assert torch.equal(out, plain) and not torch.isnan(out).any() and torch.equal(pool, before)
