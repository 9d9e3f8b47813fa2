"""CPU tests of argument validation of the three public functions: the errors.

Every bad argument must raise TypeError (type / dtype) or ValueError (shape, stride, alignment,
value) naming the argument, before anything touches memory: all tensor arguments are compared
bit for bit after the failed call (valid arguments: tests/test_validation_valid.py).
"""
from __future__ import annotations

import re

import pytest
import torch

from helpers import (
    ALL, B, BF16, F32, FNS, H, HV, K, P, STATE_ARG, T_MTP, V, expect_error, expect_only_device_error,
    make_inputs, make_intermediate, make_state, padded_state, state_dims, strided_view, tokens, valid_kwargs,
)


# ----------------------------------------------------------------------------- tensor builders


def not_last_contiguous(t):
    """Same shape and values, last-dim stride != 1."""
    if t.dim() >= 2 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([t, t], -1)[..., 0]


def misaligned_leading_stride(t):
    """Same shape and values, last dim contiguous, dim-0 stride one element past a packed row
    (not a multiple of 16 bytes)."""
    n = t[0].numel()
    buf = torch.zeros(t.shape[0], n + 1, dtype=t.dtype)
    out = buf[:, :n].view(t.shape)
    out.copy_(t)
    return out


def misaligned_pointer(t):
    """Same shape, packed strides, data pointer one element past a 16-byte boundary."""
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16
    return out


def with_shape(t, shape):
    return torch.randn(*shape).to(t.dtype)


# ----------------------------------------------------------------------------- cases



def _set(**changes):
    def mutate(api, kw):
        for name, fn in changes.items():
            kw[name] = fn(api, kw)
    return mutate


def _shape_of(name, dims):
    """Replace argument `name` by a random tensor of its dtype with shape dims(api, T)."""
    return _set(**{name: lambda api, kw: with_shape(kw[name], dims(api, tokens(api)))})


# (id, apis, mutate, exception, regex)
INPUT_CASES = [
    # not a tensor
    ("q-none", ALL, _set(q=lambda api, kw: None), TypeError, r"^q must be a torch\.Tensor, got NoneType"),
    ("q-list", ALL, _set(q=lambda api, kw: kw["q"].float().tolist()), TypeError, r"^q must be a torch\.Tensor, got list"),
    ("k-list", ALL, _set(k=lambda api, kw: [1.0]), TypeError, r"^k must be a torch\.Tensor"),
    ("v-none", ALL, _set(v=lambda api, kw: None), TypeError, r"^v must be a torch\.Tensor"),
    ("a-float", ALL, _set(a=lambda api, kw: 0.5), TypeError, r"^a must be a torch\.Tensor"),
    ("b-none", ALL, _set(b=lambda api, kw: None), TypeError, r"^b must be a torch\.Tensor"),
    ("A_log-list", ALL, _set(A_log=lambda api, kw: kw["A_log"].tolist()), TypeError, r"^A_log must be a torch\.Tensor"),
    ("dt_bias-none", ALL, _set(dt_bias=lambda api, kw: None), TypeError, r"^dt_bias must be a torch\.Tensor"),
    # dtypes
    ("q-fp32", ALL, _set(q=lambda api, kw: kw["q"].float()), TypeError, r"^q must have dtype bfloat16 or float16, got float32"),
    ("q-int", ALL, _set(q=lambda api, kw: kw["q"].to(torch.int16)), TypeError, r"^q must have dtype"),
    ("k-fp16", ALL, _set(k=lambda api, kw: kw["k"].half()), TypeError, r"^k must have dtype bfloat16, got float16"),
    ("v-fp32", ALL, _set(v=lambda api, kw: kw["v"].float()), TypeError, r"^v must have dtype bfloat16, got float32"),
    ("a-fp16", ALL, _set(a=lambda api, kw: kw["a"].half()), TypeError, r"^a must have dtype bfloat16 or float32, got float16"),
    ("b-fp32", ALL, _set(b=lambda api, kw: kw["b"].float()), TypeError, r"^b must have dtype bfloat16, got float32"),
    ("A_log-bf16", ALL, _set(A_log=lambda api, kw: kw["A_log"].bfloat16()), TypeError, r"^A_log must have dtype float32, got bfloat16"),
    ("A_log-fp64", ALL, _set(A_log=lambda api, kw: kw["A_log"].double()), TypeError, r"^A_log must have dtype float32"),
    ("dt_bias-fp16", ALL, _set(dt_bias=lambda api, kw: kw["dt_bias"].half()), TypeError, r"^dt_bias must have dtype float32 or bfloat16, got float16"),
    # shapes and cross-argument mismatches
    ("q-3d", ALL, _set(q=lambda api, kw: kw["q"][:, 0]), ValueError, r"^q must have shape \[\*, \*, \*, \*\]"),
    ("k-B", ALL, _shape_of("k", lambda api, T: (B + 1, T, H, K)), ValueError, r"^k must have shape \[2, \d+, 2, 64\]"),
    ("k-H", ALL, _shape_of("k", lambda api, T: (B, T, H + 1, K)), ValueError, r"^k must have shape"),
    ("k-K", ALL, _shape_of("k", lambda api, T: (B, T, H, 128)), ValueError, r"^k must have shape"),
    ("k-T", ALL, _shape_of("k", lambda api, T: (B, T + 1, H, K)), ValueError, r"^k must have shape"),
    ("v-B", ALL, _shape_of("v", lambda api, T: (B + 1, T, HV, V)), ValueError, r"^v must have shape \[2, \d+, \*, \*\]"),
    ("v-T", ALL, _shape_of("v", lambda api, T: (B, T + 1, HV, V)), ValueError, r"^v must have shape"),
    ("v-3d", ALL, _set(v=lambda api, kw: kw["v"][:, 0]), ValueError, r"^v must have shape"),
    ("HV-not-multiple", ALL, _shape_of("v", lambda api, T: (B, T, 3, V)), ValueError,
     r"^v\.shape\[2\] \(HV=3\) must be a positive multiple of q\.shape\[2\] \(H=2\)"),
    ("K-96", ALL, _set(q=lambda api, kw: with_shape(kw["q"], (B, tokens(api), H, 96)),
                       k=lambda api, kw: with_shape(kw["k"], (B, tokens(api), H, 96))),
     ValueError, r"^q\.shape\[3\] \(K\) must be one of \(64, 128, 256\), got 96"),
    ("K-32", ALL, _set(q=lambda api, kw: with_shape(kw["q"], (B, tokens(api), H, 32)),
                       k=lambda api, kw: with_shape(kw["k"], (B, tokens(api), H, 32))),
     ValueError, r"^q\.shape\[3\] \(K\) must be one of"),
    ("V-96", ALL, _shape_of("v", lambda api, T: (B, T, HV, 96)), ValueError, r"^v\.shape\[3\] \(V\) must be one of .*got 96"),
    ("a-HV", ALL, _shape_of("a", lambda api, T: (B, T, HV + 1)), ValueError, r"^a must have shape \[2, \d+, 4\]"),
    ("a-B", ALL, _shape_of("a", lambda api, T: (B + 1, T, HV)), ValueError, r"^a must have shape"),
    ("b-T", ALL, _shape_of("b", lambda api, T: (B, T + 1, HV)), ValueError, r"^b must have shape"),
    ("b-4d", ALL, _shape_of("b", lambda api, T: (B, T, HV, 1)), ValueError, r"^b must have shape"),
    ("A_log-HV", ALL, _shape_of("A_log", lambda api, T: (HV + 1,)), ValueError, r"^A_log must have shape \[4\]"),
    ("A_log-2d", ALL, _shape_of("A_log", lambda api, T: (1, HV)), ValueError, r"^A_log must have shape \[4\]"),
    ("dt_bias-HV", ALL, _shape_of("dt_bias", lambda api, T: (HV - 1,)), ValueError, r"^dt_bias must have shape \[4\]"),
    # token counts
    ("T0", ALL, _set(**{n: (lambda n: lambda api, kw: kw[n][:, :0])(n) for n in ("q", "k", "v", "a", "b")}),
     ValueError, r"^q\.shape\[1\] \(tokens per sequence T\) must be in \[1, \d+\] here, got 0"),
    # contiguity of the last dim
    ("q-last-dim-strided", ALL, _set(q=lambda api, kw: not_last_contiguous(kw["q"])), ValueError,
     r"^q must have its last dim contiguous"),
    ("k-last-dim-strided", ALL, _set(k=lambda api, kw: not_last_contiguous(kw["k"])), ValueError,
     r"^k must have its last dim contiguous"),
    ("v-last-dim-strided", ALL, _set(v=lambda api, kw: not_last_contiguous(kw["v"])), ValueError,
     r"^v must have its last dim contiguous"),
    ("a-last-dim-strided", ALL, _set(a=lambda api, kw: not_last_contiguous(kw["a"])), ValueError,
     r"^a must have its last dim contiguous"),
    ("b-last-dim-strided", ALL, _set(b=lambda api, kw: not_last_contiguous(kw["b"])), ValueError,
     r"^b must have its last dim contiguous"),
    ("A_log-strided", ALL, _set(A_log=lambda api, kw: not_last_contiguous(kw["A_log"])), ValueError,
     r"^A_log must have its last dim contiguous"),
    ("dt_bias-strided", ALL, _set(dt_bias=lambda api, kw: not_last_contiguous(kw["dt_bias"])), ValueError,
     r"^dt_bias must have its last dim contiguous"),
    # 16-byte alignment of q, k, v
    ("q-misaligned-stride", ALL, _set(q=lambda api, kw: misaligned_leading_stride(kw["q"])), ValueError,
     r"^q stride \d+ at dim 0 must be a multiple of 8 elements \(16 bytes\)"),
    ("k-misaligned-stride", ALL, _set(k=lambda api, kw: misaligned_leading_stride(kw["k"])), ValueError,
     r"^k stride \d+ at dim 0 must be a multiple of 8 elements"),
    ("v-misaligned-stride", ALL, _set(v=lambda api, kw: misaligned_leading_stride(kw["v"])), ValueError,
     r"^v stride \d+ at dim 0 must be a multiple of 8 elements"),
    ("q-misaligned-head-stride", ALL,
     _set(q=lambda api, kw: torch.zeros(B, tokens(api), H, K + 4, dtype=BF16)[..., :K]), ValueError,
     r"^q stride 68 at dim 2 must be a multiple of 8"),
    ("q-misaligned-pointer", ALL, _set(q=lambda api, kw: misaligned_pointer(kw["q"])), ValueError,
     r"^q data pointer must be 16-byte aligned"),
    ("k-misaligned-pointer", ALL, _set(k=lambda api, kw: misaligned_pointer(kw["k"])), ValueError,
     r"^k data pointer must be 16-byte aligned"),
    ("v-misaligned-pointer", ALL, _set(v=lambda api, kw: misaligned_pointer(kw["v"])), ValueError,
     r"^v data pointer must be 16-byte aligned"),
    # output
    ("output-list", ALL, _set(output=lambda api, kw: [0.0]), TypeError, r"^output must be a torch\.Tensor"),
    # any of bf16, fp16, fp32 whatever q's dtype (tests/test_validation_valid.py); nothing else
    ("output-int32", ALL, _set(output=lambda api, kw: torch.zeros(B, tokens(api), HV, V, dtype=torch.int32)),
     TypeError, r"^output must have dtype bfloat16 or float16 or float32, got int32"),
    ("output-fp64", ALL, _set(output=lambda api, kw: torch.zeros(B, tokens(api), HV, V, dtype=torch.float64)),
     TypeError, r"^output must have dtype bfloat16 or float16 or float32, got float64"),
    ("output-shape-HV", ALL, _set(output=lambda api, kw: torch.zeros(B, tokens(api), H, V, dtype=BF16)), ValueError,
     r"^output must have shape \[2, \d+, 4, 128\]"),
    ("output-shape-T", ALL, _set(output=lambda api, kw: torch.zeros(B, tokens(api) + 1, HV, V, dtype=BF16)),
     ValueError, r"^output must have shape"),
    ("output-last-dim-strided", ALL,
     _set(output=lambda api, kw: not_last_contiguous(torch.zeros(B, tokens(api), HV, V, dtype=BF16))),
     ValueError, r"^output must have its last dim contiguous"),
    # written tensors must not overlap themselves
    ("output-expanded", ALL,
     _set(output=lambda api, kw: torch.zeros(1, tokens(api), HV, V, dtype=BF16).expand(B, -1, -1, -1)), ValueError,
     r"^output must not overlap itself \(it is written.*\), got shape \[2, \d+, 4, 128\] strides \[0, "),
    ("output-heads-overlap", ALL,
     _set(output=lambda api, kw: strided_view((B, tokens(api), HV, V), (tokens(api) * HV * V, HV * V, V // 2, 1),
                                              BF16)),
     ValueError, rf"^output must not overlap itself .*strides \[\d+, \d+, {V // 2}, 1\]"),
    ("output-tokens-share-rows", ("mtp",),
     _set(output=lambda api, kw: strided_view((B, tokens(api), HV, V), (HV * V, HV * V, V, 1), BF16)),
     ValueError, r"^output must not overlap itself"),
    # scale
    ("scale-str", ALL, _set(scale=lambda api, kw: "0.1"), TypeError, r"^scale must be a float or None, got str"),
    ("scale-bool", ALL, _set(scale=lambda api, kw: True), TypeError, r"^scale must be a float or None, got bool"),
    ("scale-tensor", ALL, _set(scale=lambda api, kw: torch.tensor(0.1)), TypeError, r"^scale must be a float or None"),
    ("scale-inf", ALL, _set(scale=lambda api, kw: float("inf")), ValueError, r"^scale must be finite, got inf"),
    ("scale-neg-inf", ALL, _set(scale=lambda api, kw: float("-inf")), ValueError, r"^scale must be finite"),
    ("scale-nan", ALL, _set(scale=lambda api, kw: float("nan")), ValueError, r"^scale must be finite, got nan"),
    # softplus of the gates: beta divides, so it must be positive; any finite threshold (as torch)
    ("softplus_beta-str", ALL, _set(softplus_beta=lambda api, kw: "1"), TypeError,
     r"^softplus_beta must be a float, got str"),
    ("softplus_beta-bool", ALL, _set(softplus_beta=lambda api, kw: True), TypeError,
     r"^softplus_beta must be a float, got bool"),
    ("softplus_beta-0", ALL, _set(softplus_beta=lambda api, kw: 0.0), ValueError, r"^softplus_beta must be > 0, got 0\.0"),
    ("softplus_beta-int-0", ALL, _set(softplus_beta=lambda api, kw: 0), ValueError, r"^softplus_beta must be > 0, got 0$"),
    ("softplus_beta-negative", ALL, _set(softplus_beta=lambda api, kw: -1.0), ValueError,
     r"^softplus_beta must be > 0, got -1\.0"),
    ("softplus_beta-nan", ALL, _set(softplus_beta=lambda api, kw: float("nan")), ValueError,
     r"^softplus_beta must be finite, got nan"),
    ("softplus_beta-inf", ALL, _set(softplus_beta=lambda api, kw: float("inf")), ValueError,
     r"^softplus_beta must be finite, got inf"),
    ("softplus_threshold-nan", ALL, _set(softplus_threshold=lambda api, kw: float("nan")), ValueError,
     r"^softplus_threshold must be finite, got nan"),
    ("softplus_threshold-inf", ALL, _set(softplus_threshold=lambda api, kw: float("inf")), ValueError,
     r"^softplus_threshold must be finite, got inf"),
    ("softplus_threshold-none", ALL, _set(softplus_threshold=lambda api, kw: None), TypeError,
     r"^softplus_threshold must be a float, got NoneType"),
]


def _state(api, kw):
    return kw[STATE_ARG[api]]


def _replace_state(fn):
    def mutate(api, kw):
        kw[STATE_ARG[api]] = fn(api, kw)
    return mutate


def _state_rows(api):
    return B if api in ("pre", "dec") else P

STATE_CASES = [
    ("state-list", ALL, _replace_state(lambda api, kw: _state(api, kw).tolist()), TypeError,
     lambda api: rf"^{STATE_ARG[api]} must be a torch\.Tensor"),
    ("state-fp16", ALL, _replace_state(lambda api, kw: _state(api, kw).half()), TypeError,
     lambda api: rf"^{STATE_ARG[api]} must have dtype float32 or bfloat16, got float16"),
    ("state-fp64", ALL, _replace_state(lambda api, kw: _state(api, kw).double()), TypeError,
     lambda api: rf"^{STATE_ARG[api]} must have dtype float32 or bfloat16, got float64"),
    ("state-HV", ALL, _replace_state(lambda api, kw: torch.randn(_state_rows(api), HV + 1, *state_dims(api))),
     ValueError, lambda api: rf"^{STATE_ARG[api]} must have shape"),
    ("state-wrong-layout", ALL,
     _replace_state(lambda api, kw: torch.randn(_state_rows(api), HV, *reversed(state_dims(api)))),
     ValueError, lambda api: rf"^{STATE_ARG[api]} must have shape \[[\d*]+, 4, {state_dims(api)[0]}, {state_dims(api)[1]}\]"),
    ("state-3d", ALL, _replace_state(lambda api, kw: _state(api, kw)[0]), ValueError,
     lambda api: rf"^{STATE_ARG[api]} must have shape"),
    ("state-5d", ALL, _replace_state(lambda api, kw: _state(api, kw)[None]), ValueError,
     lambda api: rf"^{STATE_ARG[api]} must have shape"),
    ("state-dense-B", ("pre", "dec"), _replace_state(lambda api, kw: torch.randn(B + 1, HV, *state_dims(api))),
     ValueError, lambda api: r"^state must have shape \[2, 4, "),
    # only the last dim must be contiguous (padded row and head strides: tests/test_validation_valid.py)
    ("state-transposed-view", ALL,
     _replace_state(lambda api, kw: _state(api, kw).transpose(-1, -2).contiguous().transpose(-1, -2)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} must have its last dim contiguous \(expected stride 1 at dim 3\)"),
    ("state-row-stride-not-16-bytes", ALL, _replace_state(lambda api, kw: padded_state(api, F32, row_pad=1)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} stride {state_dims(api)[1] + 1} at dim 2 must be a multiple of 4 "
                             r"elements \(16 bytes\)"),
    ("state-bf16-row-stride-not-16-bytes", ALL,
     _replace_state(lambda api, kw: padded_state(api, BF16, row_pad=4)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} stride {state_dims(api)[1] + 4} at dim 2 must be a multiple of 8 "
                             r"elements \(16 bytes\)"),
    ("state-head-stride-not-16-bytes", ALL, _replace_state(lambda api, kw: padded_state(api, F32, head_pad=2)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} stride {K * V + 2} at dim 1 must be a multiple of 4 elements"),
    ("state-misaligned-slot-stride", ALL,
     _replace_state(lambda api, kw: make_state(_state_rows(api), HV, *state_dims(api), F32, pad=1)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} stride {HV * K * V + 1} at dim 0 must be a multiple of 4 elements"),
    ("state-bf16-misaligned-slot-stride", ALL,
     _replace_state(lambda api, kw: make_state(_state_rows(api), HV, *state_dims(api), BF16, pad=4)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} stride \d+ at dim 0 must be a multiple of 8 elements"),
    ("state-misaligned-pointer", ALL, _replace_state(lambda api, kw: misaligned_pointer(_state(api, kw))),
     ValueError, lambda api: rf"^{STATE_ARG[api]} data pointer must be 16-byte aligned"),
    # written, so no internal overlap (a padded slot stride is fine: test_strided_views_pass_structural_checks)
    ("state-expanded", ALL, _replace_state(lambda api, kw: _state(api, kw)[:1].expand(_state_rows(api), -1, -1, -1)),
     ValueError, lambda api: rf"^{STATE_ARG[api]} must not overlap itself .*strides \[0, {K * V}, "),
    ("state-slot-stride-too-small", ALL,
     _replace_state(lambda api, kw: strided_view((_state_rows(api), HV, *state_dims(api)),
                                                 (HV * K * V - 16, K * V, state_dims(api)[1], 1))),
     ValueError, lambda api: rf"^{STATE_ARG[api]} must not overlap itself .*strides \[{HV * K * V - 16}, "),
]


def _case_params(cases):
    params = []
    for cid, apis, mutate, exc, match in cases:
        for api in apis:
            params.append(pytest.param(api, mutate, exc, match, id=f"{api}-{cid}"))
    return params


@pytest.mark.parametrize("api,mutate,exc,match", _case_params(INPUT_CASES))
def test_input_errors(api, mutate, exc, match):
    kw = valid_kwargs(api)
    mutate(api, kw)
    expect_error(api, kw, exc, match)


@pytest.mark.parametrize("api,mutate,exc,match", _case_params(STATE_CASES))
def test_state_errors(api, mutate, exc, match):
    kw = valid_kwargs(api)
    mutate(api, kw)
    expect_error(api, kw, exc, match(api))


# ----------------------------------------------------------------------------- token limits


def _with_tokens(api, T, seed):
    kw = valid_kwargs(api)
    q, k, v, a, b, _, _ = make_inputs(B, T, H, HV, K, V, seed=seed)
    kw.update(q=q, k=k, v=v, a=a, b=b)
    return kw


def test_decode_rejects_two_tokens():
    expect_error("dec", _with_tokens("dec", 2, seed=5), ValueError,
                 r"^q\.shape\[1\] \(tokens per sequence T\) must be in \[1, 1\] here, got 2")


@pytest.mark.parametrize("api", ["pre", "pool", "mtp"])
def test_multi_token_apis_reject_17_tokens(api):
    expect_error(api, _with_tokens(api, 17, seed=6), ValueError,
                 r"^q\.shape\[1\] \(tokens per sequence T\) must be in \[1, 16\] here, got 17")


@pytest.mark.parametrize("api", ["pre", "pool"])
@pytest.mark.parametrize("T", [2, 16])
def test_pretranspose_takes_several_tokens(api, T):
    """T > 1 runs the MTP kernels: the same structure checks pass."""
    expect_only_device_error(api, _with_tokens(api, T, seed=5))


@pytest.mark.parametrize("T", [1, 16])
def test_mtp_token_bounds_are_valid(T):
    expect_only_device_error("mtp", _with_tokens("mtp", T, seed=7))


@pytest.mark.parametrize("api", ["pre", "mtp"])
def test_zero_value_heads_rejected(api):
    T = tokens(api)
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, 0, K, V, seed=8)
    kw = valid_kwargs(api)
    kw.update(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    kw[STATE_ARG[api]] = torch.zeros(_state_rows(api), 0, V, K)
    expect_error(api, kw, ValueError, r"^v\.shape\[2\] \(HV=0\) must be a positive multiple")


# ----------------------------------------------------------------------------- indices


@pytest.mark.parametrize("api", ["pool", "mtp"])
@pytest.mark.parametrize("name", ["initial_state_indices", "output_state_indices"])
class TestIndices:
    def _kw(self, api, name, idx):
        kw = valid_kwargs(api)
        kw[name] = idx
        return kw

    def test_not_a_tensor(self, api, name):
        expect_error(api, self._kw(api, name, [0, 1]), TypeError, rf"^{name} must be a torch\.Tensor, got list")

    def test_float_dtype(self, api, name):
        expect_error(api, self._kw(api, name, torch.tensor([0.0, 1.0])), TypeError,
                     rf"^{name} must have dtype int32 or int64, got float32")

    def test_int16_dtype(self, api, name):
        expect_error(api, self._kw(api, name, torch.tensor([0, 1], dtype=torch.int16)), TypeError,
                     rf"^{name} must have dtype int32 or int64, got int16")

    def test_2d(self, api, name):
        expect_error(api, self._kw(api, name, torch.tensor([[0], [1]], dtype=torch.int32)), ValueError,
                     rf"^{name} must have shape \[2\], got \[2, 1\]")

    def test_too_long(self, api, name):
        expect_error(api, self._kw(api, name, torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError,
                     rf"^{name} must have shape \[2\], got \[3\]")

    def test_too_short(self, api, name):
        expect_error(api, self._kw(api, name, torch.tensor([0], dtype=torch.int32)), ValueError,
                     rf"^{name} must have shape \[2\]")

    def test_not_contiguous(self, api, name):
        idx = torch.tensor([0, 9, 1, 9], dtype=torch.int32)[::2]
        expect_error(api, self._kw(api, name, idx), ValueError, rf"^{name} must have its last dim contiguous")


@pytest.mark.parametrize("api", ["pool", "mtp"])
def test_output_indices_dtype_must_match(api):
    kw = valid_kwargs(api)
    kw["output_state_indices"] = torch.tensor([1, 2], dtype=torch.int64)
    expect_error(api, kw, TypeError,
                 r"^output_state_indices must have the dtype of initial_state_indices \(int32\), got int64$")


def test_mtp_indices_required():
    kw = valid_kwargs("mtp")
    kw["initial_state_indices"] = None
    expect_error("mtp", kw, TypeError, r"^initial_state_indices must be a torch\.Tensor, got NoneType")


# ----------------------------------------------------------------------------- pool / state combinations


def test_pool_without_indices():
    kw = valid_kwargs("pool")
    del kw["initial_state_indices"]
    expect_error("pool", kw, ValueError, r"^initial_state \(a state pool\) needs initial_state_indices")


@pytest.mark.parametrize("name", ["initial_state_indices", "output_state_indices"])
def test_indices_without_pool(name):
    kw = valid_kwargs("pre")
    kw[name] = torch.tensor([0, 1], dtype=torch.int32)
    expect_error("pre", kw, ValueError, r"^initial_state_indices / output_state_indices need the pool initial_state")


@pytest.mark.parametrize("state", [
    pytest.param(lambda: make_state(P, HV, V, K, F32, seed=9), id="another-pool"),
    pytest.param(lambda: torch.randn(B, HV, K, V), id="wrong-layout"),
    pytest.param(lambda: [0.0], id="not-a-tensor"),
])
def test_state_is_ignored_when_a_pool_is_given(state):
    """With the pool initial_state given, `state` is not used (FlashInfer's rule), so not checked
    either (tests/test_validation_valid.py: the pool is what the kernel gets)."""
    kw = valid_kwargs("pool")
    kw["state"] = state()
    expect_only_device_error("pool", kw)


def test_no_state_at_all():
    kw = valid_kwargs("pre")
    kw["state"] = None
    expect_error("pre", kw, ValueError, r"^state \[B, HV, V, K\] is required")


def test_state_is_the_pool_is_fine():
    kw = valid_kwargs("pool")
    kw["state"] = kw["initial_state"]
    expect_only_device_error("pool", kw)


# ----------------------------------------------------------------------------- MTP extras


@pytest.mark.parametrize("ibuf,exc,match", [
    pytest.param([0.0], TypeError, r"^intermediate_states_buffer must be a torch\.Tensor", id="list"),
    pytest.param(make_intermediate(dtype=BF16), TypeError,
                 r"^intermediate_states_buffer must have dtype float32, got bfloat16", id="dtype-differs-from-pool"),
    pytest.param(make_intermediate(n=B - 1), ValueError,
                 r"^intermediate_states_buffer must have shape \[>= B=2, >= T=3, \.\.\.\], got \[1, 3, 4, 128, 64\]",
                 id="fewer-rows-than-B"),
    pytest.param(make_intermediate(hv=HV // 2), ValueError, r"^intermediate_states_buffer must have shape", id="HV"),
    pytest.param(make_intermediate(rows=K, cols=V), ValueError, r"^intermediate_states_buffer must have shape",
                 id="layout"),
    pytest.param(make_intermediate()[:, 0], ValueError, r"^intermediate_states_buffer must have shape", id="4d"),
    pytest.param(make_intermediate(T=T_MTP - 1), ValueError,
                 r"^intermediate_states_buffer must have shape \[>= B=2, >= T=3, \.\.\.\], got \[2, 2, 4, 128, 64\]",
                 id="too-few-slots"),
    pytest.param(make_intermediate().transpose(-1, -2).contiguous().transpose(-1, -2), ValueError,
                 r"^intermediate_states_buffer must have its last 3 dims contiguous", id="transposed"),
    # unlike the state, the buffer needs its last 3 dims packed
    pytest.param(torch.full((B, T_MTP, HV, V, K + 4), 3.0)[..., :K], ValueError,
                 r"^intermediate_states_buffer must have its last 3 dims contiguous \(expected stride 64 at dim 3\)",
                 id="row-padded"),
    pytest.param(torch.full((B, T_MTP, HV, V * K + 4), 3.0)[..., : V * K].unflatten(-1, (V, K)), ValueError,
                 rf"^intermediate_states_buffer must have its last 3 dims contiguous \(expected stride {V * K} at dim 2\)",
                 id="head-padded"),
    pytest.param(make_state(B, T_MTP * HV, V, K, F32, pad=2).unflatten(1, (T_MTP, HV)), ValueError,
                 r"^intermediate_states_buffer stride \d+ at dim 0 must be a multiple of 4", id="misaligned-stride"),
    pytest.param(misaligned_pointer(make_intermediate()), ValueError,
                 r"^intermediate_states_buffer data pointer must be 16-byte aligned", id="misaligned-pointer"),
    pytest.param(make_intermediate(T=1).expand(-1, T_MTP, -1, -1, -1), ValueError,
                 r"^intermediate_states_buffer must not overlap itself .*strides \[\d+, 0, ", id="expanded-tokens"),
    pytest.param(strided_view((B, T_MTP, HV, V, K), (T_MTP * HV * V * K, HV * V * K // 2, V * K, K, 1)), ValueError,
                 r"^intermediate_states_buffer must not overlap itself", id="token-stride-too-small"),
])
def test_mtp_intermediate_errors(ibuf, exc, match):
    kw = valid_kwargs("mtp")
    kw["intermediate_states_buffer"] = ibuf
    expect_error("mtp", kw, exc, match)


@pytest.mark.parametrize("acc,exc,match", [
    pytest.param([1, 2], TypeError, r"^accepted_tokens must be a torch\.Tensor", id="list"),
    pytest.param(torch.tensor([1, 2], dtype=torch.int64), TypeError,
                 r"^accepted_tokens must have dtype int32, got int64", id="int64"),
    pytest.param(torch.tensor([1.0, 2.0]), TypeError, r"^accepted_tokens must have dtype int32", id="float"),
    pytest.param(torch.tensor([1, 2, 3], dtype=torch.int32), ValueError,
                 r"^accepted_tokens must have shape \[2\], got \[3\]", id="length"),
    pytest.param(torch.tensor([[1, 2]], dtype=torch.int32), ValueError, r"^accepted_tokens must have shape \[2\]",
                 id="2d"),
    pytest.param(torch.tensor([1, 0, 2, 0], dtype=torch.int32)[::2], ValueError,
                 r"^accepted_tokens must have its last dim contiguous", id="strided"),
])
def test_mtp_accepted_errors(acc, exc, match):
    kw = valid_kwargs("mtp")
    kw["accepted_tokens"] = acc
    expect_error("mtp", kw, exc, match)


def test_mtp_accepted_with_disable_state_update():
    kw = valid_kwargs("mtp")
    kw["accepted_tokens"] = torch.tensor([1, 2], dtype=torch.int32)
    kw["disable_state_update"] = True
    expect_error("mtp", kw, ValueError, r"^accepted_tokens .*disable_state_update=True")


def test_mtp_intermediate_dtype_follows_pool():
    """A bf16 pool wants a bf16 intermediate buffer."""
    kw = valid_kwargs("mtp", state_dtype=BF16)
    kw["intermediate_states_buffer"] = make_intermediate(dtype=F32)
    expect_error("mtp", kw, TypeError, r"^intermediate_states_buffer must have dtype bfloat16, got float32")


def test_error_messages_name_expected_and_got():
    kw = valid_kwargs("dec")
    kw["state"] = torch.randn(B, HV, V, K)
    with pytest.raises(ValueError) as e:
        FNS["dec"](**kw)
    msg = str(e.value)
    assert re.search(r"\[2, 4, 64, 128\]", msg) and re.search(r"got \[2, 4, 128, 64\]", msg), msg


@pytest.mark.parametrize("api", ["pool", "mtp"])
def test_empty_pool(api):
    kw = valid_kwargs(api)
    kw["initial_state"] = kw["initial_state"][:0]
    expect_error(api, kw, ValueError, r"^initial_state has no slots")
