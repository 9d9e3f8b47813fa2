"""Plain torch reference of the GDN decode functions: the oracle for tests and `--verify`.

Runs on any device, computes in fp32 (or fp64 with `compute_dtype=torch.float64`), and follows
the public API exactly (pools, padding, separate write slots, intermediate states, accepted
tokens). The state is updated in place, like the kernels, and stored back in its own dtype only
after the last token (intermediate states are rounded copies), as the kernels do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def gates(A_log, a, dt_bias, b, softplus_beta=1.0, softplus_threshold=20.0, dtype=torch.float32):
    """g = exp(-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b); a, b [..., HV]."""
    log_g, beta = log_gates(A_log, a, dt_bias, b, softplus_beta, softplus_threshold, dtype)
    return torch.exp(log_g), beta


def log_gates(A_log, a, dt_bias, b, softplus_beta=1.0, softplus_threshold=20.0, dtype=torch.float32):
    """gates with the decay as its log, -exp(A_log) * softplus(a + dt_bias)."""
    x = a.to(dtype) + dt_bias.to(dtype)
    sp = F.softplus(x, beta=softplus_beta, threshold=softplus_threshold)
    return -torch.exp(A_log.to(dtype)) * sp, torch.sigmoid(b.to(dtype))


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def step(S, q, k, v, g, beta):
    """One token of the recurrence for a batch of heads, written as in the paper.

    S [N, HV, K, V]; q, k [N, HV, K]; v [N, HV, V]; g, beta [N, HV]. Returns (o, S_new).
    """
    S = S * g[..., None, None]
    u = (v - torch.einsum("nhkv,nhk->nhv", S, k)) * beta[..., None]
    S = S + k[..., :, None] * u[..., None, :]
    return torch.einsum("nhkv,nhk->nhv", S, q), S


def _recur(q, k, v, a, b, A_log, dt_bias, S, scale, use_qk_l2norm, softplus_beta, softplus_threshold, dtype,
           tree=None):
    """Run T tokens for N sequences. S [N, HV, K, V] in `dtype`; returns (o [N,T,HV,V], states list)."""
    qf, kf = _prepare_qk(q, k, v.shape[2], scale, use_qk_l2norm, dtype)
    g, beta = gates(A_log, a, dt_bias, b, softplus_beta, softplus_threshold, dtype)
    return _recur_gated(qf, kf, v, g, beta, S, dtype, tree)


def _recur_gated(qf, kf, v, g, beta, S, dtype, tree=None):
    """T tokens on gates g (decay), beta [N, T, HV] and prepared q, k [N, T, HV, K] (normed,
    scaled, repeated over the value heads). Returns (o [N, T, HV, V], states list). `tree`
    (parents [N, T] in range, which rows follow them [N], the dtype states are stored in): an
    EAGLE tree, token t >= 1 of such a row starting from the stored state after its parent (a
    parent outside [0, t), on a row the caller discards, is clamped into it)."""
    T = qf.shape[1]
    outs, states = [], []
    for t in range(T):
        if tree is not None and t > 0:
            parents, follows, stored = tree
            after = torch.stack(states)[parents[:, t].long().clamp(0, t - 1), torch.arange(S.shape[0], device=S.device)]
            S = torch.where(follows[:, None, None, None], after.to(stored).to(dtype), S)
        o, S = step(S, qf[:, t], kf[:, t], v[:, t].to(dtype), g[:, t].to(dtype), beta[:, t].to(dtype))
        outs.append(o)
        states.append(S)
    return torch.stack(outs, 1), states


def _prepare_qk(q, k, HV, scale, use_qk_l2norm, dtype):
    """q, k [N, T, H, K] -> normed (optionally), q scaled, both repeated to [N, T, HV, K]."""
    K = q.shape[-1]
    qf, kf = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * (K ** -0.5 if scale is None else scale)
    rep = HV // q.shape[2]
    return qf.repeat_interleave(rep, dim=2), kf.repeat_interleave(rep, dim=2)


def _decode(
    q, k, v, a, b, A_log, dt_bias, pool, read_idx, write_idx, layout, scale, use_qk_l2norm,
    output, intermediate_states_buffer=None, update_state=True, accepted_tokens=None,
    softplus_beta=1.0, softplus_threshold=20.0, compute_dtype=torch.float32, token_slots=None,
    zero_padding_output=True, intermediate_rows=None, parent_tokens=None,
):
    """The decode of B rows of T tokens. `intermediate_rows` [>= B] (SGLang's target verify): row i
    writes its states to intermediate_states_buffer[intermediate_rows[i]] (negative: nowhere; past
    the buffer: NaN output, nothing written) instead of buffer row i. `parent_tokens` [>= B, T]
    (with intermediate_rows: an EAGLE tree): token t >= 1 of a row that writes its states starts
    from the state stored after its parent token (a parent outside [0, t): NaN output, nothing
    written)."""
    B, T = q.shape[:2]
    HV, V = v.shape[2], v.shape[3]
    out_dtype = q.dtype if output is None else output.dtype
    out = torch.zeros(B, T, HV, V, dtype=out_dtype, device=q.device)
    if read_idx is None:
        read_idx = torch.arange(B, device=q.device)
    write_idx = read_idx if write_idx is None else write_idx
    # A negative read index is padding; a negative write index (FlashInfer's rule) lets the row run
    # (output, intermediate states) without storing its final state.
    run = read_idx >= 0
    padding = ~run
    if output is not None and not zero_padding_output:
        out[padding] = output[padding]
    # Rows the kernels refuse (slot past the pool, a write slot past it where the state is stored,
    # accepted count outside [0, T]) get NaN output.
    bad = run & ((read_idx >= pool.shape[0]) | (update_state & (write_idx >= pool.shape[0])))
    if accepted_tokens is not None:
        bad |= run & ((accepted_tokens < 0) | (accepted_tokens > T))
    if token_slots is not None:
        bad |= run & (token_slots >= pool.shape[0]).any(1)
    inter_rows = torch.arange(B, device=q.device)
    if intermediate_states_buffer is not None and intermediate_rows is not None:
        inter_rows = intermediate_rows[:B].long()
        bad |= run & (inter_rows >= intermediate_states_buffer.shape[0])
    tree = None
    if parent_tokens is not None and intermediate_states_buffer is not None:
        parents = parent_tokens[:B].long()
        steps = torch.arange(T, device=q.device)
        wrong = ((parents < 0) | (parents >= steps)) & (steps > 0)
        follows = inter_rows >= 0
        bad |= run & follows & wrong.any(1)
        tree = (parents, follows, intermediate_states_buffer.dtype)
    out[bad] = float("nan")
    run &= ~bad
    rows = torch.nonzero(run).flatten()
    if rows.numel():
        ri, wi = read_idx[rows].long(), write_idx[rows].long()
        S = pool[ri].to(compute_dtype)
        if layout == "klast":
            S = S.transpose(-1, -2)
        o, states = _recur(
            q[rows], k[rows], v[rows], a[rows], b[rows], A_log, dt_bias, S, scale, use_qk_l2norm,
            softplus_beta, softplus_threshold, compute_dtype,
            None if tree is None else (tree[0][rows], tree[1][rows], tree[2]),
        )
        out[rows] = o.to(out_dtype)
        as_stored = (lambda s: s.transpose(-1, -2)) if layout == "klast" else (lambda s: s)
        if intermediate_states_buffer is not None:
            dst = inter_rows[rows]
            keep = dst >= 0
            for t, s in enumerate(states):
                intermediate_states_buffer[dst[keep], t] = as_stored(s[keep]).to(intermediate_states_buffer.dtype)
        if token_slots is not None:  # the state after token t to its slot; no final write-back
            for t, s in enumerate(states):
                slots = token_slots[rows, t].long()
                keep = slots >= 0
                pool[slots[keep]] = as_stored(s[keep]).to(pool.dtype)
        elif update_state:
            final = torch.stack([S] + states, 1)  # [n, T+1, ...]: state after 0..T tokens
            n_acc = torch.full_like(rows, T) if accepted_tokens is None else accepted_tokens[rows].long()
            chosen = final[torch.arange(rows.numel(), device=q.device), n_acc]
            stored = wi >= 0
            pool[wi[stored]] = as_stored(chosen[stored]).to(pool.dtype)
    if output is not None:
        output.copy_(out)
        out = output
    return out


def gated_delta_rule_decode_pretranspose(
    q, k, v, state, A_log, a, dt_bias, b, scale=None, output=None, use_qk_l2norm=True,
    initial_state=None, initial_state_indices=None, output_state_indices=None,
    intermediate_states_buffer=None, disable_state_update=False, backend="auto", *,
    softplus_beta=1.0, softplus_threshold=20.0, compute_dtype=torch.float32,
):
    """Reference of flashgdn.gated_delta_rule_decode_pretranspose (state [B|P, HV, V, K], T >= 1)."""
    pool = initial_state if initial_state is not None else state
    out = _decode(
        q, k, v, a, b, A_log, dt_bias, pool, initial_state_indices, output_state_indices, "klast",
        scale, use_qk_l2norm, output, intermediate_states_buffer, not disable_state_update,
        softplus_beta=softplus_beta, softplus_threshold=softplus_threshold, compute_dtype=compute_dtype,
        zero_padding_output=q.shape[1] == 1,
    )
    return out, pool


def gated_delta_rule_decode(
    q, k, v, state, A_log, a, dt_bias, b, scale=None, output=None, use_qk_l2norm=True, backend="auto", *,
    softplus_beta=1.0, softplus_threshold=20.0, compute_dtype=torch.float32,
):
    """Reference of flashgdn.gated_delta_rule_decode (state [B, HV, K, V])."""
    out = _decode(
        q, k, v, a, b, A_log, dt_bias, state, None, None, "kmajor", scale, use_qk_l2norm, output,
        softplus_beta=softplus_beta, softplus_threshold=softplus_threshold, compute_dtype=compute_dtype,
    )
    return out, state


def gated_delta_rule_mtp(
    q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale=None, output=None,
    intermediate_states_buffer=None, ssm_state_indices=None, disable_state_update=None, use_qk_l2norm=True,
    output_state_indices=None, cache_replayssm=False, replayssm_rawv=None, replayssm_rawk=None,
    replayssm_g=None, replayssm_beta=None, *, accepted_tokens: Optional[torch.Tensor] = None,
    softplus_beta=1.0, softplus_threshold=20.0, compute_dtype=torch.float32,
):
    """Reference of flashgdn.gated_delta_rule_mtp (pool [P, HV, V, K], T tokens per sequence;
    disable_state_update None means True). With cache_replayssm, every running row (as the
    kernels decide it: slots in range, none negative) also writes its raw inputs to the ReplaySSM
    windows of its read slot (replay_windows)."""
    update = disable_state_update is not None and not disable_state_update
    out = _decode(
        q, k, v, a, b, A_log, dt_bias, initial_state, initial_state_indices, output_state_indices,
        "klast", scale, use_qk_l2norm, output, intermediate_states_buffer, update,
        accepted_tokens, softplus_beta, softplus_threshold, compute_dtype, token_slots=ssm_state_indices,
        zero_padding_output=False,
    )
    if cache_replayssm:
        read = initial_state_indices
        write = read if output_state_indices is None else output_state_indices
        P = initial_state.shape[0]
        run = (read >= 0) & (write >= 0) & (read < P) & (write < P)
        replay_windows(replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta, read, run, k, v, a, b, A_log,
                       dt_bias, softplus_beta, softplus_threshold, compute_dtype)
    return out, initial_state


def conv_update(mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, compute_dtype=torch.float32):
    """Causal conv1d update with SiLU for one token per row, as vLLM's and SGLang's
    causal_conv1d_update (activation "silu") run it for Qwen3-Next / Qwen3.5 decode: the window
    is the slot's last width - 1 inputs followed by the new input x; the output is
    silu(sum(window * weight) + bias), stored in bf16 (the models' activation dtype); the slot
    keeps the window's last width - 1 values. mixed_qkv [B, C]; conv_weight [C, width];
    conv_bias [C] or None; conv_state [P, C, width - 1], updated in place for the rows whose slot
    is in [0, P). Returns the output [B, C] (zero for the other rows)."""
    idx = state_indices.long()
    run = (idx >= 0) & (idx < conv_state.shape[0])
    y = torch.zeros(mixed_qkv.shape, dtype=torch.bfloat16, device=mixed_qkv.device)
    rows = torch.nonzero(run).flatten()
    if rows.numel():
        slots = idx[rows]
        window = torch.cat([conv_state[slots], mixed_qkv[rows].to(conv_state.dtype).unsqueeze(-1)], dim=-1)
        acc = (window.to(compute_dtype) * conv_weight.to(compute_dtype)).sum(-1)
        if conv_bias is not None:
            acc = acc + conv_bias.to(compute_dtype)
        y[rows] = F.silu(acc).to(torch.bfloat16)
        conv_state[slots] = window[..., 1:]
    return y


def gdn_fused_decode_step(
    hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale, ssm_state,
    state_indices, use_qk_l2norm=True, out=None, *, compute_dtype=torch.float32,
):
    """Reference of flashgdn.gdn_fused_decode_step (FlashInfer's contract), composed of the steps
    the models run, in their order:

    1. ba = hidden_states @ w_ba, rounded to bf16 (the projection's output dtype); b = ba[:, :HV]
       (beta gate), a = ba[:, HV:] (decay gate): FlashInfer's split, which is Qwen3.5's
       in_proj_b | in_proj_a side by side (Qwen3-Next's in_proj_ba interleaves them per q/k head
       group: an engine permutes those weight columns once).
    2. conv_update over all qkv_dim channels (SiLU).
    3. The split of the conv output into q [H*D] | k [H*D] | v [HV*D].
    4. The one-token K-last decode (gated_delta_rule_decode_pretranspose on the pool ssm_state
       [P, HV, V, K] at state_indices; a negative index is padding: zero output row, neither pool
       touched; an index past the pools gives a NaN output row and touches neither).

    scale None or 0.0 means D ** -0.5 (FlashInfer's rule). Returns (out [B, 1, HV, D] bf16,
    conv_state, ssm_state); both pools are updated in place."""
    B = hidden_states.shape[0]
    HV, D = A_log.shape[0], ssm_state.shape[-1]
    H = (mixed_qkv.shape[1] - HV * D) // (2 * D)
    ba = (hidden_states.to(compute_dtype) @ w_ba.to(compute_dtype)).to(torch.bfloat16)
    b_gate, a_gate = ba[:, :HV], ba[:, HV:]
    y = conv_update(mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, compute_dtype)
    q = y[:, : H * D].view(B, 1, H, D)
    k = y[:, H * D : 2 * H * D].view(B, 1, H, D)
    v = y[:, 2 * H * D :].view(B, 1, HV, D)
    result = _decode(
        q, k, v, a_gate.unsqueeze(1), b_gate.unsqueeze(1), A_log, dt_bias, ssm_state, state_indices, None,
        "klast", None if not scale else scale, use_qk_l2norm, out, compute_dtype=compute_dtype,
    )
    return result, conv_state, ssm_state


def fused_recurrent_gated_delta_rule_vllm(
    q, k, v, g, beta, scale, initial_state, cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None,
    use_qk_l2norm_in_kernel=False, *, compute_dtype=torch.float32,
):
    """Reference of vLLM's contract (flashgdn.engines.fused_recurrent_gated_delta_rule), one
    sequence at a time: g log decay, beta [B, T, HV]; sequence i (rows cu_seqlens[i]..[i + 1] of
    dim 1, or row i of a dense batch) reads slot ssm_state_indices[i, num_accepted_tokens[i] - 1]
    and writes the state after its token t to slot ssm_state_indices[i, t] (in place, the pool's
    dtype); a slot <= 0 is padding (read: zero output, nothing written) or not written, and so is
    an accepted count of 0; a count outside [0, T] gives NaN output rows and writes nothing; rows
    of the slot table and accepted counts past the N sequences (a CUDA-graph batch's padding) are
    not read. Returns the output (v's shape, q's dtype; NaN in rows of no sequence)."""
    idx = ssm_state_indices if ssm_state_indices.dim() == 2 else ssm_state_indices[:, None]
    out = torch.full(v.shape, float("nan"), dtype=q.dtype, device=q.device)
    HV = v.shape[2]
    for i in range(q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1):
        if cu_seqlens is None:
            row, start, n = i, 0, q.shape[1]
        else:
            row, start, n = 0, int(cu_seqlens[i]), int(cu_seqlens[i + 1] - cu_seqlens[i])
        if n == 0:
            continue
        span = slice(start, start + n)
        acc = 1 if num_accepted_tokens is None else int(num_accepted_tokens[i])
        if not 0 <= acc <= idx.shape[1]:
            continue  # NaN rows, nothing written
        slot = int(idx[i, acc - 1]) if acc else 0
        if slot <= 0:
            out[row, span] = 0
            continue
        S = initial_state[slot].to(compute_dtype).transpose(-1, -2)[None]  # [1, HV, K, V]
        qf, kf = _prepare_qk(q[row, span][None], k[row, span][None], HV, scale, use_qk_l2norm_in_kernel,
                             compute_dtype)
        o, states = _recur_gated(qf, kf, v[row, span][None], g[row, span][None].to(compute_dtype).exp(),
                                 beta[row, span][None].to(compute_dtype), S, compute_dtype)
        out[row, span] = o[0].to(q.dtype)
        for t, s in enumerate(states):
            w = int(idx[i, t])
            if w > 0:
                initial_state[w] = s[0].transpose(-1, -2).to(initial_state.dtype)
    return out
def replay_windows(rawv, rawk, log_g, beta, slots, run, k, v, a, b, A_log, dt_bias, softplus_beta=1.0,
                   softplus_threshold=20.0, compute_dtype=torch.float32):
    """A ReplaySSM verify's window writes: for each row i with run[i], at pool slot slots[i], the raw
    v [HV, T, V] and k [H, T, K] (bf16, k before its norm), the log decay
    -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) [HV, T] (fp32)."""
    rows = torch.nonzero(run).flatten()
    if not rows.numel():
        return
    slot = slots[rows].long()
    lg, bt = log_gates(A_log, a[rows], dt_bias, b[rows], softplus_beta, softplus_threshold, compute_dtype)
    rawv[slot] = v[rows].transpose(1, 2).to(rawv.dtype)
    rawk[slot] = k[rows].transpose(1, 2).to(rawk.dtype)
    log_g[slot] = lg.transpose(1, 2).to(log_g.dtype)
    beta[slot] = bt.transpose(1, 2).to(beta.dtype)


def gated_delta_rule_replayssm_commit(
    checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens, *,
    track_state_indices=None, track_steps=None, use_qk_l2norm=True, null_block_id=-1, backend="auto",
    compute_dtype=torch.float32,
):
    """Reference of flashgdn.gated_delta_rule_replayssm_commit: for every layer and each row whose
    slot is live (null_block_id < slot < slots) and whose accepted count n is in [1, T], the first n
    tokens of the slot's windows replayed into checkpoint_state [L, slots, HV, V, K] in place
    (stored in its dtype once, at the end), and the state after token track_steps[i] (zero-based,
    < n) stored at track_state_indices[i] when that slot is live. Returns None."""
    L, P, HV, V, K = checkpoint_state.shape
    H, T = rawk_cache.shape[2], rawk_cache.shape[3]
    for i in range(state_indices.shape[0]):
        slot, n = int(state_indices[i]), int(accept_lens[i])
        if not (null_block_id < slot < P and 1 <= n <= T):
            continue
        track = None
        if track_state_indices is not None:
            track_slot, track_step = int(track_state_indices[i]), int(track_steps[i])
            if null_block_id < track_slot < P:
                track = (track_slot, track_step)
        S = checkpoint_state[:, slot].to(compute_dtype).transpose(-1, -2)  # [L, HV, K, V]
        for t in range(n):
            kt = rawk_cache[:, slot, :, t].to(compute_dtype)  # [L, H, K]
            if use_qk_l2norm:
                kt = l2norm(kt)
            kt = kt.repeat_interleave(HV // H, dim=1)
            g = torch.exp(g_cache[:, slot, :, t].to(compute_dtype))
            _, S = step(S, kt, kt, rawv_cache[:, slot, :, t].to(compute_dtype), g,
                        beta_cache[:, slot, :, t].to(compute_dtype))
            if track is not None and track[1] == t:
                checkpoint_state[:, track[0]] = S.transpose(-1, -2).to(checkpoint_state.dtype)
        checkpoint_state[:, slot] = S.transpose(-1, -2).to(checkpoint_state.dtype)
