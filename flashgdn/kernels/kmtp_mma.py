"""K-last MTP kernel on the tensor cores, for a bf16 or fp32 state and bf16 q/k/v: state [.., HV, V, K].

The T tokens are applied in closed form. With D(t, j) the product of the decays of tokens j+1..t
and G(t) = D(t, -1), the state after token t is

    S_t = G(t) S_0 + sum_{j <= t} D(t, j) k_j u_j^T,

so every dot product a row needs is one against the initial state (S_0 k_t and S_0 q_t: a small
matrix product per 16 rows; bf16 S_0 and the raw bf16 q/k are exact tensor-core operands), u_t and
o_t follow from a per-row triangular recurrence on scalars, and the new state is one more matrix
product: G S_0 plus the rank-T update, with W = D u |k|^-1 in two bf16 parts (hi + lo, 16 bits of
mantissa). Decays only multiply (no division, no rescale test). Per state element this is a load,
a conversion, a multiply and a store, where kmtp.KLastMTP does 3 FMAs per token; that kernel is
bound by its serial per-token arithmetic at T = 8 with a bf16 state, this one much less.

An fp32 state stays fp32 in registers and in memory: its dot products take it as two bf16
operands (hi + lo: 16 bits of mantissa, two tensor-core products each), and the update adds the
rank-T term to G S_0 after the MMAs, an fp32 add rounded to nearest (the tensor cores' fp32
accumulation does not round so). So the products carry about 2^-17 relative error where the token
loop's carry 2^-24; the state itself is never rounded below fp32.

A CTA serves one (sequence, value head); each of its warps owns 16-row blocks of it. A warp loads
q/k and the gates, then its rows in the operand layout of mma.m16n8k16; while the rows are in
flight, the CTA's warps share the work of the head's tables (the Gram matrix of q/k and the decay
tables, in shared memory, behind two CTA barriers). Each warp then runs the recurrence one row per
lane and writes its rows back. A state per token (intermediates, token slots) is one more
matrix product each (the tables hold the weights of every prefix). A ReplaySSM verify (spec.replay_cache: a frozen state) stores the raw inputs into the
windows of the row's read slot from the registers that hold them: each lane's v, the k chunks of
the dot products and the gates of the tables (kmtp.KLastMTP's window contract).

K permutation. mma.m16n8k16 gives lane (g = lane / 4, c = lane % 4) the reduction slots 2c, 2c+1,
2c+8, 2c+9 of a k-step. Block p of 32 head-dim columns is two k-steps s = 0, 1; slot 2c+e+8h of
step s is column 32p + 8c + 4s + 2h + e, so lane c reads its columns 32p + 8c .. +8 as one 16-byte
chunk, for S rows and for q/k alike. In the update the head dim is the N side: n8 block 4p + m'
column n is 32p + 4n + m', so lane c's accumulators are elements m' and m' + 4 of its chunk p.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, const_expr

from ..spec import KernelArgs
from . import common
from .decode_kernel import DecodeKernel


class KLastMTPMma(DecodeKernel):
    def __init__(self, spec, config):
        self._refuse_unsupported(spec)
        super().__init__(spec, config)
        self.split_state = spec.state_dtype == "float32"  # the state's operands as bf16 hi + lo
        self.state_type = Float32 if self.split_state else BFloat16
        num_warps, blocks_per_warp = config.tile
        if blocks_per_warp not in (1, 2):  # a lane runs the recurrence of one row: 32 rows per warp at most
            raise ValueError(f"tile {tuple(config.tile)}: 16-row blocks per warp must be 1 or 2, "
                             f"got {blocks_per_warp}")
        self.num_warps = num_warps
        self.mb = blocks_per_warp  # 16-row blocks per warp
        self.rows_per_warp = 16 * blocks_per_warp
        self.rows_per_cta = self.rows_per_warp * num_warps
        if spec.V % self.rows_per_cta:
            raise ValueError(f"V={spec.V} is not a multiple of the CTA tile ({self.rows_per_cta} rows)")
        self.num_tiles = spec.V // self.rows_per_cta
        self.tile_rows = self.rows_per_cta  # whole rows of K
        self.nb = (spec.T + 7) // 8  # token blocks of 8 (the N side of the dot products)
        self.tp = 8 * self.nb  # tokens, padded
        self.kp = spec.K // 32  # 32-column blocks of the head dim
        # Load the update's k with the state rather than after the dot products: as L1 hits there
        # they often miss, and their wait falls just before the update. 2-5 % faster at T = 7-16
        # for 16-32 more registers (RESULTS.md "Tensor cores for MTP"). At K = 256 those registers
        # would cost a CTA per SM (T <= 8) or spill (T >= 12); an fp32 state holds twice the
        # registers, so there the same holds from K = 128.
        self.early_k = spec.K <= (64 if self.split_state else 128)

    @staticmethod
    def _refuse_unsupported(spec):
        if (spec.state_dtype not in ("bfloat16", "float32") or spec.io_dtype != "bfloat16" or spec.vllm_slots
                or spec.varlen is not None or spec.tree_parents is not None):
            raise ValueError("the tensor-core MTP kernel takes a bf16 or fp32 state and bf16 q/k/v, not vLLM's "
                             "slot rule, varlen or an EAGLE tree")

    # ---- operands -------------------------------------------------------------------------------

    def _gemm(self, acc, a, b):
        """acc += a b on the tensor cores (one mma.m16n8k16, bf16 in, fp32 accumulate)."""
        atom = cute.make_mma_atom(cute.nvgpu.warp.MmaF16BF16Op(BFloat16, Float32, (16, 8, 16)))
        cute.gemm(atom, acc, a, b, acc)

    @cute.jit
    def _frag_a(self, rTop, rBot, s: int, dtype=BFloat16):
        """A operand of k-step s from two 8-element chunks (rows g and g + 8 of the 16-row block),
        in `dtype` (the operand's bf16, or fp32 to split)."""
        rA = cute.make_rmem_tensor((8, 1), dtype)
        for e in cutlass.range_constexpr(2):
            rA[e, 0] = rTop[4 * s + e]
            rA[2 + e, 0] = rBot[4 * s + e]
            rA[4 + e, 0] = rTop[4 * s + 2 + e]
            rA[6 + e, 0] = rBot[4 * s + 2 + e]
        return rA

    @cute.jit
    def _state_frags(self, rTop, rBot, s: int):
        """The A operands of k-step s of the state rows: one (_frag_a) for a bf16 state; for an fp32
        state its bf16 hi and lo parts (x = hi + lo to 16 bits of mantissa), whose products add up."""
        if const_expr(not self.split_state):
            return [self._frag_a(rTop, rBot, s)]
        rA = self._frag_a(rTop, rBot, s, Float32)
        hi = cute.make_rmem_tensor((8, 1), BFloat16)
        lo = cute.make_rmem_tensor((8, 1), BFloat16)
        for i in cutlass.range_constexpr(8):
            hi[i, 0] = rA[i, 0].to(BFloat16)
            lo[i, 0] = (rA[i, 0] - hi[i, 0].to(Float32)).to(BFloat16)
        return [hi, lo]

    @cute.jit
    def _frag_b(self, rChunk, s: int):
        """B operand of k-step s from one 16-byte chunk of the vector of token n = g."""
        rB = cute.make_rmem_tensor((4, 1), BFloat16)
        for e in cutlass.range_constexpr(4):
            rB[e, 0] = rChunk[4 * s + e]
        return rB

    def _chunk(self, mVec: cute.Tensor, p: int, c):
        """Lane c's 16-byte chunk of block p of a length-K row."""
        return cute.local_tile(mVec, (8,), (4 * p + c,))

    def _token(self, t, count=None):
        """Token index clamped to T - 1 (padding tokens read real rows; their weights are 0), or to
        count - 1 for a runtime token count in [1, T] (the tokens from `count` on are never read)."""
        T = self.spec.T
        if count is not None:
            return Int32(cutlass.select_(t < count, t, count - 1))
        return t if const_expr(self.tp == T) else Int32(cutlass.select_(t < T, t, T - 1))

    # ---- loads ----------------------------------------------------------------------------------

    def _token_chunks(self, rows, g, c, count=None):
        """The dot products' B operands: lane (g, c)'s chunk p (_chunk) of token g + 8 na of each
        kind of vector, rows(t) the length-K row of token t of a kind (k, q); an (8, KP, NB) bf16
        tensor per kind. Token indices are clamped (_token, `count`)."""
        regs = [cute.make_rmem_tensor((8, self.kp, self.nb), BFloat16) for _ in rows]
        for na in range(self.nb):
            tc = self._token(g + 8 * na, count)
            for p in range(self.kp):
                for row, rX in zip(rows, regs):
                    cute.autovec_copy(self._chunk(row(tc), p, c), rX[None, p, na])
        return regs

    def _load_state(self, row, frag_row, c):
        """This lane's operand rows of the state, row(r) the length-K row r: frag_row + 16 m + 8 hh."""
        rS = cute.make_rmem_tensor((8, self.kp, 2, self.mb), self.state_type)
        for m in range(self.mb):
            for hh in range(2):
                for p in range(self.kp):
                    cute.autovec_copy(self._chunk(row(frag_row + 16 * m + 8 * hh), p, c), rS[None, p, hh, m])
        return rS

    def _smem_tables(self, warp):
        """The head's tables (_tables) and this warp's plane of sP, in shared memory."""
        TP, W = self.tp, self.num_warps
        smem = cutlass.memory.SmemAllocator()
        sGram = smem.allocate_tensor(Float32, cute.make_layout((2 * TP, 2 * TP)), byte_alignment=16)
        sVec = smem.allocate_tensor(Float32, cute.make_layout((5, TP + 1)), byte_alignment=16)
        sAkk = smem.allocate_tensor(Float32, cute.make_layout((TP, TP)), byte_alignment=16)
        sAkq = smem.allocate_tensor(Float32, cute.make_layout((TP, TP)), byte_alignment=16)
        sW = smem.allocate_tensor(Float32, cute.make_layout((TP + 1, TP)), byte_alignment=16)
        # S_0 k_t, S_0 q_t (then u_t) by (row of the warp, token): padded rows, no bank conflicts.
        plane = self.rows_per_warp * (TP + 1)
        sP = smem.allocate_tensor(
            Float32, cute.make_layout((self.rows_per_warp, TP, 2, W), stride=(TP + 1, 1, plane, 2 * plane)),
            byte_alignment=16,
        )[None, None, None, warp]
        return sGram, sVec, sAkk, sAkq, sW, sP

    # ---- the head's tables ----------------------------------------------------------------------

    def _inv_norm(self, sq):
        """The l2norm factor 1 / |x| from |x|^2, or 1 without l2norm."""
        return common.inv_l2norm(sq) if const_expr(self.spec.use_l2norm) else Float32(1.0)

    def _sync_tables(self):
        """Make the table writes visible to every warp that reads them: the CTA's warps share
        one set of tables (they all serve one head), a lone warp only needs a warp sync."""
        if const_expr(self.num_warps == 1):
            cute.arch.sync_warp()
        else:
            cute.arch.barrier()

    @cute.jit
    def _gram_tile(self, rK, rQ, na: int, nc: int, sGram, g, c):
        """Tile (na, nc) of the raw Gram matrix: rows [k; q] of token block na, columns [k | q]
        of block nc (the squared norms on the diagonals)."""
        NB, TP = self.nb, self.tp
        acc = cute.make_rmem_tensor((4, 1, 1), Float32)
        acc.fill(0.0)
        rCol = rK if const_expr(nc < NB) else rQ
        for p in cutlass.range_constexpr(self.kp):
            for s in cutlass.range_constexpr(2):
                self._gemm(acc, self._frag_a(rK[None, p, na], rQ[None, p, na], s),
                           self._frag_b(rCol[None, p, nc % NB], s))
        col = (nc // NB) * TP + 8 * (nc % NB) + 2 * c
        for e in cutlass.range_constexpr(2):
            sGram[8 * na + g, col + e] = acc[e, 0, 0]
            sGram[TP + 8 * na + g, col + e] = acc[2 + e, 0, 0]

    @cute.jit
    def _decay_beta(self, raw, window, warp, lane):
        """Token `lane`'s decay and beta from its gate inputs (common.gdn_gates); a ReplaySSM verify
        also stores them into its windows (common.window_gates)."""
        spec = self.spec
        if const_expr(window is None):
            return common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
        return common.window_gates(raw, spec.softplus_beta, spec.softplus_threshold, window, lane,
                                   warp == 0 and lane < spec.T)

    @cute.jit
    def _tables(self, rK, rQ, raw, sGram, sVec, sAkk, sAkq, sW, warp, lane, window=None):
        """The CTA's shared-memory tables of the head, each entry computed by one warp. sGram: the
        raw Gram matrix of [k; q] (k_i rows and columns first, then q_i). sVec rows: 0 G(t)
        |k_t|^-1, 1 G(t) |q_t|^-1 scale, 2 beta_t, 3 G(n - 1) (G(-1) = 1), 4 g_t. sAkk(t, j) =
        D(t, j) k^_j . k^_t (j < t), sAkq(t, j) = D(t, j) k^_j . q^_t (j <= t), sW(n, j) =
        D(n - 1, j) |k_j|^-1 (j < n): the weight of u_j in the state after n tokens. With `window`
        (a ReplaySSM verify), lane t < T of warp 0 also stores token t's log decay and beta
        (common.window_gates). Without q (rQ None: a replay, no outputs) the q parts are left out:
        sAkq, sVec row 1 and the Gram's q columns (its q rows hold k . k again)."""
        spec = self.spec
        TP, NB, W = self.tp, self.nb, self.num_warps
        g, c = lane // 4, lane % 4
        with_q = rQ is not None
        rLow = rQ  # the lower 8 rows of the Gram tiles' A operand
        if const_expr(not with_q):
            rLow = rK
        cols = 2 * NB if with_q else NB  # column blocks of the Gram: [k | q], or k alone
        # Gram of the raw vectors on the tensor cores, tile i by warp i % W.
        for na in cutlass.range_constexpr(NB):
            for nc in cutlass.range_constexpr(cols):
                if const_expr(W == 1):
                    self._gram_tile(rK, rLow, na, nc, sGram, g, c)
                elif warp == (na * cols + nc) % W:
                    self._gram_tile(rK, rLow, na, nc, sGram, g, c)
        decay, beta = self._decay_beta(raw, window, warp, lane)
        if lane < TP and warp == 0:
            sVec[2, lane] = beta
            sVec[4, lane] = decay
        self._sync_tables()
        rG = cute.make_rmem_tensor((TP,), Float32)
        for i in cutlass.range_constexpr(TP):
            rG[i] = sVec[4, i]
        # Entry (n, j), n = 0..TP tokens applied, per thread; t = n - 1 for the per-token tables.
        for r in cutlass.range_constexpr((TP * (TP + 1) + 32 * W - 1) // (32 * W)):
            part = r if const_expr(W == 1) else warp + W * r  # this warp's 32 entries
            ent = lane + 32 * part
            n = lane // TP + (32 // TP) * part
            j = lane % TP  # TP divides 32
            t = n - 1
            d = Float32(1.0)  # D(t, j)
            gt = Float32(1.0)  # G(t)
            for i in cutlass.range_constexpr(TP):
                d = d * Float32(cutlass.select_(i > j and i <= t, rG[i], Float32(1.0)))
                gt = gt * Float32(cutlass.select_(i <= t, rG[i], Float32(1.0)))
            if ent < TP * (TP + 1):
                kf_j = self._inv_norm(sGram[j, j])
                sW[n, j] = Float32(cutlass.select_(j < n, d * kf_j, Float32(0.0)))
                if j == 0:
                    sVec[3, n] = gt
                if n > 0:
                    kf_t = self._inv_norm(sGram[t, t])
                    qf_t = Float32(0.0)
                    if const_expr(with_q):
                        qf_t = self._inv_norm(sGram[TP + t, TP + t]) * Float32(spec.scale)
                    sAkk[t, j] = Float32(cutlass.select_(j < t, d * kf_j * kf_t * sGram[t, j], Float32(0.0)))
                    if const_expr(with_q):
                        sAkq[t, j] = Float32(cutlass.select_(j <= t, d * kf_j * qf_t * sGram[TP + t, j], Float32(0.0)))
                    if j == 0:
                        sVec[0, t] = gt * kf_t
                        if const_expr(with_q):
                            sVec[1, t] = gt * qf_t
        self._sync_tables()

    @cute.jit
    def _dots(self, rS, rK, rQ, sP, g, c):
        """S_0 k_t and S_0 q_t (none without q: rQ None) of this warp's rows, into sP: C of block
        (m, na) holds rows 16 m + g (+ 8) and tokens 8 na + 2c (+ 1)."""
        NB, KP, MB = self.nb, self.kp, self.mb
        vecs = [rK] if const_expr(rQ is None) else [rK, rQ]
        for m in cutlass.range_constexpr(MB):
            for na in cutlass.range_constexpr(NB):
                accs = [cute.make_rmem_tensor((4, 1, 1), Float32) for _ in vecs]
                for acc in accs:
                    acc.fill(0.0)
                for p in cutlass.range_constexpr(KP):
                    for s in cutlass.range_constexpr(2):
                        rBs = [self._frag_b(rX[None, p, na], s) for rX in vecs]
                        for rA in self._state_frags(rS[None, p, 0, m], rS[None, p, 1, m], s):
                            for acc, rB in zip(accs, rBs):
                                self._gemm(acc, rA, rB)
                for hh in cutlass.range_constexpr(2):
                    for e in cutlass.range_constexpr(2):
                        for i, acc in enumerate(accs):
                            sP[16 * m + 8 * hh + g, 8 * na + 2 * c + e, i] = acc[2 * hh + e, 0, 0]

    def _update_k(self, k_row, g, c, count=None):
        """k for the update's B operand, k_row(t) the row of token t: tokens 2c + e + 8 half,
        columns 32 p + 4 g .. + 4 (token indices clamped: _token, `count`)."""
        KP, NB = self.kp, self.nb
        rKu = cute.make_rmem_tensor((4, KP, 2, NB), BFloat16)
        for half in range(NB):
            for e in range(2):
                tc = self._token(2 * c + e + 8 * half, count)
                for p in range(KP):
                    cute.autovec_copy(cute.local_tile(k_row(tc), (4,), (8 * p + g,)), rKu[None, p, e, half])
        return rKu

    # ---- ReplaySSM windows (spec.replay_cache) --------------------------------------------------

    @cute.jit
    def _window_k(self, window, rK, warp, g, c):
        """The raw k of tokens < T into the window of the row's read slot, by warp 0 of the CTA
        that stores the head's k (common.writes_window_k), from the dot products' B operands:
        lane (g, c) holds columns 32 p + 8 c .. + 8 of token g + 8 na, one 16-byte store each."""
        gmem, slot, tile, hv, h, run = window
        if run and warp == 0 and common.writes_window_k(self.spec, tile, hv):
            for na in cutlass.range_constexpr(self.nb):
                t = g + 8 * na
                if t < self.spec.T:
                    for p in cutlass.range_constexpr(self.kp):
                        cute.autovec_copy(rK[None, p, na], self._chunk(gmem.replay_k[slot, h, t, None], p, c))

    @cute.jit
    def _window_v(self, window, rV, row, writer):
        """This lane's v of every token (row `row`; only the lanes that own a row) into the window
        of the row's read slot."""
        gmem, slot, _, hv, _, run = window
        if run and writer:
            for t in cutlass.range_constexpr(self.spec.T):
                gmem.replay_v[slot, hv, t, row] = rV[t]

    # ---- the kernel -----------------------------------------------------------------------------

    @common.kernel_args
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.KernelArgs, in its order."""
        gmem = KernelArgs(*args)
        spec = self.spec
        T, MB = spec.T, self.mb
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, b, hv, h = self.cta_coords()
        g, c = lane // 4, lane % 4
        row0 = tile * self.rows_per_cta + warp * self.rows_per_warp  # first row of the warp
        frag_row = row0 + g  # this lane's operand rows: frag_row + 16 m + 8 hh

        # Loads, all up front (common.load_fence): q/k chunks, v and the gate inputs first (the
        # tables need only q/k and the gates, so they are built while the state is in flight),
        # then the state, whose address waits for the pool index.
        read_slot, write_slot, accepted, status = common.row_slots(gmem, b, T, spec.update_state)
        tok_slots = None
        if const_expr(spec.has_token_slots):
            tok_slots, status = common.token_slots(gmem.token_state_indices, b, gmem.state.shape[0], T, status)
        inter, inter_on, status = common.inter_row(gmem, b, status)
        run = status == common.RUN
        k_row = lambda t: gmem.k[b, t, h, None]  # noqa: E731
        rK, rQ = self._token_chunks((k_row, lambda t: gmem.q[b, t, h, None]), g, c)
        # The recurrence runs one row per lane (lanes 16.. repeat rows 0..15 when MB = 1).
        my_row = lane % self.rows_per_warp
        rV = cute.make_rmem_tensor((T,), BFloat16)
        for t in cutlass.range_constexpr(T):
            rV[t] = gmem.v[b, t, hv, row0 + my_row]
        raw = common.load_gates(gmem, b, Int32(cutlass.select_(lane < T, lane, T - 1)), hv)
        common.load_fence()
        rS = self._load_state(lambda r: gmem.state[read_slot, hv, r, None], frag_row, c)
        common.load_fence()
        self.prefetch_later(gmem, with_inputs=True)

        sGram, sVec, sAkk, sAkq, sW, sP = self._smem_tables(warp)
        if const_expr(self.early_k):
            rKu = self._update_k(k_row, g, c)
        # A ReplaySSM verify stores the raw inputs from these registers: the gates in the tables, k
        # after its last use, v after the recurrence's.
        window = (gmem, read_slot, tile, hv, h, run) if const_expr(spec.replay_cache) else None
        self._tables(rK, rQ, raw, sGram, sVec, sAkk, sAkq, sW, warp, lane, window)
        self._dots(rS, rK, rQ, sP, g, c)
        if const_expr(window is not None):
            self._window_k(window, rK, warp, g, c)
        cute.arch.sync_warp()  # sP written
        if const_expr(not self.early_k):
            rKu = self._update_k(k_row, g, c)  # L1 hits: the warp read these rows above

        # The triangular recurrence of row my_row; its u_t replace S_0 k_t in sP.
        fill = common.skipped_output(status)
        writer = lane < self.rows_per_warp if const_expr(MB == 1) else True
        out_writer = writer and common.writes_output(spec, status)
        u = []
        for t in cutlass.range_constexpr(T):
            u.append(self._u(t, u, sVec, sAkk, sP, rV, my_row))
            o = sVec[1, t] * sP[my_row, t, 1]
            for j in cutlass.range_constexpr(t + 1):
                o += sAkq[t, j] * u[j]
            if out_writer:
                gmem.output[b, t, hv, row0 + my_row] = Float32(cutlass.select_(run, o, fill)).to(
                    gmem.output.element_type)
        if const_expr(window is not None):
            self._window_v(window, rV, row0 + my_row, writer)
        self._stash_u(u, sP, my_row, writer)

        # The state after each token n (intermediates, token slots: kmtp's stores, each a matrix
        # product here), then the committed one.
        for n in cutlass.range_constexpr(1, T + 1 if spec.writes_states else 1):
            if const_expr(spec.has_intermediate):
                self._apply(n, rS, rKu, sVec, sW, sP, gmem.intermediate_states[inter, n - 1, hv, None, None],
                            frag_row, g, c, run and inter_on)
            if const_expr(spec.has_token_slots):
                slot = tok_slots[n - 1]
                self._apply(n, rS, rKu, sVec, sW, sP, gmem.state[slot, hv, None, None], frag_row, g, c,
                            run and slot >= 0)
        if const_expr(spec.update_state and spec.has_accepted):
            # The count indexes the tables: out of [0, T] (an invalid row, not stored) it reads 0.
            n_acc = Int32(cutlass.select_(run, accepted, 0))
            self._apply(n_acc, rS, rKu, sVec, sW, sP, gmem.state[write_slot, hv, None, None], frag_row, g, c,
                        common.commits_state(status, write_slot))
        elif const_expr(spec.update_state and not spec.has_token_slots):
            self._apply(T, rS, rKu, sVec, sW, sP, gmem.state[write_slot, hv, None, None], frag_row, g, c,
                        common.commits_state(status, write_slot))

    def _u(self, t: int, u, sVec, sAkk, sP, rV, my_row):
        """u_t of row my_row from S_0 k_t (in sP), v_t and the u_j of the tokens before it."""
        a = sVec[0, t] * sP[my_row, t, 0]
        for j in range(t):
            a += sAkk[t, j] * u[j]
        return sVec[2, t] * (rV[t].to(Float32) - a)

    @cute.jit
    def _stash_u(self, u, sP, my_row, writer):
        """The u_t of row my_row replace its S_0 k_t in sP, once every lane of the warp has read them."""
        cute.arch.sync_warp()
        if writer:
            for t in cutlass.range_constexpr(self.spec.T):
                sP[my_row, t, 0] = u[t]
        cute.arch.sync_warp()

    @cute.jit
    def _apply(self, n, rS, rKu, sVec, sW, sP, mDst, frag_row, g, c, run):
        """Write the state after n tokens of this warp's rows into mDst (V, K): G(n - 1) S_0 plus
        sum_j W(row, j) k_j with W = sW(n, j) u_j, on the tensor cores (W as bf16 hi + lo)."""
        NB, KP, MB = self.nb, self.kp, self.mb
        gx = sVec[3, n]
        for m in cutlass.range_constexpr(MB):
            # A operand(s): rows g, g + 8 (hh) and the lane's token slots 2c + e (+ 8 half).
            hi = cute.make_rmem_tensor((2, 2, NB), BFloat16)  # (e, hh, half)
            lo = cute.make_rmem_tensor((2, 2, NB), BFloat16)
            for half in cutlass.range_constexpr(NB):
                for e in cutlass.range_constexpr(2):
                    j = 2 * c + e + 8 * half
                    wj = sW[n, j]  # 0 for j >= n, so padding tokens (j >= T) drop out
                    for hh in cutlass.range_constexpr(2):
                        w = wj * sP[16 * m + 8 * hh + g, j, 0]
                        hi[e, hh, half] = w.to(BFloat16)
                        lo[e, hh, half] = (w - hi[e, hh, half].to(Float32)).to(BFloat16)
            # The k16 reduction slots in groups of 8 tokens, (part, token half) each: T <= 8 is one
            # step [hi | lo]; T <= 16 two, [hi half 0 | hi half 1] and [lo half 0 | lo half 1].
            groups = [(hi, 0), (lo, 0)] if const_expr(NB == 1) else [(hi, 0), (hi, 1), (lo, 0), (lo, 1)]
            steps = []
            for st in cutlass.range_constexpr(len(groups) // 2):
                (low, low_half), (up, up_half) = groups[2 * st], groups[2 * st + 1]
                rA = cute.make_rmem_tensor((8, 1), BFloat16)
                for e in cutlass.range_constexpr(2):
                    rA[e, 0] = low[e, 0, low_half]
                    rA[2 + e, 0] = low[e, 1, low_half]
                    rA[4 + e, 0] = up[e, 0, up_half]
                    rA[6 + e, 0] = up[e, 1, up_half]
                steps.append(rA)
            for p in cutlass.range_constexpr(KP):
                rTop = cute.make_rmem_tensor((8,), self.state_type)
                rBot = cute.make_rmem_tensor((8,), self.state_type)
                for mq in cutlass.range_constexpr(4):
                    rB = cute.make_rmem_tensor((4, 1), BFloat16)
                    for e in cutlass.range_constexpr(2):  # k of the token halves, the same every step
                        rB[e, 0] = rKu[mq, p, e, groups[0][1]]
                        rB[2 + e, 0] = rKu[mq, p, e, groups[1][1]]
                    decayed = [gx * rS[mq + 4 * r, p, hh, m].to(Float32) for hh in range(2) for r in range(2)]
                    # An fp32 state is added after the MMAs, rounded to nearest: the tensor cores'
                    # fp32 accumulation does not round so, and the state would drift each step.
                    acc = cute.make_rmem_tensor((4, 1, 1), Float32)
                    for i in cutlass.range_constexpr(4):
                        acc[i, 0, 0] = Float32(0.0) if const_expr(self.split_state) else decayed[i]
                    for rA in steps:
                        self._gemm(acc, rA, rB)
                    if const_expr(self.split_state):
                        for i in cutlass.range_constexpr(4):
                            acc[i, 0, 0] = acc[i, 0, 0] + decayed[i]
                    rTop[mq] = acc[0, 0, 0].to(self.state_type)
                    rTop[mq + 4] = acc[1, 0, 0].to(self.state_type)
                    rBot[mq] = acc[2, 0, 0].to(self.state_type)
                    rBot[mq + 4] = acc[3, 0, 0].to(self.state_type)
                if run:
                    cute.autovec_copy(rTop, self._chunk(mDst[frag_row + 16 * m, None], p, c))
                    cute.autovec_copy(rBot, self._chunk(mDst[frag_row + 16 * m + 8, None], p, c))
