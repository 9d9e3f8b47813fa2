"""flashgdn.engines.fused_sigmoid_gating_delta_rule_update_vllm (vLLM's fused_sigmoid_gating_delta_rule_update:
its recurrent op with the gates computed in the kernel) on the CPU: valid calls in vLLM's layouts
reach the device check, each bad argument raises naming it with nothing written, the refused modes
raise, a valid call builds the raw-gate variant on the engine's tensors (its torch.library op:
tests/test_ops_recurrent.py)."""
from __future__ import annotations

import pytest
import torch

from flashgdn import api, engines, recurrent
from flashgdn.device import DeviceFacts
from helpers import BF16, F32
import test_recurrent
from test_recurrent import HV, N, recurrent_kwargs

FN = engines.fused_sigmoid_gating_delta_rule_update_vllm
OP = torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update_vllm


def sigmoid_kwargs(*, seed=0, gates_2d=True, gate_dtype=BF16, dt_bias_dtype=F32, **layout):
    """Valid CPU arguments as vLLM's GDN layer passes them: recurrent_kwargs' q, k, v, pool, slots
    and accepted counts, with raw gates a, b [tokens, HV] (views of one [tokens, 2 HV] projection,
    b then a) or q's [B, T] then HV, A_log [HV] fp32 and dt_bias [HV]."""
    kw = recurrent_kwargs(seed=seed, **layout)
    del kw["g"], kw["beta"]
    gen = torch.Generator().manual_seed(seed + 7)
    lead = kw["q"].shape[:2]
    ba = torch.randn(lead[0] * lead[1], 2 * HV, generator=gen).to(gate_dtype)
    b, a = ba[:, :HV], ba[:, HV:]
    if not gates_2d:
        a, b = a.unflatten(0, lead), b.unflatten(0, lead)
    return dict(A_log=torch.rand(HV, generator=gen), a=a, b=b,
                dt_bias=torch.randn(HV, generator=gen).to(dt_bias_dtype), **kw)


def expect_error(kw, exc, match):
    test_recurrent.expect_error(kw, exc, match, fn=FN)


LAYOUTS = {  # vLLM's speculative verify, its decode, a dense batch; gates as vLLM passes them or 3-D
    "varlen-accepted": dict(),
    "varlen-1d-decode": dict(one_d=True),
    "dense-3d-gates-fp32": dict(varlen=False, gates_2d=False, gate_dtype=F32),
    "varlen-noacc-bf16-dtbias": dict(accepted=False, sdt=BF16, dt_bias_dtype=BF16),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_valid_inputs_reach_the_device_check(layout):
    expect_error(sigmoid_kwargs(**LAYOUTS[layout]), ValueError, r"^q must be a CUDA tensor, got device cpu")


BAD = {
    "is-kda": (lambda kw: kw.update(is_kda=True), NotImplementedError, r"is_kda=True .* not supported"),
    "no-A_log": (lambda kw: kw.update(A_log=None), TypeError, r"^A_log must be a torch.Tensor, got NoneType"),
    "no-dt_bias": (lambda kw: kw.update(dt_bias=None), TypeError, r"^dt_bias must be a torch.Tensor, got NoneType"),
    "inplace-false": (lambda kw: kw.update(inplace_final_state=False), NotImplementedError,
                      r"^fused_sigmoid_gating_delta_rule_update\(inplace_final_state=False\)"),
    "no-initial-state": (lambda kw: kw.update(initial_state=None), ValueError, r"initial_state .* is required"),
    "no-indices": (lambda kw: kw.update(ssm_state_indices=None), ValueError, r"pass ssm_state_indices"),
    "a-tokens": (lambda kw: kw.update(a=kw["a"][:4]), ValueError,
                 r"^a as \[rows, HV\] must have a row per token, at least 5 .*got \[4, 4\]"),
    "b-tokens": (lambda kw: kw.update(b=torch.cat([kw["b"]] * 2)), ValueError, r"^b must have shape \[5, 4\]"),
    "a-3d-tokens": (lambda kw: kw.update(a=torch.cat([kw["a"]] * 2)[None]), ValueError,
                    r"^a must have shape \[1, 5, 4\]"),
    "a-dtype": (lambda kw: kw.update(a=kw["a"].half(), b=kw["b"].half()), TypeError,
                r"^a must have dtype bfloat16 or float32"),
    "b-dtype": (lambda kw: kw.update(b=kw["b"].float()), TypeError, r"^b must have dtype bfloat16"),
    "b-heads": (lambda kw: kw.update(b=kw["b"][:, :HV - 1]), ValueError, r"^b must have shape \[5, 4\]"),
    "A_log-dtype": (lambda kw: kw.update(A_log=kw["A_log"].to(BF16)), TypeError, r"^A_log must have dtype float32"),
    "dt_bias-shape": (lambda kw: kw.update(dt_bias=kw["dt_bias"][:2]), ValueError, r"^dt_bias must have shape \[4\]"),
    "beta-zero": (lambda kw: kw.update(beta=0.0), ValueError, r"^beta must be > 0, got 0.0"),
    "beta-tensor": (lambda kw: kw.update(beta=torch.ones(1)), TypeError, r"^beta must be a float"),
    "threshold-inf": (lambda kw: kw.update(threshold=float("inf")), ValueError, r"^threshold must be finite"),
    "scale-negative": (lambda kw: kw.update(scale=-1.0), ValueError, r"^scale must be positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument(case):
    change, exc, match = BAD[case]
    kw = sigmoid_kwargs()
    change(kw)
    expect_error(kw, exc, match)


def test_gates_of_more_rows_give_their_first_tokens(monkeypatch):
    """vLLM passes its whole batch's gates beside the speculative tokens' q, k, v: they go to the
    kernel as they are (KernelSpec.gate_rows: it reads the first tokens' rows, as vLLM's kernel does),
    and the fast key holds their rows."""
    launched = []
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "_launch", lambda plan, layout, args, options: launched.append(args))
    kw = sigmoid_kwargs()
    tokens = kw["a"].shape[0]
    ba = torch.cat([torch.cat([kw["b"], kw["a"]], 1), torch.randn(3, 2 * HV).to(BF16)])  # 3 more tokens
    kw.update(b=ba[:, :HV], a=ba[:, HV:])
    FN(**kw)
    assert launched[0].a is kw["a"] and launched[0].b is kw["b"] and kw["a"].shape[0] == tokens + 3
    key = recurrent._recurrent_key(kw["q"], kw["a"], kw["initial_state"], kw["cu_seqlens"], kw["ssm_state_indices"],
                                   kw["num_accepted_tokens"], kw["A_log"], 1.0, 20.0, None, False, kw["v"])
    assert tokens + 3 in key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_valid_call_builds_the_raw_gate_variant(monkeypatch, layout):
    """The launch gets the engine's a and b as they are (vLLM's [tokens, HV]: KernelSpec.gate_rows, or
    [B, T, HV]), A_log and dt_bias, the slots as they are ([N] at one token: KernelSpec.slot_column);
    the spec computes the gates (softplus from beta and threshold) with vLLM's slots."""
    launched = []
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "_launch", lambda plan, layout, args, options: launched.append((plan, args, options)))
    kw = dict(sigmoid_kwargs(**LAYOUTS[layout]), beta=2.0, threshold=15.0)
    o, state = FN(**kw)
    assert state is kw["initial_state"] and o.shape == kw["v"].shape and o.dtype == kw["q"].dtype
    plan, args, options = launched[0]
    assert args.a is kw["a"] and args.b is kw["b"]
    assert args.A_log is kw["A_log"] and args.dt_bias is kw["dt_bias"]
    assert args.state is kw["initial_state"] and args.state_indices is None and args.output is o
    assert args.token_state_indices is kw["ssm_state_indices"] and args.cu_seqlens is kw["cu_seqlens"]
    assert args.accepted_tokens is kw["num_accepted_tokens"] and plan.problem.B == N
    spec = api.kernel_spec("klast", plan.problem, args, options, DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    assert not spec.precomputed_gates and spec.vllm_slots and spec.has_token_slots
    assert (spec.softplus_beta, spec.softplus_threshold) == (2.0, 15.0)
    assert spec.gate_rows == (kw["a"].dim() == 2) and spec.slot_column == (kw["ssm_state_indices"].dim() == 1)
    assert spec.varlen == (None if kw["cu_seqlens"] is None else "int32")
    from flashgdn.kernels.build import fake_arguments

    fakes = fake_arguments(spec)
    assert [f for f in args._fields if getattr(args, f) is None] == [f for f in fakes._fields if getattr(fakes, f) is None]
    FN(**kw)  # the second call of the signature is remembered
    assert len(api._VALIDATED) == 1 and len(launched) == 2


def _op_args(kw, o):
    """The op's arguments of a call's keyword arguments."""
    return (kw["A_log"], kw["a"], kw["b"], kw["dt_bias"], kw["q"], kw["k"], kw["v"], 1.0, 20.0, kw["scale"],
            kw["initial_state"], kw["cu_seqlens"], kw["ssm_state_indices"], kw["num_accepted_tokens"],
            kw["use_qk_l2norm_in_kernel"], o)


# ----------------------------------------------------------------------------- on the GPU

GPU_LAYOUTS = ["varlen-accepted", "varlen-1d-decode", "varlen-noacc-bf16-dtbias"]


def _cuda(kw):
    from test_ops_engines import _cuda as move

    return move(kw)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_opcheck_on_the_kernels(layout):
    kw = _cuda(sigmoid_kwargs(seed=5, **LAYOUTS[layout]))
    torch.library.opcheck(OP.default, _op_args(kw, torch.empty_like(kw["v"])))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_compiled_equals_eager_on_the_kernels(layout):
    """torch.compile (inductor) of a call, two steps: output and pool bit for bit the eager ones."""
    from helpers import same_bits

    eager, comp = (_cuda(sigmoid_kwargs(seed=6, **LAYOUTS[layout])) for _ in range(2))
    before = eager["initial_state"].clone()
    compiled = torch.compile(lambda kw: FN(**kw), fullgraph=True)
    for step in range(2):
        (o_e, _), (o_c, st_c) = FN(**eager), compiled(comp)
        assert st_c is comp["initial_state"] and not o_e.isnan().any(), f"step {step}"
        assert same_bits(o_c, o_e), f"output, step {step}"
        assert same_bits(comp["initial_state"], eager["initial_state"]), f"pool, step {step}"
    assert not torch.equal(eager["initial_state"], before), "the calls wrote no slot"


# ----------------------------------------------------------------------------- compiles (no GPU)

COMPILED = {  # vLLM's speculative verify and its decode, raw gates [tokens, HV] (test_compile.spec's keywords):
    # the token loop, the tensor cores, and one-token slots [N]
    "T4-varlen-accepted-large-bfloat16": dict(T=4, regime="large", state="bfloat16", index_dtype="int32",
                                              has_accepted=True, varlen="int32"),
    "T8-mma-varlen-accepted-fp32gates-large-bfloat16": dict(T=8, regime="large", state="bfloat16", gate="float32",
                                                            index_dtype="int64", has_accepted=True,
                                                            accepted_dtype="int64", varlen="int32"),
    "T1-varlen-slotcol-small-float32": dict(gate="float32", index_dtype="int64", varlen="int64", slot_column=True),
}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("kw", list(COMPILED.values()), ids=list(COMPILED))
def test_compiles(arch, kw):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    from flashgdn.kernels.build import compile_kernel
    from test_compile import spec

    assert callable(compile_kernel(spec(arch, has_token_slots=True, vllm_slots=True, gate_rows=True, **kw)))


@pytest.mark.parametrize("T", [1, 4])
def test_views_of_vllm_rows_leave_the_kernel_as_it_is(monkeypatch, tmp_path, T):
    """vLLM's [tokens, HV] gates and one-token [N] slots (KernelSpec.gate_rows, slot_column) change
    only the launch, which views them as [B, T, HV] and [N, 1]: the kernel's PTX is that of the
    variant taking those shapes (the views' strides are launch parameters)."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    import dataclasses

    from helpers import compiled_ptx
    from test_compile import spec

    plain = spec("sm_90a", T=T, regime="large" if T > 1 else "small", index_dtype="int32", has_token_slots=True,
                 vllm_slots=True, varlen="int32", has_accepted=T > 1)
    viewed = dataclasses.replace(plain, gate_rows=True, slot_column=T == 1)
    assert (compiled_ptx(plain, tmp_path / "plain", monkeypatch)
            == compiled_ptx(viewed, tmp_path / "viewed", monkeypatch))

