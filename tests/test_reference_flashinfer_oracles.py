"""flashgdn.reference against FlashInfer 0.7.2's own torch references, on CPU tensors: the
references of its trace templates (flashinfer.trace.templates.gdn: the decode, MTP with the
ReplaySSM windows, the ReplaySSM commit) and the composable path of gdn_fused_decode_step (its
Hopper path). A second oracle for the contracts flashgdn claims; the tests skip where FlashInfer
or these modules cannot be imported (the CI machine).
"""
from __future__ import annotations

import pytest
import torch

from flashgdn import reference as ref

fi_gdn = pytest.importorskip("flashinfer.trace.templates.gdn", reason="FlashInfer's trace templates are not importable")

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _randn(gen, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _gates(gen, *lead, HV):
    return _randn(gen, *lead, HV, dtype=BF16), _randn(gen, *lead, HV, dtype=BF16), torch.rand(HV, generator=gen), \
        _randn(gen, HV)


@pytest.mark.parametrize("B, H, HV, K, scale", [(3, 2, 4, 64, None), (2, 4, 8, 128, 0.3)])
def test_decode_equals_flashinfers_reference(B, H, HV, K, scale):
    """One token on a dense K-last state (FlashInfer's decode reference has no q/k norm: k is given
    unit norm, use_qk_l2norm=False): outputs bit for bit, the state within fp32 rounding."""
    gen = torch.Generator().manual_seed(B * K)
    q, k = _randn(gen, B, 1, H, K, dtype=BF16), _randn(gen, B, 1, H, K)
    k = (k / k.norm(dim=-1, keepdim=True)).to(BF16)
    v = _randn(gen, B, 1, HV, K, dtype=BF16)
    a, b, A_log, dt_bias = _gates(gen, B, 1, HV=HV)
    state = _randn(gen, B, HV, K, K, scale=0.1)
    out_fi, state_fi = fi_gdn._gdn_decode_reference(q, k, v, state.clone(), A_log, a, dt_bias, b, scale)
    ours = state.clone()
    out = ref.gated_delta_rule_decode_pretranspose(q, k, v, ours, A_log, a, dt_bias, b, scale=scale,
                                                   use_qk_l2norm=False, compute_dtype=F64)[0]
    assert torch.equal(out, out_fi)
    torch.testing.assert_close(ours, state_fi, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("B, T, H, HV, K, P, slots, l2norm, state_dtype", [
    (4, 4, 2, 4, 64, 7, [3, -1, 0, 6], True, F32),
    (3, 8, 1, 2, 128, 5, [4, 1, -1], False, BF16),
])
def test_replay_verify_equals_flashinfers_reference(B, T, H, HV, K, P, slots, l2norm, state_dtype):
    """MTP with cache_replayssm=True (the pool frozen, padding rows): outputs and the four windows
    bit for bit, the pool untouched."""
    gen = torch.Generator().manual_seed(T * K)
    q, k = _randn(gen, B, T, H, K, dtype=BF16), _randn(gen, B, T, H, K, dtype=BF16)
    v = _randn(gen, B, T, HV, K, dtype=BF16)
    a, b, A_log, dt_bias = _gates(gen, B, T, HV=HV)
    pool = _randn(gen, P, HV, K, K, dtype=state_dtype, scale=0.1)
    idx = torch.tensor(slots, dtype=torch.int32)

    def windows():
        return [torch.zeros(P, HV, T, K, dtype=BF16), torch.zeros(P, H, T, K, dtype=BF16), torch.zeros(P, HV, T),
                torch.zeros(P, HV, T)]

    fi_win, our_win = windows(), windows()
    out_fi, _ = fi_gdn._gdn_mtp_reference(
        q, k, v, pool.float(), idx, A_log, a, dt_bias, b, None, None, cache_replayssm=True, disable_state_update=True,
        use_qk_l2norm=l2norm, replayssm_rawv=fi_win[0], replayssm_rawk=fi_win[1], replayssm_g=fi_win[2],
        replayssm_beta=fi_win[3])
    ours = pool.clone()
    out, _ = ref.gated_delta_rule_mtp(q, k, v, ours, idx, A_log, a, dt_bias, b, use_qk_l2norm=l2norm,
                                      cache_replayssm=True, replayssm_rawv=our_win[0], replayssm_rawk=our_win[1],
                                      replayssm_g=our_win[2], replayssm_beta=our_win[3], compute_dtype=F64)
    assert torch.equal(out, out_fi) and torch.equal(ours, pool)
    for name, x, y in zip(("rawv", "rawk", "g", "beta"), our_win, fi_win):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("L, T, H, HV, K, P, slots, accepted, null_block_id, track", [
    (2, 4, 2, 4, 64, 9, [3, 0, 5, 7], [2, 4, 0, 4], -1, ([8, 1, 2, -1], [1, 3, 0, 2])),
    (3, 8, 1, 2, 64, 10, [3, 0, 5, 7, 9], [8, 4, 1, 3, 5], 0, ([8, 0, 2, 6, 4], [7, 3, 0, 1, 2])),
    (1, 2, 2, 2, 128, 6, [1, 2, 4], [1, 2, 2], -1, None),
])
def test_commit_equals_flashinfers_reference(L, T, H, HV, K, P, slots, accepted, null_block_id, track):
    """The ReplaySSM commit over L layers: accepted counts 0..T, null blocks, track writes (to a
    live slot and to a null one): the checkpoint pool bit for bit."""
    gen = torch.Generator().manual_seed(L * T + P)
    checkpoint = _randn(gen, L, P, HV, K, K, scale=0.1)
    rawv, rawk = _randn(gen, L, P, HV, T, K, dtype=BF16), _randn(gen, L, P, H, T, K, dtype=BF16)
    log_g, beta = -torch.rand(L, P, HV, T, generator=gen), torch.rand(L, P, HV, T, generator=gen)
    idx, acc = torch.tensor(slots, dtype=torch.int32), torch.tensor(accepted, dtype=torch.int32)
    kw = dict(null_block_id=null_block_id)
    if track is not None:
        kw.update(track_state_indices=torch.tensor(track[0], dtype=torch.int32),
                  track_steps=torch.tensor(track[1], dtype=torch.int32))
    fi_state, ours = checkpoint.clone(), checkpoint.clone()
    fi_gdn._gdn_replayssm_commit_reference(fi_state, rawv, rawk, log_g, beta, idx, acc, **kw)
    ref.gated_delta_rule_replayssm_commit(ours, rawv, rawk, log_g, beta, idx, acc, compute_dtype=F64, **kw)
    assert torch.equal(ours, fi_state)


@pytest.mark.parametrize("B, H, HV, D, hidden, width, P, slots, layout, bias, scale", [
    (4, 2, 4, 64, 128, 4, 6, [3, -1, 0, 5], "SD", True, None),
    (3, 4, 8, 128, 256, 3, 5, [4, 1, -1], "DS", False, 0.0),
])
def test_fused_step_equals_flashinfers_hopper_path(B, H, HV, D, hidden, width, P, slots, layout, bias, scale):
    """gdn_fused_decode_step: FlashInfer's composable path (what it runs on Hopper) on an fp32 pool,
    both conv-state layouts, padding, scale None and 0.0: outputs and conv pools bit for bit, the
    ssm pool within fp32 rounding."""
    fused = pytest.importorskip("flashinfer.gdn_kernels.experimental.gdn_fused_decode",
                                reason="FlashInfer's gdn_fused_decode_step is not importable")
    gen = torch.Generator().manual_seed(B * D + width)
    C = (2 * H + HV) * D
    hidden_states = _randn(gen, B, hidden, dtype=BF16)
    w_ba = _randn(gen, hidden, 2 * HV, dtype=BF16, scale=hidden ** -0.5)
    mixed_qkv = _randn(gen, B, C, dtype=BF16)
    conv_weight, conv_bias = _randn(gen, C, width, dtype=BF16, scale=0.5), _randn(gen, C, dtype=BF16, scale=0.1)
    conv_state = (_randn(gen, P, width - 1, C, dtype=BF16).transpose(1, 2) if layout == "SD"
                  else _randn(gen, P, C, width - 1, dtype=BF16))
    A_log, dt_bias = torch.rand(HV, generator=gen), _randn(gen, HV)
    ssm = _randn(gen, P, HV, D, D, scale=0.1)
    idx = torch.tensor(slots, dtype=torch.int32)
    fi_conv, fi_ssm = conv_state.clone(), ssm.clone()
    out_fi, _, _ = fused._gdn_fused_decode_step_fallback(
        hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias if bias else torch.zeros_like(conv_bias), fi_conv,
        A_log, dt_bias, scale, fi_ssm, idx, True)
    our_conv, our_ssm = conv_state.clone(), ssm.clone()
    out, _, _ = ref.gdn_fused_decode_step(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias if bias else None,
                                          our_conv, A_log, dt_bias, scale, our_ssm, idx, True)
    assert torch.equal(out, out_fi) and torch.equal(our_conv, fi_conv)
    torch.testing.assert_close(our_ssm, fi_ssm, atol=1e-6, rtol=1e-6)


def test_mtp_with_intermediates_equals_flashinfers_reference():
    """MTP writing the state after every token to intermediate_states_buffer[row, t] and the final
    state to the pool (disable_state_update=False), with a padding row: bit for bit."""
    B, T, H, HV, K, P = 3, 4, 2, 4, 64, 6
    gen = torch.Generator().manual_seed(5)
    q, k = _randn(gen, B, T, H, K, dtype=BF16), _randn(gen, B, T, H, K, dtype=BF16)
    v = _randn(gen, B, T, HV, K, dtype=BF16)
    a, b, A_log, dt_bias = _gates(gen, B, T, HV=HV)
    pool = _randn(gen, P, HV, K, K, scale=0.1)
    idx = torch.tensor([2, -1, 5], dtype=torch.int32)
    fi_buf, our_buf = torch.zeros(B, T, HV, K, K), torch.zeros(B, T, HV, K, K)
    out_fi, pool_fi = fi_gdn._gdn_mtp_reference(q, k, v, pool.clone(), idx, A_log, a, dt_bias, b, None, fi_buf,
                                                disable_state_update=False)
    ours = pool.clone()
    out, _ = ref.gated_delta_rule_mtp(q, k, v, ours, idx, A_log, a, dt_bias, b, intermediate_states_buffer=our_buf,
                                      disable_state_update=False, compute_dtype=F64)
    assert torch.equal(out, out_fi) and torch.equal(ours, pool_fi) and torch.equal(our_buf, fi_buf)
