"""flashgdn.engines.fused_recurrent_gated_delta_rule (vLLM's precomputed-gate op) on the CPU: valid
calls in each layout reach the device check, each bad argument raises naming it with nothing
written, the refused modes raise, a valid call builds the variant its arguments ask for, and the
vLLM-contract reference agrees with flashgdn's own reference where both apply."""
from __future__ import annotations

import pytest
import torch

from flashgdn import api, engines
from flashgdn import reference as ref
from flashgdn.device import DeviceFacts
from helpers import BF16, F32, make_state

FN = engines.fused_recurrent_gated_delta_rule
N, T, H, HV, K, V = 3, 4, 2, 4, 64, 128  # K != V: a state in the wrong layout has the wrong shape
P = 16
I32, I64 = torch.int32, torch.int64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def recurrent_kwargs(*, seed=0, varlen=True, sdt=F32, g_dtype=F32, beta_dtype=BF16, one_d=False, accepted=True):
    """Valid CPU arguments in vLLM's layouts: varlen q, k, v [1, tokens, ...] views of one packed
    projection row with sequences of 3, 0 and 2 tokens (T_max = 4; one token each with slots [N]),
    or a dense batch [N, T, ...]; slots [N, T] (or [N] for one token), accepted counts 1..T."""
    gen = _gen(seed)
    tokens = (N if one_d else 5) if varlen else N * (1 if one_d else T)
    width = 2 * H * K + HV * V
    mixed = torch.randn(tokens, width + 24, generator=gen).to(BF16)[:, :width]
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unflatten(0, (N, tokens // N)))
    kw = dict(
        q=lead(mixed[:, :H * K].unflatten(1, (H, K))), k=lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K))),
        v=lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V))),
        g=lead(-torch.rand(tokens, HV, generator=gen).to(g_dtype)), beta=lead(torch.rand(tokens, HV, generator=gen).to(beta_dtype)),
        scale=None, initial_state=make_state(P, HV, V, K, sdt, pad=16, seed=seed + 1), inplace_final_state=True,
        cu_seqlens=(torch.arange(N + 1, dtype=I32) if one_d else torch.tensor([0, 3, 3, 5], dtype=I32)) if varlen else None,
        ssm_state_indices=(torch.arange(1, N + 1, dtype=I32) if one_d else torch.arange(1, N * T + 1, dtype=I32).view(N, T)),
        num_accepted_tokens=torch.tensor([1, 2, 4][:N], dtype=I64) if accepted and not one_d else None,
        use_qk_l2norm_in_kernel=True,
    )
    return kw


def expect_error(kw, exc, match, fn=FN):
    """fn(**kw) raises `exc` matching `match` and leaves every tensor argument as it was."""
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        fn(**kw)
    for n, t in before.items():
        assert torch.equal(kw[n], t), f"{n} changed by a call that failed"


LAYOUTS = {
    "varlen": dict(),
    "varlen-1d": dict(one_d=True),
    "dense": dict(varlen=False),
    "dense-1d-bf16": dict(varlen=False, one_d=True, sdt=BF16, g_dtype=BF16),
    "varlen-noacc-fp32-beta": dict(accepted=False, beta_dtype=F32),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_valid_inputs_reach_the_device_check(layout):
    expect_error(recurrent_kwargs(**LAYOUTS[layout]), ValueError, r"^q must be a CUDA tensor, got device cpu")


def test_strided_one_d_indices_are_accepted():
    kw = recurrent_kwargs(one_d=True)
    kw["ssm_state_indices"] = torch.stack([kw["ssm_state_indices"]] * 2, 1)[:, 0]  # a block-table column
    expect_error(kw, ValueError, r"^q must be a CUDA tensor")


def _bad_last_dim(t):
    return torch.stack([t, t], -1)[..., 0]


BAD = {
    "inplace-false": (lambda kw: kw.update(inplace_final_state=False), NotImplementedError,
                      r"inplace_final_state=False.*not supported"),
    "no-initial-state": (lambda kw: kw.update(initial_state=None), ValueError, r"initial_state .* is required"),
    "no-indices": (lambda kw: kw.update(ssm_state_indices=None), ValueError, r"pass ssm_state_indices"),
    "headwise-beta": (lambda kw: kw.update(beta=torch.rand(1, 5, HV, V)), NotImplementedError, r"headwise beta"),
    "q-dtype": (lambda kw: kw.update(q=kw["q"].float()), TypeError, r"^q must have dtype bfloat16 or float16"),
    "k-shape": (lambda kw: kw.update(k=kw["k"][:, :4]), ValueError, r"^k must have shape \[1, 5, 2, 64\]"),
    "v-dtype": (lambda kw: kw.update(v=kw["v"].half()), TypeError, r"^v must have dtype bfloat16"),
    "heads": (lambda kw: kw.update(v=torch.randn(1, 5, 3, V).to(BF16)), ValueError, r"multiple of q.shape\[2\]"),
    "head-dim": (lambda kw: kw.update(q=torch.randn(1, 5, H, 48).to(BF16), k=torch.randn(1, 5, H, 48).to(BF16)),
                 ValueError, r"^q.shape\[3\] \(K\) must be one of"),
    "g-shape": (lambda kw: kw.update(g=kw["g"][..., :HV - 1]), ValueError, r"^g must have shape \[1, 5, 4\]"),
    "g-dtype": (lambda kw: kw.update(g=kw["g"].double()), TypeError, r"^g must have dtype float32 or bfloat16"),
    "beta-shape": (lambda kw: kw.update(beta=kw["beta"][:, :4]), ValueError, r"^beta must have shape \[1, 5, 4\]"),
    "beta-last-dim": (lambda kw: kw.update(beta=_bad_last_dim(kw["beta"])), ValueError,
                      r"^beta must have its last dim contiguous"),
    "q-last-dim": (lambda kw: kw.update(q=_bad_last_dim(kw["q"])), ValueError, r"^q must have its last dim contiguous"),
    "indices-dtype": (lambda kw: kw.update(ssm_state_indices=kw["ssm_state_indices"].float()), TypeError,
                      r"^ssm_state_indices must have dtype int32 or int64"),
    "indices-3d": (lambda kw: kw.update(ssm_state_indices=kw["ssm_state_indices"][..., None]), ValueError,
                   r"^ssm_state_indices must have shape \[\*\]"),
    "indices-rows": (lambda kw: kw.update(ssm_state_indices=kw["ssm_state_indices"][:2]), ValueError,
                     r"^ssm_state_indices must have at least 3 rows"),
    "indices-columns": (lambda kw: kw.update(ssm_state_indices=torch.ones(N, 17, dtype=I32)), ValueError,
                        r"^ssm_state_indices.shape\[1\] .* must be in \[1, 16\], got 17"),
    "indices-last-dim": (lambda kw: kw.update(ssm_state_indices=_bad_last_dim(kw["ssm_state_indices"])), ValueError,
                         r"^ssm_state_indices must have its last dim contiguous"),
    "cu-type": (lambda kw: kw.update(cu_seqlens=[0, 3, 3, 5]), TypeError, r"^cu_seqlens must be a torch.Tensor"),
    "cu-dtype": (lambda kw: kw.update(cu_seqlens=kw["cu_seqlens"].float()), TypeError,
                 r"^cu_seqlens must have dtype int32 or int64"),
    "cu-empty": (lambda kw: kw.update(cu_seqlens=torch.zeros(0, dtype=I32)), ValueError, r"^cu_seqlens must have shape \[N \+ 1\]"),
    "cu-batch": (lambda kw: kw.update(**{n: torch.cat([kw[n]] * 2) for n in ("q", "k", "v", "g", "beta")}),
                 ValueError, r"^with cu_seqlens, q must have shape \[1, tokens, H, K\]"),
    "accepted-shape": (lambda kw: kw.update(num_accepted_tokens=kw["num_accepted_tokens"][:2]), ValueError,
                       r"^num_accepted_tokens must have at least 3 entries"),
    "accepted-dtype": (lambda kw: kw.update(num_accepted_tokens=kw["num_accepted_tokens"].float()), TypeError,
                       r"^num_accepted_tokens must have dtype int32 or int64"),
    "state-shape": (lambda kw: kw.update(initial_state=kw["initial_state"].transpose(-1, -2)), ValueError,
                    r"^initial_state must have shape \[\*, 4, 128, 64\]"),
    "state-dtype": (lambda kw: kw.update(initial_state=kw["initial_state"].half()), TypeError,
                    r"^initial_state must have dtype float32 or bfloat16"),
    "scale-negative": (lambda kw: kw.update(scale=-1.0), ValueError, r"^scale must be positive"),
    "scale-str": (lambda kw: kw.update(scale="0.1"), TypeError, r"^scale must be a float or None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument(case):
    change, exc, match = BAD[case]
    kw = recurrent_kwargs()
    change(kw)
    expect_error(kw, exc, match)


def test_dense_tokens_must_match_the_slot_columns():
    kw = recurrent_kwargs(varlen=False)
    kw["ssm_state_indices"] = kw["ssm_state_indices"][:, :3].contiguous()
    expect_error(kw, ValueError, r"^without cu_seqlens every sequence has q.shape\[1\] = 4 tokens")
    kw = recurrent_kwargs(varlen=False)
    kw["ssm_state_indices"] = kw["ssm_state_indices"][:, 0].contiguous()
    expect_error(kw, ValueError, r"ssm_state_indices must have shape \[3, 4\]")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_valid_call_builds_its_variant(monkeypatch, layout):
    """The launch gets g and beta as a and b, no A_log or dt_bias, the slots as they are ([N, T], or
    [N] at one token: KernelSpec.slot_column) and the engine's tensors; the spec says precomputed
    gates, vLLM's slots and (varlen) the cu_seqlens dtype."""
    launched = []
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "_launch", lambda plan, layout, args, options: launched.append((plan, args, options)))
    kw = recurrent_kwargs(**LAYOUTS[layout])
    o, state = FN(**kw)
    assert state is kw["initial_state"] and o.shape == kw["v"].shape and o.dtype == kw["q"].dtype
    plan, args, options = launched[0]
    assert args.a is kw["g"] and args.b is kw["beta"] and args.A_log is None and args.dt_bias is None
    assert args.state is kw["initial_state"] and args.state_indices is None
    assert args.token_state_indices is kw["ssm_state_indices"] and args.cu_seqlens is kw["cu_seqlens"]
    assert args.accepted_tokens is kw["num_accepted_tokens"] and args.output is o
    spec = api.kernel_spec("klast", plan.problem, args, options, DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    assert spec.precomputed_gates and spec.vllm_slots and spec.has_token_slots and not spec.commits_accepted
    one_column = args.token_state_indices.dim() == 1
    assert spec.slot_column == one_column and not spec.gate_rows
    assert spec.T == (1 if one_column else args.token_state_indices.shape[1]) and plan.problem.B == N
    assert spec.varlen == (None if kw["cu_seqlens"] is None else "int32")
    assert spec.gate_dtype == str(kw["g"].dtype)[6:]
    assert spec.beta_dtype == (None if kw["beta"].dtype == kw["g"].dtype else str(kw["beta"].dtype)[6:])
    # The compiled function takes a tensor exactly where the launch passes one (TVM-FFI rejects
    # None for a tensor parameter and a tensor for a None one).
    from flashgdn.kernels.build import fake_arguments

    fakes = fake_arguments(spec)
    assert [f for f in args._fields if getattr(args, f) is None] == [f for f in fakes._fields if getattr(fakes, f) is None]
    FN(**kw)  # the second call of the signature is remembered
    assert len(api._VALIDATED) == 1 and len(launched) == 2


def test_a_padded_slot_table_goes_as_it_is(monkeypatch):
    """vLLM pads the slot table and the accepted counts to its CUDA-graph batch: the kernel gets
    them as they are (its grid is the N sequences of cu_seqlens, whose rows it reads), and the
    compiled function takes the padding (their rows are symbols of their own in its arguments)."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    from helpers import ffi_checking_stub

    launched = []
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "_launch", lambda plan, layout, args, options: launched.append((plan, args, options)))
    kw = recurrent_kwargs()
    idx, acc = kw["ssm_state_indices"], kw["num_accepted_tokens"]
    kw.update(ssm_state_indices=torch.cat([idx, torch.full((2, T), -1, dtype=I32)]),
              num_accepted_tokens=torch.cat([acc, torch.full((1,), 9, dtype=I64)]))  # padded apart
    FN(**kw)
    plan, args, options = launched[0]
    assert args.token_state_indices is kw["ssm_state_indices"] and args.accepted_tokens is kw["num_accepted_tokens"]
    assert plan.problem.B == N
    spec = api.kernel_spec("klast", plan.problem, args, options, DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    ffi_checking_stub(spec)(*args)  # the padded rows pass the compiled function's checks


def test_no_tokens_launch_nothing(monkeypatch):
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "_launch", lambda *a: pytest.fail("launched"))
    kw = recurrent_kwargs()
    for n in ("q", "k", "v", "g", "beta"):
        kw[n] = kw[n][:, :0]
    kw["cu_seqlens"] = torch.zeros(N + 1, dtype=I32)
    o, _ = FN(**kw)
    assert o.shape == (1, 0, HV, V)


def test_reference_matches_flashgdn_reference():
    """One token per sequence, column-0 slots: vLLM's contract on g = log(decay) is flashgdn's
    pool decode (padding: slot <= 0)."""
    gen = _gen(5)
    q, k = torch.randn(N, 1, H, K, generator=gen), torch.randn(N, 1, H, K, generator=gen)
    v = torch.randn(N, 1, HV, V, generator=gen)
    a, b = torch.randn(N, 1, HV, generator=gen), torch.randn(N, 1, HV, generator=gen)
    A_log, dt_bias = torch.rand(HV, generator=gen), torch.randn(HV, generator=gen)
    decay, beta = ref.gates(A_log, a, dt_bias, b, dtype=torch.float64)
    pool = torch.randn(P, HV, V, K, generator=gen, dtype=torch.float64)
    idx = torch.tensor([4, 0, 9])
    mine = pool.clone()
    out = ref.fused_recurrent_gated_delta_rule_vllm(q, k, v, decay.log(), beta, None, mine, None, idx, None, True,
                                                    compute_dtype=torch.float64)
    theirs = pool.clone()
    expected, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, A_log, a, dt_bias, b, None, None, True, initial_state=theirs,
        initial_state_indices=torch.where(idx > 0, idx, -1), compute_dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mine, theirs)
    assert torch.all(out[1] == 0) and torch.equal(mine[0], pool[0])



def test_reference_accepted_count_zero_is_padding_and_outside_the_row_is_nan():
    """vLLM's accepted counts: 0 (a row vLLM sends without an accepted token, which its kernel
    masks) is a padding sequence, zero rows and no slot touched; a count past the row's slots or
    negative gives NaN rows and writes nothing; the others read column count - 1."""
    gen = _gen(9)
    T = 3
    q, k = torch.randn(4, T, H, K, generator=gen), torch.randn(4, T, H, K, generator=gen)
    v = torch.randn(4, T, HV, V, generator=gen)
    g, beta = -torch.rand(4, T, HV, generator=gen), torch.rand(4, T, HV, generator=gen)
    pool = torch.randn(4 * T + 1, HV, V, K, generator=gen, dtype=torch.float64)
    idx = torch.arange(1, 4 * T + 1).view(4, T)
    acc = torch.tensor([2, 0, T + 1, -1])
    mine = pool.clone()
    out = ref.fused_recurrent_gated_delta_rule_vllm(q, k, v, g, beta, None, mine, None, idx, acc, True,
                                                    compute_dtype=torch.float64)
    assert torch.all(out[1] == 0) and torch.isnan(out[2:]).all() and not torch.isnan(out[0]).any()
    assert torch.equal(mine[4:], pool[4:]), "only the first sequence writes its slots"
    assert not torch.equal(mine[1:4], pool[1:4])


# ----------------------------------------------------------------------------- compiles (no GPU)

COMPILED = {  # keyword arguments of test_compile.spec: the variants this function builds
    "T1-varlen-slotcol-large-float32": dict(regime="large", gate="float32", beta_dtype="bfloat16",
                                            index_dtype="int32", varlen="int32", slot_column=True),
    "T1-dense-accepted-strided-small-bfloat16": dict(state="bfloat16", index_dtype="int64", has_accepted=True,
                                                     accepted_dtype="int64", strided_state=True),
    "T4-varlen-accepted-large-bfloat16": dict(T=4, regime="large", state="bfloat16", gate="float32",
                                              beta_dtype="bfloat16", index_dtype="int32", has_accepted=True,
                                              accepted_dtype="int64", varlen="int64"),
    "T3-dense-nol2-small-float32": dict(T=3, state="float32", index_dtype="int32", l2norm=False),
}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("kw", list(COMPILED.values()), ids=list(COMPILED))
def test_compiles(arch, kw):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    from flashgdn.kernels.build import compile_kernel
    from test_compile import spec

    assert callable(compile_kernel(spec(arch, precomputed_gates=True, has_token_slots=True, vllm_slots=True, **kw)))


def test_precomputed_gates_reach_the_tensor_core_kernel():
    """The gate mode lives in the shared helpers: the tensor-core MTP kernel builds with it too."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    from flashgdn.kernels import policy
    from flashgdn.kernels.build import compile_kernel
    from test_compile import spec

    s = spec("sm_90a", T=8, regime="large", state="bfloat16", gate="float32", precomputed_gates=True,
             index_dtype="int32")
    assert policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA
    assert callable(compile_kernel(s))
