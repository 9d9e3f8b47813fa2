"""SGLang's target verify on the GPU: flashgdn.engines.fused_sigmoid_gating_delta_rule_update with T
draft tokens per sequence, the pool frozen and the state after every token written to SGLang's
speculative buffer `intermediate_states_buffer[intermediate_state_indices[i], t]`.

The expected values come from SGLang's contract written out in plain torch in fp64 (verify_contract,
from the kernel in sgl-project/sglang python/sglang/kernels/ops/attention/fla/
fused_sigmoid_gating_recurrent.py: the gates, the l2norm with eps 1e-6 inside the square root, the
delta rule on a [K, V] state per value head read from the K-last pool), not from flashgdn.reference.
flashgdn's documented differences (docs/engines.md) are part of what is checked: a padding sequence
(negative slot) gets zero outputs and writes nothing, a buffer row past the buffer gives NaN outputs
and writes nothing. Outputs are poisoned before the call; untouched buffer rows, the buffer's spare
token steps, its slot padding and (frozen) the pool must keep their bits.
"""
from __future__ import annotations

import pytest
import torch

from flashgdn import engines
from helpers import BF16, F32, assert_close_output, assert_close_state, graph_replay_equals_eager

pytestmark = pytest.mark.gpu
DEV = "cuda"
FN = engines.fused_sigmoid_gating_delta_rule_update


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def verify_inputs(N, T, H, HV, K, V, varlen, gates_3d, seed):
    """q, k, v views of one packed projection row per token in SGLang's layout ([1, N*T, ...] or
    [N, T, ...]), a and b views of one gate tensor ([N*T, HV], or 3-D in q's leading dims), A_log,
    dt_bias, cu_seqlens."""
    gen = _gen(seed)
    width = 2 * H * K + HV * V
    mixed = torch.randn(N * T, width + 24, generator=gen).to(BF16).to(DEV)[:, :width]
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unflatten(0, (N, T)))
    q = lead(mixed[:, :H * K].unflatten(1, (H, K)))
    k = lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K)))
    v = lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V)))
    ab = torch.randn(N * T, 2 * HV + 8, generator=gen).to(BF16).to(DEV)
    b, a = ab[:, :HV], ab[:, HV:2 * HV]
    if gates_3d:
        a, b = lead(a), lead(b)
    A_log = torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(DEV)
    dt_bias = torch.randn(HV, generator=gen).to(DEV)
    cu = torch.arange(0, N * T + 1, T, dtype=torch.int32, device=DEV) if varlen else None
    return q, k, v, a, b, A_log, dt_bias, cu


def padded(shape, dtype, pad, seed):
    """(tensor of `shape`, its allocation): the first dim's stride padded by `pad` elements."""
    inner = 1
    for d in shape[1:]:
        inner *= d
    flat = torch.randn(shape[0], inner + pad, generator=_gen(seed)).to(dtype).to(DEV)
    return flat[:, :inner].unflatten(1, shape[1:]), flat


def verify_contract(q, k, v, a, b, A_log, dt_bias, softplus, scale, pool64, idx, buffer64, rows, T, update):
    """SGLang's verify in fp64 on rows [N, T, ...] (q, k, v, a, b as SGLang passes them, viewed by
    sequence): sequence i starts from pool64[idx[i]], and after its token t its state goes to
    buffer64[rows[i], t] (rows[i] >= 0) and, with `update`, after its last token to pool64[idx[i]].
    Returns the outputs [N, T, HV, V]; flashgdn's rules for padding and rows past the buffer applied."""
    N, HV, V, K = idx.shape[0], *pool64.shape[1:]
    H = q.shape[-2]
    q, k, v = (t.reshape(N, T, *t.shape[-2:]).double() for t in (q, k, v))
    a, b = a.reshape(N, T, HV).double(), b.reshape(N, T, HV).double()
    sp_beta, sp_threshold = softplus
    x = a + dt_bias.double()
    soft = torch.where(sp_beta * x <= sp_threshold, torch.log1p(torch.exp(sp_beta * x)) / sp_beta, x)
    decay = torch.exp(-torch.exp(A_log.double()) * soft)  # [N, T, HV]
    beta = torch.sigmoid(b)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * (K ** -0.5 if scale is None else scale)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = HV // H
    out = torch.zeros(N, T, HV, V, dtype=torch.float64, device=DEV)
    for i in range(N):
        slot, row = int(idx[i]), int(rows[i])
        if slot < 0:
            continue  # padding: zero outputs, nothing written
        if row >= buffer64.shape[0]:
            out[i] = float("nan")
            continue
        h = pool64[slot].transpose(-1, -2).clone()  # [HV, K, V]
        for t in range(T):
            kt, qt = k[i, t].repeat_interleave(group, 0), q[i, t].repeat_interleave(group, 0)  # [HV, K]
            h = h * decay[i, t][:, None, None]
            u = (v[i, t] - torch.einsum("hkv,hk->hv", h, kt)) * beta[i, t][:, None]
            h = h + kt[:, :, None] * u[:, None, :]
            out[i, t] = torch.einsum("hkv,hk->hv", h, qt)
            if row >= 0:
                buffer64[row, t] = h.transpose(-1, -2)
        if update:
            pool64[slot] = h.transpose(-1, -2)
    return out


CASES = [
    dict(N=5, T=2, H=2, HV=4, K=128, V=128, varlen=True, gates_3d=False, sdt=F32, update=False, softplus=(1.0, 20.0),
         scale=None),
    dict(N=6, T=4, H=2, HV=8, K=64, V=128, varlen=True, gates_3d=True, sdt=BF16, update=False, softplus=(2.0, 5.0),
         scale=0.1),
    dict(N=4, T=3, H=1, HV=4, K=128, V=64, varlen=False, gates_3d=False, sdt=BF16, update=True, softplus=(1.0, 20.0),
         scale=None),
    dict(N=5, T=8, H=2, HV=4, K=128, V=128, varlen=False, gates_3d=True, sdt=F32, update=False, softplus=(1.0, 20.0),
         scale=None),
    # the large-batch builds (B * HV past two heads per SM)
    dict(N=70, T=4, H=2, HV=8, K=128, V=128, varlen=True, gates_3d=False, sdt=BF16, update=False,
         softplus=(1.0, 20.0), scale=None),
    dict(N=40, T=8, H=4, HV=16, K=128, V=128, varlen=True, gates_3d=False, sdt=F32, update=True,
         softplus=(1.0, 20.0), scale=None),
]


def _case_id(c):
    return (f"N{c['N']}-T{c['T']}-HV{c['HV']}-K{c['K']}V{c['V']}-{'varlen' if c['varlen'] else 'batched'}-"
            f"{'g3' if c['gates_3d'] else 'g2'}-{str(c['sdt'])[6:]}-{'update' if c['update'] else 'frozen'}")


def _slots_and_rows(N, P, R, seed):
    """Slot indices (padding every fourth sequence from 1) and buffer rows (a permutation, one -1,
    one past the buffer: R) of N sequences."""
    gen = _gen(seed)
    idx = torch.randperm(P, generator=gen)[:N]
    idx[1::4] = -1
    rows = torch.randperm(R, generator=gen)[:N]
    rows[0] = -1
    if N > 2:
        rows[2] = R
    return idx.to(torch.int32).to(DEV), rows.to(torch.int32).to(DEV)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_target_verify_matches_the_contract(case):
    c = dict(case)
    N, T, H, HV, K, V, sdt = c["N"], c["T"], c["H"], c["HV"], c["K"], c["V"], c["sdt"]
    seed = 7 * N + T
    q, k, v, a, b, A_log, dt_bias, cu = verify_inputs(N, T, H, HV, K, V, c["varlen"], c["gates_3d"], seed)
    P, R, steps = 2 * N + 3, N + 4, T + 1
    pool, pool_flat = padded((P, HV, V, K), sdt, 16, seed + 1)
    buffer, buffer_flat = padded((R, steps, HV, V, K), sdt, 32, seed + 2)
    idx, rows = _slots_and_rows(N, P, R, seed + 3)
    pool_before, buffer_before = pool_flat.clone(), buffer_flat.clone()
    pool64, buffer64 = pool.double(), buffer.double()

    expected = verify_contract(q, k, v, a, b, A_log, dt_bias, c["softplus"], c["scale"], pool64, idx, buffer64,
                               rows, T, c["update"])
    o = FN(A_log=A_log, a=a, dt_bias=dt_bias, softplus_beta=c["softplus"][0], softplus_threshold=c["softplus"][1],
           q=q, k=k, v=v, b=b, initial_state_source=pool, initial_state_indices=idx, scale=c["scale"],
           use_qk_l2norm_in_kernel=True, cu_seqlens=cu, disable_state_update=not c["update"],
           intermediate_states_buffer=buffer, intermediate_state_indices=rows, cache_steps=steps)
    torch.cuda.synchronize()

    assert tuple(o.shape) == (*q.shape[:2], HV, V) and o.dtype == q.dtype
    got = o.reshape(N, T, HV, V)
    pad, past = idx < 0, (rows >= R) & (idx >= 0)
    live = ~pad & ~past
    assert torch.all(got[pad] == 0), "padding sequences must have zero outputs"
    assert torch.all(got[past].isnan()), "a sequence whose buffer row is past the buffer must have NaN outputs"
    assert_close_output(got[live], expected[live])

    written = rows[live & (rows >= 0)].long()
    kept = torch.ones(R, dtype=torch.bool, device=DEV)
    kept[written] = False
    inner = buffer[0].numel()
    before = buffer_before[:, :inner].unflatten(1, buffer.shape[1:])
    assert torch.equal(buffer[kept], before[kept]), "a buffer row no sequence writes changed"
    assert torch.equal(buffer[written, T:], before[written, T:]), "a spare token step of the buffer changed"
    assert torch.equal(buffer_flat[:, inner:], buffer_before[:, inner:]), "the buffer's slot padding changed"
    assert_close_state(buffer[written, :T], buffer64[written, :T], "intermediate states")
    if c["update"]:
        slots = idx[live].long()
        assert_close_state(pool[slots], pool64[slots], "pool")
        others = torch.ones(P, dtype=torch.bool, device=DEV)
        others[slots] = False
        pool_inner = pool[0].numel()
        assert torch.equal(pool[others], pool_before[:, :pool_inner].unflatten(1, pool.shape[1:])[others])
    else:
        assert torch.equal(pool_flat, pool_before), "the frozen pool changed"


@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_target_verify_cuda_graph_replay_equals_eager(sdt):
    """New draft tokens, slots and buffer rows per replay, as SGLang's verify step under its graphs."""
    N, T, H, HV, K, V = 6, 3, 2, 8, 128, 128
    P, R = 2 * N + 3, N + 2
    width = 2 * H * K + HV * V
    static = [torch.zeros(N * T, width + 24, dtype=BF16, device=DEV),
              torch.zeros(N * T, 2 * HV + 8, dtype=BF16, device=DEV),
              torch.zeros(N, dtype=torch.int32, device=DEV), torch.zeros(N, dtype=torch.int32, device=DEV)]

    def fresh(i):
        gen = _gen(40 + i)
        idx, rows = _slots_and_rows(N, P, R - 1, 50 + i)  # rows within the buffer: no NaN rows
        return [torch.randn(N * T, width + 24, generator=gen).to(BF16).to(DEV),
                torch.randn(N * T, 2 * HV + 8, generator=gen).to(BF16).to(DEV), idx, rows]

    for s, f in zip(static, fresh(-1)):
        s.copy_(f)
    mixed_buf, ab_buf, idx, rows = static
    mixed = mixed_buf[:, :width]
    q = mixed[:, :H * K].unflatten(1, (H, K)).unsqueeze(0)
    k = mixed[:, H * K:2 * H * K].unflatten(1, (H, K)).unsqueeze(0)
    v = mixed[:, 2 * H * K:].unflatten(1, (HV, V)).unsqueeze(0)
    cu = torch.arange(0, N * T + 1, T, dtype=torch.int32, device=DEV)
    _, _, _, _, _, A_log, dt_bias, _ = verify_inputs(1, 1, H, HV, K, V, True, False, 3)
    pool, _ = padded((P, HV, V, K), sdt, 16, 4)
    buffer, _ = padded((R, T, HV, V, K), sdt, 0, 5)

    def call(t):
        return FN(A_log, ab_buf[:, HV:2 * HV], dt_bias, 1.0, 20.0, q, k, v, ab_buf[:, :HV], pool, idx,
                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu, disable_state_update=True,
                  intermediate_states_buffer=t["buffer"], intermediate_state_indices=rows, cache_steps=T)

    graph_replay_equals_eager(call, static, fresh, dict(buffer=buffer))
