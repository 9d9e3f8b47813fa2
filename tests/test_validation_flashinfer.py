"""CPU tests of the arguments that came with FlashInfer 0.7.2's `flashinfer.gdn_decode` signatures:
`backend`, pretranspose's intermediate_states_buffer / disable_state_update (T > 1 only), MTP's
ssm_state_indices, ReplaySSM buffers without cache_replayssm (tests/test_replay.py has the rest)
and MTP's disable_state_update default (None: True, with a FutureWarning once per process).

Every error names its argument and leaves every tensor argument bit for bit as it was
(helpers.expect_error); valid arguments fail only at the device check, which runs last.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from flashgdn import api as fapi
from flashgdn import logging_utils

from helpers import (
    B, FNS, H, HV, K, P, T_MTP, V, expect_error, expect_only_device_error, make_inputs,
    make_intermediate, remember_valid_call, valid_kwargs,
)

BACKENDS = ("auto", "flashgdn", "flashinfer")
BACKEND_APIS = ("pre", "pool", "dec")  # gated_delta_rule_mtp has no backend argument


def _with_tokens(api, T, seed=11):
    kw = valid_kwargs(api)
    q, k, v, a, b, _, _ = make_inputs(B, T, H, HV, K, V, seed=seed)
    kw.update(q=q, k=k, v=v, a=a, b=b)
    return kw


# ----------------------------------------------------------------------------- backend


@pytest.mark.parametrize("api", BACKEND_APIS)
@pytest.mark.parametrize("backend", ["cuda", "FlashInfer", "", None, 1])
def test_bad_backend(api, backend):
    kw = valid_kwargs(api)
    kw["backend"] = backend
    expect_error(api, kw, ValueError,
                 rf"^backend must be one of \('auto', 'flashgdn', 'flashinfer'\), got {re.escape(repr(backend))}$")


@pytest.mark.parametrize("api", BACKEND_APIS)
def test_backend_checked_before_anything_else(api):
    kw = valid_kwargs(api)
    kw.update(backend="triton", q=None, state=None, scale=float("nan"))
    expect_error(api, kw, ValueError, r"^backend must be one of .*got 'triton'$")


@pytest.mark.parametrize("api", BACKEND_APIS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_pass(api, backend):
    kw = valid_kwargs(api)
    kw["backend"] = backend
    expect_only_device_error(api, kw)


def test_backend_checked_on_every_call(monkeypatch):
    """backend is no part of the memoized signature: a bad one raises also after a valid call with
    the same tensors was remembered."""
    kw = remember_valid_call(monkeypatch, "pre")
    for _ in range(2):
        expect_error("pre", dict(kw, backend="cutlass"), ValueError, r"^backend must be one of")


# ----------------------------------------------------------------------------- pretranspose T == 1 / T > 1


@pytest.mark.parametrize("api", ["pre", "pool"])
def test_pretranspose_t1_rejects_intermediate_buffer(api):
    kw = valid_kwargs(api)
    kw["intermediate_states_buffer"] = make_intermediate(T=1)
    expect_error(api, kw, ValueError,
                 r"^intermediate_states_buffer is supported only for T > 1 \(q\.shape\[1\] is 1\)$")


@pytest.mark.parametrize("api", ["pre", "pool"])
def test_pretranspose_t1_rejects_disable_state_update(api):
    kw = valid_kwargs(api)
    kw["disable_state_update"] = True
    expect_error(api, kw, ValueError,
                 r"^disable_state_update=True is supported only for T > 1 \(q\.shape\[1\] is 1\)$")
    kw["disable_state_update"] = False  # the default: fine
    expect_only_device_error(api, kw)


@pytest.mark.parametrize("api", ["pre", "pool"])
@pytest.mark.parametrize("rows,steps", [(B - 1, 2), (B, 1)], ids=["fewer-rows", "fewer-steps"])
def test_pretranspose_intermediate_buffer_too_small(api, rows, steps):
    kw = _with_tokens(api, 2)
    kw["intermediate_states_buffer"] = make_intermediate(T=steps, n=rows)
    expect_error(api, kw, ValueError,
                 rf"^intermediate_states_buffer must have shape \[>= B=2, >= T=2, \.\.\.\], got \[{rows}, {steps}, ")


@pytest.mark.parametrize("api", ["pre", "pool"])
@pytest.mark.parametrize("disable", [False, True])
def test_pretranspose_multi_token_options_pass(api, disable):
    kw = _with_tokens(api, 3)
    kw.update(intermediate_states_buffer=make_intermediate(T=3), disable_state_update=disable)
    expect_only_device_error(api, kw)


# ----------------------------------------------------------------------------- ReplaySSM


@pytest.mark.parametrize("name", ["replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta"])
def test_mtp_replayssm_buffer_without_cache_replayssm(name):
    kw = valid_kwargs("mtp")
    kw[name] = torch.full((B, T_MTP, HV, V), 2.0)
    expect_error("mtp", kw, ValueError, r"^replayssm_rawv/rawk/g/beta buffers require cache_replayssm=True$")


# ----------------------------------------------------------------------------- ssm_state_indices


def _slots(T=T_MTP, dtype=torch.int32):
    """ssm_state_indices [B, T]: row 1 partly padding (negative)."""
    return torch.tensor([[1, 2, 4, 1, 2, 4][:T], [-1, 0, -1, 0, -1, 0][:T]], dtype=dtype)


@pytest.mark.parametrize("slots,exc,match", [
    pytest.param([[1, 2, 4], [0, 3, 1]], TypeError, r"^ssm_state_indices must be a torch\.Tensor, got list$", id="list"),
    pytest.param(_slots(dtype=torch.int64), TypeError, r"^ssm_state_indices must have dtype int32, got int64$",
                 id="int64"),
    pytest.param(_slots().float(), TypeError, r"^ssm_state_indices must have dtype int32, got float32$", id="float"),
    pytest.param(_slots()[:, 0], ValueError, r"^ssm_state_indices must have shape \[2, 3\], got \[2\]$", id="1d"),
    pytest.param(torch.zeros(B, T_MTP + 1, dtype=torch.int32), ValueError,
                 r"^ssm_state_indices must have shape \[2, 3\], got \[2, 4\]$", id="T"),
    pytest.param(torch.zeros(B + 1, T_MTP, dtype=torch.int32), ValueError,
                 r"^ssm_state_indices must have shape \[2, 3\], got \[3, 3\]$", id="B"),
    pytest.param(_slots().t().contiguous().t(), ValueError, r"^ssm_state_indices must have its last dim contiguous",
                 id="last-dim-strided"),
])
def test_mtp_ssm_state_indices_errors(slots, exc, match):
    kw = valid_kwargs("mtp")
    kw["ssm_state_indices"] = slots
    expect_error("mtp", kw, exc, match)


def test_mtp_ssm_state_indices_need_two_tokens():
    kw = _with_tokens("mtp", 1)
    kw["ssm_state_indices"] = _slots(T=1)
    expect_error("mtp", kw, ValueError, r"^ssm_state_indices needs T >= 2 tokens per sequence, got T=1$")


@pytest.mark.parametrize("name,value", [
    ("intermediate_states_buffer", make_intermediate()),
    ("output_state_indices", torch.tensor([4, 1], dtype=torch.int32)),
    ("accepted_tokens", torch.tensor([1, 2], dtype=torch.int32)),
])
def test_mtp_ssm_state_indices_exclusive(name, value):
    kw = valid_kwargs("mtp")
    kw.update(ssm_state_indices=_slots(), **{name: value})
    expect_error("mtp", kw, ValueError,
                 rf"^ssm_state_indices \(the state after every token to its own slot\) cannot go with {name}$")


def test_mtp_ssm_state_indices_need_state_update(monkeypatch):
    msg = r"^ssm_state_indices writes the states: it needs disable_state_update=False$"
    kw = valid_kwargs("mtp")
    kw.update(ssm_state_indices=_slots(), disable_state_update=True)
    expect_error("mtp", kw, ValueError, msg)
    del kw["disable_state_update"]  # None: True, as in FlashInfer 0.7.2
    monkeypatch.setattr(fapi, "_WARNED_DISABLE_DEFAULT", False)
    with pytest.warns(FutureWarning, match=r"disable_state_update"):
        expect_error("mtp", kw, ValueError, msg)


@pytest.mark.parametrize("T", [2, T_MTP, 16])
def test_mtp_ssm_state_indices_pass(T):
    kw = _with_tokens("mtp", T)
    kw["ssm_state_indices"] = torch.full((B, T + 3), 7, dtype=torch.int32)[:, :T]  # a padded row stride is fine
    kw["ssm_state_indices"][:, ::2] = torch.arange(B, dtype=torch.int32)[:, None] - 1
    expect_only_device_error("mtp", kw)


# ----------------------------------------------------------------------------- disable_state_update default

FUTURE_TEXT = (
    r"^gated_delta_rule_mtp\(\): the 'disable_state_update' parameter currently defaults to True \(as in "
    r"FlashInfer 0\.7\.2\), but this default will change to False with FlashInfer 0\.8\.0\. Please pass "
    r"disable_state_update=True or disable_state_update=False explicitly to suppress this warning\.$"
)


def _call_mtp_expecting_device_error(kw):
    """Calls gated_delta_rule_mtp from this file (the warning points at its caller)."""
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=r"^q must be a CUDA tensor"):
        FNS["mtp"](**kw)
    for n, t in before.items():
        assert torch.equal(kw[n], t), f"{n} changed"


def test_mtp_omitted_disable_state_update_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(fapi, "_WARNED_DISABLE_DEFAULT", False)
    kw = valid_kwargs("mtp")
    del kw["disable_state_update"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")  # the module flag, not Python's warning registry, must silence repeats
        _call_mtp_expecting_device_error(kw)  # warned first, then the device check fails
        assert fapi._WARNED_DISABLE_DEFAULT is True
        _call_mtp_expecting_device_error(kw)
        _call_mtp_expecting_device_error(dict(kw, disable_state_update=None))
    assert [w.category for w in rec] == [FutureWarning], [str(w.message) for w in rec]
    assert re.match(FUTURE_TEXT, str(rec[0].message)), str(rec[0].message)
    if logging_utils.LOG_LEVEL <= 0:  # (a logging wrapper adds a frame)
        assert rec[0].filename == __file__, "the warning must point at the caller's line"


@pytest.mark.parametrize("disable", [False, True])
def test_mtp_explicit_disable_state_update_does_not_warn(monkeypatch, disable):
    monkeypatch.setattr(fapi, "_WARNED_DISABLE_DEFAULT", False)
    kw = valid_kwargs("mtp")
    kw["disable_state_update"] = disable
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _call_mtp_expecting_device_error(kw)
    assert not rec and fapi._WARNED_DISABLE_DEFAULT is False


def test_mtp_disable_state_update_resolution(monkeypatch):
    """None means True (FlashInfer 0.7.2); explicit values pass through."""
    monkeypatch.setattr(fapi, "_WARNED_DISABLE_DEFAULT", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert fapi._mtp_disable_state_update(False) is False
        assert fapi._mtp_disable_state_update(True) is True
        assert not rec
        assert fapi._mtp_disable_state_update(None) is True
        assert fapi._mtp_disable_state_update(None) is True
    assert [w.category for w in rec] == [FutureWarning]


def test_mtp_omitted_disable_state_update_only_reads_the_pool(monkeypatch):
    """The default leaves the pool unwritten: a pool that overlaps itself passes (written, it may
    not), and accepted_tokens (a commit count) is refused."""
    monkeypatch.setattr(fapi, "_WARNED_DISABLE_DEFAULT", True)  # warned already
    kw = valid_kwargs("mtp")
    del kw["disable_state_update"]
    kw["initial_state"] = kw["initial_state"][:1].expand(P, -1, -1, -1)
    expect_only_device_error("mtp", kw)
    expect_error("mtp", dict(kw, disable_state_update=False), ValueError, r"^initial_state must not overlap itself")
    kw = valid_kwargs("mtp")
    del kw["disable_state_update"]
    kw["accepted_tokens"] = torch.tensor([1, 2], dtype=torch.int32)
    expect_error("mtp", kw, ValueError, r"^accepted_tokens .*disable_state_update=True")
