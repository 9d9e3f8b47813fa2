"""ReplaySSM commit: replay the accepted prefix of each slot's window into its checkpoint, for all
layers in one launch. Checkpoint [L, P, HV, V, K] (K contiguous, fp32 or bf16), windows of the
verify (kmtp.KLastMTP or kmtp_mma.KLastMTPMma with spec.replay_cache): replay_v [L, P, HV, T, V],
replay_k [L, P, H, T, K] (bf16, k before its norm), replay_g (log decay) and replay_beta
[L, P, HV, T] (fp32).

One CTA per (layer, batch row, value head, tile of rows). A live row (slot above null_block_id and
inside the pool, 0 < accepted <= T) reads its state rows and the window once, applies the accepted
tokens

    S = g S;  u = (v - S^T k) beta;  S = S + k u^T

and stores its rows once (and the state at the tracked step into the track slot). A row that is
not live reads and writes nothing: an accepted count of 0 is a no-op, as is an out-of-range slot
or count. There are no outputs. Where the policy gives a distance (a table's "commit" /
"commit_mma" entry, large regime), a live CTA, its state loads issued, brings a later CTA's
checkpoint tile into L2 (decode_kernel.DecodeKernel.prefetch_later). Two kernels, the policy's choice
(policy.BuildConfig):

- ReplayCommit, kmtp.KLastMTP's token loop in klast's register layout: it stages the window's
  normalised k, decays, betas and its rows' v in shared memory behind one barrier and runs the
  tokens one by one (3 FMAs per state element and token).
- ReplayCommitMma, kmtp_mma.KLastMTPMma's closed form without q: the state after n tokens is
  G(n - 1) S_0 plus a rank-T update whose weights of the tokens from n on are zero, so the accepted
  count (and the tracked step) is a runtime index into the head's tables; per state element a
  load, a multiply and a store, whatever the count.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, const_expr

from ..spec import CommitArgs
from . import common
from .kmtp import KLastMTP
from .kmtp_mma import KLastMTPMma


class _CommitRows:
    """The grid and row rules both commit kernels share (a mixin ahead of their decode kernel)."""

    def grid_rows(self, tensors):
        """One grid row per (layer, batch row)."""
        gmem = CommitArgs(*tensors)
        return gmem.state.shape[0] * gmem.state_indices.shape[0]

    def _coords(self, gmem: CommitArgs):
        """(tile, layer, batch row b, value head hv, q/k head h) of this CTA."""
        tile, row, hv, h = self.cta_coords()
        batch = gmem.state_indices.shape[0]
        return tile, row // batch, row % batch, hv, h

    @cute.jit
    def _live(self, gmem: CommitArgs, b):
        """(slot (64-bit), accepted tokens, whether the row commits): a slot above null_block_id
        and inside the pool with 0 < accepted <= T."""
        slot = Int64(gmem.state_indices[b])
        accepted = Int32(gmem.accept_lens[b])
        live = slot > Int64(self.spec.null_block_id) and slot < Int64(gmem.state.shape[1])
        live = live and accepted > Int32(0) and accepted <= Int32(self.spec.T)
        return slot, accepted, live

    @cute.jit
    def _prefetch_state(self, gmem: CommitArgs, tile, row, hv, tid):
        """prefetch_later's fetch: the checkpoint tile of grid row `row` (a layer and batch row)
        into L2, if that row commits."""
        batch = gmem.state_indices.shape[0]
        slot, _, live = self._live(gmem, row % batch)
        if live:
            common.bulk_prefetch(gmem.state[row // batch, slot, hv, tile * self.tile_rows, None].iterator,
                                 self.tile_bytes)

    @cute.jit
    def _track(self, gmem: CommitArgs, b):
        """(track slot (64-bit), zero-based step, whether it is written at all)."""
        slot = Int64(gmem.track_state_indices[b])
        live = slot > Int64(self.spec.null_block_id) and slot < Int64(gmem.state.shape[1])
        return slot, Int32(gmem.track_steps[b]), live


class ReplayCommit(_CommitRows, KLastMTP):
    """Built from a spec.CommitSpec (its T, H, HV, K, V and state dtype are KernelSpec's) and a
    (warps, rows per thread, lanes per row) tile."""

    @cute.jit
    def _window_loads(self, gmem: CommitArgs, layer, slot, h, hv, tile, warp, lane):
        """Raw window values, as kmtp's _stage_loads: v of the CTA's rows for every token; warp w
        the k rows of tokens w, w + num_warps, ...; lane t the decay and beta of token t. Token
        indices past T are clamped (no branch)."""
        spec = self.spec
        T, W, rpc = spec.T, self.num_warps, self.rows_per_cta
        values = []
        for m in cutlass.range_constexpr(self.v_per_thread):
            f, fc, _ = self._entry(warp * 32 + lane, m)
            values.append((f, gmem.replay_v[layer, slot, hv, fc // rpc, tile * rpc + fc % rpc]))
        common.load_fence()
        keys = []
        for j in cutlass.range_constexpr(self.tokens_per_warp):
            t = warp + j * W
            tc = t if const_expr(T % W == 0) else Int32(cutlass.select_(t < T, t, T - 1))
            keys.append((t, common.warp_slice(gmem.replay_k[layer, slot, h, tc, None], lane, spec.K)))
        gates = []
        for j in cutlass.range_constexpr(self.gate_cols // 32):
            t = lane + 32 * j
            tc = Int32(cutlass.select_(t < T, t, T - 1))
            gates.append((t, gmem.replay_g[layer, slot, hv, tc], gmem.replay_beta[layer, slot, hv, tc]))
        return values, keys, gates

    @cute.jit
    def _window_store(self, values, keys, gates, sK, sGate, sV, warp, lane):
        """Into shared memory: v, k_hat (normalised when use_l2norm), the decay exp(log g) and beta
        (one copy per warp, copy 0 is read). Padded work writes spare columns: no branch."""
        n = self.spec.K // 32
        for f, val in values:
            sV[f % self.rows_per_cta, f // self.rows_per_cta] = val.to(Float32)
        for t, rRaw in keys:
            k = rRaw.load().to(Float32)
            factor = Float32(1.0)
            if const_expr(self.spec.use_l2norm):
                sum_kk = Float32(0.0)
                for e in cutlass.range_constexpr(n):
                    sum_kk += k[e] * k[e]
                factor = common.inv_l2norm(cute.arch.warp_reduction_sum(sum_kk, threads_in_group=32))
            for e in cutlass.range_constexpr(n):
                sK[lane * n + e, t] = k[e] * factor
        for t, log_g, beta in gates:
            sGate[0, t, warp] = cute.math.exp(log_g)
            sGate[1, t, warp] = beta

    @common.kernel_params(CommitArgs._fields)
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.CommitArgs, in its order."""
        gmem = CommitArgs(*args)
        spec = self.spec
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, layer, b, hv, h = self._coords(gmem)
        lane_in_row = lane % self.lanes_per_row
        row0 = tile * self.rows_per_cta + warp * self.groups_per_warp + lane // self.lanes_per_row
        local0 = row0 - tile * self.rows_per_cta

        smem = cutlass.memory.SmemAllocator()
        sK = smem.allocate_tensor(Float32, cute.make_layout((spec.K, self.t_pad)), byte_alignment=16)
        sGate = smem.allocate_tensor(
            Float32, cute.make_layout((2, max(self.t_pad, self.gate_cols), self.num_warps)), byte_alignment=16
        )
        sV = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_cta, self.v_cols)), byte_alignment=16)

        slot, accepted, live = self._live(gmem, b)
        # The branch is uniform over the CTA (one batch row), so its barrier is too.
        if live:
            mS = gmem.state[layer, slot, hv, None, None]
            rRaw = self._load_rows(mS, row0, lane_in_row)
            common.load_fence()  # the state first: the window's arithmetic comes first
            self.prefetch_later(gmem)
            values, keys, gates = self._window_loads(gmem, layer, slot, h, hv, tile, warp, lane)
            rS = self._f32(rRaw)
            self._window_store(values, keys, gates, sK, sGate, sV, warp, lane)
            cute.arch.barrier()
            track = self._track(gmem, b) if const_expr(spec.has_track) else None
            for t in cutlass.range_constexpr(spec.T):
                if t < accepted:
                    self._token(rS, sK, sGate, sV, t, local0, lane_in_row)
                    if const_expr(spec.has_track):
                        track_slot, track_step, track_live = track
                        if track_live and track_step == t:
                            self._store_rows(rS, gmem.state[layer, track_slot, hv, None, None], row0, lane_in_row)
            self._store_rows(rS, mS, row0, lane_in_row)

    @cute.jit
    def _token(self, rS, sK, sGate, sV, t: int, local0, lane_in_row):
        """Token t on this thread's rows: S = g S; u = (v - S^T k) beta; S += k u^T. The decay
        goes into the dot product (g (S k)) and the update (g S + k u): two FMAs and a multiply
        per element."""
        R, E, L = self.rows_per_thread, self.vec * self.chunks, self.lanes_per_row
        rK = self._f32(self._load_vec(sK[None, t], lane_in_row))
        rGate = cute.make_rmem_tensor((2,), Float32)
        cute.autovec_copy(sGate[None, t, 0], rGate)
        g, beta = rGate[0], rGate[1]
        dots = []
        for i in cutlass.range_constexpr(R):
            dot = Float32(0.0)
            for e in cutlass.range_constexpr(E):
                dot += rS[e, i] * rK[e]
            dots.append(dot)
        for i in cutlass.range_constexpr(R):
            dot = cute.arch.warp_reduction_sum(dots[i], threads_in_group=L)
            u = (sV[local0 + i * self.row_step, t] - g * dot) * beta
            for e in cutlass.range_constexpr(E):
                rS[e, i] = g * rS[e, i] + rK[e] * u


class ReplayCommitMma(_CommitRows, KLastMTPMma):
    """Built from a spec.CommitSpec and a (warps, 16-row blocks per warp) tile: each warp loads the
    window's k chunks, its rows' v and (lane t) token t's gates, then its state rows; the CTA's
    warps build the head's tables (no q: kmtp_mma's _tables and _dots with rQ None), each lane runs
    the recurrence of u for its row, and the rows are written after `accepted` tokens."""

    @staticmethod
    def _refuse_unsupported(spec):
        """Every CommitSpec: bf16 windows, an fp32 or bf16 checkpoint."""

    def _decay_beta(self, raw, window, warp, lane):
        """The window's decay exp(log g) and beta of token `lane` (raw: as they are stored)."""
        log_g, beta = raw
        return cute.math.exp(log_g), beta

    @common.kernel_params(CommitArgs._fields)
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.CommitArgs, in its order."""
        gmem = CommitArgs(*args)
        spec = self.spec
        T = spec.T
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, layer, b, hv, h = self._coords(gmem)
        g, c = lane // 4, lane % 4
        row0 = tile * self.rows_per_cta + warp * self.rows_per_warp  # first row of the warp
        frag_row = row0 + g  # this lane's operand rows: frag_row + 16 m + 8 hh
        my_row = lane % self.rows_per_warp  # the recurrence's row (lanes 16.. repeat 0..15 when MB = 1)
        writer = lane < self.rows_per_warp if const_expr(self.mb == 1) else True
        sGram, sVec, sAkk, sAkq, sW, sP = self._smem_tables(warp)

        slot, accepted, live = self._live(gmem, b)
        # The branch is uniform over the CTA (one batch row), so its barriers are too.
        if live:
            # The window first (the tables need only k and the gates), then the state. Tokens from
            # `accepted` on read the last accepted one again (_token): their weights are zero, and
            # the window past the accepted prefix is never read (it may hold anything).
            k_row = lambda t: gmem.replay_k[layer, slot, h, t, None]  # noqa: E731
            rK = self._token_chunks((k_row,), g, c, accepted)[0]
            rV = cute.make_rmem_tensor((T,), BFloat16)
            for t in cutlass.range_constexpr(T):
                rV[t] = gmem.replay_v[layer, slot, hv, self._token(t, accepted), row0 + my_row]
            tc = self._token(lane, accepted)
            raw = (gmem.replay_g[layer, slot, hv, tc], gmem.replay_beta[layer, slot, hv, tc])
            common.load_fence()
            mS = gmem.state[layer, slot, hv, None, None]
            rS = self._load_state(lambda r: mS[r, None], frag_row, c)
            common.load_fence()
            self.prefetch_later(gmem)
            if const_expr(self.early_k):
                rKu = self._update_k(k_row, g, c, accepted)
            self._tables(rK, None, raw, sGram, sVec, sAkk, sAkq, sW, warp, lane)
            self._dots(rS, rK, None, sP, g, c)
            cute.arch.sync_warp()  # sP written
            if const_expr(not self.early_k):
                rKu = self._update_k(k_row, g, c, accepted)  # L1 hits: the warp read these rows above
            # A repeat of the last accepted token (t >= accepted) has no weight (sW is 0 there), but
            # its u can overflow without the l2 norm (each repeat scales u by up to |1 - beta |k|^2|):
            # it is stored as 0, so that no 0 * inf reaches the update.
            u = []
            for t in cutlass.range_constexpr(T):
                u_t = self._u(t, u, sVec, sAkk, sP, rV, my_row)
                u.append(u_t if t == 0 else Float32(cutlass.select_(Int32(t) < accepted, u_t, Float32(0.0))))
            self._stash_u(u, sP, my_row, writer)
            if const_expr(spec.has_track):
                # The state after token `step` (step + 1 tokens), where that token is accepted.
                track_slot, step, track_live = self._track(gmem, b)
                tracked = track_live and step >= Int32(0) and step < accepted
                n_track = Int32(cutlass.select_(tracked, step + 1, 0))
                self._apply(n_track, rS, rKu, sVec, sW, sP, gmem.state[layer, track_slot, hv, None, None], frag_row,
                            g, c, tracked)
            self._apply(accepted, rS, rKu, sVec, sW, sP, mS, frag_row, g, c, True)
