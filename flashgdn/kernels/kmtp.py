"""K-last GDN kernel for T tokens per sequence (MTP / speculative-decode verify), state [.., HV, V, K].

Same CTA shape and register layout as klast.KLastDecode. The state rows stay in registers across
the T tokens (read once, written once, plus one write per token into the optional intermediate
buffer). Every global load is issued up front as in klast; then the normalised q/k, gates and v
of every token are staged once per CTA in shared memory behind one barrier, and the tokens run one
after another as S = c * rS, with the decay folded into the scalar c (one FMA per element and token
in the update); c is tested against a rescale bound every token, or, where the policy asks
for it (policy.BuildConfig.unchecked_loop), by the CTAs whose decays could reach the bound only,
the others running a copy of the loop without the test. The outputs of all tokens go through
shared memory and are written coalesced. A ReplaySSM verify (spec.replay_cache) stores its windows
from the staging, or, where the policy says so (BuildConfig.window_heads), from CTAs of their own
after the decode CTAs, which then run as the frozen MTP does.

With more rows per thread, each shared-memory read of q/k serves more rows: the per-token work,
not the bytes, bounds this kernel. (A closed form with every dot product against the initial state
and a per-row triangular solve, free of the serial chain, was measured slower on the CUDA cores: it
adds per-CTA coefficient tables and about a third more instructions. On the tensor cores it is
faster from T = 5 on for a bf16 state at large batch: kmtp_mma.KLastMTPMma; benchmarks/RESULTS.md.)
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, const_expr

from . import common
from ..spec import KernelArgs, vec_elems
from .klast import KLastDecode

# Smallest folded decay c kept as a scale; below it c is applied to the state itself.
RESCALE_MIN = 2.0 ** -64


class KLastMTP(KLastDecode):
    def __init__(self, spec, config):
        super().__init__(spec, config)
        num_warps, rows_per_thread = self.num_warps, self.rows_per_thread
        # A second copy of the token loop without the per-token rescale test, taken by the CTAs
        # whose decays cannot trigger it: without the branch, ptxas schedules across tokens.
        self.unchecked_loop = config.unchecked_loop
        threads = num_warps * 32
        # Staging work per thread, padded so there are no tail branches on the loads.
        self.tokens_per_warp = (spec.T + num_warps - 1) // num_warps
        self.v_per_thread = (spec.T * self.rows_per_cta + threads - 1) // threads
        self.gate_cols = 32 * ((spec.T + 31) // 32)  # one token per lane
        self.t_pad = self.tokens_per_warp * num_warps
        self.v_cols = (self.v_per_thread * threads + self.rows_per_cta - 1) // self.rows_per_cta
        # One reduce-scatter for the 2R dot products of a token (common.group_reduce_scatter)
        # when they fill the lane group, one sum per lane: 2R - 1 shuffles instead of
        # 2R log2(L). With fewer sums than lanes the extra butterfly levels lengthen the serial
        # token chain more than they save (RESULTS.md "Reduce-scatter").
        self.scatter = 2 * rows_per_thread == self.lanes_per_row
        # ReplaySSM windows by CTAs of their own (BuildConfig.window_heads): window_ctas per batch row.
        self.window_heads = config.window_heads
        self.window_ctas = spec.HV // config.window_heads if config.window_heads else 0
        if self.window_ctas and self.prefetch_ctas:
            raise ValueError("window CTAs and an L2 prefetch of a later CTA's tile do not go together")

    def _entry(self, tid, m: int):
        """Entry m of this thread in the flat (row, token) order the v staging and the output
        writes share: f = tid + m * threads is (row f % rows_per_cta, token f // rows_per_cta).
        Returns (f, f clamped to the last real entry, whether f may be past it)."""
        T, rpc, threads = self.spec.T, self.rows_per_cta, self.num_warps * 32
        f = tid + m * threads
        padded = (T * rpc) % threads != 0
        fc = Int32(cutlass.select_(f < T * rpc, f, T * rpc - 1)) if padded else f
        return f, fc, padded

    @cute.jit
    def _stage_loads(self, gmem: KernelArgs, b, h, hv, tile, warp, lane, start, count):
        """The CTA loads the v values of its rows for every token; warp w loads q, k and the gate
        inputs of tokens w, w + num_warps, ... Token indices past T (and, varlen, past the
        sequence: common.token_at) are clamped (no branch). Fenced in groups so that no load waits
        behind arithmetic on another."""
        spec = self.spec
        T, W, rpc = spec.T, self.num_warps, self.rows_per_cta
        values = []
        for m in cutlass.range_constexpr(self.v_per_thread):
            f, fc, _ = self._entry(warp * 32 + lane, m)
            bi, ti = common.token_at(gmem, b, fc // rpc, start, count)
            values.append((f, gmem.v[bi, ti, hv, tile * rpc + fc % rpc]))
        common.load_fence()
        tokens = []
        for j in cutlass.range_constexpr(self.tokens_per_warp):
            t = warp + j * W
            tc = t if const_expr(T % W == 0) else Int32(cutlass.select_(t < T, t, T - 1))
            bi, ti = common.token_at(gmem, b, tc, start, count)
            tokens.append((t, common.warp_slice(gmem.q[bi, ti, h, None], lane, spec.K),
                           common.warp_slice(gmem.k[bi, ti, h, None], lane, spec.K)))
        common.load_fence()
        # Gates: lane t loads token t's inputs (few loads, simple addresses, issued together).
        gates = []
        for j in cutlass.range_constexpr(self.gate_cols // 32):
            t = lane + 32 * j
            tc = Int32(cutlass.select_(t < T, t, T - 1))
            bi, ti = common.token_at(gmem, b, tc, start, count)
            gates.append((t, common.load_gates(gmem, bi, ti, hv)))
        return values, tokens, gates

    @cute.jit
    def _stage_store(self, values, tokens, gates, sQK, sGate, sV, warp, lane, window=None):
        """Into shared memory: v; q_hat (scale folded in), k_hat and k.q (sQK, sGate[2]); g and beta
        (sGate[0:2], one copy per warp, copy 0 is read). Padded work writes spare columns and
        every lane of a warp writes the same k.q: no branch. With `window` (a ReplaySSM verify: gmem,
        the row's read slot, tile, hv, h and whether the row runs), the raw inputs also go to the
        windows of that slot, each written once and only by a running row: v by the CTA that owns
        its rows, k (as bf16) by tile 0 of the first value head of its q/k head, the log decay and
        beta by warp 0 of tile 0; padded work writes nothing."""
        spec = self.spec
        n = spec.K // 32
        T, rpc = spec.T, self.rows_per_cta
        if const_expr(window is not None):
            gmem, slot, tile, hv, h, run = window
        for f, val in values:
            sV[f % rpc, f // rpc] = val.to(Float32)
            if const_expr(window is not None):
                if run and f < T * rpc:
                    gmem.replay_v[slot, hv, f // rpc, tile * rpc + f % rpc] = val.to(BFloat16)
        for t, rQ, rK in tokens:
            q = rQ.load().to(Float32)
            k = rK.load().to(Float32)
            q_factor, k_factor, kq = common.qk_factors(q, k, n, 32, spec.use_l2norm, spec.scale)
            for e in cutlass.range_constexpr(n):
                sQK[lane * n + e, 0, t] = q[e] * q_factor
                sQK[lane * n + e, 1, t] = k[e] * k_factor
            sGate[2, t, 0] = kq
            if const_expr(window is not None):
                if run and common.writes_window_k(spec, tile, hv) and t < T:
                    rRaw = cute.make_rmem_tensor((n,), BFloat16)
                    rRaw.store(rK.load().to(BFloat16))
                    cute.autovec_copy(rRaw, cute.local_tile(gmem.replay_k[slot, h, t, None], (n,), (lane,)))
        for t, raw in gates:
            if const_expr(window is None):
                g, beta = common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
            else:
                g, beta = common.window_gates(raw, spec.softplus_beta, spec.softplus_threshold, window, t,
                                              warp == 0 and t < T)
            sGate[0, t, warp] = g
            sGate[1, t, warp] = beta

    @common.kernel_args
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.KernelArgs, in its order."""
        gmem = KernelArgs(*args)
        if const_expr(self.window_ctas):
            # The window CTAs come after every decode CTA: at small batch they take the SMs the decode
            # leaves free, or share one with a decode CTA, instead of a second decode CTA sharing an
            # SM's issue slots (the token loop is issue-bound there).
            bidx, _, _ = cute.arch.block_idx()
            grid, _, _ = cute.arch.grid_dim()
            decode_ctas = self.spec.HV * self.num_tiles
            window = bidx - grid // (decode_ctas + self.window_ctas) * decode_ctas
            if window >= 0:
                self._store_windows(gmem, window // self.window_ctas, window % self.window_ctas * self.window_heads)
            else:
                self._decode(gmem)
        else:
            self._decode(gmem)

    @cute.jit
    def _store_windows(self, gmem: KernelArgs, b, hv0):
        """The window CTA of batch row b and value heads hv0 .. hv0 + window_heads - 1
        (policy.BuildConfig.window_heads): the ReplaySSM windows of a running row as the decode CTAs
        would store them (_stage_store): v and the log decay and beta of every token of each value
        head, and k from each value head that is the first of its q/k head. Every load is issued
        before the first store."""
        spec = self.spec
        T, G, threads = spec.T, self.window_heads, self.num_warps * 32
        ratio = spec.HV // spec.H
        n = vec_elems(spec.io_dtype)  # q/k/v elements of a 16-byte vector (policy._window_heads counts in them)
        tid, _, _ = cute.arch.thread_idx()
        slot, _, _, status = common.row_slots(gmem, b, T, spec.update_state)
        start, count, status = common.sequence_span(gmem, b, T, status)
        if status == common.RUN:
            # (source row, window row, its 16-byte vector, whether entry i is in the windows): entry
            # i = (head of the group, token, vector) of v, and of k where the value head is the first
            # of its q/k head.
            copies = []
            for src, dst, D, is_k in ((gmem.v, gmem.replay_v, spec.V, False), (gmem.k, gmem.replay_k, spec.K, True)):
                per_row = D // n
                for m in cutlass.range_constexpr((G * T * per_row + threads - 1) // threads):
                    i = tid + m * threads
                    hv = hv0 + cutlass.min(i // (T * per_row), G - 1)
                    t = i // per_row % T
                    bi, ti = common.token_at(gmem, b, t, start, count)
                    head = hv // ratio if is_k else hv
                    live = i < G * T * per_row
                    if const_expr(is_k):
                        live = live and common.writes_window_k(spec, 0, hv)
                    copies.append((src[bi, ti, head, None], dst[slot, head, t, None], i % per_row, live))
            rVecs = [cute.make_rmem_tensor((n,), src_row.element_type) for src_row, *_ in copies]
            for (src_row, _, j, live), rVec in zip(copies, rVecs):
                if live:
                    cute.autovec_copy(cute.local_tile(src_row, (n,), (j,)), rVec)
            for m in cutlass.range_constexpr((G * T + threads - 1) // threads):
                e = tid + m * threads
                if e < G * T:
                    hv, t = hv0 + e // T, e % T
                    bi, ti = common.token_at(gmem, b, t, start, count)
                    log_g, beta = common.gdn_log_gates(common.load_gates(gmem, bi, ti, hv), spec.softplus_beta,
                                                       spec.softplus_threshold)
                    gmem.replay_g[slot, hv, t] = log_g
                    gmem.replay_beta[slot, hv, t] = beta
            for (_, dst_row, j, live), rVec in zip(copies, rVecs):
                if live:
                    rRaw = cute.make_rmem_tensor((n,), BFloat16)
                    rRaw.store(rVec.load().to(BFloat16))
                    cute.autovec_copy(rRaw, cute.local_tile(dst_row, (n,), (j,)))

    @cute.jit
    def _decode(self, gmem: KernelArgs):
        """A decode CTA: its tile of one (batch row, value head)'s state through the T tokens."""
        spec = self.spec
        T = spec.T
        lane, warp, tile, b, hv, h, lane_in_row, row0 = self._thread_coords()
        local0 = row0 - tile * self.rows_per_cta  # first row of this thread within the CTA tile

        # Loads: raw registers only, no arithmetic that waits for a load.
        read_slot, write_slot, accepted, status = common.row_slots(gmem, b, T, spec.update_state)
        start, count, status = common.sequence_span(gmem, b, T, status)
        tok_slots = None
        if const_expr(spec.has_token_slots):
            tok_slots, status = common.token_slots(gmem.token_state_indices, b, gmem.state.shape[0], T, status,
                                                   spec.vllm_slots, None if start is None else count)
        inter, inter_on, status = common.inter_row(gmem, b, status)
        parents = None
        if const_expr(spec.tree_parents is not None):
            parents, status = common.tree_parents(gmem.parent_tokens, b, T, inter_on, status)
        run = status == common.RUN
        # The state first even with a pool (unlike T = 1): placed after the others, its loads end
        # up below the staging arithmetic in the SASS, waiting for q/k, fences or not.
        rRaw = self._load_rows(gmem.state[read_slot, hv, None, None], row0, lane_in_row)
        common.load_fence()
        values, tokens, gates = self._stage_loads(gmem, b, h, hv, tile, warp, lane, start, count)
        self.prefetch_later(gmem, with_inputs=True)

        # Per-token q/k norms and gates once per CTA (per-lane recomputation would cost more ALU
        # work than the recurrence), read back from shared memory by every row.
        smem = cutlass.memory.SmemAllocator()
        sQK = smem.allocate_tensor(Float32, cute.make_layout((spec.K, 2, self.t_pad)), byte_alignment=16)
        # (g, beta, k.q, unused) of a token are one 16-byte shared load.
        sGate = smem.allocate_tensor(
            Float32, cute.make_layout((4, max(self.t_pad, self.gate_cols), self.num_warps)), byte_alignment=16
        )
        sV = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_cta, self.v_cols)), byte_alignment=16)
        sO = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_cta, self.v_cols)), byte_alignment=16)
        rS = self._f32(rRaw)
        window = (gmem, read_slot, tile, hv, h, run) if const_expr(spec.replay_cache and not self.window_ctas) else None
        self._stage_store(values, tokens, gates, sQK, sGate, sV, warp, lane, window)
        cute.arch.barrier()

        # The recurrence runs unconditionally (on slot 0 for a row that does not run) and only the
        # stores depend on the row status: a branch around the compute would let the compiler
        # sink loads into it.
        # The final state: stored by a running row whose write index is not negative (token slots
        # come without one: there the write slot is the read slot)
        commit = common.commits_state(status, write_slot)
        if const_expr(spec.update_state and spec.commits_accepted):
            if commit and accepted == 0:
                self._store_rows(rS, gmem.state[write_slot, hv, None, None], row0, lane_in_row)
        loop_args = (rS, sQK, sGate, sV, sO, gmem.state, gmem.intermediate_states, inter, hv, row0, lane,
                     lane_in_row, local0, run and inter_on, commit, accepted, write_slot, tok_slots, parents)
        if const_expr(self.unchecked_loop):
            # Every decay is <= 1, so if the product of all T stays above the bound, so does every
            # partial product (a NaN fails the test and takes the checked loop).
            total = Float32(1.0)
            for t in cutlass.range_constexpr(T):
                total = total * sGate[0, t, 0]
            c = Float32(1.0)  # assigned in both branches below
            if total >= Float32(RESCALE_MIN):
                c = self._token_loop(False, *loop_args)
            else:
                c = self._token_loop(True, *loop_args)
        else:
            c = self._token_loop(True, *loop_args)
        if const_expr(spec.update_state and not spec.has_accepted and not spec.has_token_slots):
            if commit:
                self._store_rows(rS, gmem.state[write_slot, hv, None, None], row0, lane_in_row, c)
        cute.arch.barrier()
        self._write_outputs(sO, gmem, b, hv, tile, warp * 32 + lane, status, start, count)

    @cute.jit
    def _token_loop(self, checked: cutlass.Constexpr[bool], rS, sQK, sGate, sV, sO, mS, mInter, inter, hv, row0,
                    lane, lane_in_row, local0, inter_run, commit, accepted, write_slot, tok_slots, parents):
        """The T tokens, one after another; returns the folded decay c (S = c rS). `checked`:
        test c against RESCALE_MIN every token (a branch); without it the caller has made sure
        no partial product of the decays falls below it. The state after each token goes to
        intermediate buffer row `inter` where `inter_run` (common.inter_row); with
        `parents` (an EAGLE tree: common.tree_parents) token t >= 1 of such a row starts from the
        state stored there for its parent token, read back by the thread that stored it. `commit`:
        the row stores its states in the pool (common.commits_state)."""
        spec = self.spec
        R = self.rows_per_thread
        T = spec.T
        E = self.vec * self.chunks
        # S = c * rS: the decay of each token goes into the scalar c, so the update is one FMA per
        # element (rS += k (u / c)) instead of a multiply and an FMA.
        L = self.lanes_per_row
        if const_expr(self.scatter):
            span = L // (2 * R)  # lanes per reduce-scatter sum
            part = lane_in_row // span
            group_base = lane - lane_in_row
            q_writer = part >= R and lane_in_row % span == 0
        c = Float32(1.0)
        for t in cutlass.range_constexpr(T):
            if const_expr(parents is not None and t > 0):
                if inter_run:
                    rParent = self._load_rows(mInter[inter, parents[t - 1], hv, None, None], row0, lane_in_row)
                    for i in cutlass.range_constexpr(R):
                        for e in cutlass.range_constexpr(E):
                            rS[e, i] = rParent[e, i].to(Float32)
                    c = Float32(1.0)
            rQ = self._f32(self._load_vec(sQK[None, 0, t], lane_in_row))
            rK = self._f32(self._load_vec(sQK[None, 1, t], lane_in_row))
            rGate = cute.make_rmem_tensor((4,), Float32)
            cute.autovec_copy(sGate[None, t, 0], rGate)
            g, beta, kq = rGate[0], rGate[1], rGate[2]
            c = c * g
            if const_expr(checked):
                if c < Float32(RESCALE_MIN):
                    # 1 / c would overflow (or g is 0): apply c to the registers, restart at 1.
                    for i in cutlass.range_constexpr(R):
                        for e in cutlass.range_constexpr(E):
                            rS[e, i] = rS[e, i] * c
                    c = Float32(1.0)
            inv_c = cute.arch.rcp_approx(c)
            if const_expr(self.scatter):
                # The 2R dot products of the thread's rows in one reduce-scatter: lane group
                # part j = lane_in_row // span ends with sum j (S k of rows 0..R-1, then S q).
                dots = []
                for i in cutlass.range_constexpr(R):
                    dots.append(self._row_partials(rS, rK, rQ, i))
                held = common.group_reduce_scatter([d[0] for d in dots] + [d[1] for d in dots], L, lane_in_row)
            u_mine = Float32(0.0)
            for i in cutlass.range_constexpr(R):
                if const_expr(self.scatter):
                    dot_k = cute.arch.shuffle_sync(held, group_base + i * span)
                else:
                    dot_k, dot_q = self._row_dots(rS, rK, rQ, i)
                # S' = g S + k u^T  =>  o = S'^T q = g (S^T q) + u (k . q), with S = c rS
                u = (sV[local0 + i * self.row_step, t] - c * dot_k) * beta
                w = u * inv_c
                for e in cutlass.range_constexpr(E):
                    rS[e, i] = rS[e, i] + rK[e] * w
                if const_expr(self.scatter):
                    u_mine = Float32(cutlass.select_(part == R + i, u, u_mine))
                else:
                    # Every lane of the row group writes the same o; the CTA writes all outputs
                    # coalesced after the loop.
                    sO[local0 + i * self.row_step, t] = c * dot_q + u * kq
            if const_expr(self.scatter):
                # The first lane holding S q of a row writes its output.
                if q_writer:
                    sO[local0 + (part - R) * self.row_step, t] = c * held + u_mine * kq
            if const_expr(spec.has_intermediate):
                if inter_run:
                    self._store_rows(rS, mInter[inter, t, hv, None, None], row0, lane_in_row, c)
            if const_expr(spec.update_state and spec.commits_accepted):
                if commit and accepted == t + 1:
                    self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row, c)
            if const_expr(spec.has_token_slots):
                if commit and tok_slots[t] >= 0:
                    self._store_rows(rS, mS[tok_slots[t], hv, None, None], row0, lane_in_row, c)
        return c

    @cute.jit
    def _write_outputs(self, sO, gmem, b, hv, tile, tid, status, start, count):
        """The outputs of the CTA's rows for every token of the sequence, from shared memory,
        coalesced (the (row, token) mapping of the v staging); a row that does not run writes
        common.skipped_output where common.writes_output says so."""
        T, rpc = self.spec.T, self.rows_per_cta
        mO = gmem.output
        run = status == common.RUN
        fill = common.skipped_output(status)
        write = common.writes_output(self.spec, status)
        for m in cutlass.range_constexpr(self.v_per_thread):
            f, _, padded = self._entry(tid, m)
            out = Float32(cutlass.select_(run, sO[f % rpc, f // rpc], fill)).to(mO.element_type)
            in_range = (f < T * rpc) if const_expr(padded) else True  # a static True: no branch
            if in_range:
                if write and common.token_stored(f // rpc, count):
                    bi, ti = common.token_at(gmem, b, f // rpc, start, count)
                    mO[bi, ti, hv, tile * rpc + f % rpc] = out
