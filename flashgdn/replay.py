"""FlashInfer 0.7.2's `gated_delta_rule_replayssm_commit` (names, argument order, defaults,
in-place behaviour): the ReplaySSM commit, which replays the accepted prefix of each live slot's
windows (written by flashgdn.api.gated_delta_rule_mtp(cache_replayssm=True)) into every layer's
checkpoint in one launch. Its eager body and fast path follow flashgdn.api's (the module's
switches, memo and compile cache are api's, read at call time)."""
from __future__ import annotations

from typing import Optional

import torch

from . import api, fastpath
from . import validation as val
from .device import DeviceFacts
from .kernels import policy
from .logging_utils import logged
from .spec import CommitArgs, CommitSpec

COMMIT_BACKENDS = ("auto", "simt", "flashgdn")  # FlashInfer's "tcgen05" (its SM100 TF32 path) is not built


def commit_spec(p: val.CommitProblem, checkpoint_state: torch.Tensor, use_l2norm: bool, null_block_id: int,
                has_track: bool, facts: DeviceFacts) -> CommitSpec:
    """The compiled ReplaySSM commit variant of a call; its regime counts (layer, row, value head)
    CTAs as the decode kernels count (row, value head)."""
    return CommitSpec(
        H=p.H, HV=p.HV, K=p.K, V=p.V, T=p.T, state_dtype=val.dtype_name(checkpoint_state.dtype),
        use_l2norm=bool(use_l2norm), arch=facts.arch,
        regime=policy.regime(p.L * p.B, p.HV, facts.sm_count, facts.device_class), null_block_id=null_block_id,
        has_track=has_track, device_class=facts.device_class,
    )


def _check_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                  track_state_indices, track_steps, null_block_id):
    p = val.check_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                         track_state_indices, track_steps, null_block_id)
    return p, val.check_devices(dict(
        checkpoint_state=checkpoint_state, rawv_cache=rawv_cache, rawk_cache=rawk_cache, g_cache=g_cache,
        beta_cache=beta_cache, state_indices=state_indices, accept_lens=accept_lens,
        track_state_indices=track_state_indices, track_steps=track_steps,
    ))


def _check_commit_values(p: val.CommitProblem, args: CommitArgs, null_block_id: int) -> None:
    """FLASHGDN_CHECK_INDICES=1: accepted counts in [0, T]; live slots (above null_block_id) in
    range, each committed by one row, track slots distinct and apart from them (a host sync)."""
    val.check_index_values("accept_lens", args.accept_lens, p.T + 1, allow_negative=False)
    slots = [("state_indices", args.state_indices)]
    if args.track_state_indices is not None:
        slots.append(("track_state_indices", args.track_state_indices))
    live = []
    for name, t in slots:
        t = t[t > null_block_id]
        val.check_index_values(name, t, p.P, allow_negative=False)
        val.check_distinct_slots(name, t, t)
        live.append(t)
    if len(live) == 2 and torch.isin(live[1], live[0]).any():
        raise ValueError("track_state_indices must not name a slot that state_indices commits")


@logged
def gated_delta_rule_replayssm_commit(
    checkpoint_state: torch.Tensor, rawv_cache: torch.Tensor, rawk_cache: torch.Tensor, g_cache: torch.Tensor,
    beta_cache: torch.Tensor, state_indices: torch.Tensor, accept_lens: torch.Tensor, *,
    track_state_indices: Optional[torch.Tensor] = None, track_steps: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = True, null_block_id: int = -1, backend: str = "auto",
) -> None:
    """Commit the accepted ReplaySSM prefix into every layer's checkpoint, in one launch.

    checkpoint_state [L, P, HV, V, K] (fp32 or bf16, K-last, its last three dims packed) is updated
    in place from the windows that gated_delta_rule_mtp(cache_replayssm=True) wrote for each layer:
    rawv_cache [L, P, HV, T, V], rawk_cache [L, P, H, T, K] (bf16), g_cache and beta_cache
    [L, P, HV, T] (fp32). For row i with a live slot s = state_indices[i] (null_block_id < s < P)
    and n = accept_lens[i] in [1, T], the first n tokens of slot s's windows are replayed into
    checkpoint_state[:, s]: S = exp(g) S; u = (v - S^T k) beta; S = S + k u^T, with k normalised
    when use_qk_l2norm (as in the verify). accept_lens 0, a slot at or below null_block_id, or
    (unchecked values) a slot or count out of range leave everything untouched. With
    track_state_indices / track_steps [B] (int32, together), the state after token track_steps[i]
    (zero-based, < n) also goes to slot track_state_indices[i] when that slot is live. Live slots
    must be unique, and track slots distinct and apart from them (not checked on the host unless
    FLASHGDN_CHECK_INDICES=1). backend: "auto" or "simt" (FlashInfer's names; both run flashgdn's
    fp32 kernel), "flashgdn".
    """
    if api._is_compiling():  # traced: one custom op (flashgdn.api's module docstring)
        torch.ops.flashgdn.gated_delta_rule_replayssm_commit(
            checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
            track_state_indices, track_steps, use_qk_l2norm, null_block_id, backend,
        )
        return None
    _replayssm_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                      track_state_indices, track_steps, use_qk_l2norm, null_block_id, backend)
    return None


def _check_commit_backend(backend) -> None:
    if backend not in COMMIT_BACKENDS:
        raise ValueError(f"backend must be one of {COMMIT_BACKENDS} (flashgdn has no tcgen05 commit), got {backend!r}")


def _commit_key(checkpoint_state, state_indices, track_state_indices, track_steps, use_qk_l2norm, backend,
                null_block_id) -> tuple:
    """The fast key of a ReplaySSM commit (flashgdn.fastpath): what its compiled function does not check."""
    return (_replayssm_commit, state_indices.shape[0], checkpoint_state.get_device(), checkpoint_state.shape,
            checkpoint_state.stride(), track_state_indices is None, track_steps is None, use_qk_l2norm, backend,
            type(null_block_id), null_block_id)


def _replayssm_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                      track_state_indices, track_steps, use_qk_l2norm, null_block_id, backend):
    key, fast = fastpath.find(api.CHECK_INDICES, _commit_key, checkpoint_state, state_indices, track_state_indices,
                              track_steps, use_qk_l2norm, backend, null_block_id)
    if fast is not None:
        try:  # CommitArgs' order
            fast.fn(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                    track_state_indices, track_steps)
            return
        except fastpath.REFUSED:
            pass
    _check_commit_backend(backend)
    val.check_flags(use_qk_l2norm=use_qk_l2norm)
    plan = api._validated(
        _check_commit, checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
        track_state_indices, track_steps, null_block_id, options=(use_qk_l2norm,),
    )
    args = CommitArgs(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                      track_state_indices, track_steps)
    p = plan.problem
    fn = plan.fn
    if fn is None:
        fn = plan.fn = api.kernel_cache.get(commit_spec(p, checkpoint_state, use_qk_l2norm, null_block_id,
                                                        track_state_indices is not None, api.facts_of(plan.device)))
    if api.CHECK_INDICES:
        _check_commit_values(p, args, null_block_id)
    if p.B:
        fn(*args)
    api._remember_fast(key, plan)
