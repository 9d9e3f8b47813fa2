"""CPU tests of flashgdn.reference's FlashInfer 0.7.2 behaviour against the naive oracle of
tests/test_reference.py: pretranspose with T > 1 (dense state and pool, intermediate states,
disable_state_update), MTP's ssm_state_indices and disable_state_update default, what padding
rows leave in the output, and an output buffer of another dtype than the inputs.
"""
from __future__ import annotations

import pytest
import torch

from flashgdn import reference as ref
from helpers import make_state
from test_reference import close, inputs, naive_seq, stored

F32, BF16 = torch.float32, torch.bfloat16
NAN = float("nan")


def _state_tol(sdt):
    """A stored state against the fp64 oracle: fp32 noise, or one bf16 rounding step."""
    return dict(atol=1e-4, rtol=1e-4) if sdt == F32 else dict(atol=1e-5, rtol=2 ** -8)


# ----------------------------------------------------------------------------- pretranspose, T > 1


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("with_ibuf", [False, True], ids=["no-ibuf", "ibuf"])
def test_pretranspose_multi_token_dense(T, with_ibuf):
    """Dense state [B, HV, V, K], T tokens: outputs of every token, the state after T tokens, and
    the state after every token in a buffer larger than [B, T] (the rest untouched)."""
    B, H, HV, K, V = 3, 2, 4, 64, 128
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=200 + T)
    state = make_state(B, HV, V, K, F32, seed=201)
    before = state.clone()
    ibuf = torch.full((B + 1, T + 1, HV, V, K), 7.0) if with_ibuf else None
    out, st = ref.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b,
                                                       intermediate_states_buffer=ibuf)
    assert st is state and out.shape == (B, T, HV, V) and out.dtype == q.dtype
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(state[i], stored(s[-1], "klast"), msg=f"state row {i}")
        if with_ibuf:
            for t in range(T):
                close(ibuf[i, t], stored(s[t], "klast"), msg=f"row {i} state after token {t + 1}")
    if with_ibuf:
        assert torch.all(ibuf[B:] == 7.0) and torch.all(ibuf[:, T:] == 7.0)


@pytest.mark.parametrize("pool", [False, True], ids=["dense", "pool"])
def test_pretranspose_multi_token_disable_state_update(pool):
    """disable_state_update=True (T > 1): the state is only read; outputs and intermediate states
    are those of an update."""
    B, H, HV, K, V, T = 2, 2, 4, 64, 64, 3
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=210)
    st = make_state(4 if pool else B, HV, V, K, F32, seed=211)
    before = st.clone()
    idx = torch.tensor([3, 1], dtype=torch.int32) if pool else torch.arange(B)
    ibuf = torch.zeros(B, T, HV, V, K)
    kw = dict(initial_state=st, initial_state_indices=idx) if pool else {}
    out, ret = ref.gated_delta_rule_decode_pretranspose(q, k, v, None if pool else st, A_log, a, dt_bias, b,
                                                        intermediate_states_buffer=ibuf, disable_state_update=True,
                                                        **kw)
    assert ret is st
    assert torch.equal(st, before), "state changed with disable_state_update=True"
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        for t in range(T):
            close(ibuf[i, t], stored(s[t], "klast"), msg=f"row {i} state after token {t + 1}")


@pytest.mark.parametrize("given", [True, False], ids=["output-given", "output-none"])
def test_pretranspose_multi_token_pool(given):
    """Pool, T > 1, separate write slots, padding by a negative read index: a padding row leaves
    its output as it was (zero when allocated), its buffer rows and every slot; a negative write
    index (FlashInfer's MTP) computes the row's output and buffer rows and stores no final state;
    the result is MTP's for the same arguments (`state` is ignored when the pool is given)."""
    B, H, HV, K, V, T, P = 4, 2, 2, 64, 64, 3, 7
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=220)
    pool = make_state(P, HV, V, K, F32, seed=221)
    before = pool.clone()
    read = torch.tensor([5, -1, 0, 2], dtype=torch.int32)
    write = torch.tensor([1, 3, -1, 6], dtype=torch.int32)
    output = torch.full((B, T, HV, V), NAN) if given else None
    ibuf = torch.full((B, T, HV, V, K), 7.0)
    ignored = make_state(B, HV, V, K, F32, seed=222)
    ignored_before = ignored.clone()
    args = (q, k, v, ignored, A_log, a, dt_bias, b)
    out, ret = ref.gated_delta_rule_decode_pretranspose(
        *args, output=output, initial_state=pool, initial_state_indices=read, output_state_indices=write,
        intermediate_states_buffer=ibuf)
    assert ret is pool and torch.equal(ignored, ignored_before)
    for i in (0, 2, 3):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[read[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        if write[i] >= 0:
            close(pool[write[i]], stored(s[-1], "klast"), msg=f"write slot of row {i}")
        for t in range(T):
            close(ibuf[i, t], stored(s[t], "klast"), msg=f"row {i} state after token {t + 1}")
    for i in (1,):
        if given:
            assert torch.isnan(out[i]).all(), f"padding row {i}: the caller's output was overwritten"
        else:
            assert torch.equal(out[i], torch.zeros_like(out[i])), f"padding row {i}: not zero"
        assert torch.all(ibuf[i] == 7.0), f"padding row {i}: intermediate states written"
    for slot in (0, 2, 3, 4, 5):
        assert torch.equal(pool[slot], before[slot]), f"slot {slot} changed"

    pool2, ibuf2 = before.clone(), torch.full_like(ibuf, 7.0)
    output2 = torch.full((B, T, HV, V), NAN) if given else None
    out2, _ = ref.gated_delta_rule_mtp(q, k, v, pool2, read, A_log, a, dt_bias, b, output=output2,
                                       intermediate_states_buffer=ibuf2, output_state_indices=write,
                                       disable_state_update=False)
    assert torch.equal(out.nan_to_num(), out2.nan_to_num()) and torch.equal(out.isnan(), out2.isnan())
    assert torch.equal(pool, pool2) and torch.equal(ibuf, ibuf2)


# ----------------------------------------------------------------------------- padding rows, T == 1


@pytest.mark.parametrize("given", [True, False], ids=["output-given", "output-none"])
def test_pretranspose_t1_padding_writes_zeros(given):
    """T == 1: a padding row's output is zero, also in a caller's buffer (FlashInfer's decode rule)."""
    B, H, HV, K, V = 3, 2, 2, 64, 64
    q, k, v, a, b, A_log, dt_bias = inputs(B, 1, H, HV, K, V, seed=230)
    pool = make_state(4, HV, V, K, F32, seed=231)
    before = pool.clone()
    idx = torch.tensor([-1, 2, -3], dtype=torch.int32)
    output = torch.full((B, 1, HV, V), NAN) if given else None
    out, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, output=output,
                                                      initial_state=pool, initial_state_indices=idx)
    if given:
        assert out is output
    for i in (0, 2):
        assert torch.equal(out[i], torch.zeros_like(out[i])), f"padding row {i}: not zero"
    o, s = naive_seq(q[1], k[1], v[1], a[1], b[1], A_log, dt_bias, before[2], layout="klast")
    close(out[1], o, msg="output row 1")
    close(pool[2], stored(s[-1], "klast"), msg="slot 2")
    for slot in (0, 1, 3):
        assert torch.equal(pool[slot], before[slot]), f"slot {slot} changed"


# ----------------------------------------------------------------------------- MTP


@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_mtp_ssm_state_indices(sdt):
    """ssm_state_indices [B, T]: the state after token t goes to slot ssm_state_indices[i, t]
    (negative: not written); no final write-back to the read slots; a padding row writes nothing
    and leaves its output row as it was."""
    B, H, HV, K, V, T, P = 3, 2, 4, 64, 64, 3, 12
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=240)
    pool = make_state(P, HV, V, K, sdt, seed=241)
    before = pool.clone()
    idx = torch.tensor([0, 1, -1], dtype=torch.int32)
    slots = torch.tensor([[4, -1, 5], [6, 7, 8], [9, 10, 11]], dtype=torch.int32)
    output = torch.full((B, T, HV, V), NAN)
    out, ret = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, output=output,
                                        ssm_state_indices=slots, disable_state_update=False)
    assert out is output and ret is pool
    for i in (0, 1):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        for t in range(T):
            if slots[i, t] >= 0:
                close(pool[slots[i, t]], stored(s[t], "klast"), msg=f"row {i} token {t + 1} slot {int(slots[i, t])}",
                      **_state_tol(sdt))
    assert torch.isnan(out[2]).all(), "padding row: the caller's output was overwritten"
    written = {4, 5, 6, 7, 8}
    for slot in range(P):  # the read slots 0, 1 included: no final write-back
        if slot not in written:
            assert torch.equal(pool[slot], before[slot]), f"slot {slot} changed"


@pytest.mark.parametrize("disable", ["omitted", None, True])
def test_mtp_default_does_not_write_the_pool(disable):
    """disable_state_update omitted or None means True (FlashInfer 0.7.2): the pool is only read."""
    B, H, HV, K, V, T = 2, 2, 2, 64, 64, 2
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, seed=250)
    pool = make_state(3, HV, V, K, F32, seed=251)
    before = pool.clone()
    idx = torch.tensor([2, 0], dtype=torch.int32)
    ibuf = torch.zeros(B, T, HV, V, K)
    kw = {} if disable == "omitted" else dict(disable_state_update=disable)
    out, _ = ref.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, intermediate_states_buffer=ibuf, **kw)
    assert torch.equal(pool, before), "pool written"
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[idx[i]], layout="klast")
        close(out[i], o, msg=f"output row {i}")
        close(ibuf[i, -1], stored(s[-1], "klast"), msg=f"row {i} last state")


# ----------------------------------------------------------------------------- output dtype


@pytest.mark.parametrize("fn", ["pretranspose", "pretranspose-T3", "nontranspose", "mtp"])
def test_fp32_output_with_bf16_inputs(fn):
    """An fp32 `output` buffer with bf16 inputs gets the fp32 result, not a bf16 rounding of it."""
    B, H, HV, K, V = 2, 2, 4, 64, 128
    T = 3 if fn in ("pretranspose-T3", "mtp") else 1
    layout = "kmajor" if fn == "nontranspose" else "klast"
    q, k, v, a, b, A_log, dt_bias = inputs(B, T, H, HV, K, V, dtype=BF16, seed=260)
    state = make_state(B, HV, *((K, V) if layout == "kmajor" else (V, K)), F32, seed=261)
    before = state.clone()
    output = torch.full((B, T, HV, V), NAN)
    args = (q, k, v, state, A_log, a, dt_bias, b)
    if fn == "nontranspose":
        out, _ = ref.gated_delta_rule_decode(*args, output=output)
    elif fn == "mtp":
        out, _ = ref.gated_delta_rule_mtp(q, k, v, state, torch.arange(B), A_log, a, dt_bias, b, output=output,
                                          disable_state_update=False)
    else:
        out, _ = ref.gated_delta_rule_decode_pretranspose(*args, output=output)
    assert out is output and out.dtype == F32
    for i in range(B):
        o, s = naive_seq(q[i], k[i], v[i], a[i], b[i], A_log, dt_bias, before[i], layout=layout)
        close(out[i], o, atol=1e-5, rtol=1e-4, msg=f"output row {i}")  # fp32: far below a bf16 step (2^-9)
        close(state[i], stored(s[-1], layout), msg=f"state row {i}")
    assert not torch.equal(out, out.to(BF16).float()), "the fp32 output holds bf16 values only"
