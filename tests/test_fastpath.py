"""CPU tests of the repeated-call path (flashgdn.fastpath): a repeated signature skips the full
checks; whatever the compiled function does not check itself takes the full way (which raises the
same clear error as ever, nothing written) or a new variant. The compiled functions are the
argument-checking stand-ins of helpers.ffi_checking_stub."""
from __future__ import annotations

import pytest
import torch

import flashgdn
from flashgdn import api, fastpath
from flashgdn.device import DeviceFacts
from flashgdn.kernels import policy

from helpers import (B, FNS, HV, P, T_MTP, V, expect_call_error, expect_error, make_intermediate, padded_state,
                     stub_kernel_lookups, valid_kwargs)

FACTS = DeviceFacts("sm_90a", 132, "sm90-hbm3")


@pytest.fixture
def calls(monkeypatch):
    """(specs looked up, checks run by the full way) of the calls a test makes."""
    looked_up = stub_kernel_lookups(monkeypatch, FACTS)
    full = []
    validated = api._validated

    def counting(check, *args, **kw):
        full.append(check)
        return validated(check, *args, **kw)

    monkeypatch.setattr(api, "_validated", counting)
    return looked_up, full


def call(name, kw):
    return FNS[name](**kw)


@pytest.mark.parametrize("name", ["pre", "pool", "dec", "mtp"])
@pytest.mark.parametrize("output_given", [False, True])
def test_a_repeated_call_skips_the_full_checks(calls, name, output_given):
    looked_up, full = calls
    kw = valid_kwargs(name)
    if output_given:
        kw["output"] = torch.empty(B, T_MTP if name == "mtp" else 1, HV, V, dtype=torch.bfloat16)
    outs = [call(name, kw)[0] for _ in range(3)]
    assert len(full) == 1 and len(looked_up) == 1 and len(fastpath.FAST) == 1
    if output_given:
        assert all(o is kw["output"] for o in outs)
    else:  # a new output per call, as the full way allocates it
        assert outs[0] is not outs[1] and all(o.shape == outs[0].shape and o.is_contiguous() for o in outs)
    # A padding row's output: zero for one token; for T > 1 left as a passed output has it, written
    # as zeros by the kernel in one allocated here (no fill launch)
    [spec] = looked_up
    assert spec.zero_padding_output == (name != "mtp" or not output_given)


def _expand_pool(kw):
    pool = kw["initial_state"]
    return dict(kw, initial_state=pool[:1].expand(pool.shape))


def _overlapping_output(kw):
    T = kw["q"].shape[1]
    return dict(kw, output=torch.randn(1, T, HV, V).bfloat16().expand(B, T, HV, V))


# (api, change, error, message): each refused after a valid call of the same tensors was remembered
REFUSED = [
    ("pool", lambda kw: dict(kw, k=kw["k"].half()), TypeError, r"^k must have dtype bfloat16"),
    ("pool", lambda kw: dict(kw, q=kw["q"][:, :, :1]), ValueError, r"^k must have shape"),
    ("pool", _expand_pool, ValueError, r"^initial_state must not overlap itself"),
    ("pool", _overlapping_output, ValueError, r"^output must not overlap itself"),
    ("pool", lambda kw: dict(kw, initial_state=kw["initial_state"][:0]), ValueError, r"^initial_state has no slots"),
    ("scale", lambda kw: dict(kw, scale=True), TypeError, r"^scale must be a float or None, got bool"),
    ("pool", lambda kw: dict(kw, softplus_beta=True), TypeError, r"^softplus_beta must be a float, got bool"),
    ("pool", lambda kw: dict(kw, state=kw["initial_state"], initial_state=None), ValueError,
     r"^initial_state_indices / output_state_indices need the pool"),
    ("pool", lambda kw: dict(kw, q=kw["q"].tolist()), TypeError, r"^q must be a torch.Tensor"),
    ("pool", lambda kw: dict(kw, initial_state_indices=kw["initial_state_indices"].long()[:1]), ValueError,
     r"^initial_state_indices must have shape \[2\]"),
    ("pool", lambda kw: dict(kw, backend="cutlass"), ValueError, r"^backend must be one of"),
    ("dec", lambda kw: dict(kw, state=kw["state"][:1].expand(kw["state"].shape)), ValueError,
     r"^state must not overlap itself"),
    ("mtp", _expand_pool, ValueError, r"^initial_state must not overlap itself"),
    ("mtp", lambda kw: dict(kw, intermediate_states_buffer=make_intermediate(T=T_MTP, n=B - 1)), ValueError,
     r"^intermediate_states_buffer must have shape \[>= B=2"),
    ("mtp", lambda kw: dict(kw, replayssm_g=torch.zeros(P, HV, T_MTP)), ValueError,
     r"^replayssm_rawv/rawk/g/beta buffers require cache_replayssm=True"),
    # not read by the key, used before the compiled function's checks (the output is v's layout)
    ("pool", lambda kw: dict(kw, v=kw["v"].tolist()), TypeError, r"^v must be a torch.Tensor"),
    ("mtp", lambda kw: dict(kw, v=kw["v"].tolist()), TypeError, r"^v must be a torch.Tensor"),
    ("dec", lambda kw: dict(kw, v=kw["v"].tolist()), TypeError, r"^v must be a torch.Tensor"),
    # a flag that selects the variant: a tensor's value would need a host sync, its layout or identity is
    # all a memo or a key sees
    ("pool", lambda kw: dict(kw, use_qk_l2norm=torch.tensor(False)), TypeError,
     r"^use_qk_l2norm must be a bool, got Tensor"),
    ("dec", lambda kw: dict(kw, use_qk_l2norm=torch.tensor(True)), TypeError, r"^use_qk_l2norm must be a bool"),
    ("mtp", lambda kw: dict(kw, disable_state_update=torch.tensor(True)), TypeError,
     r"^disable_state_update must be a bool, got Tensor"),
    ("mtp", lambda kw: dict(kw, cache_replayssm=torch.tensor(False)), TypeError, r"^cache_replayssm must be a bool"),
]


@pytest.mark.parametrize("name, change, exc, match", REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)])
def test_what_the_compiled_function_does_not_check_takes_the_full_way(calls, name, change, exc, match):
    if name == "scale":  # True == 1.0 as a dict key: the key holds the types too
        name, kw = "pool", dict(valid_kwargs("pool"), scale=1.0)
    else:
        kw = valid_kwargs(name)
    for _ in range(2):
        call(name, kw)
    bad = change(kw)
    for _ in range(2):  # also with the bad call's own fast key seen once
        expect_error(name, bad, exc, match)
    call(name, kw)  # the good signature still runs


def test_a_refused_fast_call_runs_its_own_variant(calls):
    """Another valid signature with the same fast key (fp16 q, k, v): the compiled bf16 function
    refuses it, the full way runs the fp16 variant and keeps it for the key."""
    looked_up, full = calls
    kw = valid_kwargs("pool")
    call("pool", kw)
    half = dict(kw, **{n: kw[n].half() for n in ("q", "k", "v", "a", "b")})
    for _ in range(2):
        call("pool", half)
    assert [s.io_dtype for s in looked_up] == ["bfloat16", "float16"] and len(full) == 2
    call("pool", kw)  # refused by the fp16 function: the full way again (its memo keeps the bf16 plan)
    assert len(full) == 3 and len(looked_up) == 2


def _regime_batches():
    """Two batch sizes of different regimes on FACTS."""
    small = [n for n in range(1, 4096) if policy.regime(n, HV, FACTS.sm_count, FACTS.device_class) == "small"]
    return small[-1], small[-1] + 1


def test_the_batch_regime_is_in_the_key(calls):
    looked_up, full = calls
    for n in _regime_batches():
        kw = valid_kwargs("pool")
        kw["initial_state_indices"] = torch.arange(n, dtype=torch.int32) % P
        for name in ("q", "k", "v", "a", "b"):
            kw[name] = kw[name][:1].expand(n, *kw[name].shape[1:]).contiguous()
        for _ in range(2):
            call("pool", kw)
    assert [s.regime for s in looked_up] == ["small", "large"] and len(full) == 2


def test_a_packed_state_after_a_padded_one_gets_the_packed_variant(calls):
    """A strided (padded pool) variant would accept a packed pool too: the strides are in the key."""
    looked_up, full = calls
    kw = valid_kwargs("pool")
    padded = dict(kw, initial_state=padded_state("pool", row_pad=4))
    call("pool", padded)
    call("pool", kw)
    assert [s.strided_state for s in looked_up] == [True, False] and len(full) == 2


def test_a_none_becoming_a_tensor_takes_the_full_way(calls):
    looked_up, full = calls
    kw = valid_kwargs("pool")
    call("pool", kw)
    call("pool", dict(kw, output_state_indices=torch.tensor([1, 2], dtype=torch.int32)))
    assert [s.has_out_indices for s in looked_up] == [False, True] and len(full) == 2


@pytest.mark.parametrize("switch", ["check_indices", "fast_path_off"])
def test_the_switches_take_the_full_way(calls, monkeypatch, switch):
    """FLASHGDN_CHECK_INDICES=1 (api.CHECK_INDICES) and FLASHGDN_FAST_PATH=0 (fastpath.ENABLED): every
    call runs the full checks (the first also checks index values)."""
    if switch == "check_indices":
        monkeypatch.setattr(api, "CHECK_INDICES", True)
    else:
        monkeypatch.setattr(fastpath, "ENABLED", False)
    looked_up, full = calls
    kw = valid_kwargs("pool")
    for _ in range(3):
        call("pool", kw)
    assert len(full) == 3 and len(looked_up) == 1 and not fastpath.FAST
    if switch == "check_indices":
        kw["initial_state_indices"] = torch.tensor([P, 0], dtype=torch.int32)
        expect_error("pool", kw, ValueError, r"^initial_state_indices values must be in \[0, 5\)")


def test_an_empty_batch_is_never_kept(calls):
    looked_up, full = calls
    kw = valid_kwargs("pool")
    for name in ("q", "k", "v", "a", "b", "initial_state_indices"):
        kw[name] = kw[name][:0]
    for _ in range(2):
        out, _ = call("pool", kw)
    assert out.shape[0] == 0 and len(full) == 2 and not fastpath.FAST


def test_the_commit_skips_the_full_checks_and_refuses_an_overlapping_checkpoint(calls):
    from test_replay import commit_kwargs

    looked_up, full = calls
    kw = commit_kwargs()
    for _ in range(3):
        flashgdn.gated_delta_rule_replayssm_commit(**kw)
    assert len(full) == 1 and len(looked_up) == 1
    ck = kw["checkpoint_state"]
    for bad, match in ((dict(kw, checkpoint_state=ck[:, :1].expand(ck.shape)), r"^checkpoint_state must not overlap"),
                       (dict(kw, null_block_id=True), r"^null_block_id must be an int, got bool")):
        exc = TypeError if "null_block_id" in match else ValueError
        expect_call_error(flashgdn.gated_delta_rule_replayssm_commit, bad, exc, match)


def test_the_key_reads_no_data_pointer_and_holds_no_tensor(calls):
    """The fast key keeps no tensor alive and never asks for an address (FakeTensors have none)."""
    kw = valid_kwargs("mtp")
    call("mtp", kw)
    [key] = fastpath.FAST
    flat = []
    stack = [key]
    while stack:
        x = stack.pop()
        if isinstance(x, tuple):
            stack.extend(x)
        else:
            flat.append(x)
    assert not any(isinstance(x, torch.Tensor) for x in flat)


def test_an_allocated_output_is_packed_whatever_the_order_of_vs_dims():
    """fastpath.output: `given` as it is, else an empty contiguous tensor of v's shape and dtype, for a
    contiguous v, a view of a projection's rows, and a v whose dims are out of order (its second,
    contiguous allocation)."""
    given = torch.empty(B, 1, HV, V)
    assert fastpath.output(given, torch.empty(0)) is given
    rows = torch.randn(B, 3 * HV * V).bfloat16()
    for v in (torch.randn(B, 1, HV, V).bfloat16(), rows[:, HV * V:2 * HV * V].view(B, 1, HV, V),
              torch.randn(HV, B, 2, V).bfloat16().permute(1, 2, 0, 3)):
        out = fastpath.output(None, v)
        assert out.shape == v.shape and out.dtype == v.dtype and out.is_contiguous()
