"""MTP (T > 1 tokens) kernel: outputs, intermediates slot by slot, state commit, padding."""
import itertools

import pytest
import torch

import flashgdn
from flashgdn import reference as ref
from flashgdn.kernels import policy
from helpers import assert_close_output, assert_close_state, make_inputs, make_state, use_h200_table, use_table

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _cases():
    cases = []
    for n, (T, B) in enumerate(itertools.product((2, 3, 4, 8, 16), (1, 5, 64, 200))):
        cases.append(dict(T=T, B=B, ratio=(1, 2)[n % 2], sdt=(torch.float32, torch.bfloat16)[(n // 2) % 2],
                          inter=bool((n // 3) % 2), update=(n % 5 != 4), accepted=(n % 4 == 1), pad=(n % 3 == 0)))
    return cases


def _run(T, B, ratio, sdt, inter, update, accepted, pad, strided=False, A_log=None, K=128, out_none=False):
    H = 2
    HV = H * ratio
    q, k, v, a, b, A_log_rand, dt_bias = make_inputs(B, T, H, HV, K, K, device=DEV, strided=strided)
    A_log = A_log_rand if A_log is None else A_log.to(DEV)
    P = B + 4
    pool = make_state(P, HV, K, K, sdt, DEV)
    before = pool.clone()
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    if pad:
        idx[::2] = -1
    acc = torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV) if accepted and update else None
    ibuf = torch.full((B, T, HV, K, K), float("nan"), dtype=sdt, device=DEV) if inter else None
    ref_ibuf = torch.zeros(B, T, HV, K, K, device=DEV, dtype=torch.float64) if inter else None
    ref_pool = before.double()
    o_ref, _ = ref.gated_delta_rule_mtp(q, k, v, ref_pool, idx, A_log, a, dt_bias, b, None, None, ref_ibuf,
                                        disable_state_update=not update, accepted_tokens=acc, compute_dtype=torch.float64)
    out = None if out_none else torch.full((B, T, HV, K), float("nan"), dtype=q.dtype, device=DEV)
    o, st = flashgdn.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, None, out, ibuf,
                                         disable_state_update=not update, accepted_tokens=acc)
    assert (out_none or o is out) and st is pool
    run = idx >= 0
    if out_none:
        assert o.shape == (B, T, HV, K) and (o[~run] == 0).all(), "an allocated output's padding rows are zero"
    else:
        assert torch.isnan(o[~run]).all(), "a padding row's output is left as it is (FlashInfer's MTP rule)"
    assert_close_output(o[run], o_ref[run])
    touched = torch.zeros(P, dtype=torch.bool, device=DEV)
    if update:
        touched[idx[run].long()] = True
        assert_close_state(pool[touched], ref_pool[touched])
    assert torch.equal(pool[~touched], before[~touched]), "pool slots that must stay untouched changed"
    if inter:
        for t in range(T):
            assert_close_state(ibuf[run, t], ref_ibuf[run, t], f"intermediate state after token {t + 1}")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items()))
def test_mtp_matches_reference(case):
    _run(**case)


@pytest.mark.parametrize("T", (6, 8, 16))
@pytest.mark.parametrize("B", (5, 200), ids=("small", "large"))
@pytest.mark.parametrize("inter", (True, False), ids=("inter", "accepted"))
@pytest.mark.parametrize("sdt", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_mtp_extreme_decay(sdt, inter, B, T):
    """Decays from ~1 to exactly 0 in fp32 (A_log = 7: g = exp(-1097 softplus(.)) underflows), so
    the token-by-token kernel's folded decay scale takes its rescale path, with and without a zero g
    (bf16 at large batch without intermediates runs the tensor-core kernel, whose decay products
    underflow to 0 instead); with the
    intermediates written, and with accepted counts instead; in both regimes (CTA shapes). At T=6
    with accepted counts, the fp32 large-batch build runs both token loops in one launch: the
    unchecked one for the heads whose decays stay above the rescale bound (A_log = -6), the checked
    one for those whose decays underflow (A_log = 4, 7)."""
    A_log = torch.tensor([-6.0, 2.0, 4.0, 7.0])
    _run(T, B, 2, sdt, inter, True, not inter, False, A_log=A_log)


@pytest.mark.parametrize("table, kernel", [("sm90-hbm3", policy.KMTP), ("sm90-hbm3e", policy.KMTP_MMA)],
                         ids=("h100-table", "h200-table"))
@pytest.mark.parametrize("inter,update,accepted", [(False, True, False), (False, True, True), (True, False, False)],
                         ids=("plain", "accepted", "inter-noupdate"))
def test_mtp_fp32_large_t8(monkeypatch, inter, update, accepted, table, kernel):
    """fp32 state, large-batch regime, T=8, as each table builds it without intermediates: the H100's
    "mtp_long" (4, 4, 8) token loop with the L2 prefetch, the H200's tensor cores (2, 1); with them
    the "mtp_inter" token loop in both."""
    specs = use_table(monkeypatch, table)
    _run(8, 200, 2, torch.float32, inter, update, accepted, True)
    assert specs and {policy.BuildConfig.for_spec(s).kernel for s in specs} == {policy.KMTP if inter else kernel}


@pytest.mark.parametrize("accepted", (False, True), ids=("plain", "accepted"))
@pytest.mark.parametrize("sdt", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_mtp_two_tokens_large_batch(sdt, accepted):
    """T=2, large-batch regime, no intermediates: the kmtp builds that prefetch 6 MiB of state
    ahead (the policy table's short_mtp_tokens), with padding rows."""
    _run(2, 200, 2, sdt, False, True, accepted, True)


@pytest.mark.parametrize("sdt,T,B", [(torch.float32, 4, 5), (torch.bfloat16, 3, 64), (torch.bfloat16, 8, 200),
                                     (torch.float32, 8, 200)])
def test_mtp_allocated_output_has_zero_padding_rows(sdt, T, B):
    """output=None: flashgdn allocates the output and the kernel writes every row of it, zeros for
    padding rows (FlashInfer's allocated output has them): the token loop and, at B = 200, the
    tensor cores (bf16; fp32 on the H200 table)."""
    _run(T, B, 2, sdt, False, True, False, True, out_none=True)


@pytest.mark.parametrize("T,update,accepted,pad,ratio,K", [
    (5, True, False, True, 1, 128), (6, True, True, False, 2, 128), (7, False, False, True, 2, 128),
    (8, True, True, True, 1, 128), (16, True, False, False, 2, 128), (16, True, True, True, 1, 128),
    (8, True, True, True, 2, 64), (5, True, False, True, 2, 256), (16, True, True, False, 1, 256),
])
def test_mtp_bf16_tensor_core(T, update, accepted, pad, ratio, K):
    """bf16 state, large batch, T >= 5: the tensor-core kernel (closed form, the state update as a
    matrix product), with padding, accepted counts, no state update, GVA and other head dims."""
    _run(T, 200, ratio, torch.bfloat16, False, update, accepted, pad, K=K)


@pytest.mark.parametrize("T,update,accepted,pad,ratio,K", [
    (2, True, False, True, 1, 128), (4, True, True, False, 2, 128), (8, False, False, True, 2, 128),
    (8, True, True, True, 1, 64), (16, True, False, True, 2, 128), (5, True, True, False, 1, 256),
])
def test_mtp_fp32_tensor_core(monkeypatch, T, update, accepted, pad, ratio, K):
    """fp32 state on the tensor-core kernel (its dot products on bf16 hi + lo parts of the state),
    which a table takes from mma_min_tokens_fp32 on (here the H200 table from T = 2): outputs, and
    the state after up to 16 tokens within the fp32 tolerance; padding, accepted counts, no state
    update, GVA, other head dims."""
    specs = use_h200_table(monkeypatch, mma_min_tokens_fp32=2)
    _run(T, 200, ratio, torch.float32, False, update, accepted, pad, K=K)
    assert specs and all(policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA for s in specs)


@pytest.mark.parametrize("T,sdt,pad,ratio", [(3, torch.bfloat16, True, 2), (4, torch.bfloat16, False, 1),
                                             (6, torch.float32, True, 2), (7, torch.float32, False, 1)])
def test_mtp_frozen_tensor_core_in_the_h100_table(monkeypatch, T, sdt, pad, ratio):
    """MTP without a state update on the tensor-core kernel, which the H100 table takes from its
    mma_min_tokens_frozen on (a bf16 state from T = 3, an fp32 one from T = 6 on four warps of one
    16-row block): outputs; the pool untouched; padding, GVA."""
    specs = use_table(monkeypatch, "sm90-hbm3")
    _run(T, 200, ratio, sdt, False, False, False, pad)
    assert specs and all(policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA for s in specs)


@pytest.mark.parametrize("T,sdt,update,accepted,pad,ratio,K", [
    (2, torch.float32, True, True, True, 1, 128), (4, torch.bfloat16, True, False, False, 2, 128),
    (4, torch.float32, False, False, True, 2, 128), (8, torch.bfloat16, True, True, True, 1, 128),
    (8, torch.float32, True, False, False, 2, 64), (16, torch.bfloat16, False, False, True, 2, 128),
])
def test_mtp_tensor_core_intermediates(monkeypatch, T, sdt, update, accepted, pad, ratio, K):
    """Intermediate states on the tensor-core kernel (the state after each token one matrix product),
    which a table takes from mma_min_tokens_writes on (here the H200 table from T = 2, both state
    dtypes): every intermediate, the committed state (all T or the accepted count) and outputs."""
    specs = use_h200_table(monkeypatch, mma_min_tokens_writes=2, mma_min_tokens_fp32=2)
    _run(T, 200, ratio, sdt, True, update, accepted, pad, K=K)
    assert specs and all(policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA for s in specs)


@pytest.mark.parametrize("sdt,B", [(torch.float32, 200), (torch.bfloat16, 200), (torch.bfloat16, 5)],
                         ids=("fp32-large", "bf16-large-tensor-core", "bf16-small"))
def test_mtp_out_of_range_accepted_counts(sdt, B):
    """Accepted counts outside [0, T] (not checked on the host without FLASHGDN_CHECK_INDICES):
    those rows get NaN outputs and their slots stay untouched; the other rows are exact."""
    T, H, HV, K = 8, 2, 4, 128
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, K, device=DEV)
    pool = make_state(B + 3, HV, K, K, sdt, DEV)
    before = pool.clone()
    idx = torch.randperm(B + 3, device=DEV)[:B].to(torch.int32)
    acc = torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV)
    bad = torch.zeros(B, dtype=torch.bool, device=DEV)
    bad[1::3] = True
    acc[1::3] = torch.tensor([T + 1, -1, 1 << 20], dtype=torch.int32, device=DEV).repeat(B)[: int(bad.sum())]
    ref_pool = before.double()
    acc_ref = torch.where(bad, torch.zeros_like(acc), acc)
    o_ref, _ = ref.gated_delta_rule_mtp(q, k, v, ref_pool, idx, A_log, a, dt_bias, b, None, None, None, disable_state_update=False,
                                        accepted_tokens=acc_ref, compute_dtype=torch.float64)
    out = torch.full((B, T, HV, K), 0.5, dtype=q.dtype, device=DEV)
    flashgdn.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, None, out, accepted_tokens=acc, disable_state_update=False)
    assert torch.isnan(out[bad]).all()
    assert_close_output(out[~bad], o_ref[~bad])
    good_slots = idx[~bad].long()
    assert_close_state(pool[good_slots], ref_pool[good_slots])
    untouched = torch.ones(B + 3, dtype=torch.bool, device=DEV)
    untouched[good_slots] = False
    assert torch.equal(pool[untouched], before[untouched]), "slots of invalid rows changed"


@pytest.mark.parametrize("K", (64, 256))
@pytest.mark.parametrize("T", (1, 5))
def test_mtp_head_dims(K, T):
    """Other head dims (other chunk counts per lane and staging shapes) and T=1 through the MTP
    entry point (with intermediates or accepted counts, the multi-token kernel builds it)."""
    _run(T, 7, 2, torch.float32, True, True, True, True, K=K)
    _run(T, 7, 1, torch.bfloat16, False, True, True, False, K=K)
    _run(T, 70, 2, torch.bfloat16, True, True, False, True, K=K)  # large regime


def test_mtp_strided_inputs():
    _run(4, 33, 2, torch.float32, True, True, False, True, strided=True)


def test_mtp_cuda_graph_replay_equals_eager():
    B, T, H, HV, K = 16, 4, 2, 4, 128
    static = list(make_inputs(B, T, H, HV, K, K, device=DEV))
    q, k, v, a, b, A_log, dt_bias = static
    pool = make_state(B + 2, HV, K, K, torch.float32, DEV)
    idx = torch.arange(B, dtype=torch.int32, device=DEV)
    ibuf = torch.empty(B, T, HV, K, K, device=DEV)
    out = torch.empty(B, T, HV, K, dtype=torch.bfloat16, device=DEV)
    flashgdn.gated_delta_rule_mtp(q, k, v, pool.clone(), idx, A_log, a, dt_bias, b, disable_state_update=False)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashgdn.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, output=out,
                                      intermediate_states_buffer=ibuf, disable_state_update=False)
    for _ in range(2):
        for s, f in zip(static, make_inputs(B, T, H, HV, K, K, device=DEV)):
            s.copy_(f)
        eager_pool, eager_ibuf = pool.clone(), torch.empty_like(ibuf)
        o_eager, _ = flashgdn.gated_delta_rule_mtp(q, k, v, eager_pool, idx, A_log, a, dt_bias, b,
                                                   intermediate_states_buffer=eager_ibuf, disable_state_update=False)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, o_eager) and torch.equal(pool, eager_pool) and torch.equal(ibuf, eager_ibuf)
