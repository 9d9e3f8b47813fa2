"""CPU tests of argument validation that let calls through: valid arguments pass every structural
check and fail only at the device check ("must be a CUDA tensor"), which runs last; the
self-overlap rule; the debug checks of index values; the memo of validated call signatures.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from flashgdn.spec import KernelArgs

from helpers import (
    ALL, B, BF16, F32, FNS, H, HV, K, P, STATE_ARG, V, expect_error, expect_only_device_error, make_inputs,
    make_intermediate, make_state, padded_state, remember_valid_call, state_dims, tokens, valid_kwargs,
)


# ----------------------------------------------------------------------------- valid inputs: device check last


@pytest.mark.parametrize("api", ALL)
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_valid_cpu_inputs_fail_only_on_device(api, state_dtype):
    kw = valid_kwargs(api, state_dtype=state_dtype)
    expect_error(api, kw, ValueError, r"^q must be a CUDA tensor, got device cpu")


@pytest.mark.parametrize("api", ALL)
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_strided_views_pass_structural_checks(api, state_dtype):
    """q/k/v as views of one packed projection, a/b as views of one gate tensor, and a state with
    a padded slot stride (16 elements) are valid."""
    kw = valid_kwargs(api, strided=True, state_dtype=state_dtype, pad=16)
    assert not kw["q"].is_contiguous() and not kw["a"].is_contiguous()
    assert not kw[STATE_ARG[api]].is_contiguous()
    expect_only_device_error(api, kw)


@pytest.mark.parametrize("api", ALL)
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pads", [(1, 0), (0, 1), (1, 1), (4, 3)], ids=["rows", "heads", "both", "wide"])
def test_padded_state_rows_and_heads_pass(api, state_dtype, pads):
    """Only the state's last dim must be contiguous: rows and heads padded by multiples of 16 bytes
    are valid (tests/test_validation.py: other paddings are not)."""
    vec = 16 // state_dtype.itemsize
    kw = valid_kwargs(api)
    kw[STATE_ARG[api]] = padded_state(api, state_dtype, row_pad=pads[0] * vec, head_pad=pads[1] * vec, seed=3)
    assert not kw[STATE_ARG[api]].is_contiguous()
    expect_only_device_error(api, kw)


@pytest.mark.parametrize("api", ALL)
@pytest.mark.parametrize("io", [BF16, torch.float16], ids=["bf16-io", "fp16-io"])
@pytest.mark.parametrize("out", [BF16, torch.float16, F32], ids=["bf16-out", "fp16-out", "fp32-out"])
def test_output_dtype_is_free(api, io, out):
    """output may be bf16, fp16 or fp32 whatever q's dtype (the kernels convert in their store)."""
    kw = valid_kwargs(api)
    for n in ("q", "k", "v", "a", "b"):
        kw[n] = kw[n].to(io)
    kw["output"] = torch.zeros(B, tokens(api), HV, V, dtype=out)
    expect_only_device_error(api, kw)


@pytest.mark.parametrize("api", ["pre", "pool", "mtp"])
@pytest.mark.parametrize("rows,steps", [(B, 3), (B + 3, 3), (B + 1, 5)], ids=["exact", "more-rows", "more-both"])
def test_intermediate_buffer_may_be_larger(api, rows, steps):
    """intermediate_states_buffer [>= B, >= T, HV, V, K]: engines pass their whole buffer; with
    pretranspose too (T > 1)."""
    kw = valid_kwargs(api)
    if api != "mtp":
        q, k, v, a, b, _, _ = make_inputs(B, 3, H, HV, K, V, seed=4)
        kw.update(q=q, k=k, v=v, a=a, b=b)
    kw["intermediate_states_buffer"] = make_intermediate(T=steps, n=rows)
    expect_only_device_error(api, kw)


@pytest.mark.parametrize("api", ["pre", "pool"])
def test_pretranspose_disable_state_update_reads_an_overlapping_state(api):
    """pretranspose with T > 1 and disable_state_update=True only reads the state: it may overlap
    itself; written, it may not."""
    kw = valid_kwargs(api)
    q, k, v, a, b, _, _ = make_inputs(B, 2, H, HV, K, V, seed=6)
    kw.update(q=q, k=k, v=v, a=a, b=b, disable_state_update=True)
    kw[STATE_ARG[api]] = kw[STATE_ARG[api]][:1].expand(kw[STATE_ARG[api]].shape[0], -1, -1, -1)
    expect_only_device_error(api, kw)
    kw["disable_state_update"] = False
    expect_error(api, kw, ValueError, rf"^{STATE_ARG[api]} must not overlap itself")


def test_pool_given_state_is_not_used(monkeypatch):
    """With initial_state given, the kernel gets the pool and the call returns it; `state` (here
    another valid pool) is not used (FlashInfer's rule)."""
    from flashgdn import api

    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    launched = []
    monkeypatch.setattr(api, "_launch", lambda plan, layout, args, options: launched.append(args) or "out")
    kw = valid_kwargs("pool")
    kw["state"] = make_state(P, HV, V, K, F32, seed=9)
    out, st = FNS["pool"](**kw)
    assert out == "out" and st is kw["initial_state"]
    assert len(launched) == 1 and launched[0].state is kw["initial_state"]


def _all_options(api):
    kw = valid_kwargs(api)
    T = tokens(api)
    # gates in fp32, dt_bias in bf16, int64 indices, a given output with odd leading strides, scale int
    kw["a"], kw["b"] = kw["a"].float(), kw["b"].float()
    kw["dt_bias"] = kw["dt_bias"].bfloat16()
    kw["output"] = torch.zeros(B, T * HV * V + 3, dtype=BF16)[:, : T * HV * V].view(B, T, HV, V)
    kw["scale"] = 1
    kw["softplus_beta"], kw["softplus_threshold"] = 2, -5.0  # int beta; torch takes any threshold
    kw["use_qk_l2norm"] = False
    if api != "mtp":
        kw["backend"] = "flashinfer"
    if api in ("pool", "mtp"):
        kw["initial_state_indices"] = torch.tensor([-1, 7], dtype=torch.int64)  # values are not checked here
        kw["output_state_indices"] = torch.tensor([4, 1], dtype=torch.int64)
    if api == "mtp":
        kw["intermediate_states_buffer"] = make_intermediate(T=T + 2)
        kw["accepted_tokens"] = torch.tensor([0, 3], dtype=torch.int32)
    return kw


@pytest.mark.parametrize("api", ALL)
def test_all_options_pass_structural_checks(api):
    expect_only_device_error(api, _all_options(api))


def test_fp16_io_passes_structural_checks():
    kw = valid_kwargs("pre")
    for n in ("q", "k", "v", "a", "b"):
        kw[n] = kw[n].half()
    expect_only_device_error("pre", kw)


def test_mtp_disable_state_update_without_accepted_is_fine():
    kw = valid_kwargs("mtp")
    kw["disable_state_update"] = True
    kw["intermediate_states_buffer"] = make_intermediate()
    expect_only_device_error("mtp", kw)


def test_mtp_disable_state_update_reads_an_overlapping_pool():
    """Without a state update the pool is only read, so it may overlap itself; written, it may not."""
    kw = valid_kwargs("mtp")
    kw["initial_state"] = kw["initial_state"][:1].expand(P, -1, -1, -1)
    kw["disable_state_update"] = True
    expect_only_device_error("mtp", kw)
    kw["disable_state_update"] = False
    expect_error("mtp", kw, ValueError, r"^initial_state must not overlap itself")


@pytest.mark.parametrize("api", ALL)
def test_zero_batch_written_tensors_pass(api):
    """B = 0: written tensors without elements pass the overlap check, expand() views included."""
    T = tokens(api)
    kw = valid_kwargs(api)
    q, k, v, a, b, A_log, dt_bias = make_inputs(0, T, H, HV, K, V, seed=10)
    kw.update(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    kw["output"] = torch.zeros(1, T, HV, V, dtype=BF16).expand(0, -1, -1, -1)
    if api in ("pre", "dec"):
        kw["state"] = torch.zeros(1, HV, *state_dims(api)).expand(0, -1, -1, -1)
    else:
        kw["initial_state_indices"] = torch.zeros(0, dtype=torch.int32)
    if api == "mtp":
        kw["intermediate_states_buffer"] = make_intermediate(n=1, T=1).expand(0, T, -1, -1, -1)
    expect_only_device_error(api, kw)


def _brute_force_overlaps(shape, strides):
    offsets = [sum(i * s for i, s in zip(ix, strides)) for ix in itertools.product(*map(range, shape))]
    return len(offsets) != len(set(offsets))


def test_overlap_rule_is_sound_and_exact_for_pools():
    """The overlap check never rejects a layout without overlap, and decides a packed block under
    one strided dim (a pool with any slot stride) exactly."""
    from flashgdn import validation as val

    rng = random.Random(0)
    storage = torch.empty(4096, device="meta")
    beyond_torch = 0  # overlaps torch finds too hard to tell, caught by the stride rule
    for _ in range(3000):
        ndim = rng.randint(1, 4)
        shape = tuple(rng.randint(0, 4) for _ in range(ndim))
        strides = tuple(rng.randint(0, 12) for _ in range(ndim))
        t = storage.as_strided(shape, strides)
        if val._overlaps_itself(t):
            assert _brute_force_overlaps(shape, strides), (shape, strides)
            beyond_torch += torch._debug_has_internal_overlap(t) == 2
    assert beyond_torch > 100
    for n, rows, cols, slot in itertools.product((2, 3), (1, 2, 3), (1, 4), range(1, 14)):
        t = storage.as_strided((n, rows, cols), (slot, cols, 1))
        assert val._overlaps_itself(t) == _brute_force_overlaps(t.shape, t.stride()), (n, rows, cols, slot)


_SLOTS = [  # (initial_state_indices, output_state_indices, update_state, error or None)
    pytest.param([3, 3], None, True, r"^initial_state_indices must not repeat a written slot .*got slot 3 in 2 rows",
                 id="read-and-write-slot-twice"),
    pytest.param([3, 0], [4, 4], True, r"^output_state_indices must not repeat a written slot .*got slot 4 in 2 rows",
                 id="write-slot-twice"),
    pytest.param([3, -1], [4, 4], True, None, id="padding-row-writes-nothing"),
    pytest.param([-1, -1], None, True, None, id="padding-repeats"),
    pytest.param([3, 0], [-1, -1], True, None, id="write-padding-repeats"),
    pytest.param([3, 3], [1, 2], True, None, id="read-slot-twice"),
    pytest.param([3, 3], None, False, None, id="no-state-update"),  # MTP with disable_state_update
]


@pytest.mark.parametrize("idx,out_idx,update,error", _SLOTS)
def test_index_checks_reject_duplicate_write_slots(monkeypatch, idx, out_idx, update, error):
    """FLASHGDN_CHECK_INDICES=1: slots written by two rows raise before the launch (a fake kernel
    here; tests/test_pretranspose_gpu.py runs the real one)."""
    from flashgdn import api

    monkeypatch.setattr(api, "CHECK_INDICES", True)
    launches = []
    plan = api._Plan(api.val.Problem(B, 1, H, HV, K, V), torch.device("cpu"))
    plan.fn = lambda *args: launches.append(args)
    kw = valid_kwargs("pool")
    as_idx = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32)  # noqa: E731
    tensors = KernelArgs(kw["q"], kw["k"], kw["v"], kw["a"], kw["b"], kw["A_log"], kw["dt_bias"], kw["initial_state"],
                         state_indices=as_idx(idx), output_state_indices=as_idx(out_idx))
    args = (plan, "klast", tensors, api.CallOptions(None, True, update))
    if error is None:
        api._launch(*args)
        assert len(launches) == 1
    else:
        with pytest.raises(ValueError, match=error):
            api._launch(*args)
        assert not launches


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_shape_one_dims_skip_stride_checks(name):
    """A size-1 dim (T=1) may carry any stride: only dims with more than one index are checked."""
    kw = valid_kwargs("pre")
    t = kw[name]
    kw[name] = t.as_strided(t.shape, (t.stride(0), 3, t.stride(2), 1))
    expect_only_device_error("pre", kw)

# ----------------------------------------------------------------------------- validation memo


def _counting_check(calls, fail=False):
    def check(*args):
        calls.append(args)
        if fail:
            raise ValueError("bad")
        return "p", "device"
    return check


def test_validation_memo_skips_repeated_signatures():
    from flashgdn import api

    calls = []
    check = _counting_check(calls)
    base = torch.zeros(4, 8)
    plan = api._validated(check, torch.zeros(4, 8), 0.5, None)
    assert (plan.problem, plan.device, plan.fn) == ("p", "device", None)
    assert api._validated(check, torch.ones(4, 8), 0.5, None) is plan  # same signature: same plan
    assert len(calls) == 1
    api._validated(check, base.t().contiguous().t(), 0.5, None)  # other strides
    api._validated(check, torch.zeros(8, 5)[:, 1:], 0.5, None)  # other alignment and shape
    api._validated(check, torch.zeros(4, 8, dtype=torch.float16), 0.5, None)  # other dtype
    api._validated(check, torch.zeros(4, 8), 1, None)  # other scalar
    api._validated(check, torch.zeros(4, 8), True, None)  # True is not 1
    assert len(calls) == 6
    # Options select the kernel: part of the signature, not passed to the check.
    other = api._validated(check, torch.zeros(4, 8), 0.5, None, options=(False, 1.0, 20.0))
    assert other is not plan and len(calls) == 7 and len(calls[-1]) == 3


def test_validation_memo_never_caches_failures_or_unhashables():
    from flashgdn import api

    calls = []
    failing = _counting_check(calls, fail=True)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            api._validated(failing, torch.zeros(3), 0.5)
    assert len(calls) == 2
    calls.clear()
    check = _counting_check(calls)
    for _ in range(2):
        api._validated(check, torch.zeros(3), [0.5])
    assert len(calls) == 2


def test_softplus_checked_on_every_call(monkeypatch):
    """The softplus values are checked arguments of the memoized signature, not unchecked options:
    a bad value raises on every call, also after a valid call with the same tensors was remembered."""
    kw = remember_valid_call(monkeypatch, "mtp")
    for _ in range(2):
        expect_error("mtp", dict(kw, softplus_beta=0.0), ValueError, r"^softplus_beta must be > 0")
        expect_error("mtp", dict(kw, softplus_threshold=float("nan")), ValueError,
                     r"^softplus_threshold must be finite")
    from flashgdn import api

    assert len(api._VALIDATED) == 1


def test_validation_memo_is_bounded(monkeypatch):
    from flashgdn import api

    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "MEMO_MAX", 4)
    check = _counting_check([])
    for n in range(10):
        api._validated(check, torch.zeros(n + 1))
    assert len(api._VALIDATED) <= 4
