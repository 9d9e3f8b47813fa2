"""FlashInfer 0.7.2 call patterns of serving engines, on the GPU, against the fp64 reference:

1. pretranspose with T > 1 (the MTP kernels): dense state or pool, intermediate states,
   disable_state_update, padding rows (output left as it is; T == 1: zero);
2. per-token state slots (gated_delta_rule_mtp's ssm_state_indices [B, T]);
3. state pools and dense states with padded strides (bit-identical to a packed copy);
4. an intermediate_states_buffer with more rows and steps than the call uses;
5. an output dtype other than the inputs' (fp32, fp16, bf16);
and CUDA graph replay of patterns 1 and 2.

Every output is poisoned before the call; every pool slot and buffer entry a call must not write
is compared bit for bit with its value before. Small batches run the "small" regime, B = 72 with
HV = 8 the "large" one (a bf16 state with T >= 5 and no per-token writes: the tensor-core kernel).
"""
import pytest
import torch

import flashgdn
from flashgdn import api as fg_api
from flashgdn import reference as ref
from flashgdn.kernels import policy
from helpers import (assert_close_output, assert_close_state, graph_replay_equals_eager, make_inputs, make_state,
                     same_bits, use_h200_table, use_table)

pytestmark = pytest.mark.gpu
DEV = "cuda"
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
NAN = float("nan")
SENTINEL = -7.5  # exact in bf16, fp16 and fp32; far from any output
DT_NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16"}
SMALL = dict(B=4, H=2, HV=4)  # "small" regime (B * HV well below 2 per SM)
LARGE = dict(B=72, H=4, HV=8)  # "large" regime


# ----------------------------------------------------------------------------- shared helpers


def _id(case):
    parts = []
    for k, v in case.items():
        if isinstance(v, bool):
            parts.append(k if v else f"no{k}")
        elif isinstance(v, torch.dtype):
            parts.append(f"{k}{DT_NAMES[v]}")
        else:
            parts.append(f"{k}{v}")
    return "-".join(parts)


def _params(cases):
    """pytest params of the case dicts, each with its own seed (reproducible inputs)."""
    return [pytest.param({**c, "seed": 1000 * (n + 1)}, id=_id(c)) for n, c in enumerate(cases)]


def _perm(n, seed):
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randperm(n, generator=gen).to(torch.int32).to(DEV)


def _read_slots(P, B, seed, pad=True):
    """B distinct slots of a pool of P; with `pad`, rows 1, 4, 7, ... and the last row are
    padding (negative index)."""
    idx = _perm(P, seed + 2)[:B].clone()
    if pad:
        idx[1::3] = -1
        idx[-1] = -2
    return idx


def _pool_and_slots(B, HV, K, sdt, seed, pad=True, extra=5):
    """A pool of B + extra random slots and B read slots (_read_slots)."""
    return make_state(B + extra, HV, K, K, sdt, DEV, seed=seed + 1), _read_slots(B + extra, B, seed, pad)


def _poison(shape, dtype, value=NAN):
    return torch.full(shape, value, dtype=dtype, device=DEV)


def _call(mod, api, inputs, state, idx, out, ibuf=None, update=True, tok=None, **kw):
    """One public function (of flashgdn or of the reference `mod`): "pre" pretranspose (dense
    state when idx is None, else pool), "dec" K-major decode, "mtp" gated_delta_rule_mtp."""
    q, k, v, a, b, A_log, dt_bias = inputs
    if api == "dec":
        return mod.gated_delta_rule_decode(q, k, v, state, A_log, a, dt_bias, b, output=out, **kw)
    if api == "pre":
        pool_kw = {} if idx is None else dict(initial_state=state, initial_state_indices=idx)
        return mod.gated_delta_rule_decode_pretranspose(
            q, k, v, state if idx is None else None, A_log, a, dt_bias, b, output=out,
            intermediate_states_buffer=ibuf, disable_state_update=not update, **pool_kw, **kw)
    return mod.gated_delta_rule_mtp(q, k, v, state, idx, A_log, a, dt_bias, b, output=out,
                                    intermediate_states_buffer=ibuf, ssm_state_indices=tok,
                                    disable_state_update=not update, **kw)


def _run_both(api, inputs, state, idx, out, ibuf=None, update=True, tok=None):
    """The fp64 reference on copies of `state` and `ibuf`, then the flashgdn call in place.
    Returns (output, reference output, reference state, reference intermediates)."""
    q, v = inputs[0], inputs[2]
    ref_state = state.double()
    ref_ibuf = None if ibuf is None else torch.zeros(ibuf.shape, dtype=F64, device=DEV)
    ref_out = torch.zeros(*q.shape[:2], *v.shape[2:], dtype=F64, device=DEV)
    o_ref, _ = _call(ref, api, inputs, ref_state, idx, ref_out, ref_ibuf, update, tok, compute_dtype=F64)
    o, st = _call(flashgdn, api, inputs, state, idx, out, ibuf, update, tok)
    assert st is state and (out is None or o is out)
    return o, o_ref, ref_state, ref_ibuf


def _check_out(o, o_ref, run, pad, before, zero_pad):
    """Running rows match the reference; padding rows are zero (T == 1) or left as they were."""
    assert_close_output(o[run], o_ref[run])
    if zero_pad:
        assert (o[pad] == 0).all(), "a padding row's output must be zero (T == 1)"
    else:
        assert same_bits(o[pad], before[pad]), "a padding row's output must be left as it is (T > 1)"


def _check_pool(pool, before, ref_pool, written):
    """Written slots match the reference; every other slot is bit for bit as before."""
    assert_close_state(pool[written], ref_pool[written])
    assert same_bits(pool[~written], before[~written]), "pool slots that must stay untouched changed"


def _written(P, slots):
    mask = torch.zeros(P, dtype=torch.bool, device=DEV)
    slots = slots[slots >= 0].long()
    mask[slots] = True
    assert int(mask.sum()) == slots.numel(), "test bug: a slot written twice"
    return mask


# ----------------------------------------------------------------------------- 1. pretranspose, T > 1


def _case_pretranspose_mtp(B, H, HV, T, sdt, pool, inter, update, pad=False, out_none=False, K=128, seed=0):
    inputs = make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed)
    if pool:
        state, idx = _pool_and_slots(B, HV, K, sdt, seed, pad)
    else:
        state, idx = make_state(B, HV, K, K, sdt, DEV, seed=seed + 1), None
    before = state.clone()
    run = torch.ones(B, dtype=torch.bool, device=DEV) if idx is None else idx >= 0
    ibuf = _poison((B, T, HV, K, K), sdt) if inter else None
    out = None if out_none else _poison((B, T, HV, K), BF16)
    out_before = torch.zeros(B, T, HV, K, dtype=BF16, device=DEV) if out_none else out.clone()
    o, o_ref, ref_state, ref_ibuf = _run_both("pre", inputs, state, idx, out, ibuf, update)
    _check_out(o, o_ref, run, ~run, out_before, zero_pad=False)
    written = torch.zeros(state.shape[0], dtype=torch.bool, device=DEV)
    if update:
        written = run.clone() if idx is None else _written(state.shape[0], idx[run])
    _check_pool(state, before, ref_state, written)
    if inter:
        for t in range(T):
            assert_close_state(ibuf[run, t], ref_ibuf[run, t], f"intermediate state after token {t + 1}")
        assert same_bits(ibuf[~run], _poison(ibuf[~run].shape, sdt)), "a padding row's intermediates were written"


PRETRANSPOSE_MTP = _params([
    dict(**SMALL, T=2, sdt=F32, pool=True, inter=True, update=True, pad=True),
    dict(**SMALL, T=2, sdt=BF16, pool=False, inter=False, update=True),
    dict(**SMALL, T=4, sdt=F32, pool=False, inter=True, update=False),
    dict(**SMALL, T=4, sdt=BF16, pool=True, inter=False, update=False, pad=True),
    dict(**SMALL, T=8, sdt=F32, pool=True, inter=False, update=True, pad=True, out_none=True),
    dict(**SMALL, T=8, sdt=BF16, pool=True, inter=True, update=True, pad=True),
    dict(**LARGE, T=2, sdt=F32, pool=True, inter=False, update=True, pad=True),
    dict(**LARGE, T=2, sdt=BF16, pool=True, inter=True, update=False, pad=True),
    dict(**LARGE, T=4, sdt=F32, pool=False, inter=True, update=True),
    dict(**LARGE, T=4, sdt=BF16, pool=False, inter=False, update=True),
    dict(**LARGE, T=8, sdt=F32, pool=False, inter=False, update=True),
    dict(**LARGE, T=8, sdt=F32, pool=True, inter=True, update=False, pad=True),
    dict(**LARGE, T=8, sdt=BF16, pool=True, inter=False, update=True, pad=True),  # tensor cores
    dict(**LARGE, T=8, sdt=BF16, pool=True, inter=False, update=False, pad=True, out_none=True),  # tensor cores
    dict(**LARGE, T=8, sdt=BF16, pool=False, inter=False, update=True),  # tensor cores, dense
    dict(B=5, H=2, HV=4, T=4, sdt=F32, pool=True, inter=True, update=True, pad=True, K=64),
    dict(B=76, H=4, HV=8, T=8, sdt=BF16, pool=True, inter=False, update=True, pad=True, K=64),  # tensor cores
])


@pytest.mark.parametrize("case", PRETRANSPOSE_MTP)
def test_pretranspose_multi_token(case):
    """gated_delta_rule_decode_pretranspose with T > 1: pool or dense state, intermediate states,
    disable_state_update (the pool stays bit for bit), padding rows (output left as it is, or
    zero when output is None)."""
    _case_pretranspose_mtp(**case)


@pytest.mark.parametrize("sdt,shape", [(F32, SMALL), (BF16, LARGE)], ids=("fp32-small", "bf16-large"))
def test_pretranspose_single_token_padding_rows_are_zero(sdt, shape):
    """T == 1: a padding row's output is zero (poisoned output, and output=None), nothing written."""
    B, H, HV, K = shape["B"], shape["H"], shape["HV"], 128
    inputs = make_inputs(B, 1, H, HV, K, K, device=DEV, seed=7)
    pool, idx = _pool_and_slots(B, HV, K, sdt, 7)
    run = idx >= 0
    for out in (_poison((B, 1, HV, K), BF16), None):
        state = pool.clone()
        o, o_ref, ref_state, _ = _run_both("pre", inputs, state, idx, out)
        _check_out(o, o_ref, run, ~run, None, zero_pad=True)
        _check_pool(state, pool, ref_state, _written(pool.shape[0], idx[run]))


# ----------------------------------------------------------------------------- 2. per-token state slots


def _token_slots(B, T, seed, extra=3):
    """Distinct read slots [B] and per-token write slots [B, T] (some negative: skipped) from a
    pool of B * (T + 1) + extra slots; row 1 is padding (its token slots are valid, never written)."""
    P = B * (T + 1) + extra
    perm = _perm(P, seed)
    idx = perm[:B].clone()
    tok = perm[B : B * (T + 1)].view(B, T).clone()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed + 3)
    tok[(torch.rand(B, T, generator=gen) < 0.25).to(DEV)] = -1
    tok[0, T - 1] = -1  # row 0's final state goes nowhere
    tok[2, 0] = -3
    idx[1] = -1
    return P, idx, tok


def _case_token_slots(B, H, HV, T, sdt, K=128, bad_row=False, seed=0):
    inputs = make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed)
    P, idx, tok = _token_slots(B, T, seed)
    bad = torch.zeros(B, dtype=torch.bool, device=DEV)
    if bad_row:  # one slot past the pool: the whole row is refused (NaN output, nothing written)
        tok[B - 1, T // 2] = P + 5
        bad[B - 1] = True
    pool = make_state(P, HV, K, K, sdt, DEV, seed=seed + 1)
    before = pool.clone()
    out = _poison((B, T, HV, K), BF16, SENTINEL)
    out_before = out.clone()
    o, o_ref, ref_pool, _ = _run_both("mtp", inputs, pool, idx, out, tok=tok)
    pad = idx < 0
    run = ~pad & ~bad
    _check_out(o, o_ref, run, pad, out_before, zero_pad=False)
    assert torch.isnan(o[bad]).all(), "a row with a slot past the pool must get a NaN output"
    # Written: the non-negative token slots of running rows; read slots, skipped and unused slots,
    # and every slot of padding and refused rows stay bit for bit.
    _check_pool(pool, before, ref_pool, _written(P, tok[run].flatten()))


TOKEN_SLOTS = _params([
    dict(**SMALL, T=2, sdt=F32), dict(**SMALL, T=4, sdt=BF16), dict(**SMALL, T=8, sdt=F32),
    dict(**SMALL, T=8, sdt=BF16), dict(**LARGE, T=2, sdt=BF16), dict(**LARGE, T=4, sdt=F32),
    dict(**LARGE, T=8, sdt=BF16), dict(**LARGE, T=8, sdt=F32), dict(B=5, H=2, HV=4, T=4, sdt=BF16, K=64),
])


@pytest.mark.parametrize("case", TOKEN_SLOTS)
def test_mtp_per_token_state_slots(case):
    """ssm_state_indices [B, T]: the state after token t of row i lands in its slot; negative
    entries are skipped; no final write-back; read slots and unused slots stay bit for bit."""
    _case_token_slots(**case)


@pytest.mark.parametrize("case", _params([
    dict(**LARGE, T=2, sdt=F32), dict(**LARGE, T=4, sdt=BF16), dict(**LARGE, T=8, sdt=F32, bad_row=True),
    dict(**LARGE, T=8, sdt=BF16, K=64), dict(B=40, H=2, HV=8, T=16, sdt=BF16),
]))
def test_mtp_per_token_state_slots_tensor_core(case, monkeypatch):
    """The same contract on the tensor-core kernel (each token's state one matrix product), which a
    table takes from mma_min_tokens_writes on (here the H200 table from T = 2, both state dtypes)."""
    monkeypatch.setattr(fg_api, "CHECK_INDICES", False)
    specs = use_h200_table(monkeypatch, mma_min_tokens_writes=2, mma_min_tokens_fp32=2)
    _case_token_slots(**case)
    assert specs and all(policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA for s in specs)


@pytest.mark.parametrize("case", _params([dict(**LARGE, T=2, sdt=F32), dict(**LARGE, T=2, sdt=BF16)]))
def test_mtp_per_token_state_slots_l2_prefetch(case, monkeypatch):
    """The same contract with the L2 prefetch of later CTAs' state tiles that the H100 table runs for
    token slots of up to short_mtp_tokens tokens (its "mtp_slots" distance)."""
    specs = use_table(monkeypatch, "sm90-hbm3")
    _case_token_slots(**case)
    assert specs and all(policy.BuildConfig.for_spec(s).prefetch_bytes > 0 for s in specs)


@pytest.mark.parametrize("case", _params([dict(**SMALL, T=4, sdt=F32), dict(**LARGE, T=8, sdt=BF16)]))
def test_mtp_per_token_slot_out_of_range(case, monkeypatch):
    """A token slot >= the pool size: that row's output is NaN and it writes nothing; the other
    rows are exact (FLASHGDN_CHECK_INDICES off: the kernel itself refuses the row)."""
    monkeypatch.setattr(fg_api, "CHECK_INDICES", False)
    _case_token_slots(**case, bad_row=True)


# ----------------------------------------------------------------------------- 3. padded state strides


def _padded_state(n, HV, R, C, dtype, style, seed):
    """(big allocation, function taking it to the [n, HV, R, C] view): "rows" pads every row and
    every head ([n, HV, R + 8, C + 16]), "heads" every head ([n, HV, R * C + 16])."""
    if style == "rows":
        big = make_state(n, HV, R + 8, C + 16, dtype, DEV, seed=seed)
        return big, lambda t: t[:, :, :R, :C]
    big = make_state(n, HV, 1, R * C + 16, dtype, DEV, seed=seed)[:, :, 0]
    return big, lambda t: t[..., : R * C].unflatten(-1, (R, C))


def _case_padded(api, sdt, style, B, H, HV, K=128, inter=False, seed=0):
    T = 4 if api == "mtp" else 1
    inputs = make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed)
    if api == "dec":
        n, idx, run = B, None, torch.ones(B, dtype=torch.bool, device=DEV)
    else:
        n = B + 5
        idx = _read_slots(n, B, seed)
        run = idx >= 0
    big, view_of = _padded_state(n, HV, K, K, sdt, style, seed + 1)
    big_before = big.clone()
    view = view_of(big)
    assert not view.is_contiguous() and view.data_ptr() == big.data_ptr()
    packed = view.contiguous()
    before = packed.clone()
    out_p, ibuf_p = _poison((B, T, HV, K), BF16), (_poison((B, T, HV, K, K), sdt) if inter else None)
    out_v, ibuf_v = out_p.clone(), (None if ibuf_p is None else ibuf_p.clone())
    # The packed call against the reference, then the padded view against the packed call.
    o, o_ref, ref_state, _ = _run_both(api, inputs, packed, idx, out_p, ibuf_p)
    _check_out(o, o_ref, run, ~run, _poison(o.shape, BF16), zero_pad=(api != "mtp"))
    _check_pool(packed, before, ref_state, run.clone() if idx is None else _written(n, idx[run]))
    o_v, st = _call(flashgdn, api, inputs, view, idx, out_v, ibuf_v)
    assert o_v is out_v and st is view
    assert same_bits(out_v, out_p), "output differs from the call on a packed copy"
    assert same_bits(view.contiguous(), packed), "state differs from the call on a packed copy"
    if inter:
        assert same_bits(ibuf_v, ibuf_p), "intermediate states differ from the call on a packed copy"
    outside = torch.ones(big.shape, dtype=torch.bool, device=DEV)
    view_of(outside).fill_(False)
    assert same_bits(big[outside], big_before[outside]), "the padding of the state allocation was written"


PADDED = _params([
    dict(api="pre", sdt=F32, style="rows", **SMALL),
    dict(api="pre", sdt=BF16, style="heads", **LARGE),
    dict(api="pre", sdt=BF16, style="rows", B=5, H=2, HV=4, K=64),
    dict(api="mtp", sdt=F32, style="heads", **SMALL),
    dict(api="mtp", sdt=BF16, style="rows", **LARGE),
    dict(api="mtp", sdt=BF16, style="rows", **SMALL, inter=True),
    dict(api="mtp", sdt=F32, style="heads", **LARGE, inter=True),
    dict(api="dec", sdt=F32, style="rows", **SMALL),
    dict(api="dec", sdt=BF16, style="heads", **LARGE),
])


@pytest.mark.parametrize("case", PADDED)
def test_padded_state_strides(case):
    """A pool (K-last, T = 1 and MTP T = 4 with and without intermediates) or a dense K-major
    state that is a view of a larger allocation: the same results, bit for bit, as on a packed
    copy, and the allocation's padding untouched."""
    _case_padded(**case)


# ----------------------------------------------------------------------------- 4. oversized intermediate buffer


def _case_big_buffer(api, B, H, HV, T, sdt, update=True, K=128, seed=0):
    inputs = make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed)
    pool, idx = _pool_and_slots(B, HV, K, sdt, seed)
    before = pool.clone()
    run = idx >= 0
    ibuf = _poison((B + 5, T + 2, HV, K, K), sdt)
    out = _poison((B, T, HV, K), BF16)
    o, o_ref, ref_pool, ref_ibuf = _run_both(api, inputs, pool, idx, out, ibuf, update)
    _check_out(o, o_ref, run, ~run, _poison(o.shape, BF16), zero_pad=False)
    _check_pool(pool, before, ref_pool, _written(pool.shape[0], idx[run] if update else idx[:0]))
    written = torch.zeros(B + 5, T + 2, dtype=torch.bool, device=DEV)
    written[:B, :T] = run[:, None]
    assert_close_state(ibuf[written], ref_ibuf[written], "intermediate states")
    rest = ibuf[~written]
    assert same_bits(rest, _poison(rest.shape, sdt)), "buffer entries beyond [B, T] or of padding rows written"


BIG_BUFFER = _params([
    dict(api="mtp", **SMALL, T=4, sdt=F32),
    dict(api="mtp", **LARGE, T=2, sdt=BF16),
    dict(api="mtp", B=5, H=2, HV=4, T=8, sdt=BF16, K=64),
    dict(api="pre", B=3, H=2, HV=4, T=8, sdt=BF16),
    dict(api="pre", **LARGE, T=4, sdt=F32, update=False),
])


@pytest.mark.parametrize("case", BIG_BUFFER)
def test_intermediate_buffer_larger_than_batch(case):
    """intermediate_states_buffer [B + 5, T + 2, HV, V, K]: row i, step t of the batch lands in
    buffer[i, t]; the rows and steps beyond, and padding rows, stay bit for bit."""
    _case_big_buffer(**case)


# ----------------------------------------------------------------------------- 5. output dtype


def _case_out_dtype(api, io, odt, sdt, B, H, HV, T=1, K=128, seed=0):
    inputs = make_inputs(B, T, H, HV, K, K, io, DEV, seed=seed)
    if api == "dec":
        state, idx = make_state(B, HV, K, K, sdt, DEV, seed=seed + 1), None
        run = torch.ones(B, dtype=torch.bool, device=DEV)
    else:
        state, idx = _pool_and_slots(B, HV, K, sdt, seed)
        run = idx >= 0
    before = state.clone()
    out = _poison((B, T, HV, K), odt)
    out_before = out.clone()
    o, o_ref, ref_state, _ = _run_both(api, inputs, state, idx, out)
    assert o.dtype == odt
    _check_out(o, o_ref, run, ~run, out_before, zero_pad=(api != "mtp"))
    _check_pool(state, before, ref_state, run.clone() if idx is None else _written(state.shape[0], idx[run]))
    if io == BF16 and odt != BF16:  # the store converts the fp32 result, not a value rounded to bf16
        o_run = o[run]
        in_bf16 = (o_run == o_run.to(BF16).to(odt)).float().mean()
        assert in_bf16 < 0.5, f"{float(in_bf16):.0%} of the {DT_NAMES[odt]} outputs are bf16 values"


OUT_DTYPES = _params([
    dict(api="pre", io=BF16, odt=F32, sdt=F32, **SMALL),
    dict(api="pre", io=BF16, odt=F16, sdt=BF16, **LARGE),
    dict(api="pre", io=F16, odt=BF16, sdt=F32, **SMALL),
    dict(api="dec", io=BF16, odt=F32, sdt=BF16, **LARGE),
    dict(api="dec", io=BF16, odt=F16, sdt=F32, **SMALL),
    dict(api="dec", io=F16, odt=BF16, sdt=BF16, **SMALL),
    dict(api="mtp", io=BF16, odt=F32, sdt=BF16, **SMALL, T=4),
    dict(api="mtp", io=BF16, odt=F16, sdt=F32, **LARGE, T=4),
    dict(api="mtp", io=F16, odt=BF16, sdt=BF16, **LARGE, T=4),
    dict(api="mtp", io=BF16, odt=F32, sdt=BF16, **LARGE, T=8),  # tensor cores
])


@pytest.mark.parametrize("case", OUT_DTYPES)
def test_output_dtype_differs_from_inputs(case):
    """`output` in fp32 or fp16 with bf16 inputs, bf16 with fp16 inputs: converted in the
    kernel's store, compared with the fp64 reference; padding rows as for the output's own dtype."""
    _case_out_dtype(**case)


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("case", _params([dict(**SMALL, T=4, sdt=F32, inter=True),
                                          dict(**LARGE, T=8, sdt=BF16, inter=False)]))  # tensor cores
def test_pretranspose_multi_token_cuda_graph(case):
    """Pattern 1 in a CUDA graph: new inputs and new read slots (with padding rows) per replay."""
    B, H, HV, T, sdt, seed, K = case["B"], case["H"], case["HV"], case["T"], case["sdt"], case["seed"], 128
    pool, idx = _pool_and_slots(B, HV, K, sdt, seed)
    static = [*make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed), idx]
    bufs = dict(pool=pool, out=_poison((B, T, HV, K), BF16))
    if case["inter"]:
        bufs["ibuf"] = _poison((B, T, HV, K, K), sdt)

    def fresh(i):
        return [*make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed + 10 * (i + 1)),
                _read_slots(B + 5, B, seed + 10 * (i + 1))]

    graph_replay_equals_eager(lambda t: _call(
        flashgdn, "pre", static[:7], t["pool"], static[7], t["out"], t.get("ibuf")), static, fresh, bufs)


@pytest.mark.parametrize("case", _params([dict(**SMALL, T=4, sdt=F32), dict(**LARGE, T=2, sdt=BF16)]))
def test_mtp_per_token_state_slots_cuda_graph(case):
    """Pattern 2 in a CUDA graph: new inputs, read slots and token slots per replay."""
    B, H, HV, T, sdt, seed, K = case["B"], case["H"], case["HV"], case["T"], case["sdt"], case["seed"], 128
    P, idx, tok = _token_slots(B, T, seed)
    static = [*make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed), idx, tok]
    bufs = dict(pool=make_state(P, HV, K, K, sdt, DEV, seed=seed + 1), out=_poison((B, T, HV, K), BF16, SENTINEL))

    def fresh(i):
        return [*make_inputs(B, T, H, HV, K, K, device=DEV, seed=seed + 10 * (i + 1)),
                *_token_slots(B, T, seed + 10 * (i + 1))[1:]]

    graph_replay_equals_eager(lambda t: _call(
        flashgdn, "mtp", static[:7], t["pool"], static[7], t["out"], tok=static[8]), static, fresh, bufs)


# ----------------------------------------------------------------------------- a negative write index


@pytest.mark.parametrize("T,sdt,B", [(1, F32, 6), (1, BF16, 200), (3, F32, 6), (8, BF16, 200), (8, F32, 200)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_negative_write_index_runs_the_row_and_stores_no_state(T, sdt, B):
    """output_state_indices negative with a valid read index (FlashInfer's MTP rule): the row's
    output is computed and its state is stored nowhere, while the other rows store theirs; with
    disable_state_update=True (T > 1) a write index past the pool or negative changes nothing
    either. The T = 1 kernel, the token loop and (B = 200, T = 8) the tensor cores."""
    H, HV, K = 2, 4, 128
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, K, device=DEV, seed=31)
    P = 2 * B + 2
    pool = make_state(P, HV, K, K, sdt, DEV, seed=32)
    before = pool.clone()
    slots = torch.randperm(P, device=DEV).to(torch.int32)
    read, write = slots[:B].clone(), slots[B:2 * B].clone()
    write[::3] = -1
    ref_pool = before.double()
    o_ref, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, A_log, a, dt_bias, b, initial_state=ref_pool, initial_state_indices=read,
        output_state_indices=write, compute_dtype=F64)
    out = torch.full((B, T, HV, K), float("nan"), dtype=BF16, device=DEV)
    o, _ = flashgdn.gated_delta_rule_decode_pretranspose(
        q, k, v, None, A_log, a, dt_bias, b, output=out, initial_state=pool, initial_state_indices=read,
        output_state_indices=write)
    assert_close_output(o, o_ref)
    stored = torch.zeros(P, dtype=torch.bool, device=DEV)
    stored[write[write >= 0].long()] = True
    assert_close_state(pool[stored], ref_pool[stored])
    assert same_bits(pool[~stored], before[~stored]), "a slot no row stores changed"
    if T > 1:
        frozen = before.clone()
        write[1::3] = P + 7
        o2, _ = flashgdn.gated_delta_rule_mtp(q, k, v, frozen, read, A_log, a, dt_bias, b, output_state_indices=write,
                                              disable_state_update=True)
        o_frozen, _ = ref.gated_delta_rule_mtp(q, k, v, before.double(), read, A_log, a, dt_bias, b,
                                               disable_state_update=True, compute_dtype=F64)
        assert_close_output(o2, o_frozen)
        assert same_bits(frozen, before), "disable_state_update=True wrote the pool"
