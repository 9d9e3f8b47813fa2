"""CPU tests of the repeated-call path (flashgdn.fastpath) of the engine entry points, vLLM's
recurrent op and the fused step (and, for the arguments of its launches, of every public
function): a repeated call skips the full checks and hands the compiled function the same
tensors, in the same places (views rebuilt from the kept geometry), as the full way; a change that
matters takes the full way, which raises the same clear error as a first call (nothing written)
or runs the call as a first call would. The compiled functions are the argument-checking
stand-ins of helpers.ffi_checking_stub."""
from __future__ import annotations

import re

import pytest
import torch

from flashgdn import api, engines, fastpath, fused_step, recurrent
from flashgdn import validation as val
from flashgdn.device import DeviceFacts
import flashgdn
from helpers import BF16, FNS, T_MTP, ffi_checking_stub, make_fused_inputs, make_intermediate, valid_kwargs
from test_engines import packed_kwargs, sigmoid_kwargs
from test_recurrent import recurrent_kwargs
from test_engines_sglang import verify_kwargs
from test_replay import commit_kwargs
from test_replay import verify_kwargs as replay_verify_kwargs
from test_recurrent_sigmoid import sigmoid_kwargs as sigmoid_vllm_kwargs

FACTS = DeviceFacts("sm_90a", 132, "sm90-hbm3")
PACKED = engines.fused_recurrent_gated_delta_rule_packed_decode
PACKED_VLLM = engines.fused_recurrent_gated_delta_rule_packed_decode_vllm
SIGMOID = engines.fused_sigmoid_gating_delta_rule_update
RECURRENT = recurrent.fused_recurrent_gated_delta_rule
STEP = fused_step.gdn_fused_decode_step


def _fused_kwargs():
    return make_fused_inputs(B=3, H=2, HV=4, D=64, hidden=128, P=6, slots=[4, -1, 0], seed=2)


def _padded(kw):
    """vLLM's slot table and accepted counts padded to its CUDA-graph batch (two rows more)."""
    slots, accepted = kw["ssm_state_indices"], kw["num_accepted_tokens"]
    kw["ssm_state_indices"] = torch.cat([slots, torch.full((2, *slots.shape[1:]), -1, dtype=slots.dtype)])
    if accepted is not None:
        kw["num_accepted_tokens"] = torch.cat([accepted, torch.full((2,), 9, dtype=accepted.dtype)])
    return kw


def _wide(kw):
    """vLLM's gates with rows past the tokens (its whole batch's, beside the speculative tokens) and
    one-token slots that are a column of a block table (stride 2)."""
    HV = kw["a"].shape[1]
    ba = torch.cat([torch.cat([kw["b"], kw["a"]], 1), torch.randn(3, 2 * HV).to(kw["a"].dtype)])
    slots = kw["ssm_state_indices"]
    return dict(kw, b=ba[:, :HV], a=ba[:, HV:], ssm_state_indices=torch.stack([slots, slots], 1)[:, 0])


def _unaligned(t):
    """t's values in a tensor whose last-but-one stride is one element more than packed (not a
    multiple of 16 bytes)."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
    wide[..., :-1] = t
    return wide[..., :-1]


ENTRIES = {  # name: (function, valid keyword arguments)
    "packed": (PACKED, packed_kwargs),
    "packed_vllm": (PACKED_VLLM, packed_kwargs),
    "sigmoid": (SIGMOID, sigmoid_kwargs),
    "sigmoid_batched": (SIGMOID, lambda: sigmoid_kwargs(varlen=False, gates_3d=True)),
    "sigmoid_verify": (SIGMOID, verify_kwargs),
    "sigmoid_tree": (SIGMOID, lambda: verify_kwargs(tree=True)),
    "recurrent_varlen": (RECURRENT, recurrent_kwargs),
    "recurrent_one_token": (RECURRENT, lambda: recurrent_kwargs(varlen=False, one_d=True)),
    "sigmoid_vllm_verify": (engines.fused_sigmoid_gating_delta_rule_update_vllm, sigmoid_vllm_kwargs),
    "sigmoid_vllm_decode": (engines.fused_sigmoid_gating_delta_rule_update_vllm,
                            lambda: sigmoid_vllm_kwargs(one_d=True)),
    "recurrent_padded": (RECURRENT, lambda: _padded(recurrent_kwargs())),
    "sigmoid_vllm_padded_decode": (engines.fused_sigmoid_gating_delta_rule_update_vllm,
                                   lambda: _padded(sigmoid_vllm_kwargs(one_d=True))),
    "sigmoid_vllm_wide_decode": (engines.fused_sigmoid_gating_delta_rule_update_vllm,
                                 lambda: _wide(sigmoid_vllm_kwargs(one_d=True))),
    "fused_step": (STEP, _fused_kwargs),
    # flashgdn.api's functions (test_fastpath.py tests what takes their full way)
    "pretranspose": (FNS["pre"], lambda: valid_kwargs("pre")),
    "pretranspose_pool": (FNS["pool"], lambda: dict(valid_kwargs("pool"), output_state_indices=torch.tensor(
        [1, 4], dtype=torch.int32))),
    "decode": (FNS["dec"], lambda: valid_kwargs("dec")),
    "mtp": (FNS["mtp"], lambda: dict(valid_kwargs("mtp"), intermediate_states_buffer=make_intermediate(),
                                     accepted_tokens=torch.tensor([2, 1], dtype=torch.int32))),
    "mtp_token_slots": (FNS["mtp"], lambda: dict(valid_kwargs("mtp"), ssm_state_indices=torch.tensor(
        [[1, 2, 4], [0, -1, 3]], dtype=torch.int32)[:, :T_MTP])),
    "replay_verify": (FNS["mtp"], replay_verify_kwargs),
    "replay_commit": (flashgdn.gated_delta_rule_replayssm_commit, lambda: commit_kwargs(track=True)),
}


@pytest.fixture
def calls(monkeypatch):
    """(full checks run, arguments of each launch): every memo (validation.remembered) call is one
    full way; the compiled functions record their arguments."""
    launched, full = [], []
    remembered = val.remembered

    def counting(*args, **kw):
        full.append(args[1])
        return remembered(*args, **kw)

    monkeypatch.setattr(val, "remembered", counting)
    monkeypatch.setattr(val, "check_devices", lambda named: torch.device("cpu"))
    for module in (api, fused_step):
        monkeypatch.setattr(module, "facts_of", lambda device: FACTS)
    for module, memo in ((api, "_VALIDATED"), (val, "_CHECKED"), (fused_step, "_VALIDATED"),
                         (fused_step, "_WORKSPACES")):
        monkeypatch.setattr(module, memo, {})
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    monkeypatch.setattr(api.kernel_cache, "get", lambda spec: ffi_checking_stub(spec, launched))
    return full, launched


def _layout(t):
    return None if t is None else (t.shape, t.stride(), t.data_ptr(), t.dtype)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_a_repeated_call_skips_the_full_checks(calls, name):
    full, launched = calls
    fn, make = ENTRIES[name]
    kw = make()
    fn(**kw)
    n_full, n_launched = len(full), len(launched)
    assert n_full >= 1 and n_launched >= 1
    for _ in range(3):
        fn(**kw)
    assert len(full) == n_full, "a repeated call ran the full checks"
    assert len(launched) == 4 * n_launched
    # The fast calls hand the compiled functions the tensors of the full call: views of the
    # caller's tensors at the same addresses (rebuilt from the kept geometry), the outputs a call
    # allocates of the same layout.
    inputs = {t.untyped_storage().data_ptr() for t in kw.values() if isinstance(t, torch.Tensor)}
    for full_args, fast_args in zip(launched[:n_launched], launched[n_launched:2 * n_launched]):
        for i, (x, y) in enumerate(zip(full_args, fast_args)):
            assert (x is None) == (y is None), f"argument {i}"
            if x is not None:
                assert (x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype), f"argument {i}"
                if x.untyped_storage().data_ptr() in inputs:
                    assert x.data_ptr() == y.data_ptr(), f"argument {i}"


def _gemm_table(monkeypatch, launched):
    """The "gemm" conv/gate regime from B * HV > 2 per SM (a table's conv_gate_gemm_heads_per_sm; no
    small conv/gate regime); returns (specs looked up, the b | a workspace rows as each launch saw
    them)."""
    import dataclasses

    from flashgdn.kernels import policy

    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3", dataclasses.replace(
        policy.SM90_HBM3, conv_gate_gemm_heads_per_sm=2, conv_gate_small_heads_per_sm=0))
    looked_up, seen = [], []

    def get(spec):
        looked_up.append(spec)
        stub = ffi_checking_stub(spec, launched)

        def compiled(*args):
            stub(*args)
            seen.append(fused_step._workspace(torch.device("cpu"), 70, 2, 4, 64, 0)[1].clone())

        return compiled

    monkeypatch.setattr(api.kernel_cache, "get", get)
    return looked_up, seen


def test_the_gemm_regime_projects_before_the_step(calls, monkeypatch):
    """In the "gemm" regime the step writes hidden_states @ w_ba (torch.mm) into the workspace's
    b | a rows before its compiled function (the conv-only conv/gate kernel and the decode) runs, on
    the full way and on the fast one; the conv/gate build is the gemm one; a w_ba that requires grad
    (an nn.Parameter) goes detached."""
    full, launched = calls
    looked_up, seen = _gemm_table(monkeypatch, launched)
    kw = make_fused_inputs(B=70, H=2, HV=4, D=64, hidden=128, P=80, seed=5)  # B * HV = 280 > 2 * 132
    want = torch.mm(kw["hidden_states"], kw["w_ba"])
    kw["w_ba"].requires_grad_(True)
    for n in range(2):
        ba = fused_step._workspace(torch.device("cpu"), 70, 2, 4, 64, 0)[1]
        ba.zero_()
        seen.clear()
        STEP(**kw)
        assert launched[-1][8].data_ptr() == ba.data_ptr(), f"call {n}: the step's b | a rows"
        assert len(seen) == 1 and torch.equal(seen[0], want), f"call {n}: the GEMM, then the step"
    assert len(full) == 1, "the second call takes the fast way"
    assert [s.conv.regime for s in looked_up] == ["gemm"]


@pytest.mark.parametrize("change, match", [
    (lambda kw: dict(kw, w_ba=torch.cat([kw["w_ba"], kw["w_ba"]], 1)), "^w_ba must have shape"),
    (lambda kw: dict(kw, w_ba=kw["w_ba"].half()), "^w_ba must have dtype"),
    (lambda kw: dict(kw, hidden_states=torch.cat([kw["hidden_states"]] * 2, 1)), "^w_ba must have shape"),
], ids=["w_ba-columns", "w_ba-dtype", "hidden"])
def test_the_gemm_regime_refuses_bad_operands_before_the_gemm(calls, monkeypatch, change, match):
    """hidden_states and w_ba are not in the fast key: the gemm regime's entry keeps their dtypes,
    shapes and devices, so a repeated call with other ones takes the full way, which raises before
    the GEMM runs (no launch, the workspace rows not resized)."""
    full, launched = calls
    _gemm_table(monkeypatch, launched)
    kw = make_fused_inputs(B=70, H=2, HV=4, D=64, hidden=128, P=80, seed=5)
    STEP(**kw)
    STEP(**kw)
    ba = fused_step._workspace(torch.device("cpu"), 70, 2, 4, 64, 0)[1]
    before, shape, n_launched = ba.clone(), ba.shape, len(launched)
    with pytest.raises((TypeError, ValueError), match=match):
        STEP(**change(kw))
    assert len(launched) == n_launched and ba.shape == shape and torch.equal(ba, before)


def _expect_same_error(fn, kw, bad, reset, launched):
    """fn(**bad) after fast calls of kw raises what it raises as a first call, launching nothing
    (the stand-ins write nothing: a launch stands for a write) and writing nothing."""
    for _ in range(2):
        fn(**kw)
    before = {n: t.clone() for n, t in bad.items() if isinstance(t, torch.Tensor)}
    n_launched = len(launched)
    with pytest.raises((TypeError, ValueError, NotImplementedError)) as after_fast:
        fn(**bad)
    assert len(launched) == n_launched, "a refused call launched a kernel"
    for n, t in before.items():
        assert torch.equal(bad[n], t), f"{n} written by a refused call"
    reset()
    with pytest.raises(type(after_fast.value)) as first:
        fn(**bad)
    assert str(after_fast.value) == str(first.value)
    return str(first.value)


def _expanded(t):
    return t[:1].expand(t.shape)


def _misaligned_pool(pool):
    """The pool at an address 4 bytes past a 16-byte boundary (same shape and strides)."""
    flat = torch.empty(pool.untyped_storage().nbytes() // pool.element_size() + 1, dtype=pool.dtype)
    view = flat.as_strided(pool.shape, pool.stride(), 1)
    view.copy_(pool)
    return view


BAD = [  # (entry, change, message)
    ("packed", lambda kw: dict(kw, initial_state=_expanded(kw["initial_state"])), r"initial_state must not overlap"),
    ("packed", lambda kw: dict(kw, out=_expanded(kw["out"])), r"^out must not overlap itself"),
    ("packed", lambda kw: dict(kw, a=kw["a"].half()), r"^a must have dtype"),
    ("packed", lambda kw: dict(kw, scale=True), r"^scale must be a float or None, got bool"),
    ("packed", lambda kw: dict(kw, mixed_qkv=kw["mixed_qkv"][:, :-64]), r"^mixed_qkv must have shape"),
    ("packed", lambda kw: dict(kw, ssm_state_indices=kw["ssm_state_indices"][:, None]),
     r"^ssm_state_indices must have shape"),
    ("packed_vllm", lambda kw: dict(kw, ssm_state_indices=kw["ssm_state_indices"].tolist()),
     r"^ssm_state_indices must be a torch.Tensor"),
    ("sigmoid", lambda kw: dict(kw, cu_seqlens=torch.arange(kw["q"].shape[1] + 2, dtype=torch.int32)),
     r"varlen batch of 4 tokens in 5 sequences"),
    ("sigmoid", lambda kw: dict(kw, is_kda=True), r"is_kda=True"),
    ("sigmoid", lambda kw: dict(kw, scale=-1.0), r"^scale must be positive"),
    ("sigmoid", lambda kw: dict(kw, softplus_threshold=True), r"^softplus_threshold must be a float, got bool"),
    ("sigmoid", lambda kw: dict(kw, initial_state_source=_expanded(kw["initial_state_source"])),
     r"^initial_state_source must not overlap itself"),
    ("sigmoid_verify", lambda kw: dict(kw, intermediate_state_indices=None),
     r"^intermediate_states_buffer needs intermediate_state_indices"),
    ("sigmoid_verify", lambda kw: dict(kw, intermediate_states_buffer=kw["intermediate_states_buffer"][:, :2]),
     r"^intermediate_states_buffer must have shape \[>= 1, >= T=3"),
    ("sigmoid_verify", lambda kw: dict(kw, intermediate_states_buffer=kw["intermediate_states_buffer"].bfloat16()),
     r"^intermediate_states_buffer must have dtype float32"),
    ("sigmoid_verify", lambda kw: dict(kw, intermediate_state_indices=kw["intermediate_state_indices"][:2]),
     r"^intermediate_state_indices must have at least B=4 entries"),
    ("sigmoid_verify", lambda kw: dict(kw, disable_state_update=1), r"^disable_state_update must be a bool"),
    ("sigmoid_tree", lambda kw: dict(kw, retrieve_parent_token=kw["retrieve_parent_token"][:2]),
     r"^retrieve_parent_token must have at least B=4 rows"),
    ("recurrent_varlen", lambda kw: dict(kw, cu_seqlens=torch.cat([kw["cu_seqlens"], kw["cu_seqlens"][-1:]])),
     r"^ssm_state_indices must have at least 4 rows"),
    ("recurrent_varlen", lambda kw: dict(kw, initial_state=_expanded(kw["initial_state"])),
     r"^initial_state must not overlap itself"),
    ("recurrent_varlen", lambda kw: dict(kw, scale=-0.5), r"^scale must be positive"),
    ("recurrent_varlen", lambda kw: dict(kw, beta=kw["beta"][:, :, :1]), r"^beta must have shape"),
    # q, k, v, the gates and the slots' layouts are the compiled function's to check (not in the key)
    ("recurrent_varlen", lambda kw: dict(kw, k=kw["k"][:, :4]), r"^k must have shape"),
    ("recurrent_varlen", lambda kw: dict(kw, v=_unaligned(kw["v"])), r"^v stride \d+ at dim \d must be a multiple"),
    ("recurrent_varlen", lambda kw: dict(kw, ssm_state_indices=kw["ssm_state_indices"].t().contiguous().t()),
     r"^ssm_state_indices must have its last dim contiguous"),
    ("sigmoid_vllm_decode", lambda kw: dict(kw, b=kw["b"].float()), r"^b must have dtype"),
    # vLLM's [rows, HV] gates: their rows are in the key (they must cover the tokens), b's are the
    # compiled function's to check against a's
    ("sigmoid_vllm_wide_decode", lambda kw: dict(kw, a=kw["a"][:1], b=kw["b"][:1]), r"^a as \[rows, HV\] must have"),
    ("sigmoid_vllm_wide_decode", lambda kw: dict(kw, b=kw["b"][:-1]), r"^b must have shape"),
    # SGLang's decode layout goes as it is: the key holds what decides it, the rest is checked there
    ("sigmoid", lambda kw: dict(kw, k=kw["k"][:, :2]), r"^k must have shape"),
    ("sigmoid", lambda kw: dict(kw, q=_unaligned(kw["q"])), r"^q stride \d+ at dim \d must be a multiple"),
    ("sigmoid", lambda kw: dict(kw, b=kw["b"].float()), r"^b must have dtype"),
    ("sigmoid", lambda kw: dict(kw, initial_state_indices=torch.stack([kw["initial_state_indices"]] * 2, 1)[:, 0]),
     r"^initial_state_indices must have its last dim contiguous"),
    ("sigmoid", lambda kw: dict(kw, disable_state_update=True), r"disable_state_update / intermediate_states_buffer"),
    # not read by the key, used before the compiled function's checks (cut to the sequences)
    ("recurrent_varlen", lambda kw: dict(kw, num_accepted_tokens=kw["num_accepted_tokens"].tolist()),
     r"^num_accepted_tokens must be a torch.Tensor"),
    ("fused_step", lambda kw: dict(kw, A_log=kw["A_log"].bfloat16()), r"^A_log must have dtype float32"),
    ("fused_step", lambda kw: dict(kw, ssm_state=_misaligned_pool(kw["ssm_state"])), r"^ssm_state data pointer"),
    ("fused_step", lambda kw: dict(kw, out=torch.zeros(1, 1, 4, 64, dtype=BF16).expand(3, 1, 4, 64)),
     r"^out must not overlap itself"),
    ("fused_step", lambda kw: dict(kw, conv_state=_expanded(kw["conv_state"])), r"^conv_state must not overlap"),
    ("fused_step", lambda kw: dict(kw, dt_bias=kw["dt_bias"][:2]), r"^dt_bias must have shape"),
    # a flag that selects the variant, as a tensor (its value would need a host sync)
    ("packed", lambda kw: dict(kw, use_qk_l2norm_in_kernel=torch.tensor(True)),
     r"^use_qk_l2norm_in_kernel must be a bool, got Tensor"),
    ("sigmoid", lambda kw: dict(kw, use_qk_l2norm_in_kernel=torch.tensor(False)), r"^use_qk_l2norm_in_kernel must"),
    ("recurrent_varlen", lambda kw: dict(kw, use_qk_l2norm_in_kernel=torch.tensor(True)),
     r"^use_qk_l2norm_in_kernel must be a bool"),
    ("fused_step", lambda kw: dict(kw, use_qk_l2norm=torch.tensor(False)), r"^use_qk_l2norm must be a bool"),
    ("replay_commit", lambda kw: dict(kw, use_qk_l2norm=torch.tensor(True)), r"^use_qk_l2norm must be a bool"),
]


def _reset_memos(monkeypatch):
    for module, memo in ((api, "_VALIDATED"), (val, "_CHECKED"), (fused_step, "_VALIDATED"), (fastpath, "FAST")):
        monkeypatch.setattr(module, memo, {})


@pytest.mark.parametrize("name, change, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_a_change_that_matters_raises_the_first_calls_error(calls, monkeypatch, name, change, match):
    fn, make = ENTRIES[name]
    kw = make()
    message = _expect_same_error(fn, kw, change(kw), lambda: _reset_memos(monkeypatch), calls[1])
    assert re.search(match, message), message


@pytest.mark.parametrize("change, match", [c[1:] for c in BAD if c[0] == "fused_step"],
                         ids=[f"fused_step-{i}" for i, c in enumerate(BAD) if c[0] == "fused_step"])
def test_the_gemm_regime_refuses_what_its_step_would_before_the_gemm(calls, monkeypatch, change, match):
    """In the "gemm" regime the GEMM runs before the step's compiled function checks its tensors:
    a repeated call that function would refuse launches nothing and raises the first call's error."""
    _gemm_table(monkeypatch, calls[1])
    kw = make_fused_inputs(B=70, H=2, HV=4, D=64, hidden=128, P=80, seed=6)
    kw["out"] = torch.zeros(70, 1, 4, 64, dtype=BF16)
    bad = change(kw)
    if bad["out"].shape[0] != 70:  # the overlapping output of the 3-row call, at this batch
        bad["out"] = torch.zeros(1, 1, 4, 64, dtype=BF16).expand(70, 1, 4, 64)
    message = _expect_same_error(STEP, kw, bad, lambda: _reset_memos(monkeypatch), calls[1])
    assert re.search(match, message), message


def test_packed_row_stride_change_rebuilds_the_views(calls):
    """Another row stride of mixed_qkv (same shape) is another geometry: a new key, views of the
    new rows."""
    full, launched = calls
    kw = packed_kwargs()
    PACKED(**kw)
    wider = torch.zeros(kw["mixed_qkv"].shape[0], kw["mixed_qkv"].shape[1] + 40, dtype=BF16)
    wider[:, :kw["mixed_qkv"].shape[1]] = kw["mixed_qkv"]
    moved = dict(kw, mixed_qkv=wider[:, :kw["mixed_qkv"].shape[1]])
    for _ in range(2):
        PACKED(**moved)
    q, k, v = launched[-1][:3]
    assert q.stride(0) == wider.stride(0) and q.data_ptr() == wider.data_ptr()
    assert torch.equal(q.flatten(1), kw["mixed_qkv"][:, :q[0].numel()])
    assert len(fastpath.FAST) >= 2


def test_sigmoid_q_strides_change_rebuilds_the_views(calls):
    full, launched = calls
    kw = sigmoid_kwargs()
    SIGMOID(**kw)
    for name in ("q", "k", "v", "a", "b"):  # one tensor at a time: each one's strides are in the key
        dense = dict(kw, **{name: kw[name].contiguous()})
        for _ in range(2):
            SIGMOID(**dense)
        t, view = dense[name], launched[-1]["qkvab".index(name)]
        assert view.data_ptr() == t.data_ptr() and torch.equal(view.flatten(), t.flatten())


def test_sigmoid_gates_changing_form_take_their_own_views(calls):
    """SGLang's decode layout (2-D gates) goes as it is; 3-D gates with the same q go as row views
    (another key), and back: each call hands the compiled function its own form."""
    full, launched = calls
    kw = sigmoid_kwargs()
    SIGMOID(**kw)
    n_full = len(full)  # the checks one full way runs
    three_d = dict(kw, a=kw["a"][None], b=kw["b"][None])
    for call in (kw, kw, three_d, three_d, kw):
        SIGMOID(**call)
        a = launched[-1][3]
        assert a.shape == ((call["a"].shape[1], 1, a.shape[-1]) if call is three_d else call["a"].shape)
        assert a.data_ptr() == call["a"].data_ptr()
    assert len(full) == 2 * n_full, "one full way per form"


def test_recurrent_accepted_counts_appearing_take_the_full_way(calls):
    full, launched = calls
    kw = recurrent_kwargs(accepted=False)
    RECURRENT(**kw)
    n = len(full)
    RECURRENT(**dict(kw, num_accepted_tokens=torch.tensor([1, 2, 4], dtype=torch.int64)))
    assert len(full) > n and launched[-1][10] is not None


def test_recurrent_without_tokens_is_never_kept(calls):
    full, launched = calls
    kw = recurrent_kwargs()
    for n in ("q", "k", "v", "g", "beta"):
        kw[n] = kw[n][:, :0]
    kw["cu_seqlens"] = torch.zeros(4, dtype=torch.int32)
    for _ in range(2):
        RECURRENT(**kw)
    assert not launched and not fastpath.FAST


def test_fused_step_workspace_follows_the_current_stream(calls, monkeypatch):
    """The fast call takes the workspace of the stream current at the call, as the full way does."""
    full, launched = calls
    kw = _fused_kwargs()
    STEP(**kw)
    n = len(full)
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 8)
    STEP(**kw)
    assert len(full) == n  # the fast path
    ws7, ws8 = (fused_step._WORKSPACES[(torch.device("cpu"), s, 512, 4, 0, False)] for s in (7, 8))
    # One compiled function per step (StepArgs: the conv/gate kernel writes qkv (argument 7) and ba
    # (8), which the decode reads)
    assert len(launched) == 2
    step7, step8 = launched
    assert step7[7].data_ptr() == ws7.qkv.data_ptr() and step8[7].data_ptr() == ws8.qkv.data_ptr()
    assert step7[8].data_ptr() == ws7.ba.data_ptr() and step8[8].data_ptr() == ws8.ba.data_ptr()


def test_check_indices_always_takes_the_full_way(calls, monkeypatch):
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    full, launched = calls
    for name in ("packed", "sigmoid", "recurrent_varlen", "fused_step"):
        fn, make = ENTRIES[name]
        kw = make()
        fn(**kw)
        n = len(full)
        fn(**kw)
        assert len(full) > n, name


@pytest.mark.parametrize("slots, match", [([4, 4, 0], r"^state_indices must not repeat a written slot"),
                                          ([4, -1, 6], r"^state_indices values must be in \[0, 6\)")])
def test_check_indices_refuses_the_fused_steps_bad_slots(calls, monkeypatch, slots, match):
    """FLASHGDN_CHECK_INDICES=1: the fused step's slots in range and none written by two rows (a host
    sync), raised before any launch."""
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    full, launched = calls
    kw = _fused_kwargs()
    STEP(**kw)
    n = len(launched)
    with pytest.raises(ValueError, match=match):
        STEP(**dict(kw, state_indices=torch.tensor(slots, dtype=torch.int32)))
    assert len(launched) == n
