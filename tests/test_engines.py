"""CPU tests of flashgdn.engines: the signatures against the engines' own ops, the validation of
each entry point (every bad argument raises an error naming it, before flashgdn's device check,
and writes nothing; valid CPU arguments reach exactly that device check), the views handed to
flashgdn (no copies), the memo of checked call signatures, and examples/engine_decode_loop.py on
the CPU. SGLang's decode has its own file (test_engines_sglang.py).
"""
from __future__ import annotations

import inspect

import pytest
import torch

from flashgdn import api, engines, fastpath
from flashgdn import validation as val

from flashgdn.device import DeviceFacts
from flashgdn.spec import KernelArgs
from helpers import BF16, F32, make_state, run_example, stub_kernel_lookups, supported_gpu

EMPTY = inspect.Parameter.empty
F16 = torch.float16

# ----------------------------------------------------------------------------- upstream signatures
# (name, default) of every parameter, all positional-or-keyword, in order.

# vllm-project/vllm, vllm/third_party/flash_linear_attention/ops/fused_recurrent.py at commit
# 5c7cb312eddf585d3c47864c7485cbb6c9b4e262; sgl-project/sglang's
# python/sglang/kernels/ops/attention/fla/fused_recurrent.py defines the same (its kernel is
# adapted from vLLM's).
PACKED_DECODE = [
    ("mixed_qkv", EMPTY), ("a", EMPTY), ("b", EMPTY), ("A_log", EMPTY), ("dt_bias", EMPTY), ("scale", EMPTY),
    ("initial_state", EMPTY), ("out", EMPTY), ("ssm_state_indices", EMPTY), ("use_qk_l2norm_in_kernel", False),
]

# vllm-project/vllm, vllm/third_party/flash_linear_attention/ops/fused_recurrent.py at commit
# 5c7cb312eddf585d3c47864c7485cbb6c9b4e262.
RECURRENT = [
    ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("g", EMPTY), ("beta", None), ("scale", None),
    ("initial_state", None), ("inplace_final_state", True), ("cu_seqlens", None), ("ssm_state_indices", None),
    ("num_accepted_tokens", None), ("use_qk_l2norm_in_kernel", False),
]

# sgl-project/sglang, python/sglang/kernels/ops/attention/fla/fused_sigmoid_gating_recurrent.py
# (the newest revision found: the one with lower_bound, the ReplaySSM ring arguments and
# num_warps; earlier revisions end after retrieve_parent_token or replayssm_beta, and every call
# written for them binds the same way here).
SIGMOID = [
    ("A_log", EMPTY), ("a", EMPTY), ("dt_bias", EMPTY), ("softplus_beta", EMPTY), ("softplus_threshold", EMPTY),
    ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("b", EMPTY), ("initial_state_source", EMPTY),
    ("initial_state_indices", EMPTY), ("scale", None), ("use_qk_l2norm_in_kernel", False), ("cu_seqlens", None),
    ("is_kda", False), ("lower_bound", None), ("disable_state_update", False), ("intermediate_states_buffer", None),
    ("intermediate_state_indices", None), ("cache_steps", None), ("retrieve_parent_token", None),
    ("cache_ring", False), ("replayssm_rawv", None), ("replayssm_rawk", None), ("replayssm_g", None),
    ("replayssm_beta", None), ("num_warps", 1),
]

# vllm-project/vllm, vllm/model_executor/layers/fla/ops/fused_sigmoid_gating.py at commit
# 95a3d5a40244d55ae2761d61e6c744dccac7ba3a (its `beta`/`threshold` shape the softplus).
SIGMOID_VLLM = [
    ("A_log", EMPTY), ("a", EMPTY), ("b", EMPTY), ("dt_bias", EMPTY), ("q", EMPTY), ("k", EMPTY), ("v", EMPTY),
    ("beta", 1.0), ("threshold", 20.0), ("scale", None), ("initial_state", None), ("inplace_final_state", True),
    ("cu_seqlens", None), ("ssm_state_indices", None), ("num_accepted_tokens", None),
    ("use_qk_l2norm_in_kernel", False), ("is_kda", False),
]

PACKED_FNS = {
    "sglang": engines.fused_recurrent_gated_delta_rule_packed_decode,
    "vllm": engines.fused_recurrent_gated_delta_rule_packed_decode_vllm,
}


@pytest.mark.parametrize("fn,expected", [
    (engines.fused_recurrent_gated_delta_rule_packed_decode, PACKED_DECODE),
    (engines.fused_recurrent_gated_delta_rule_packed_decode_vllm, PACKED_DECODE),
    (engines.fused_recurrent_gated_delta_rule, RECURRENT),
    (engines.fused_sigmoid_gating_delta_rule_update, SIGMOID),
    (engines.fused_sigmoid_gating_delta_rule_update_vllm, SIGMOID_VLLM),
], ids=["packed_decode", "packed_decode_vllm", "fused_recurrent", "fused_sigmoid_gating", "fused_sigmoid_gating_vllm"])
def test_signature_matches_upstream(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.default) for p in params] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_module_exports():
    assert sorted(engines.__all__) == sorted([
        "fused_recurrent_gated_delta_rule_packed_decode", "fused_recurrent_gated_delta_rule_packed_decode_vllm",
        "fused_sigmoid_gating_delta_rule_update", "fused_recurrent_gated_delta_rule",
        "fused_sigmoid_gating_delta_rule_update_vllm",
    ])
    import flashgdn.engines as by_path
    assert by_path is engines


# ----------------------------------------------------------------------------- arguments

N, H, HV, K, V = 4, 2, 4, 64, 128  # K != V: a state in the wrong layout has the wrong shape
P = 7
WIDTH = 2 * H * K + HV * V


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def packed_kwargs(*, seed=0, sdt=F32, io=BF16, n=N, h=H, hv=HV, k=K, v=V, row_pad=24, slot_pad=16, idx=None):
    """Valid CPU arguments of the packed decode, in the engines' layout: mixed_qkv a view of a wider
    projection row, a and b views of one [n, 2*hv + 8] gate tensor, a pool with a padded slot stride."""
    gen = _gen(seed)
    width = 2 * h * k + hv * v
    mixed = torch.randn(n, width + row_pad, generator=gen).to(io)[:, :width]
    ab = torch.randn(n, 2 * hv + 8, generator=gen).to(io)
    return dict(
        mixed_qkv=mixed, a=ab[:, hv:2 * hv], b=ab[:, :hv],
        A_log=torch.log(torch.rand(hv, generator=gen) * 15 + 1), dt_bias=torch.randn(hv, generator=gen),
        scale=k ** -0.5, initial_state=make_state(P, hv, v, k, sdt, pad=slot_pad, seed=seed + 1),
        out=torch.randn(n, 1, hv, v, generator=gen).to(io),
        ssm_state_indices=torch.tensor([3, 0, -1, 5], dtype=torch.int32)[:n] if idx is None else idx,
        use_qk_l2norm_in_kernel=True,
    )


def sigmoid_kwargs(*, seed=0, varlen=True, sdt=F32, gates_3d=False, n=N, tokens=1):
    """Valid CPU arguments of SGLang's decode (`tokens` 1) or of the tokens of its target verify
    without the verify's own arguments: q, k, v views of one packed projection row per token, in the
    varlen layout [1, n * tokens, ...] with cu_seqlens = arange(0, n * tokens + 1, tokens), or
    [n, tokens, ...] without."""
    gen = _gen(seed)
    mixed = torch.randn(n * tokens, WIDTH + 24, generator=gen).to(BF16)[:, :WIDTH]
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unflatten(0, (n, tokens)))
    ab = torch.randn(n * tokens, 2 * HV + 8, generator=gen).to(BF16)
    a, b = ab[:, HV:2 * HV], ab[:, :HV]
    if gates_3d:
        a, b = lead(a), lead(b)
    return dict(
        A_log=torch.log(torch.rand(HV, generator=gen) * 15 + 1), a=a, dt_bias=torch.randn(HV, generator=gen),
        softplus_beta=1.0, softplus_threshold=20.0,
        q=lead(mixed[:, :H * K].unflatten(1, (H, K))), k=lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K))),
        v=lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V))), b=b,
        initial_state_source=make_state(P, HV, V, K, sdt, pad=16, seed=seed + 1),
        initial_state_indices=torch.tensor([3, 0, -1, 5], dtype=torch.int32)[:n],
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=torch.arange(0, n * tokens + 1, tokens, dtype=torch.int32) if varlen else None,
    )


def expect_error(fn, kw, exc, match):
    """fn(**kw) raises `exc` matching `match` and leaves every tensor argument bit for bit as it was."""
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        fn(**kw)
    for n, t in before.items():
        assert kw[n].dtype == t.dtype and kw[n].shape == t.shape, n
        assert torch.equal(kw[n], t), f"{n} changed by a call that failed"


def expect_only_device_error(fn, kw):
    """Valid CPU arguments pass every check and stop at flashgdn's device check, which runs last."""
    expect_error(fn, kw, ValueError, r"^q must be a CUDA tensor, got device cpu")


# ----------------------------------------------------------------------------- packed decode: valid


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_packed_valid_inputs_reach_the_device_check(variant, sdt):
    kw = packed_kwargs(sdt=sdt)
    assert not kw["mixed_qkv"].is_contiguous() and not kw["a"].is_contiguous()
    assert not kw["initial_state"].is_contiguous()
    expect_only_device_error(PACKED_FNS[variant], kw)


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("dims", [(2, 4, 64, 128), (1, 2, 128, 64), (4, 8, 128, 128), (2, 2, 256, 256)],
                         ids=lambda d: "H{}-HV{}-K{}-V{}".format(*d))
def test_packed_derives_heads_from_the_width(variant, dims):
    """H comes from the width and the state's HV, V, K, K and V either way round."""
    h, hv, k, v = dims
    expect_only_device_error(PACKED_FNS[variant], packed_kwargs(h=h, hv=hv, k=k, v=v))


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("change", [
    "int64-indices", "strided-indices", "one-row", "no-rows", "fp16", "fp32-gates", "contiguous", "fp32-out",
    "no-scale", "no-l2norm", "bf16-dt-bias",
])
def test_packed_valid_variants(variant, change):
    kw = packed_kwargs()
    if change == "int64-indices":
        kw["ssm_state_indices"] = kw["ssm_state_indices"].long()
    elif change == "strided-indices":  # a column of a block table, as vLLM's eager path passes it
        kw["ssm_state_indices"] = torch.stack([kw["ssm_state_indices"], kw["ssm_state_indices"] + 1], 1)[:, 0]
        assert kw["ssm_state_indices"].stride(0) == 2
    elif change in ("one-row", "no-rows"):
        n = 1 if change == "one-row" else 0
        kw = packed_kwargs(n=n, idx=torch.tensor([2], dtype=torch.int32)[:n])
    elif change == "fp16":
        kw = packed_kwargs(io=F16)
    elif change == "fp32-gates":
        kw["a"], kw["b"] = kw["a"].float(), kw["b"].float()
    elif change == "contiguous":
        kw = packed_kwargs(row_pad=0, slot_pad=0)
        kw["a"], kw["b"] = kw["a"].contiguous(), kw["b"].contiguous()
    elif change == "fp32-out":
        kw["out"] = kw["out"].float()
    elif change == "no-scale":
        kw["scale"] = None
    elif change == "no-l2norm":
        kw["use_qk_l2norm_in_kernel"] = False
    elif change == "bf16-dt-bias":
        kw["dt_bias"] = kw["dt_bias"].bfloat16()
    expect_only_device_error(PACKED_FNS[variant], kw)


# ----------------------------------------------------------------------------- packed decode: invalid


def _strided_last_dim(t):
    """t's values with the last dim at stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _misaligned(t):
    """t's values at an address 2 bytes past a 16-byte boundary (same shape and strides)."""
    flat = torch.zeros(t.numel() + 8, dtype=t.dtype)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _kmajor(pool):
    return pool.transpose(-1, -2).contiguous()


PACKED_BAD = {
    # (change, exception, message)
    "mixed-not-tensor": (lambda kw: kw.update(mixed_qkv=kw["mixed_qkv"].tolist()), TypeError,
                         r"^mixed_qkv must be a torch.Tensor, got list"),
    "mixed-3d": (lambda kw: kw.update(mixed_qkv=kw["mixed_qkv"].unsqueeze(1)), ValueError,
                 r"^mixed_qkv must have shape \[\*, \*\]"),
    "mixed-fp32": (lambda kw: kw.update(mixed_qkv=kw["mixed_qkv"].float()), TypeError,
                   r"^mixed_qkv must have dtype bfloat16 or float16, got float32"),
    "width-no-split": (lambda kw: kw.update(mixed_qkv=torch.zeros(N, WIDTH + 16, dtype=BF16)), ValueError,
                       r"^mixed_qkv must have shape \[N, 2\*H\*K \+ HV\*V\] .* HV=4, V=128, K=64 .* width 784"),
    "width-heads": (lambda kw: kw.update(mixed_qkv=torch.zeros(N, 2 * 3 * K + HV * V, dtype=BF16)), ValueError,
                    r"^mixed_qkv must have shape \[N, 2\*H\*K \+ HV\*V\].*width 896 does not split"),
    "width-v-only": (lambda kw: kw.update(mixed_qkv=torch.zeros(N, HV * V, dtype=BF16)), ValueError,
                     r"^mixed_qkv must have shape \[N, 2\*H\*K \+ HV\*V\]"),
    "mixed-last-dim": (lambda kw: kw.update(mixed_qkv=_strided_last_dim(kw["mixed_qkv"])), ValueError,
                       r"^mixed_qkv must have its last dim contiguous"),
    "mixed-row-stride": (lambda kw: kw.update(mixed_qkv=torch.zeros(N, WIDTH + 3, dtype=BF16)[:, :WIDTH]),
                         ValueError, r"^mixed_qkv stride 771 at dim 0 must be a multiple of 8 elements"),
    "mixed-address": (lambda kw: kw.update(mixed_qkv=_misaligned(kw["mixed_qkv"].contiguous())), ValueError,
                      r"^mixed_qkv data pointer must be 16-byte aligned"),
    "state-not-tensor": (lambda kw: kw.update(initial_state=None), TypeError,
                         r"^initial_state must be a torch.Tensor, got NoneType"),
    "state-3d": (lambda kw: kw.update(initial_state=kw["initial_state"][0]), ValueError,
                 r"^initial_state must have shape \[\*, \*, \*, \*\]"),
    "state-fp16": (lambda kw: kw.update(initial_state=kw["initial_state"].half()), TypeError,
                   r"^initial_state must have dtype float32 or bfloat16, got float16"),
    "state-head-dim": (lambda kw: kw.update(initial_state=torch.zeros(P, HV, V, 96)), ValueError,
                       r"^initial_state.shape\[3\] \(K\) must be one of \(64, 128, 256\), got 96"),
    "state-v-dim": (lambda kw: kw.update(initial_state=torch.zeros(P, HV, 32, K)), ValueError,
                    r"^initial_state.shape\[2\] \(V\) must be one of"),
    "state-k-major": (lambda kw: kw.update(initial_state=_kmajor(kw["initial_state"])), ValueError,
                      r"^out must have shape \[4, 1, 4, 64\]"),
    "state-no-slots": (lambda kw: kw.update(initial_state=torch.zeros(0, HV, V, K)), ValueError,
                       r"^initial_state has no slots"),
    "state-last-dim": (lambda kw: kw.update(initial_state=_strided_last_dim(kw["initial_state"])), ValueError,
                       r"^initial_state must have its last dim contiguous"),
    "state-overlap": (lambda kw: kw.update(initial_state=kw["initial_state"][:1].expand(P, -1, -1, -1)), ValueError,
                      r"^initial_state must not overlap itself"),
    "a-shape": (lambda kw: kw.update(a=torch.zeros(N, HV + 1, dtype=BF16)), ValueError,
                r"^a must have shape \[4, 4\], got \[4, 5\]"),
    "a-3d": (lambda kw: kw.update(a=kw["a"].unsqueeze(1)), ValueError, r"^a must have shape \[4, 4\]"),
    "a-rows": (lambda kw: kw.update(a=kw["a"][:N - 1]), ValueError, r"^a must have shape \[4, 4\], got \[3, 4\]"),
    "a-dtype": (lambda kw: kw.update(a=kw["a"].half()), TypeError, r"^a must have dtype bfloat16 or float32"),
    "b-dtype": (lambda kw: kw.update(b=kw["b"].float()), TypeError, r"^b must have dtype bfloat16, got float32"),
    "b-shape": (lambda kw: kw.update(b=kw["b"][:, :HV - 1]), ValueError, r"^b must have shape \[4, 4\]"),
    "a-last-dim": (lambda kw: kw.update(a=_strided_last_dim(kw["a"])), ValueError,
                   r"^a must have its last dim contiguous"),
    "out-shape": (lambda kw: kw.update(out=kw["out"][:, 0]), ValueError, r"^out must have shape \[4, 1, 4, 128\]"),
    "out-rows": (lambda kw: kw.update(out=kw["out"][:N - 1]), ValueError, r"^out must have shape \[4, 1, 4, 128\]"),
    "out-dtype": (lambda kw: kw.update(out=kw["out"].to(torch.int32)), TypeError,
                  r"^out must have dtype bfloat16 or float16 or float32, got int32"),
    "out-last-dim": (lambda kw: kw.update(out=_strided_last_dim(kw["out"])), ValueError,
                     r"^out must have its last dim contiguous"),
    "out-overlap": (lambda kw: kw.update(out=kw["out"][:1].expand(N, -1, -1, -1)), ValueError,
                    r"^out must not overlap itself"),
    "indices-dtype": (lambda kw: kw.update(ssm_state_indices=kw["ssm_state_indices"].float()), TypeError,
                      r"^ssm_state_indices must have dtype int32 or int64, got float32"),
    "indices-shape": (lambda kw: kw.update(ssm_state_indices=torch.zeros(N + 1, dtype=torch.int32)), ValueError,
                      r"^ssm_state_indices must have shape \[4\], got \[5\]"),
    "indices-2d": (lambda kw: kw.update(ssm_state_indices=torch.zeros(N, 1, dtype=torch.int32)), ValueError,
                   r"^ssm_state_indices must have shape \[4\]"),
    # flashgdn's own checks, whose argument names are the engine's too
    "A_log-dtype": (lambda kw: kw.update(A_log=kw["A_log"].bfloat16()), TypeError, r"^A_log must have dtype float32"),
    "dt_bias-shape": (lambda kw: kw.update(dt_bias=kw["dt_bias"][:HV - 1]), ValueError,
                      r"^dt_bias must have shape \[4\]"),
    "scale-inf": (lambda kw: kw.update(scale=float("inf")), ValueError, r"^scale must be finite"),
    "scale-str": (lambda kw: kw.update(scale="0.1"), TypeError, r"^scale must be a float or None"),
}


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("case", list(PACKED_BAD))
def test_packed_bad_argument(variant, case):
    change, exc, match = PACKED_BAD[case]
    kw = packed_kwargs()
    change(kw)
    expect_error(PACKED_FNS[variant], kw, exc, match)


# ----------------------------------------------------------------------------- packed decode: what the kernel gets


def _capture_launch(monkeypatch):
    """Run flashgdn on the CPU up to its kernel (stub_kernel_lookups); the returned list collects
    (spec, KernelArgs) of every launch, as the compiled kernel would get them."""
    launched = []
    specs = stub_kernel_lookups(monkeypatch, DeviceFacts("sm_90a", 132, "sm90-hbm3e"))
    get = api.kernel_cache.get

    def lookup(spec):
        stub = get(spec)

        def run(*args):
            stub(*args)
            launched.append((spec, KernelArgs(*args)))

        return run

    monkeypatch.setattr(api.kernel_cache, "get", lookup)
    assert specs == []
    return launched


def _launched_packed(monkeypatch, variant):
    """A recorder of the packed decode's one launch: (spec, KernelArgs), checked to be the packed-rows
    variant (KernelSpec.row_form "packed", T = 1) with the slot rule of `variant`."""
    launched = _capture_launch(monkeypatch)

    def got():
        (spec, args), = launched
        assert spec.row_form == "packed" and spec.T == 1 and spec.layout == "klast" and spec.vllm_slots == (variant == "vllm")
        return spec, args

    return got


def _slots(variant, args):
    """The slot indices a packed launch got: vLLM's as its token slots, SGLang's as state indices."""
    if variant == "vllm":
        assert args.state_indices is None
        return args.token_state_indices
    assert args.token_state_indices is None
    return args.state_indices


@pytest.mark.parametrize("variant", list(PACKED_FNS))
def test_packed_hands_the_engine_tensors_to_the_kernel(monkeypatch, variant):
    """The packed rows go to the kernel as they are (it views q | k | v of each row itself): no
    view, no copy, no conversion of the slot indices."""
    captured = _launched_packed(monkeypatch, variant)
    kw = packed_kwargs()
    out, st = PACKED_FNS[variant](**kw)
    assert out is kw["out"] and st is kw["initial_state"]
    spec, args = captured()
    assert args.q is kw["mixed_qkv"] and args.k is None and args.v is None
    for name in ("a", "b", "A_log", "dt_bias"):
        assert getattr(args, name) is kw[name], name
    assert args.state is kw["initial_state"] and args.output is kw["out"]
    assert _slots(variant, args) is kw["ssm_state_indices"]
    assert (spec.H, spec.HV, spec.K, spec.V) == (H, HV, K, V) and spec.io_dtype == "bfloat16"
    assert spec.scale == kw["scale"] and spec.use_l2norm is True


@pytest.mark.parametrize("variant", list(PACKED_FNS))
def test_packed_strided_indices_arrive_as_they_are(monkeypatch, variant):
    """A column of a block table: the packed-rows kernel declares the slot vector's stride dynamic,
    so neither decode copies it."""
    captured = _launched_packed(monkeypatch, variant)
    column = torch.tensor([[3, 9], [0, 9], [-1, 9], [5, 9]], dtype=torch.int64)[:, 0]
    PACKED_FNS[variant](**packed_kwargs(idx=column))
    spec, args = captured()
    assert _slots(variant, args) is column and spec.index_dtype == "int64"


def test_vllm_packed_check_indices_refuses_a_slot_written_twice(monkeypatch):
    """FLASHGDN_CHECK_INDICES=1: vLLM's packed decode refuses two running rows on one slot; its null
    block 0 (padding) may repeat. Nothing is launched on a refusal."""
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    launched = _capture_launch(monkeypatch)
    fn = PACKED_FNS["vllm"]
    fn(**packed_kwargs(idx=torch.tensor([3, 0, 0, 5], dtype=torch.int32)))
    assert len(launched) == 1
    with pytest.raises(ValueError, match=r"^ssm_state_indices must not repeat a written slot .* slot 3 in 2 rows"):
        fn(**packed_kwargs(idx=torch.tensor([3, 0, 3, 5], dtype=torch.int32)))
    assert len(launched) == 1


@pytest.mark.parametrize("variant", list(PACKED_FNS))
def test_packed_check_indices_with_no_rows(monkeypatch, variant):
    """FLASHGDN_CHECK_INDICES=1 and an empty batch: the checks pass, nothing is launched."""
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    launched = _capture_launch(monkeypatch)
    kw = packed_kwargs(n=0, idx=torch.zeros(0, dtype=torch.int32))
    out, _ = PACKED_FNS[variant](**kw)
    assert out is kw["out"] and launched == []


def _shares_storage(view, base):
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _size_one_strides_packed(t):
    """Every size-1 dim of t has the packed stride of the dims inside it."""
    inner = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if size == 1 and stride != inner:
            return False
        inner *= size
    return True


def test_packed_one_row_with_an_odd_row_stride(monkeypatch):
    """One row: mixed_qkv's row stride is never stepped, so any is valid (the compiled function
    checks no stride of a size-1 dim); the row and the one slot index go over as they are."""
    column = torch.tensor([[2, 9]], dtype=torch.int32)[:, 0]  # a block table's column: stride 2
    kw = packed_kwargs(n=1, row_pad=3, idx=column)
    assert kw["mixed_qkv"].stride(0) % 8
    for variant, fn in PACKED_FNS.items():
        with monkeypatch.context() as m:  # its stubs (and the fast path they fill) end with the block
            m.setattr(fastpath, "FAST", {})
            captured = _launched_packed(m, variant)
            fn(**kw)
            _, args = captured()
        assert args.q is kw["mixed_qkv"] and _slots(variant, args) is column
    for fn in PACKED_FNS.values():
        expect_only_device_error(fn, kw)


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
def test_sigmoid_one_token_views_have_packed_size_one_strides(monkeypatch, varlen):
    """One sequence: SGLang's own layout (varlen, 2-D gates) goes to the kernel as it is (it checks no
    stride of a size-1 dim); the batched layout's row views carry packed strides in their size-1 dims."""
    launched = _capture_launch(monkeypatch)
    kw = sigmoid_kwargs(varlen=varlen, n=1)
    mixed = torch.randn(1, WIDTH + 3).to(BF16)[:, :WIDTH]  # an odd row stride: never stepped
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unsqueeze(1))
    kw.update(q=lead(mixed[:, :H * K].unflatten(1, (H, K))), k=lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K))),
              v=lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V))))
    kw["initial_state_indices"] = torch.tensor([[4, 9]], dtype=torch.int32)[:, 0]
    engines.fused_sigmoid_gating_delta_rule_update(**kw)
    (spec, args), = launched
    assert spec.row_form == ("flat" if varlen else "batch")
    if varlen:
        assert all(getattr(args, n) is kw[n] for n in ("q", "k", "v", "a", "b"))
        assert args.state_indices is kw["initial_state_indices"]
    else:
        for name in ("q", "k", "v", "a", "b", "output", "state_indices"):
            assert _size_one_strides_packed(getattr(args, name)), (name, getattr(args, name).stride())
        assert args.state_indices.data_ptr() == kw["initial_state_indices"].data_ptr()
    monkeypatch.undo()
    expect_only_device_error(engines.fused_sigmoid_gating_delta_rule_update, kw)


def test_packed_positional_call(monkeypatch):
    """The engines call it with keywords, FLA-style code positionally: both bind the same."""
    launched = _capture_launch(monkeypatch)
    kw = packed_kwargs()
    engines.fused_recurrent_gated_delta_rule_packed_decode(*kw.values())
    engines.fused_recurrent_gated_delta_rule_packed_decode(**kw)
    assert len(launched) == 2
    assert all(x is y for x, y in zip(launched[0][1], launched[1][1]))


# ----------------------------------------------------------------------------- memo of checked signatures


def test_checks_run_once_per_call_signature(monkeypatch):
    _capture_launch(monkeypatch)
    monkeypatch.setattr(fastpath, "ENABLED", False)  # every call takes the full way
    monkeypatch.setattr(val, "_CHECKED", {})
    runs = []
    check = engines._check_packed
    monkeypatch.setattr(engines, "_check_packed", lambda *args: runs.append(1) or check(*args))
    kw = packed_kwargs()
    fn = engines.fused_recurrent_gated_delta_rule_packed_decode
    fn(**kw)
    fn(**packed_kwargs(seed=5))  # new values, same signature
    assert len(runs) == 1
    fn(**packed_kwargs(n=3, idx=torch.tensor([1, 2, 3], dtype=torch.int32)))  # new shapes
    assert len(runs) == 2
    bad = packed_kwargs()
    bad["out"] = bad["out"][:, 0]
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="^out must have shape"):
            fn(**bad)
    assert len(runs) == 4


# ----------------------------------------------------------------------------- the example

def test_engine_decode_loop_example_runs():
    proc = run_example("engine_decode_loop.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not supported_gpu():
        assert "No supported GPU" in proc.stdout, proc.stdout
        assert "reference decode loop" in proc.stdout, proc.stdout
