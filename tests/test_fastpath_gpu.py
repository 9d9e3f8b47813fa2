"""The repeated-call path (flashgdn.fastpath) on the GPU: one function called with signatures that
alternate, each call with fresh random inputs against the fp64 reference, so that a compiled
function kept for another signature (dtype, regime, padded pool, options) would be caught; and a
refused call after fast calls raises and writes nothing."""
import pytest
import torch

import flashgdn
from flashgdn import fastpath
from flashgdn import reference as ref
from flashgdn.device import facts_of
from flashgdn.kernels import policy
from helpers import assert_close_output, assert_close_state, make_inputs, make_state

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
        before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
        with pytest.raises((ValueError, TypeError), match=match):
            flashgdn.gated_delta_rule_decode_pretranspose(**kw)
        torch.cuda.synchronize()
        for n, t in before.items():
            assert torch.equal(kw[n], t), f"{n} changed by a refused call"
