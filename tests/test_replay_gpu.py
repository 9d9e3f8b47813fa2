"""ReplaySSM on the GPU: gated_delta_rule_mtp(cache_replayssm=True) (verify: outputs from the frozen
checkpoint, the raw-input windows of every live slot) and gated_delta_rule_replayssm_commit (the
accepted prefix replayed into every layer's checkpoint), against the fp64 reference, with outputs,
windows and pools poisoned or random beforehand and everything that must stay untouched checked
bit for bit."""
import itertools

import pytest
import torch

import flashgdn
from flashgdn import reference as ref
from flashgdn.kernels import policy
from flashgdn.spec import CommitSpec, KernelSpec
from helpers import (assert_close_output, assert_close_state, bf16_ulp, make_inputs, make_state, use_h200_table,
                     use_table)

pytestmark = pytest.mark.gpu
DEV = "cuda"
F64 = torch.float64
NAN = float("nan")


def bits(t: torch.Tensor) -> torch.Tensor:
    """`t` as integers of its width: bit-for-bit comparisons that NaN passes."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def windows(lead, H, HV, T, K, V):
    """ReplaySSM windows (rawv, rawk, g, beta) [*lead, ...], NaN (never read before written)."""
    return [torch.full((*lead, HV, T, V), NAN, dtype=torch.bfloat16, device=DEV),
            torch.full((*lead, H, T, K), NAN, dtype=torch.bfloat16, device=DEV),
            torch.full((*lead, HV, T), NAN, device=DEV), torch.full((*lead, HV, T), NAN, device=DEV)]


def verify(inputs, pool, idx, win, out=None):
    q, k, v, a, b, A_log, dt_bias = inputs
    rawv, rawk, g, beta = win
    return flashgdn.gated_delta_rule_mtp(q, k, v, pool, idx, A_log, a, dt_bias, b, None, out, disable_state_update=True,
                                         cache_replayssm=True, replayssm_rawv=rawv, replayssm_rawk=rawk,
                                         replayssm_g=g, replayssm_beta=beta)


def ref_outputs(inputs, pool, idx):
    """Plain MTP outputs (no windows, frozen pool) in fp64."""
    q, k, v, a, b, A_log, dt_bias = inputs
    o, _ = ref.gated_delta_rule_mtp(q, k, v, pool.double(), idx, A_log, a, dt_bias, b, disable_state_update=True,
                                    compute_dtype=F64)
    return o


def check_windows(win, before, inputs, idx, HV, H):
    """Live slots hold this step's raw inputs (k once per q/k head); the other slots are untouched."""
    q, k, v, a, b, A_log, dt_bias = inputs
    rawv, rawk, g, beta = win
    live = torch.nonzero(idx >= 0).flatten()
    slots = idx[live].long()
    exact = v.dtype == torch.bfloat16  # fp16 inputs are rounded to bf16
    tol = dict(atol=0, rtol=0) if exact else dict(atol=1e-6, rtol=2 ** -8)
    torch.testing.assert_close(rawv[slots].float(), v[live].transpose(1, 2).float(), **tol)
    torch.testing.assert_close(rawk[slots].float(), k[live].transpose(1, 2).float(), **tol)
    g_ref, beta_ref = ref.log_gates(A_log, a[live], dt_bias, b[live], dtype=F64)
    torch.testing.assert_close(g[slots].double(), g_ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(beta[slots].double(), beta_ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
    untouched = torch.ones(rawv.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    for w, w0, name in zip(win, before, ("rawv", "rawk", "g", "beta")):
        assert torch.equal(bits(w[untouched]), bits(w0[untouched])), f"{name}: a window of no live row changed"


# ----------------------------------------------------------------------------- verify


def _verify_cases():
    cases = []
    for n, (T, B) in enumerate(itertools.product((2, 3, 4, 8, 16), (1, 5, 64, 200))):
        cases.append(dict(T=T, B=B, ratio=(1, 2)[n % 2], sdt=(torch.float32, torch.bfloat16)[(n // 2) % 2],
                          K=(128, 64, 128, 256)[n % 4] if T <= 8 else 128))
    return cases


@pytest.mark.parametrize("case", _verify_cases(),
                         ids=lambda c: "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items()))
def test_verify_outputs_and_windows(case):
    """Outputs equal the plain MTP's (frozen state, fp64 reference); the windows of the live slots
    hold the raw inputs; padding rows (every other row) leave their output and no window touched;
    the pool is not written (the large-batch bf16 cases run the tensor-core kernel from the device
    table's mma_min_tokens on, as plain MTP does)."""
    check_verify(case)


@pytest.mark.parametrize("case", [c for c in _verify_cases() if c["B"] < 200] + [
    # several window CTAs per row of several value heads each: Qwen3-Next's heads (GVA 2), and 12 value
    # heads of 3 per q/k head in groups of 4 or 6 (a group's first head need not be a q/k head's first)
    dict(T=8, B=3, ratio=2, sdt=torch.float32, K=128, H=16), dict(T=4, B=5, ratio=3, sdt=torch.bfloat16, K=64, H=4),
    dict(T=16, B=2, ratio=3, sdt=torch.float32, K=128, H=4)],
    ids=lambda c: "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items()))
@pytest.mark.parametrize("heads", [1, 8])
def test_verify_with_window_ctas(monkeypatch, case, heads):
    """The same with the windows stored by CTAs of their own after the decode CTAs, each of up to
    `heads` value heads (policy.BuildConfig.window_heads: every case here is in the small regime, on
    the token loop)."""
    specs = use_h200_table(monkeypatch, verify_window_ctas=("float32", "bfloat16"), verify_window_heads=heads)
    check_verify(case)
    built = {policy.BuildConfig.for_spec(s).window_heads for s in specs if s.replay_cache}
    assert built == {1} if heads == 1 else (built and min(built) > 1)


def check_verify(case, io=torch.bfloat16):
    T, B, ratio, sdt, K = case["T"], case["B"], case["ratio"], case["sdt"], case["K"]
    H = case.get("H", 2)
    HV = H * ratio
    inputs = make_inputs(B, T, H, HV, K, K, dtype=io, device=DEV)
    P = B + 4
    pool = make_state(P, HV, K, K, sdt, DEV)
    before = pool.clone()
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[1::2] = -1
    win = windows((P,), H, HV, T, K, K)
    win_before = [w.clone() for w in win]
    out = torch.full((B, T, HV, K), NAN, dtype=io, device=DEV)
    o, st = verify(inputs, pool, idx, win, out)
    assert o is out and st is pool
    run = idx >= 0
    assert torch.isnan(o[~run]).all(), "a padding row's output is left as it is"
    assert_close_output(o[run], ref_outputs(inputs, before, idx)[run])
    assert torch.equal(bits(pool), bits(before)), "the verify wrote the checkpoint"
    check_windows(win, win_before, inputs, idx, HV, H)


@pytest.mark.parametrize("window_ctas", [False, True], ids=["decode-ctas", "window-ctas"])
def test_verify_fp16_inputs_and_strided_slots(monkeypatch, window_ctas):
    """fp16 q/k/v (rounded to bf16 in the windows) and windows with a padded slot stride, stored by
    the decode CTAs or by window CTAs of 4 value heads (policy.BuildConfig.window_heads)."""
    if window_ctas:
        use_h200_table(monkeypatch, verify_window_ctas=("float32", "bfloat16"), verify_window_heads=4)
    B, T, H, HV, K = 9, 4, 2, 4, 128
    inputs = make_inputs(B, T, H, HV, K, K, dtype=torch.float16, device=DEV)
    P = 12
    pool = make_state(P, HV, K, K, torch.float32, DEV)
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[3] = -1
    padded = windows((P, 2), H, HV, T, K, K)
    win = [w[:, 0] for w in padded]
    assert not win[0].is_contiguous()
    before = [w.clone() for w in padded]
    o, _ = verify(inputs, pool, idx, win)
    run = idx >= 0
    assert_close_output(o[run], ref_outputs(inputs, pool, idx)[run])
    check_windows(win, [w[:, 0] for w in before], inputs, idx, HV, H)
    for w, w0 in zip(padded, before):
        assert torch.equal(bits(w[:, 1]), bits(w0[:, 1])), "the padding between slots changed"


# ----------------------------------------------------------------------------- tensor-core verify


@pytest.fixture
def tensor_core_specs(monkeypatch):
    """Calls take the H200 table (the tensor cores for a bf16 state at large batch from T = 3) on
    any device; returns the list of KernelSpecs they look up."""
    return use_h200_table(monkeypatch)


def assert_tensor_core_verify(specs):
    verifies = [s for s in specs if isinstance(s, KernelSpec)]
    assert verifies and all(s.replay_cache for s in verifies)
    for s in verifies:
        assert policy.BuildConfig.for_spec(s).kernel == policy.KMTP_MMA, f"{s.short_name()} is not the tensor-core kernel"


def _live_indices(B, P):
    """Read slots of B rows in a pool of P: every third row padding (-1), row 2 past the pool
    (invalid: NaN output, nothing written); and those indices with the invalid row as padding."""
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[1::3] = -1
    idx[2] = P + 7
    return idx, torch.where(idx < P, idx, -1)


H200, H100 = "sm90-hbm3e", "sm90-hbm3"


@pytest.mark.parametrize("table,T,B,ratio,K,sdt", [
    (H200, 3, 100, 2, 128, torch.bfloat16), (H200, 4, 200, 1, 64, torch.bfloat16),
    (H200, 4, 160, 1, 256, torch.bfloat16), (H200, 8, 100, 2, 128, torch.bfloat16),
    (H200, 8, 100, 2, 256, torch.bfloat16), (H200, 8, 100, 2, 128, torch.float32),
    (H100, 3, 100, 2, 128, torch.bfloat16), (H100, 6, 100, 2, 128, torch.float32),
    (H100, 7, 160, 1, 128, torch.float32)])
def test_tensor_core_verify_outputs_and_windows(monkeypatch, table, T, B, ratio, K, sdt):
    """The tensor-core kernel's verify at large batch, by each table's choice (the H200 table: a
    bf16 state from T = 3, two or four warps of two 16-row blocks, K = 256 one block and four CTAs
    per head, GVA 2 and 1; an fp32 state from T = 8, two warps of one block; the H100 table's
    thresholds for MTP without a state update: a bf16 state from T = 3, an fp32 one from T = 6 on
    four warps of one block): outputs equal the fp64 reference's plain MTP; the windows of live
    slots hold the raw inputs bit for bit (v, k) and the gates; padding and invalid rows, the other
    slots' windows and the pool stay untouched."""
    specs = use_table(monkeypatch, table)
    H = 2
    HV = H * ratio
    inputs = make_inputs(B, T, H, HV, K, K, device=DEV)
    P = B + 4
    pool = make_state(P, HV, K, K, sdt, DEV)
    before = pool.clone()
    idx, live_idx = _live_indices(B, P)
    win = windows((P,), H, HV, T, K, K)
    win_before = [w.clone() for w in win]
    out = torch.full((B, T, HV, K), NAN, dtype=torch.bfloat16, device=DEV)
    verify(inputs, pool, idx, win, out)
    assert_tensor_core_verify(specs)
    live = live_idx >= 0
    assert torch.isnan(out[~live]).all(), "a padding or invalid row's output is written"
    assert_close_output(out[live], ref_outputs(inputs, before, live_idx)[live])
    assert torch.equal(bits(pool), bits(before)), "the verify wrote the checkpoint"
    check_windows(win, win_before, inputs, live_idx, HV, H)


@pytest.mark.parametrize("T", (3, 8))
def test_tensor_core_verify_then_commit(tensor_core_specs, T):
    """Two layers verified on the tensor-core kernel, then one commit with accept_lens 0..T: the
    committed slots equal the fp64 reference state after that many tokens; the others stay."""
    L, B, H, HV, K = 2, 100, 2, 4, 128
    P = B + 4
    inputs, ck, caches = _layers(L, B, T, H, HV, K, torch.bfloat16, P)
    idx, live_idx = _live_indices(B, P)
    acc = (torch.arange(B, device=DEV) % (T + 1)).to(torch.int32)  # every count on live rows too
    before = ck.clone()
    live = live_idx >= 0
    for layer in range(L):
        o, _ = verify(inputs[layer], ck[layer], idx, [c[layer] for c in caches])
        assert_close_output(o[live], ref_outputs(inputs[layer], before[layer], live_idx)[live])
    assert_tensor_core_verify(tensor_core_specs)
    assert torch.equal(bits(ck), bits(before))
    flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, live_idx, acc)
    committed = live & (acc > 0)
    slots = live_idx[committed].long()
    for layer in range(L):
        want = _ref_after(inputs[layer], before[layer], live_idx, acc)
        assert_close_state(ck[layer, slots], want[slots], f"layer {layer}: committed slots")
    untouched = torch.ones(P, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(bits(ck[:, untouched]), bits(before[:, untouched])), "slots that must stay untouched changed"


# ----------------------------------------------------------------------------- commit


@pytest.fixture(params=("loop", "mma"), ids=("commit-loop", "commit-mma"))
def commit_kernel(request, monkeypatch):
    """The commit's kernel, under the H200 table: the token loop (ReplayCommit: the table without
    its commit_mma_min_tokens), or the tensor cores (ReplayCommitMma: commit_mma_min_tokens from
    T = 2 for both checkpoint dtypes, and every call in the large regime, whose kernels the
    verifies take too). Returns a check, called after the commits, that every commit took it."""
    mma = request.param == "mma"
    changes = (dict(commit_mma_min_tokens={"float32": 2, "bfloat16": 2}, small_regime_heads_per_sm=0) if mma
               else dict(commit_mma_min_tokens={}))
    specs = use_h200_table(monkeypatch, **changes)
    expected = policy.REPLAY_COMMIT_MMA if mma else policy.REPLAY_COMMIT

    def check():
        commits = [s for s in specs if isinstance(s, CommitSpec)]
        assert commits, "no commit was looked up"
        for s in commits:
            assert policy.BuildConfig.for_spec(s).kernel == expected, f"{s.short_name()} is not built by {expected}"

    return check


def _layers(L, B, T, H, HV, K, sdt, P):
    """Per-layer inputs, a checkpoint [L, P, HV, K, K] and windows [L, P, ...]."""
    inputs = [make_inputs(B, T, H, HV, K, K, device=DEV) for _ in range(L)]
    ck = make_state(L * P, HV, K, K, sdt, DEV).unflatten(0, (L, P))
    return inputs, ck, windows((L, P), H, HV, T, K, K)


def _ref_after(inputs, pool, idx, acc):
    """fp64 reference pool (a copy) after accepting acc[i] of row i's tokens (rows with idx < 0 skipped)."""
    q, k, v, a, b, A_log, dt_bias = inputs
    out = pool.double().clone()
    ref.gated_delta_rule_mtp(q, k, v, out, idx, A_log, a, dt_bias, b, disable_state_update=False,
                             accepted_tokens=acc, compute_dtype=F64)
    return out


@pytest.mark.parametrize("T,B,ratio,K,sdt,null_block_id,track", [
    (2, 3, 2, 128, torch.float32, -1, False),
    (3, 7, 1, 128, torch.bfloat16, 0, True),
    (4, 40, 2, 128, torch.float32, 0, True),
    (4, 40, 2, 128, torch.bfloat16, -1, False),
    (8, 64, 2, 128, torch.float32, -1, True),
    (8, 64, 2, 128, torch.bfloat16, 0, False),
    (16, 20, 2, 128, torch.float32, -1, False),
    (5, 17, 1, 64, torch.float32, -1, True),
    (6, 17, 2, 256, torch.bfloat16, -1, True),
])
def test_commit_equals_the_state_after_the_accepted_tokens(commit_kernel, T, B, ratio, K, sdt, null_block_id,
                                                          track):
    """Three layers: verify each (windows are per-layer views of the commit's caches), commit with
    accept_lens covering 0..T; each committed slot of each layer equals the reference state after
    that many tokens; padding, a null block (null_block_id = 0: slot 0) and accept_lens 0 leave
    their slots bit for bit; track writes land at the tracked step's state where the step is inside
    the accepted prefix and the track slot is live, and nowhere else. Both commit kernels."""
    L, H = 3, 2
    HV = H * ratio
    P = B + 6 + (B if track else 0)
    inputs, ck, caches = _layers(L, B, T, H, HV, K, sdt, P)
    perm = torch.randperm(P, device=DEV).to(torch.int32)
    perm = perm[perm != 0] if null_block_id == 0 else perm
    idx = perm[:B].clone()
    idx[1] = -1  # padding
    if null_block_id == 0 and B > 2:
        idx[2] = 0  # a null block: verified (windows written), never committed
    acc = torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV)
    acc[: min(B, T + 1)] = torch.arange(min(B, T + 1), dtype=torch.int32, device=DEV)
    kw = {}
    if track:
        track_idx = perm[B: 2 * B].clone()
        track_idx[::3] = null_block_id  # no track write
        steps = torch.randint(-1, T + 1, (B,), dtype=torch.int32, device=DEV)  # some outside the prefix
        kw = dict(track_state_indices=track_idx, track_steps=steps)
    before = ck.clone()
    for layer in range(L):
        o, _ = verify(inputs[layer], ck[layer], idx, [c[layer] for c in caches])
        run = idx >= 0
        assert_close_output(o[run], ref_outputs(inputs[layer], before[layer], idx)[run])
    assert torch.equal(bits(ck), bits(before))
    flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, idx, acc, null_block_id=null_block_id, **kw)
    commit_kernel()

    live = (idx > null_block_id) & (acc > 0)
    written = torch.zeros(L, P, dtype=torch.bool, device=DEV)
    written[:, idx[live].long()] = True
    for layer in range(L):
        idx_live = torch.where(idx > null_block_id, idx, -1)
        want = _ref_after(inputs[layer], before[layer], idx_live, acc)
        slots = idx[live].long()
        assert_close_state(ck[layer, slots], want[slots], f"layer {layer}: committed slots")
        if track:
            for i in range(B):
                t_slot, step = int(track_idx[i]), int(steps[i])
                if live[i] and t_slot > null_block_id and 0 <= step < int(acc[i]):
                    one = torch.where(torch.arange(B, device=DEV) == i, idx, -1)
                    tracked = _ref_after(inputs[layer], before[layer], one, torch.full_like(acc, step + 1))
                    assert_close_state(ck[layer, t_slot], tracked[int(idx[i])], f"layer {layer}: track row {i}")
                    written[layer, t_slot] = True
    assert torch.equal(bits(ck[~written]), bits(before[~written])), "slots that must stay untouched changed"


def test_commit_out_of_range_values_leave_everything(commit_kernel):
    """Unchecked on the host: a slot past the pool, accept_lens outside [0, T], a track slot past
    the pool: those rows (and the bad track write) change nothing; the good rows commit (both
    commit kernels)."""
    L, B, T, H, HV, K = 2, 6, 4, 2, 4, 128
    P = 10
    inputs, ck, caches = _layers(L, B, T, H, HV, K, torch.float32, P)
    idx = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=DEV)
    for layer in range(L):
        verify(inputs[layer], ck[layer], idx, [c[layer] for c in caches])
    before = ck.clone()
    bad_idx = idx.clone()
    bad_idx[1] = P + 3
    acc = torch.tensor([2, 2, T + 1, -1, 1 << 20, T], dtype=torch.int32, device=DEV)
    track_idx = torch.tensor([P, -1, -1, -1, -1, P + 100], dtype=torch.int32, device=DEV)
    steps = torch.zeros(B, dtype=torch.int32, device=DEV)
    flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, bad_idx, acc, track_state_indices=track_idx,
                                               track_steps=steps)
    commit_kernel()
    for layer in range(L):
        want = _ref_after(inputs[layer], before[layer], idx, torch.where(acc.clamp(0, T) == acc, acc, 0))
        assert_close_state(ck[layer, [0, 5]], want[[0, 5]])
    assert torch.equal(bits(ck[:, 1:5]), bits(before[:, 1:5]))
    assert torch.equal(bits(ck[:, 6:]), bits(before[:, 6:]))


# Each table's L2 prefetch distance of the commit by (T, checkpoint dtype): the H100's 2 MiB on either kernel; the
# H200's 6 MiB on the tensor cores, 4 MiB on the token loop for an fp32 checkpoint and none for a bf16 one.
TABLE_COMMIT_PREFETCH = {
    "sm90-hbm3": {(8, torch.bfloat16): 2 << 20, (4, torch.bfloat16): 2 << 20, (4, torch.float32): 2 << 20},
    "sm90-hbm3e": {(8, torch.bfloat16): 6 << 20, (4, torch.bfloat16): 0, (4, torch.float32): 4 << 20},
}


@pytest.mark.parametrize("table", ["sm90-hbm3e", "sm90-hbm3"], ids=["h200", "h100"])
@pytest.mark.parametrize("T, kernel, sdt", [(8, policy.REPLAY_COMMIT_MMA, torch.bfloat16),
                                            (4, policy.REPLAY_COMMIT, torch.bfloat16),
                                            (4, policy.REPLAY_COMMIT, torch.float32)],
                         ids=["T8-tensor-cores", "T4-token-loop", "T4-token-loop-fp32"])
def test_commit_with_the_tables_as_they_are(monkeypatch, T, kernel, sdt, table):
    """Each table unchanged: a checkpoint's commit in the large regime (B * HV = 280 > 264) runs a bf16
    one on the tensor cores from T = 8 (commit_mma_min_tokens) and on the token loop below it, an fp32
    one on the token loop, with the table's L2 prefetch (TABLE_COMMIT_PREFETCH); each equals the
    reference (the checks of test_commit_equals_the_state_after_the_accepted_tokens)."""
    specs = use_table(monkeypatch, table)
    test_commit_equals_the_state_after_the_accepted_tokens(lambda: None, T, 70, 2, 128, sdt, -1, True)
    configs = [policy.BuildConfig.for_spec(s) for s in specs if isinstance(s, CommitSpec)]
    assert configs and all(c.kernel == kernel for c in configs)
    assert all(c.prefetch_bytes == TABLE_COMMIT_PREFETCH[table][T, sdt] for c in configs)


@pytest.mark.parametrize("T, kernel", [(8, policy.REPLAY_COMMIT_MMA), (4, policy.REPLAY_COMMIT)],
                         ids=["T8-tensor-cores", "T4-token-loop"])
def test_commit_with_an_l2_prefetch(monkeypatch, T, kernel):
    """The commit's L2 prefetch of a later CTA's checkpoint tile (the H200 table with a distance of
    one tile on either kernel and for a bf16 checkpoint: each CTA prefetches the next one's, across
    value heads, batch rows and layers, where that row commits) leaves every check of
    test_commit_equals_the_state_after_the_accepted_tokens as it is."""
    table = policy.DEVICE_TABLES["sm90-hbm3e"]
    one_tile = {"commit": 1, "commit:bfloat16": 1, "commit_mma": 1}
    specs = use_h200_table(monkeypatch, prefetch_bytes={**table.prefetch_bytes, **one_tile})
    test_commit_equals_the_state_after_the_accepted_tokens(lambda: None, T, 70, 2, 128, torch.bfloat16, -1, True)
    configs = [policy.BuildConfig.for_spec(s) for s in specs if isinstance(s, CommitSpec)]
    assert configs and all(c.kernel == kernel and c.prefetch_bytes == 1 for c in configs)


@pytest.mark.parametrize("sdt", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_commit_without_l2norm_ignores_the_window_past_the_prefix(commit_kernel, sdt):
    """Without the l2 norm, a token repeated beyond the accepted prefix would grow u by about
    |1 - beta |k|^2| (here ~1000) per repeat up to fp32 overflow: what the commit computes past
    accept_lens (the tensor cores re-read the last accepted token there, with zero weight) must not
    reach the state. T = 16, large raw k, accept_lens 1..3; both commit kernels."""
    L, B, H, HV, K, T = 2, 6, 2, 4, 128, 16
    P = B + 2
    gen = torch.Generator(device=DEV).manual_seed(11)
    ck = (torch.randn(L, P, HV, K, K, generator=gen, device=DEV) * 0.1).to(sdt)
    rawv = torch.randn(L, P, HV, T, K, generator=gen, device=DEV).bfloat16()
    rawk = (torch.randn(L, P, H, T, K, generator=gen, device=DEV) * 3).bfloat16()
    log_g = -torch.rand(L, P, HV, T, generator=gen, device=DEV) * 0.1
    beta = torch.full((L, P, HV, T), 0.9, device=DEV)
    idx = torch.arange(1, B + 1, dtype=torch.int32, device=DEV)
    acc = torch.tensor([1, 2, 3, 1, 2, 3], dtype=torch.int32, device=DEV)
    want = ck.double()
    ref.gated_delta_rule_replayssm_commit(want, rawv, rawk, log_g, beta, idx, acc, use_qk_l2norm=False,
                                          compute_dtype=F64)
    assert torch.isfinite(want).all(), "test bug: the reference state overflows"
    before = ck.clone()
    flashgdn.gated_delta_rule_replayssm_commit(ck, rawv, rawk, log_g, beta, idx, acc, use_qk_l2norm=False)
    commit_kernel()
    slots = idx.long()
    assert torch.isfinite(ck[:, slots].float()).all(), "a committed state is not finite"
    # against the size of each head's state (three such tokens scale it by up to ~1e6): fp32 within 1e-4
    # of it, bf16 within one rounding step of each element
    got, ref_state = ck[:, slots].double(), want[:, slots]
    size = ref_state.abs().amax(dim=(-1, -2), keepdim=True)
    tol = 1e-4 * size if sdt == torch.float32 else bf16_ulp(ref_state.float()).double() + 1e-4 * size
    assert ((got - ref_state).abs() <= tol).all(), f"max error {(got - ref_state).abs().max():.3g}"
    assert torch.equal(bits(ck[:, [0, P - 1]]), bits(before[:, [0, P - 1]]))


# ----------------------------------------------------------------------------- rounds


def _close_after_rounds(actual, want, what):
    """fp32: assert_close_state. bf16: the checkpoint is rounded once per round on both sides:
    within 4 bf16 ulps (the caller restarts the reference from the checkpoint every round)."""
    if actual.dtype == torch.float32:
        assert_close_state(actual, want, what)
        return
    err = (actual.double() - want).abs()
    tol = 4 * bf16_ulp(want.float()).double() + 1e-4 * want.abs() + 1e-5
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} elements beyond 4 bf16 ulps, max err {err.max():.3g}"


@pytest.mark.parametrize("sdt", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("T,B", [(4, 9), (8, 70)])
def test_rounds_of_verify_and_commit_equal_token_by_token(commit_kernel, sdt, T, B):
    """Six rounds of verify + commit on two layers (accept_lens 0..T each round, a padding row):
    every round's outputs equal the reference's from its token-by-token state, and the checkpoint
    stays equal to that state (the accepted tokens applied one at a time, fp64; for a bf16
    checkpoint, from the kernel's checkpoint of the round before). Both commit kernels."""
    L, H, HV, K = 2, 2, 4, 128
    P = B + 5
    ck = make_state(L * P, HV, K, K, sdt, DEV).unflatten(0, (L, P))
    caches = windows((L, P), H, HV, T, K, K)
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[B // 2] = -1
    state = ck.double().clone()  # the token-by-token reference
    untouched = torch.ones(P, dtype=torch.bool, device=DEV)
    untouched[idx[idx >= 0].long()] = False
    before = ck.clone()
    for rnd in range(6):
        inputs = [make_inputs(B, T, H, HV, K, K, device=DEV) for _ in range(L)]
        acc = torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV)
        acc[rnd % B] = 0
        acc[(rnd + 1) % B] = T
        run = idx >= 0
        for layer in range(L):
            o, _ = verify(inputs[layer], ck[layer], idx, [c[layer] for c in caches])
            assert_close_output(o[run], ref_outputs(inputs[layer], state[layer], idx)[run], f"round {rnd} output")
        flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, idx, acc)
        commit_kernel()
        for layer in range(L):
            q, k, v, a, b, A_log, dt_bias = inputs[layer]
            for t in range(T):
                rows = torch.where(acc > t, idx, -1)
                ref.gated_delta_rule_decode_pretranspose(
                    q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], None, A_log, a[:, t:t + 1], dt_bias,
                    b[:, t:t + 1], initial_state=state[layer], initial_state_indices=rows, compute_dtype=F64)
        state = state.to(sdt).double()  # the checkpoint's dtype, once per commit
        _close_after_rounds(ck[:, ~untouched], state[:, ~untouched], f"round {rnd} checkpoint")
        if sdt == torch.bfloat16:
            # A value on a bf16 rounding boundary may round either way in the kernel (fp32) and the
            # fp64 reference; the next rounds' updates can grow that ulp past 4 (one element in 9
            # million after round 3 or 4 on the H200), so every round starts both from the checkpoint.
            state = ck.double().clone()
    assert torch.equal(bits(ck[:, untouched]), bits(before[:, untouched]))


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("sdt", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_cuda_graph_replay_equals_eager(commit_kernel, sdt):
    """Two layers' verifies and the commit captured in one CUDA graph; replayed with new inputs
    and accept_lens, it gives what eager calls on copies give, bit for bit (both commit kernels)."""
    L, B, T, H, HV, K = 2, 24, 4, 2, 4, 128
    P = B + 3
    static = [list(make_inputs(B, T, H, HV, K, K, device=DEV)) for _ in range(L)]
    ck = make_state(L * P, HV, K, K, sdt, DEV).unflatten(0, (L, P))
    caches = windows((L, P), H, HV, T, K, K)
    idx = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    idx[5] = -1
    acc = torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV)
    outs = [torch.full((B, T, HV, K), NAN, dtype=torch.bfloat16, device=DEV) for _ in range(L)]

    def step(ck, caches, outs):
        for layer in range(L):
            verify(static[layer], ck[layer], idx, [c[layer] for c in caches], outs[layer])
        flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, idx, acc)

    step(ck.clone(), [c.clone() for c in caches], [o.clone() for o in outs])  # compiles: no capture-time work
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ck, caches, outs)
    for _ in range(3):
        for layer in range(L):
            for s, f in zip(static[layer], make_inputs(B, T, H, HV, K, K, device=DEV)):
                s.copy_(f)
        acc.copy_(torch.randint(0, T + 1, (B,), dtype=torch.int32, device=DEV))
        e_ck, e_caches, e_outs = ck.clone(), [c.clone() for c in caches], [o.clone() for o in outs]
        step(e_ck, e_caches, e_outs)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bits(ck), bits(e_ck)), "checkpoint"
        for c, e in zip(caches, e_caches):
            assert torch.equal(bits(c), bits(e)), "windows"
        for o, e in zip(outs, e_outs):
            assert torch.equal(bits(o), bits(e)), "outputs"
    commit_kernel()
