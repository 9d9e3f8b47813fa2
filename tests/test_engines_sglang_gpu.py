"""SGLang's target verify on the GPU: flashgdn.engines.fused_sigmoid_gating_delta_rule_update with T
draft tokens per sequence, the pool frozen and the state after every token written to SGLang's
speculative buffer `intermediate_states_buffer[intermediate_state_indices[i], t]`.

The expected values come from SGLang's contract written out in plain torch in fp64 (verify_contract,
from the kernel in sgl-project/sglang python/sglang/kernels/ops/attention/fla/
fused_sigmoid_gating_recurrent.py: the gates, the l2norm with eps 1e-6 inside the square root, the
delta rule on a [K, V] state per value head read from the K-last pool), not from flashgdn.reference.
flashgdn's documented differences (docs/engines.md) are part of what is checked: a padding sequence
(negative slot) gets zero outputs and writes nothing, a buffer row past the buffer or a tree parent
that is not an earlier token gives NaN outputs and writes nothing. Calls through the op get an
output poisoned with NaN; untouched buffer rows, the buffer's spare token steps, the slot padding of
buffer and pool and (frozen) the pool must keep their bits. EAGLE trees (retrieve_parent_token) and
the tensor-core kernel (by a table that sends per-token states to it) are covered too.
"""
from __future__ import annotations

import pytest
import torch

from flashgdn import engines
from flashgdn.kernels import policy
from helpers import BF16, F32, assert_close_output, assert_close_state, graph_replay_equals_eager, use_h200_table

pytestmark = pytest.mark.gpu
DEV = "cuda"
FN = engines.fused_sigmoid_gating_delta_rule_update
OP = torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update
OP_ARGS = ("A_log", "a", "dt_bias", "softplus_beta", "softplus_threshold", "q", "k", "v", "b", "initial_state_source",
           "initial_state_indices", "scale", "use_qk_l2norm_in_kernel", "cu_seqlens", "disable_state_update",
           "intermediate_states_buffer", "intermediate_state_indices", "retrieve_parent_token")


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


def verify_contract(q, k, v, a, b, A_log, dt_bias, softplus, scale, pool64, idx, buffer64, rows, T, update,
                    parents=None, stored=None):
    """SGLang's verify in fp64 on rows [N, T, ...] (q, k, v, a, b as SGLang passes them, viewed by
    sequence): sequence i starts from pool64[idx[i]], and after its token t its state goes to
    buffer64[rows[i], t] (rows[i] >= 0) and, with `update`, after its last token to pool64[idx[i]].
    With `parents` [N, T] (an EAGLE tree), token t >= 1 of a sequence with rows[i] >= 0 starts from
    the state stored after its parent token, read back from `stored`: the kernel's own buffer, so that
    each token is checked from the very state the kernel reloads (a bf16 state rounded once in fp32 and
    once in fp64 can differ by one unit, which the next tokens would carry past one rounding step).
    Returns the outputs [N, T, HV, V]; flashgdn's rules applied: padding (idx < 0) zero and nothing
    written; a buffer row past the buffer or a parent outside [0, t) NaN and nothing written."""
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
        tree = parents is not None and row >= 0
        if slot < 0:
            continue  # padding: zero outputs, nothing written
        if row >= buffer64.shape[0] or (tree and any(not 0 <= int(parents[i, t]) < t for t in range(1, T))):
            out[i] = float("nan")
            continue
        h = pool64[slot].transpose(-1, -2).clone()  # [HV, K, V]
        for t in range(T):
            if tree and t > 0:
                h = stored[row, int(parents[i, t])].double().transpose(-1, -2)
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
         scale=0.1, via_op=True),
    dict(N=4, T=3, H=1, HV=4, K=128, V=64, varlen=False, gates_3d=False, sdt=BF16, update=True, softplus=(1.0, 20.0),
         scale=None),
    dict(N=5, T=8, H=2, HV=4, K=128, V=128, varlen=False, gates_3d=True, sdt=F32, update=False, softplus=(1.0, 20.0),
         scale=None, via_op=True, rows_dtype=torch.int64),
    # the large-batch builds (B * HV past two heads per SM); SGLang's whole row table (longer than the batch)
    dict(N=70, T=4, H=2, HV=8, K=128, V=128, varlen=True, gates_3d=False, sdt=BF16, update=False,
         softplus=(1.0, 20.0), scale=None, long_rows=True),
    dict(N=40, T=8, H=4, HV=16, K=128, V=128, varlen=True, gates_3d=False, sdt=F32, update=True,
         softplus=(1.0, 20.0), scale=None, strided_rows=True),
]
TREE_CASES = [  # EAGLE trees (retrieve_parent_token): the token loop serves them at every batch size
    dict(N=6, T=4, H=2, HV=4, K=128, V=128, varlen=True, gates_3d=False, sdt=F32, update=False,
         softplus=(1.0, 20.0), scale=None),
    dict(N=7, T=8, H=2, HV=8, K=64, V=64, varlen=True, gates_3d=False, sdt=BF16, update=False,
         softplus=(1.0, 20.0), scale=None, via_op=True),
    dict(N=70, T=6, H=2, HV=8, K=128, V=128, varlen=False, gates_3d=True, sdt=BF16, update=False,
         softplus=(1.0, 20.0), scale=None),
]


def _case_id(c):
    return (f"N{c['N']}-T{c['T']}-HV{c['HV']}-K{c['K']}V{c['V']}-{'varlen' if c['varlen'] else 'batched'}-"
            f"{'g3' if c['gates_3d'] else 'g2'}-{str(c['sdt'])[6:]}-{'update' if c['update'] else 'frozen'}")


def _slots_and_rows(N, P, R, seed):
    """Slot indices (padding every fourth sequence from 1) and buffer rows (a permutation, one -1,
    one past the buffer: R, for a live sequence and for a padding one) of N sequences."""
    gen = _gen(seed)
    idx = torch.randperm(P, generator=gen)[:N]
    idx[1::4] = -1
    rows = torch.randperm(R, generator=gen)[:N]
    rows[0] = -1
    if N > 2:
        rows[2] = R
    if N > 5:
        rows[5] = R + 3  # a padding sequence (5 = 1 + 4): zero output, not NaN
    return idx.to(torch.int32).to(DEV), rows.to(torch.int32).to(DEV)


def _tree(N, T, seed):
    """retrieve_parent_token [N, T] of binary-tree drafts (token t's parent (t - 1) // 2; the root's
    -1), the chain (t - 1) for sequence 3, and a parent that is not an earlier token for sequence 4."""
    parents = torch.tensor([-1] + [(t - 1) // 2 for t in range(1, T)]).repeat(N, 1)
    if N > 3:
        parents[3] = torch.arange(-1, T - 1)
    if N > 4:
        parents[4, T - 1] = T - 1
    return parents.to(torch.int32).to(DEV)


def _case_verify(c, tree=False):
    N, T, H, HV, K, V, sdt = c["N"], c["T"], c["H"], c["HV"], c["K"], c["V"], c["sdt"]
    seed = 7 * N + T + (100 if tree else 0)
    q, k, v, a, b, A_log, dt_bias, cu = verify_inputs(N, T, H, HV, K, V, c["varlen"], c["gates_3d"], seed)
    P, R, steps = 2 * N + 3, N + 4, T + 1
    pool, pool_flat = padded((P, HV, V, K), sdt, 16, seed + 1)
    buffer, buffer_flat = padded((R, steps, HV, V, K), sdt, 32, seed + 2)
    idx, rows = _slots_and_rows(N, P, R, seed + 3)
    table = rows.to(c.get("rows_dtype", torch.int32))
    if c.get("long_rows"):  # SGLang's arange over its whole pool, the batch's rows first
        table = torch.cat([table, torch.arange(R, dtype=table.dtype, device=DEV)])
    if c.get("strided_rows"):
        table = torch.stack([table, torch.zeros_like(table)], 1)[:, 0]
    parents = _tree(N, T, seed + 4) if tree else None
    pool_before, buffer_before = pool_flat.clone(), buffer_flat.clone()
    pool64, buffer64 = pool.double(), buffer.double()

    kw = dict(A_log=A_log, a=a, dt_bias=dt_bias, softplus_beta=c["softplus"][0], softplus_threshold=c["softplus"][1],
              q=q, k=k, v=v, b=b, initial_state_source=pool, initial_state_indices=idx, scale=c["scale"],
              use_qk_l2norm_in_kernel=True, cu_seqlens=cu, disable_state_update=not c["update"],
              intermediate_states_buffer=buffer, intermediate_state_indices=table, retrieve_parent_token=parents)
    if c.get("via_op"):  # the op's eager body, on an output poisoned with NaN
        o = torch.full(v.shape, float("nan"), dtype=v.dtype, device=DEV)
        OP(*[kw[n] for n in OP_ARGS], o)
    else:
        o = FN(**kw, cache_steps=steps)
    torch.cuda.synchronize()
    expected = verify_contract(q, k, v, a, b, A_log, dt_bias, c["softplus"], c["scale"], pool64, idx, buffer64,
                               rows, T, c["update"], parents, buffer)

    assert tuple(o.shape) == (*q.shape[:2], HV, V) and o.dtype == q.dtype
    got = o.reshape(N, T, HV, V)
    pad = idx < 0
    bad = ~pad & expected.isnan().flatten(1).all(1)
    live = ~pad & ~bad
    assert bad.any() and live.any()
    assert torch.all(got[pad] == 0), "padding sequences must have zero outputs"
    assert torch.all(got[bad].isnan()), "a sequence the kernel refuses must have NaN outputs"
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
    pool_inner = pool[0].numel()
    assert torch.equal(pool_flat[:, pool_inner:], pool_before[:, pool_inner:]), "the pool's slot padding changed"
    if c["update"]:
        slots = idx[live].long()
        assert_close_state(pool[slots], pool64[slots], "pool")
        others = torch.ones(P, dtype=torch.bool, device=DEV)
        others[slots] = False
        assert torch.equal(pool[others], pool_before[:, :pool_inner].unflatten(1, pool.shape[1:])[others])
    else:
        assert torch.equal(pool_flat, pool_before), "the frozen pool changed"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_target_verify_matches_the_contract(case):
    _case_verify(case)


@pytest.mark.parametrize("case", TREE_CASES, ids=_case_id)
def test_tree_verify_matches_the_contract(case):
    _case_verify(case, tree=True)


@pytest.mark.parametrize("case", [c for c in CASES if c["N"] >= 40], ids=_case_id)
def test_target_verify_on_the_tensor_cores(case, monkeypatch):
    """The same contract on the tensor-core kernel (each token's state one matrix product), which a
    table takes for per-token states from mma_min_tokens_writes on (here the H200 table from T = 2)."""
    specs = use_h200_table(monkeypatch, mma_min_tokens_writes=2, mma_min_tokens_fp32=2)
    _case_verify(case)
    assert specs and all(policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA for s in specs)


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
