"""The repeated-call path (flashgdn.fastpath) on the GPU: one function called with signatures that
alternate, each call with fresh random inputs against the fp64 reference, so that a compiled
function kept for another signature (dtype, regime, padded pool, options) would be caught; and a
refused call after fast calls raises and writes nothing. The same for the engine entry points,
vLLM's recurrent op and the fused step, through their contract tests."""
import pytest
import torch

import flashgdn
from flashgdn import fastpath
from flashgdn import reference as ref
from flashgdn.device import facts_of
from flashgdn.kernels import policy
from helpers import (BF16, F32, assert_close_output, assert_close_state, expect_call_error, make_fused_inputs, make_inputs,
                     make_state)
from test_engines_gpu import PACKED_CASES, RECURRENT_CASES, SIGMOID_CASES
from test_engines_gpu import test_packed_decode_matches_the_contract as _packed_case
from test_engines_gpu import test_sigmoid_gating_update_matches_the_contract as _sigmoid_case
from test_engines_gpu import test_vllm_recurrent_matches_the_contract as _recurrent_case
from test_fused_step_gpu import _slots as _fused_slots
from test_fused_step_gpu import run_and_check as _fused_case

pytestmark = pytest.mark.gpu
DEV = "cuda"
H, HV, K, V = 2, 4, 128, 128
T_MTP = 3


def _large_batch() -> int:
    """The smallest batch of the "large" regime on this GPU (HV value heads)."""
    facts = facts_of(torch.device(DEV))
    return next(n for n in range(1, 1 << 16) if policy.regime(n, HV, facts.sm_count, facts.device_class) == "large")


def _pool_call(B=4, io=torch.bfloat16, sdt=torch.float32, pad=0, output_given=True, scale=None, l2=True, T=1):
    """One pretranspose (T = 1) or MTP call on a pool with fresh random inputs, checked against the
    reference: the written slots close, the others bit-equal, the output close."""
    P = 2 * B + 3
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, V, io, DEV)
    pool = make_state(P, HV, V, K, sdt, DEV, pad=pad)
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[-1] = -1  # one padding row
    before = pool.clone()
    ref_pool = before.double()
    output = torch.full((B, T, HV, V), float("nan"), dtype=io, device=DEV) if output_given else None
    if T == 1:
        o_ref, _ = ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, scale, None, l2,
                                                            ref_pool, idx, None, compute_dtype=torch.float64)
        o, st = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a, dt_bias, b, scale, output, l2,
                                                              pool, idx)
    else:
        o_ref, _ = ref.gated_delta_rule_mtp(q, k, v, ref_pool, idx, A_log, a, dt_bias, b, scale, None,
                                            disable_state_update=False, use_qk_l2norm=l2, compute_dtype=torch.float64)
        o, st = flashgdn.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, scale, output,
                                              disable_state_update=False, use_qk_l2norm=l2)
    assert st is pool and (o is output if output_given else o.shape == (B, T, HV, V))
    run = idx >= 0
    touched = torch.zeros(P, dtype=torch.bool, device=DEV)
    touched[idx[run].long()] = True
    assert torch.equal(pool[~touched], before[~touched]), "untouched pool slots changed"
    assert_close_state(pool[touched], ref_pool[touched])
    assert_close_output(o[run], o_ref[run])
    if T == 1:
        assert torch.all(o[~run] == 0), "a padding row's output is zero"
    elif not output_given:
        assert torch.all(o[~run] == 0), "an allocated output starts as zeros"


SIGNATURES = {
    "bf16": dict(),
    "fp16 (same fast key, refused)": dict(io=torch.float16),
    "bf16 state (same fast key, refused)": dict(sdt=torch.bfloat16),
    "padded pool": dict(pad=16),
    "output allocated": dict(output_given=False),
    "explicit scale": dict(scale=0.5 * K ** -0.5),
    "no l2norm": dict(l2=False),
    "large regime": dict(B=None),
    "mtp": dict(T=T_MTP),
    "mtp output allocated": dict(T=T_MTP, output_given=False),
}


def test_alternating_signatures_match_the_reference():
    large = _large_batch()
    for _ in range(3):  # every signature is seen again after all the others
        for name, sig in SIGNATURES.items():
            _pool_call(**dict(sig, B=large if sig.get("B", 4) is None else 4))
    assert fastpath.FAST, "the repeated calls took the fast path"


def test_a_refused_call_after_fast_calls_writes_nothing():
    for _ in range(2):
        _pool_call()
    B, P = 4, 11
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, V, torch.bfloat16, DEV)
    idx = torch.arange(B, dtype=torch.int32, device=DEV)
    output = torch.full((B, 1, HV, V), 7.0, dtype=torch.bfloat16, device=DEV)
    for bad, match in (
        (dict(initial_state=make_state(1, HV, V, K, torch.float32, DEV).expand(P, HV, V, K)),
         r"^initial_state must not overlap itself"),
        (dict(initial_state=make_state(P, HV, V, K, torch.float32, DEV), k=k.half()), r"^k must have dtype bfloat16"),
    ):
        kw = dict(dict(q=q, k=k, v=v, state=None, A_log=A_log, a=a, dt_bias=dt_bias, b=b, output=output,
                       initial_state_indices=idx), **bad)
        expect_call_error(flashgdn.gated_delta_rule_decode_pretranspose, kw, (ValueError, TypeError), match)


# ----------------------------------------------------------------------------- the engine entry points

# Each entry point's contract test (tests/test_engines_gpu.py, tests/test_fused_step_gpu.py: fresh
# tensors, NaN-poisoned outputs, fp64 references, untouched slots bit-equal) called with
# signatures that alternate, so that an entry kept for one signature, or view geometry kept for
# another layout, would be caught. Pairs differ in one fact: the state dtype (same fast key, the
# compiled function refuses), mixed_qkv's row stride (new geometry), the pool's slot padding, the
# scale, the sequence lengths at the same token count.
ROUNDS = 3  # every signature is seen again after all the others


def _alternate(case_fn, cases):
    for _ in range(ROUNDS):
        for c in cases:
            case_fn(c)
    assert fastpath.FAST, "the repeated calls took the fast path"


def test_packed_decode_alternating_signatures():
    p0 = PACKED_CASES[0]
    _alternate(_packed_case, [p0, dict(p0, sdt=BF16), dict(p0, strided=False), dict(p0, pad=0),
                              dict(p0, scale=0.1), PACKED_CASES[1], PACKED_CASES[3], PACKED_CASES[5]])


def test_sigmoid_gating_update_alternating_signatures():
    s0 = SIGMOID_CASES[0]
    _alternate(_sigmoid_case, [s0, dict(s0, sdt=BF16), dict(s0, softplus=(2.0, 5.0)), dict(s0, scale=0.1),
                               dict(s0, gates_3d=True), SIGMOID_CASES[2]])


def test_vllm_recurrent_alternating_signatures():
    r0 = RECURRENT_CASES[0]
    same_tokens = dict(r0, lengths=[4, 1, 0, 3, 2, 4, 3])  # 17 tokens as r0: the same fast key
    _alternate(_recurrent_case, [r0, same_tokens, dict(r0, sdt=BF16), dict(r0, acc=False), dict(r0, scale=0.1),
                                 dict(r0, gdt=BF16), RECURRENT_CASES[2], RECURRENT_CASES[3]])


def _fused_call(seed, B=7, layout="SD", sdt=F32, scale=None, slot_pad=0, side_stream=False):
    P = 2 * B + 5
    kw = make_fused_inputs(B, 4, 8, 128, 2048, 4, P=P, state_dtype=sdt, conv_layout=layout, bias=True,
                           slot_pad=slot_pad, slots=_fused_slots(B, P, pad=True, invalid=True, seed=seed), device=DEV,
                           seed=seed)
    if scale is not None:
        kw["scale"] = scale
    if not side_stream:
        _fused_case(kw)
        return
    stream = torch.cuda.Stream()  # another stream: another workspace (fused_step's module docstring)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _fused_case(kw)
    torch.cuda.current_stream().wait_stream(stream)


FUSED_SIGNATURES = [dict(), dict(sdt=BF16), dict(layout="DS"), dict(scale=0.05), dict(B=70), dict(slot_pad=64),
                    dict(side_stream=True)]


def test_fused_step_alternating_signatures():
    for r in range(ROUNDS):
        for i, sig in enumerate(FUSED_SIGNATURES):
            _fused_call(100 * r + i, **sig)
    assert fastpath.FAST, "the repeated calls took the fast path"


def test_fused_step_refused_after_fast_calls_writes_nothing():
    for seed in range(2):
        _fused_call(seed)
    B, P = 7, 19
    kw = make_fused_inputs(B, 4, 8, 128, 2048, 4, P=P, conv_layout="SD", bias=True,
                           slots=_fused_slots(B, P, pad=True, invalid=False, seed=0), device=DEV, seed=5)
    flat = torch.empty(kw["ssm_state"].numel() + 1, dtype=F32, device=DEV)
    misaligned = flat[1:].view(kw["ssm_state"].shape)  # 4 bytes past a 16-byte boundary
    misaligned.copy_(kw["ssm_state"])
    for bad, match in ((dict(A_log=kw["A_log"].to(BF16)), r"^A_log must have dtype float32"),
                       (dict(ssm_state=misaligned), r"^ssm_state data pointer")):
        call = dict(kw, out=torch.full((B, 1, 8, 128), 7.0, dtype=BF16, device=DEV), **bad)
        expect_call_error(flashgdn.gdn_fused_decode_step, call, (ValueError, TypeError), match)
