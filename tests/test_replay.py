"""CPU tests of ReplaySSM: gated_delta_rule_mtp(cache_replayssm=True) and
gated_delta_rule_replayssm_commit. The reference's verify windows plus its commit of j tokens equal
its MTP with j accepted tokens (several layers, null blocks, track writes, both checkpoint dtypes);
each bad argument raises a clear error that names it and leaves every tensor as it was; valid
arguments fail only at the device check; the API asks for the variants the policy builds.
(The kernels compile in tests/test_compile.py; tests/test_replay_gpu.py runs them.)
"""
from __future__ import annotations

import pytest
import torch

import flashgdn
from flashgdn import api as fapi
from flashgdn import reference as ref
from flashgdn.device import DeviceFacts
from flashgdn.spec import CommitArgs, CommitSpec, KernelArgs

from helpers import (
    B, BF16, F32, H, HV, K, P, T_MTP, V, expect_call_error, expect_error, expect_only_device_error, make_inputs,
    make_intermediate, make_state, valid_kwargs,
)

F64 = torch.float64


def windows(n, T=T_MTP, h=H, hv=HV, k=K, v=V, layers=None, fill=2.0):
    """ReplaySSM windows (rawv, rawk, g, beta) of n slots, with a leading layers dim when given."""
    lead = (n,) if layers is None else (layers, n)
    return (torch.full((*lead, hv, T, v), fill, dtype=BF16), torch.full((*lead, h, T, k), fill, dtype=BF16),
            torch.full((*lead, hv, T), -fill, dtype=F32), torch.full((*lead, hv, T), fill / 4, dtype=F32))


def verify_kwargs():
    """Valid CPU arguments of a ReplaySSM verify."""
    kw = valid_kwargs("mtp")
    rawv, rawk, g, beta = windows(P)
    kw.update(disable_state_update=True, cache_replayssm=True, replayssm_rawv=rawv, replayssm_rawk=rawk,
              replayssm_g=g, replayssm_beta=beta)
    return kw


def commit_kwargs(L=2, T=T_MTP, track=False, state_dtype=F32):
    """Valid CPU arguments of a commit: L layers of P slots."""
    rawv, rawk, g, beta = windows(P, T=T, layers=L)
    kw = dict(checkpoint_state=torch.randn(L, P, HV, V, K).to(state_dtype), rawv_cache=rawv, rawk_cache=rawk,
              g_cache=g, beta_cache=beta, state_indices=torch.tensor([3, 0], dtype=torch.int32),
              accept_lens=torch.tensor([2, 1], dtype=torch.int32))
    if track:
        kw.update(track_state_indices=torch.tensor([1, -1], dtype=torch.int32),
                  track_steps=torch.tensor([0, 0], dtype=torch.int32))
    return kw


def commit_error(kw, exc, match):
    expect_call_error(flashgdn.gated_delta_rule_replayssm_commit, kw, exc, match)


# ----------------------------------------------------------------------------- reference


def _round(L, Bn, T, Pn, sdt, seed, null_block_id=-1, track=False):
    """One verify (reference windows, per layer) and commits of every j in 0..T against MTP with
    j accepted tokens, in fp64."""
    gen = torch.Generator().manual_seed(seed)
    pool = make_state(L * Pn, HV, V, K, sdt, seed=seed).unflatten(0, (L, Pn))
    idx = torch.randperm(Pn, generator=gen)[:Bn].to(torch.int32)
    idx[1] = null_block_id  # a null block (or padding)
    rawv, rawk, g, beta = windows(Pn, T=T, layers=L, fill=float("nan"))
    inputs = [make_inputs(Bn, T, H, HV, K, V, seed=seed + 1 + layer) for layer in range(L)]
    for layer, (q, k, v, a, b, A_log, dt_bias) in enumerate(inputs):
        out, _ = ref.gated_delta_rule_mtp(
            q, k, v, pool[layer].double(), idx, A_log, a, dt_bias, b, disable_state_update=True, cache_replayssm=True,
            replayssm_rawv=rawv[layer], replayssm_rawk=rawk[layer], replayssm_g=g[layer], replayssm_beta=beta[layer],
            compute_dtype=F64)
        plain, _ = ref.gated_delta_rule_mtp(q, k, v, pool[layer].double(), idx, A_log, a, dt_bias, b,
                                            disable_state_update=True, compute_dtype=F64)
        live = idx >= 0
        torch.testing.assert_close(out[live], plain[live], rtol=0, atol=0)
        for row in torch.nonzero(live).flatten().tolist():  # the windows hold the raw inputs
            s = int(idx[row])
            assert torch.equal(rawv[layer, s], v[row].transpose(0, 1))
            assert torch.equal(rawk[layer, s], k[row].transpose(0, 1))
            g_ref, beta_ref = ref.log_gates(A_log, a[row], dt_bias, b[row], dtype=F64)
            torch.testing.assert_close(g[layer, s], g_ref.T.float())
            torch.testing.assert_close(beta[layer, s], beta_ref.T.float())
    for j in range(T + 1):
        acc = torch.randint(0, T + 1, (Bn,), generator=gen, dtype=torch.int32)
        acc[0] = j
        ck = pool.double().clone()
        kw = {}
        track_slot = None
        if track:
            free = [s for s in range(Pn) if s not in idx.tolist() and s > null_block_id]
            track_slot = free[0]
            kw = dict(track_state_indices=torch.full((Bn,), null_block_id, dtype=torch.int32),
                      track_steps=torch.zeros(Bn, dtype=torch.int32))
            kw["track_state_indices"][0] = track_slot
            kw["track_steps"][0] = max(j - 2, 0)
        ref.gated_delta_rule_replayssm_commit(ck, rawv, rawk, g, beta, idx, acc, null_block_id=null_block_id,
                                              compute_dtype=F64, **kw)
        for layer, (q, k, v, a, b, A_log, dt_bias) in enumerate(inputs):
            want = pool[layer].double().clone()
            idx_live = torch.where(idx > null_block_id, idx, -1)
            ref.gated_delta_rule_mtp(q, k, v, want, idx_live, A_log, a, dt_bias, b, disable_state_update=False,
                                     accepted_tokens=acc, compute_dtype=F64)
            if track and j >= 1:
                step = kw["track_steps"][0].item() + 1
                tracked = pool[layer].double().clone()
                ref.gated_delta_rule_mtp(q[:1], k[:1], v[:1], tracked, idx[:1], A_log, a[:1], dt_bias, b[:1],
                                         disable_state_update=False,
                                         accepted_tokens=torch.tensor([step], dtype=torch.int32), compute_dtype=F64)
                want[track_slot] = tracked[int(idx[0])]
            torch.testing.assert_close(ck[layer], want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"layer {layer}, j={j}: {m}")


@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("track", [False, True], ids=["plain", "track"])
def test_reference_commit_of_j_tokens_is_mtp_with_j_accepted(sdt, track):
    _round(L=3, Bn=4, T=4, Pn=9, sdt=sdt, seed=5, track=track)


def test_reference_null_block_id_above_minus_one():
    """null_block_id = 0: slot 0 is a null block (no commit, no track write)."""
    _round(L=2, Bn=3, T=3, Pn=7, sdt=F32, seed=9, null_block_id=0, track=True)


def test_reference_commit_of_a_step_outside_the_prefix_tracks_nothing():
    kw = commit_kwargs(track=True)
    kw["track_steps"] = torch.tensor([2, 0], dtype=torch.int32)  # row 0 accepts 2: step 2 is outside
    before = kw["checkpoint_state"].clone()
    ref.gated_delta_rule_replayssm_commit(**kw)
    assert torch.equal(kw["checkpoint_state"][:, 1], before[:, 1])
    assert not torch.equal(kw["checkpoint_state"][:, 3], before[:, 3])


# ----------------------------------------------------------------------------- verify validation


def test_valid_verify_fails_only_on_device():
    expect_only_device_error("mtp", verify_kwargs())


def test_verify_strided_slots_pass():
    """Windows whose slot stride is padded (inner dims packed) are valid."""
    kw = verify_kwargs()
    for name in ("replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta"):
        t = kw[name]
        kw[name] = torch.cat([t, torch.zeros_like(t)], dim=1)[:, : t.shape[1]]
        assert not kw[name].is_contiguous()
    expect_only_device_error("mtp", kw)


@pytest.mark.parametrize("change,exc,match", [
    (dict(disable_state_update=False), ValueError, r"^cache_replayssm=True verifies against a frozen checkpoint"),
    (dict(intermediate_states_buffer=make_intermediate()), ValueError,
     r"^cache_replayssm=True replaces the intermediate states"),
    (dict(replayssm_g=None), ValueError, r"missing replayssm_g$"),
    (dict(replayssm_rawv=None, replayssm_beta=None), ValueError, r"missing replayssm_rawv, replayssm_beta$"),
    (dict(replayssm_rawv=windows(P + 1)[0]), ValueError, r"^replayssm_rawv must have shape \[5, 4, 3, 128\]"),
    (dict(replayssm_rawk=windows(P, h=HV)[1]), ValueError, r"^replayssm_rawk must have shape \[5, 2, 3, 64\]"),
    (dict(replayssm_g=windows(P, T=4)[2]), ValueError, r"^replayssm_g must have shape \[5, 4, 3\]"),
    (dict(replayssm_rawv=windows(P)[0].float()), TypeError, r"^replayssm_rawv must have dtype bfloat16, got float32"),
    (dict(replayssm_rawk=windows(P)[1].half()), TypeError, r"^replayssm_rawk must have dtype bfloat16"),
    (dict(replayssm_beta=windows(P)[3].double()), TypeError, r"^replayssm_beta must have dtype float32"),
    (dict(replayssm_rawv=windows(P, v=V * 2)[0][..., ::2]), ValueError, r"^replayssm_rawv must have its last 3 dims"),
    (dict(replayssm_g=windows(P, hv=T_MTP, T=HV)[2].transpose(1, 2)), ValueError, r"^replayssm_g must have its last 2 dims"),
    (dict(replayssm_rawk=torch.zeros(P * H * T_MTP * K + 4, dtype=BF16)[4:].view(P, H, T_MTP, K)), ValueError,
     r"^replayssm_rawk data pointer must be 16-byte aligned"),
])
def test_verify_errors(change, exc, match):
    kw = verify_kwargs()
    kw.update(change)
    expect_error("mtp", kw, exc, match)


def test_verify_rejects_token_slots():
    kw = verify_kwargs()
    kw.update(ssm_state_indices=torch.zeros(B, T_MTP, dtype=torch.int32))
    expect_error("mtp", kw, ValueError, r"ssm_state_indices")


def test_verify_rejects_one_token():
    kw = verify_kwargs()
    q, k, v, a, b, _, _ = make_inputs(B, 1, H, HV, K, V, seed=3)
    kw.update(q=q, k=k, v=v, a=a, b=b)
    for name, t in zip(("replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta"), windows(P, T=1)):
        kw[name] = t
    expect_error("mtp", kw, ValueError, r"^cache_replayssm=True needs T >= 2 tokens per sequence, got T=1")


def test_verify_rejects_self_overlapping_window():
    kw = verify_kwargs()
    kw["replayssm_beta"] = windows(1)[3].expand(P, HV, T_MTP)
    expect_error("mtp", kw, ValueError, r"^replayssm_beta must not overlap itself")


# ----------------------------------------------------------------------------- commit validation


@pytest.mark.parametrize("track", [False, True], ids=["plain", "track"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_valid_commit_fails_only_on_device(track, sdt):
    commit_error(commit_kwargs(track=track, state_dtype=sdt), ValueError,
                 r"^checkpoint_state must be a CUDA tensor, got device cpu")


def test_commit_padded_slots_and_layers_pass():
    """A checkpoint and windows with padded layer and slot strides (inner dims packed) are valid."""
    kw = commit_kwargs()
    for name in ("checkpoint_state", "rawv_cache", "rawk_cache", "g_cache", "beta_cache"):
        t = kw[name]
        kw[name] = torch.cat([t, t], dim=1)[:, :P]
        assert not kw[name].is_contiguous()
    commit_error(kw, ValueError, r"^checkpoint_state must be a CUDA tensor")


def _bad_commit():
    L = 2
    rawv, rawk, g, beta = windows(P, layers=L)
    return [
        ("checkpoint_state", torch.randn(P, HV, V, K), ValueError, r"^checkpoint_state must have shape \[\*, \*, \*, \*, \*\]"),
        ("checkpoint_state", torch.randn(L, P, HV, V, K).half(), TypeError, r"^checkpoint_state must have dtype float32 or bfloat16"),
        ("checkpoint_state", torch.randn(L, P, HV, V, 96), ValueError, r"^checkpoint_state.shape\[4\] \(K\) must be one of"),
        ("checkpoint_state", torch.randn(L, P, HV, K, V), ValueError, r"^rawk_cache must have shape \[2, 5, \*, \*, 128\]"),
        ("checkpoint_state", torch.randn(L, P, HV, V, 2 * K)[..., ::2], ValueError, r"^checkpoint_state must have its last 3 dims"),
        ("checkpoint_state", torch.randn(1, P, HV, V, K).expand(L, P, HV, V, K), ValueError, r"^checkpoint_state must not overlap itself"),
        ("rawk_cache", windows(P, layers=L, h=3)[1], ValueError, r"\(HV=4\) must be a positive multiple of rawk_cache.shape\[2\] \(H=3\)"),
        ("rawk_cache", windows(P, layers=L, T=17)[1], ValueError, r"^rawk_cache.shape\[3\] \(tokens of a window T\) must be in \[1, 16\], got 17"),
        ("rawk_cache", rawk.float(), TypeError, r"^rawk_cache must have dtype bfloat16"),
        ("rawv_cache", windows(P, layers=L, T=4)[0], ValueError, r"^rawv_cache must have shape \[2, 5, 4, 3, 128\]"),
        ("rawv_cache", windows(P, layers=1)[0], ValueError, r"^rawv_cache must have shape \[2, 5, 4, 3, 128\]"),
        ("g_cache", g.bfloat16(), TypeError, r"^g_cache must have dtype float32"),
        ("beta_cache", beta[..., :2], ValueError, r"^beta_cache must have shape \[2, 5, 4, 3\]"),
        ("rawv_cache", torch.zeros(rawv.numel() + 4, dtype=BF16)[4:].view(rawv.shape), ValueError,
         r"^rawv_cache data pointer must be 16-byte aligned"),
        ("state_indices", torch.tensor([3, 0]), TypeError, r"^state_indices must have dtype int32, got int64"),
        ("state_indices", torch.tensor([[3, 0]], dtype=torch.int32), ValueError, r"^state_indices must have shape \[\*\]"),
        ("accept_lens", torch.tensor([2, 1, 0], dtype=torch.int32), ValueError, r"^accept_lens must have shape \[2\]"),
        ("accept_lens", torch.tensor([2.0, 1.0]), TypeError, r"^accept_lens must have dtype int32"),
        ("accept_lens", torch.tensor([2, 0, 1, 0], dtype=torch.int32)[::2], ValueError, r"^accept_lens must have its last dim"),
        ("track_steps", torch.zeros(2, dtype=torch.int32), ValueError, r"^track_state_indices and track_steps go together"),
        ("track_state_indices", torch.zeros(2, dtype=torch.int32), ValueError, r"^track_state_indices and track_steps go together"),
        ("null_block_id", -2, ValueError, r"^null_block_id must be >= -1, got -2"),
        ("null_block_id", 0.0, TypeError, r"^null_block_id must be an int, got float"),
        ("null_block_id", True, TypeError, r"^null_block_id must be an int, got bool"),
        ("backend", "tcgen05", ValueError, r"^backend must be one of \('auto', 'simt', 'flashgdn'\) \(flashgdn has no tcgen05"),
    ]


@pytest.mark.parametrize("name,value,exc,match", _bad_commit(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_commit())])
def test_commit_errors(name, value, exc, match):
    kw = commit_kwargs()
    kw[name] = value
    commit_error(kw, exc, match)


def test_commit_track_errors():
    kw = commit_kwargs(track=True)
    kw["track_steps"] = torch.zeros(3, dtype=torch.int32)
    commit_error(kw, ValueError, r"^track_steps must have shape \[2\]")
    kw = commit_kwargs(track=True)
    kw["track_state_indices"] = torch.zeros(2, dtype=torch.int64)
    commit_error(kw, TypeError, r"^track_state_indices must have dtype int32")


# ----------------------------------------------------------------------------- variants asked for


FACTS = DeviceFacts("sm_90a", 132, "sm90-hbm3")


@pytest.fixture
def captured(monkeypatch):
    """The spec the API asks the compile cache for and the arguments its function gets (device
    check accepting the CPU, device facts of an H200)."""
    seen = {}

    def get(spec):
        seen["spec"] = spec
        return lambda *args: seen.setdefault("args", args)

    monkeypatch.setattr(fapi, "_VALIDATED", {})
    monkeypatch.setattr(fapi.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(fapi, "facts_of", lambda device: FACTS)
    monkeypatch.setattr(fapi.kernel_cache, "get", get)
    return seen


def test_verify_builds_the_replay_variant(captured):
    kw = verify_kwargs()
    flashgdn.gated_delta_rule_mtp(**kw)
    spec = captured["spec"]
    assert spec.replay_cache and not spec.update_state and spec.T == T_MTP
    args = KernelArgs(*captured["args"])
    windows = (args.replay_v, args.replay_k, args.replay_g, args.replay_beta)
    assert all(x is kw[n] for x, n in zip(windows, ("replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta")))


@pytest.mark.parametrize("track", [False, True], ids=["plain", "track"])
def test_commit_builds_its_variant(captured, track):
    kw = commit_kwargs(L=3, T=5, track=track, state_dtype=BF16)
    flashgdn.gated_delta_rule_replayssm_commit(**kw, null_block_id=0, use_qk_l2norm=False)
    assert captured["spec"] == CommitSpec(H=H, HV=HV, K=K, V=V, T=5, state_dtype="bfloat16", use_l2norm=False,
                                          arch="sm_90a", regime="small", null_block_id=0, has_track=track,
                                          device_class="sm90-hbm3")
    args = CommitArgs(*captured["args"])
    assert args.state is kw["checkpoint_state"] and args.accept_lens is kw["accept_lens"]
    assert (args.track_steps is None) != track


def test_commit_of_no_rows_launches_nothing(captured):
    kw = commit_kwargs()
    kw.update(state_indices=torch.zeros(0, dtype=torch.int32), accept_lens=torch.zeros(0, dtype=torch.int32))
    assert flashgdn.gated_delta_rule_replayssm_commit(**kw) is None
    assert "args" not in captured


def test_policy_serves_replay_verify_as_plain_mtp():
    """A replay verify takes the kernel plain MTP without a state update takes (both write the
    windows); the commit is its own kernel on the MTP shapes."""
    from flashgdn.kernels import policy
    from flashgdn.spec import KernelSpec

    def verify(**kw):
        return KernelSpec("klast", 16, 32, 128, 128, 8, "bfloat16", "bfloat16", "bfloat16", "float32", 0.1, True,
                          "sm_90a", "large", index_dtype="int32", update_state=False, **kw)

    assert policy.BuildConfig.for_spec(verify(replay_cache=True)) == policy.BuildConfig.for_spec(verify())
    assert policy.BuildConfig.for_spec(verify(replay_cache=True)).kernel == policy.KMTP_MMA
    with pytest.raises(ValueError, match="replay windows need a pool"):
        KernelSpec("klast", 16, 32, 128, 128, 4, "bfloat16", "float32", "bfloat16", "float32", 0.1, True, "sm_90a",
                   "large", index_dtype="int32", replay_cache=True)  # state updated
    commit = policy.BuildConfig.for_spec(CommitSpec(16, 32, 128, 128, 8, "float32", True, "sm_90a", "large"))
    assert commit.kernel == policy.REPLAY_COMMIT and commit.prefetch_bytes == policy.SM90_HBM3.prefetch_bytes["commit"]
    assert commit.tile == policy.SM90_HBM3.tiles[("mtp", "large", "float32")]
    small = policy.BuildConfig.for_spec(CommitSpec(1, 1, 64, 64, 2, "bfloat16", True, "sm_90a", "small"))
    assert small.tile[0] * (32 // small.tile[2]) * small.tile[1] <= 64


def test_policy_puts_the_commit_on_the_tensor_cores_by_table_or_tile(monkeypatch):
    """The tensor-core commit serves a 2-tuple tile, and the large regime from the table's
    commit_mma_min_tokens of the checkpoint dtype on (both tables: a bf16 checkpoint from T = 8);
    its tile is the table's "mtp_mma" one, fitted to the head dims as the tensor-core MTP kernel's."""
    import dataclasses

    from flashgdn.kernels import policy

    def commit(T=8, sdt="bfloat16", regime="large", K=128, **kw):
        return policy.BuildConfig.for_spec(CommitSpec(16, 32, K, K, T, sdt, True, "sm_90a", regime, **kw))

    assert policy.SM90_HBM3.commit_mma_min_tokens == policy.SM90_HBM3E.commit_mma_min_tokens == {"bfloat16": 8}
    assert commit().kernel == commit(T=16).kernel == policy.REPLAY_COMMIT_MMA
    h200 = dict(device_class="sm90-hbm3e")
    assert commit(**h200).kernel == commit(T=16, **h200).kernel == policy.REPLAY_COMMIT_MMA
    for loop in (commit(T=7, **h200), commit(T=8, sdt="float32", **h200), commit(T=8, regime="small", **h200)):
        assert loop.kernel == policy.REPLAY_COMMIT
    assert commit(tile=(2, 2)).kernel == policy.REPLAY_COMMIT_MMA and commit(tile=(2, 2)).tile == (2, 2)
    assert commit(tile=(4, 2, 8)).kernel == policy.REPLAY_COMMIT
    table = dataclasses.replace(policy.SM90_HBM3, commit_mma_min_tokens={"bfloat16": 4})
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3", table)
    assert commit(T=4).kernel == commit(T=16).kernel == policy.REPLAY_COMMIT_MMA
    assert commit(T=4).tile == table.tiles[("mtp_mma", "large", "bfloat16")]
    assert commit(T=4).prefetch_bytes == table.prefetch_bytes["commit_mma"]
    assert commit(T=8, K=256).tile == (4, 1)  # one 16-row block per warp at K = 256
    for off in (commit(T=3), commit(T=8, regime="small"), commit(T=8, sdt="float32")):
        assert off.kernel == policy.REPLAY_COMMIT


def test_policy_gives_the_commit_its_tables_l2_prefetch(monkeypatch):
    """The commit prefetches a later CTA's checkpoint tile as far ahead as the table's "commit"
    (token loop) or "commit_mma" (tensor cores) distance says, in the large regime only; a table
    without them prefetches nothing."""
    import dataclasses

    from flashgdn.kernels import policy

    def commit(T, regime="large", device_class="sm90-hbm3e", dtype="bfloat16"):
        return policy.BuildConfig.for_spec(CommitSpec(16, 32, 128, 128, T, dtype, True, "sm_90a", regime,
                                                      device_class=device_class))

    # The H100's table prefetches 2 MiB ahead on either kernel, for either checkpoint dtype.
    on_h100 = (commit(8, device_class="sm90-hbm3"), commit(4, device_class="sm90-hbm3"),
               commit(4, device_class="sm90-hbm3", dtype="float32"))
    assert [(c.kernel, c.prefetch_bytes) for c in on_h100] == [(policy.REPLAY_COMMIT_MMA, 2 << 20),
                                                                (policy.REPLAY_COMMIT, 2 << 20),
                                                                (policy.REPLAY_COMMIT, 2 << 20)]
    # The H200's: 6 MiB on the tensor cores; on the token loop 4 MiB for fp32, none for bf16 ("commit:bfloat16").
    on_h200 = commit(8), commit(4), commit(4, dtype="float32"), commit(8, dtype="float32")
    assert [(c.kernel, c.prefetch_bytes) for c in on_h200] == [(policy.REPLAY_COMMIT_MMA, 6 << 20),
                                                                (policy.REPLAY_COMMIT, 0),
                                                                (policy.REPLAY_COMMIT, 4 << 20),
                                                                (policy.REPLAY_COMMIT, 4 << 20)]
    table = policy.SM90_HBM3E
    changed = dataclasses.replace(table, prefetch_bytes={**table.prefetch_bytes, "commit": 3 << 20,
                                                         "commit:bfloat16": 1 << 20, "commit_mma": 5 << 20})
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", changed)
    assert (commit(8).kernel, commit(8).prefetch_bytes) == (policy.REPLAY_COMMIT_MMA, 5 << 20)
    assert (commit(4).kernel, commit(4).prefetch_bytes) == (policy.REPLAY_COMMIT, 1 << 20)
    assert commit(4, dtype="float32").prefetch_bytes == 3 << 20
    assert commit(8, "small").prefetch_bytes == commit(4, "small").prefetch_bytes == 0
    # A table without the entries prefetches nothing.
    bare = {k: v for k, v in table.prefetch_bytes.items() if not k.startswith("commit")}
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", dataclasses.replace(table, prefetch_bytes=bare))
    assert commit(8).prefetch_bytes == commit(4).prefetch_bytes == commit(4, dtype="float32").prefetch_bytes == 0


def test_replay_step_benchmark_compiles_its_variants(capsys):
    """benchmarks/replay_step.py --compile-only builds the verify and commit variants it would time."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    from helpers import load_benchmark

    module = load_benchmark("replay_step")
    mma = "commit_mma_min_tokens={'bfloat16': 2},small_regime_heads_per_sm=0"
    assert module.main(["--compile-only", "--tokens", "2", "--batch-size", "1", "--state-dtype", "bfloat16",
                        "--layers", "2", "--settings", "table", mma]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(": compiled (" in line for line in lines)
    commits = [line for line in lines if line.startswith("commit/T2/")]
    assert len(commits) == 2 and sum("/replay (" in line for line in lines) == 2
    assert "(ReplayCommit, table)" in commits[0] and "(ReplayCommitMma, commit_mma_min_tokens=" in commits[1]



def test_replay_step_times_the_verify_in_turns(monkeypatch):
    """replay_step.py --rounds R times the calls in turns and takes the verify's overhead as the median
    of the rounds' ratios (with their range), not the ratio of the pooled medians."""
    from flashgdn.bench import timing
    from helpers import load_benchmark

    module = load_benchmark("replay_step")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    # The calls come in turns, frozen MTP first and every other round last: round r's frozen MTP takes
    # 10 (r + 1) µs (a drift), its verify 2 / 9 / 4 % more.
    samples = iter([10.0, 10.2, 21.8, 20.0, 30.0, 31.2])
    monkeypatch.setattr(timing, "time_fn", lambda fn, iters, **kw: ([next(samples)] * iters, "cupti"))
    args = module.parse_args(["--calls", "mtp_frozen", "verify", "--rounds", "3", "--iters", "5", "--layers", "1"])
    row = module.measure(1, 2, "float32", args, flusher=None, copy_bw=1e12)
    assert row["verify_overhead_pct"] == 4.0
    assert row["verify_overhead_range"] == "2.00..9.00"
    # The calls' own columns are the medians of all their samples.
    assert (row["mtp_frozen_us"], row["verify_us"]) == (20.0, 21.8)
    with pytest.raises(SystemExit):
        module.parse_args(["--rounds", "0"])
