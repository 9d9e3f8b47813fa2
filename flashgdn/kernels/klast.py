"""K-last GDN decode kernel: state [.., HV, V, K] (K contiguous), T >= 1 tokens per sequence.

One CTA owns `rows_per_cta` rows (value channels) of one (sequence, value head). A row is split
over a group of `lanes_per_row` lanes, each holding 16-byte chunks of it in registers, so the two
dot products over K (S k and S q) are lane-group butterfly reductions.

Every global load (state, q/k, v, gate inputs) is issued up front, in an order pinned by
common.load_fence, so no load waits behind arithmetic on another: one DRAM round trip per CTA, two
with a pool index. With T = 1 everything then stays in registers. With T > 1 the normalised
q/k, gates and v of every token are staged once per CTA in shared memory behind a second barrier;
the state stays in registers across the T tokens (read once, written once, plus one write per
token into the optional intermediate buffer) as S = c * rS, with the decay folded into the scalar c;
the outputs of all tokens go through shared memory and are written coalesced at the end.

Regimes differ only in CTA shape (warps, rows per thread, lanes per row): many small CTAs to fill
the GPU at small batch, bigger CTAs at large batch; with T > 1 more rows per thread share each
shared-memory read of q/k (the per-token work, not the bytes, bounds the multi-token kernel).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from ..spec import KernelSpec
from . import common
from .common import CUTLASS_DTYPES

# Smallest folded decay c kept as a scale (T > 1); below it c is applied to the state itself.
RESCALE_MIN = 2.0 ** -64


class KLastDecode(common.DecodeKernel):
    def __init__(self, spec: KernelSpec, num_warps: int, rows_per_thread: int, lanes_per_row: int):
        self.spec = spec
        self.state_dtype = CUTLASS_DTYPES[spec.state_dtype]
        self.vec = common.vec_elems(spec.state_dtype)
        # Fewer lanes per row: fewer butterfly levels per dot product, more elements per lane.
        self.lanes_per_row = min(lanes_per_row, spec.K // self.vec)
        self.chunks = spec.K // (self.lanes_per_row * self.vec)
        self.groups_per_warp = 32 // self.lanes_per_row
        self.num_warps = num_warps
        self.rows_per_thread = rows_per_thread
        # Rows handled together by one load instruction of the CTA; consecutive rows go to
        # consecutive lane groups and warps so every warp access is one contiguous segment.
        self.row_step = num_warps * self.groups_per_warp
        self.rows_per_cta = self.row_step * rows_per_thread
        if spec.V % self.rows_per_cta:
            raise ValueError(f"V={spec.V} is not a multiple of the CTA tile ({self.rows_per_cta} rows)")
        self.num_tiles = spec.V // self.rows_per_cta
        # T > 1 staging: tokens per warp and v values per thread (padded: no tail branches).
        threads = num_warps * 32
        self.tokens_per_warp = (spec.T + num_warps - 1) // num_warps
        self.v_per_thread = (spec.T * self.rows_per_cta + threads - 1) // threads
        self.gate_cols = 32 * ((spec.T + 31) // 32)  # one token per lane

    def _reg_shape(self):
        """Registers of this thread's rows: ((chunk elements, chunks), rows)."""
        return ((self.vec, self.chunks), self.rows_per_thread)

    def _chunk(self, mRows: cute.Tensor, row, j: int, lane_in_row):
        """16-byte chunk j of this lane in row `row` of a (V, K) view."""
        return cute.local_tile(mRows[row, None], (self.vec,), (j * self.lanes_per_row + lane_in_row,))

    @cute.jit
    def _load_rows(self, mRows: cute.Tensor, row0, lane_in_row) -> cute.Tensor:
        """This thread's rows, raw."""
        rRaw = cute.make_rmem_tensor(self._reg_shape(), self.state_dtype)
        for i in cutlass.range_constexpr(self.rows_per_thread):
            for j in cutlass.range_constexpr(self.chunks):
                cute.autovec_copy(self._chunk(mRows, row0 + i * self.row_step, j, lane_in_row), rRaw[(None, j), i])
        return rRaw

    @cute.jit
    def _store_rows(self, rS: cute.Tensor, mRows: cute.Tensor, row0, lane_in_row, scale=None):
        """Store this thread's rows (times `scale`, the folded decay, when given)."""
        rRaw = cute.make_rmem_tensor(self._reg_shape(), self.state_dtype)
        if const_expr(scale is None):
            rRaw.store(rS.load().to(self.state_dtype))
        else:
            rRaw.store((rS.load() * scale).to(self.state_dtype))
        for i in cutlass.range_constexpr(self.rows_per_thread):
            for j in cutlass.range_constexpr(self.chunks):
                cute.autovec_copy(rRaw[(None, j), i], self._chunk(mRows, row0 + i * self.row_step, j, lane_in_row))

    @cute.jit
    def _load_vec(self, mX: cute.Tensor, lane_in_row) -> cute.Tensor:
        """This lane's chunks of a length-K vector (q or k, global io dtype or staged fp32), raw."""
        rRaw = cute.make_rmem_tensor((self.vec, self.chunks), mX.element_type)
        for j in cutlass.range_constexpr(self.chunks):
            cute.autovec_copy(cute.local_tile(mX, (self.vec,), (j * self.lanes_per_row + lane_in_row,)), rRaw[None, j])
        return rRaw

    def _f32(self, rRaw: cute.Tensor) -> cute.Tensor:
        rX = cute.make_rmem_tensor(rRaw.shape, Float32)
        rX.store(rRaw.load().to(Float32))
        return rX

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
    def _stage_loads(self, mQ, mK, mV, mA, mB, mALog, mDtBias, b, h, hv, tile, warp, lane):
        """T > 1: the CTA loads the v values of its rows for every token; warp w loads q, k and the
        gate inputs of tokens w, w + num_warps, ... Token indices past T are clamped (no branch).
        Fenced in groups so that no load waits behind arithmetic on another."""
        spec = self.spec
        T, W, rpc = spec.T, self.num_warps, self.rows_per_cta
        values = []
        for m in cutlass.range_constexpr(self.v_per_thread):
            f, fc, _ = self._entry(warp * 32 + lane, m)
            values.append((f, mV[b, fc // rpc, hv, tile * rpc + fc % rpc]))
        common.load_fence()
        tokens = []
        for j in cutlass.range_constexpr(self.tokens_per_warp):
            t = warp + j * W
            tc = t if const_expr(T % W == 0) else Int32(cutlass.select_(t < T, t, T - 1))
            tokens.append((t, common.warp_slice(mQ[b, tc, h, None], lane, spec.K),
                           common.warp_slice(mK[b, tc, h, None], lane, spec.K)))
        common.load_fence()
        # Gates: lane t loads token t's inputs (few loads, simple addresses, issued together).
        gates = []
        for j in cutlass.range_constexpr(self.gate_cols // 32):
            t = lane + 32 * j
            tc = Int32(cutlass.select_(t < T, t, T - 1))
            gates.append((t, common.load_gates(mA, mB, mALog, mDtBias, b, tc, hv)))
        return values, tokens, gates

    @cute.jit
    def _stage_store(self, values, tokens, gates, sQK, sGate, sV, warp, lane):
        """Into shared memory: v; q_hat (scale folded in), k_hat and k.q (sQK, sGate[2]); g and beta
        (sGate[0:2], one copy per warp, copy 0 is read). Padded work writes spare columns and
        every lane of a warp writes the same k.q: no branch."""
        spec = self.spec
        n = spec.K // 32
        for f, val in values:
            sV[f % self.rows_per_cta, f // self.rows_per_cta] = val.to(Float32)
        for t, rQ, rK in tokens:
            q = rQ.load().to(Float32)
            k = rK.load().to(Float32)
            q_factor, k_factor, kq = common.qk_factors(q, k, n, 32, spec.use_l2norm, spec.scale)
            for e in cutlass.range_constexpr(n):
                sQK[lane * n + e, 0, t] = q[e] * q_factor
                sQK[lane * n + e, 1, t] = k[e] * k_factor
            sGate[2, t, 0] = kq
        for t, raw in gates:
            g, beta = common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
            sGate[0, t, warp] = g
            sGate[1, t, warp] = beta

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mA: cute.Tensor,
        mB: cute.Tensor,
        mALog: cute.Tensor,
        mDtBias: cute.Tensor,
        mS: cute.Tensor,
        mIdx,
        mOutIdx,
        mAcc,
        mInter,
        mO: cute.Tensor,
    ):
        spec = self.spec
        L = self.lanes_per_row
        R = self.rows_per_thread
        T = spec.T
        E = self.vec * self.chunks  # elements of one row held by this lane
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, b, hv, h = self.cta_coords()
        lane_in_row = lane % L
        row0 = tile * self.rows_per_cta + warp * self.groups_per_warp + lane // L
        staged = const_expr(T > 1)

        # Load phase: raw registers only, no arithmetic that waits for a load.
        read_slot, write_slot, accepted, status = common.resolve_slots(mIdx, mOutIdx, mAcc, b, mS.shape[0], T)
        run = status == common.RUN
        rRaw = self._load_rows(mS[read_slot, hv, None, None], row0, lane_in_row)
        if const_expr(not staged):
            v_raw = [mV[b, 0, hv, row0 + i * self.row_step] for i in range(R)]
        common.load_fence()  # state and v first: the other loads have arithmetic right behind them
        if const_expr(staged):
            values, tokens, gates = self._stage_loads(mQ, mK, mV, mA, mB, mALog, mDtBias, b, h, hv, tile, warp, lane)
        else:
            rQraw = self._load_vec(mQ[b, 0, h, None], lane_in_row)
            rKraw = self._load_vec(mK[b, 0, h, None], lane_in_row)
            common.load_fence()
            raw = common.load_gates(mA, mB, mALog, mDtBias, b, 0, hv)

        rS = self._f32(rRaw)
        if const_expr(staged):
            # Per-token q/k norms and gates once per CTA (per-lane recomputation would cost more
            # ALU work than the recurrence), read back from shared memory by every row.
            smem = cutlass.memory.SmemAllocator()
            t_pad = self.tokens_per_warp * self.num_warps
            v_cols = (self.v_per_thread * self.num_warps * 32 + self.rows_per_cta - 1) // self.rows_per_cta
            sQK = smem.allocate_tensor(Float32, cute.make_layout((spec.K, 2, t_pad)), byte_alignment=16)
            # (g, beta, k.q, unused) of a token are one 16-byte shared load.
            sGate = smem.allocate_tensor(
                Float32, cute.make_layout((4, max(t_pad, self.gate_cols), self.num_warps)), byte_alignment=16
            )
            sV = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_cta, v_cols)), byte_alignment=16)
            sO = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_cta, v_cols)), byte_alignment=16)
            self._stage_store(values, tokens, gates, sQK, sGate, sV, warp, lane)
            cute.arch.barrier()
        else:
            g, beta = common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
            rQ = self._f32(rQraw)
            rK = self._f32(rKraw)
            # The norm factors are applied after the dot reductions, so the norm and the dot
            # reductions are independent (interleaved, not one after the other).
            q_factor, k_factor, kq = common.qk_factors(rQ, rK, E, L, spec.use_l2norm, spec.scale)

        # The recurrence runs unconditionally (on slot 0 for a row that does not run) and only the
        # stores depend on the row status: a branch around the compute would let the compiler
        # sink loads into it.
        fill = common.skipped_output(status)
        if const_expr(spec.update_state and spec.has_accepted):
            if run and accepted == 0:
                self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row)
        # T > 1 keeps S = c * rS: the decay of each token goes into the scalar c, so the update
        # is one FMA per element (rS += k (u / c)) instead of a multiply and an FMA.
        c = Float32(1.0)
        for t in cutlass.range_constexpr(T):
            if const_expr(staged):
                rQ = self._f32(self._load_vec(sQK[None, 0, t], lane_in_row))
                rK = self._f32(self._load_vec(sQK[None, 1, t], lane_in_row))
                rGate = cute.make_rmem_tensor((4,), Float32)
                cute.autovec_copy(sGate[None, t, 0], rGate)
                g, beta, kq = rGate[0], rGate[1], rGate[2]
                c = c * g
                if c < Float32(RESCALE_MIN):
                    # 1 / c would overflow (or g is 0): apply c to the registers, restart at 1.
                    for i in cutlass.range_constexpr(R):
                        for e in cutlass.range_constexpr(E):
                            rS[e, i] = rS[e, i] * c
                    c = Float32(1.0)
                inv_c = cute.arch.rcp_approx(c)
                decay = c
            else:
                decay = g
            for i in cutlass.range_constexpr(R):
                row = row0 + i * self.row_step
                dot_k = Float32(0.0)
                dot_q = Float32(0.0)
                for e in cutlass.range_constexpr(E):
                    dot_k += rS[e, i] * rK[e]
                    dot_q += rS[e, i] * rQ[e]
                dot_k = cute.arch.warp_reduction_sum(dot_k, threads_in_group=L)
                dot_q = cute.arch.warp_reduction_sum(dot_q, threads_in_group=L)
                # S' = g S + k u^T  =>  o = S'^T q = g (S^T q) + u (k . q)
                if const_expr(staged):
                    v = sV[row - tile * self.rows_per_cta, t]
                else:
                    v = v_raw[i].to(Float32)
                    dot_q = dot_q * q_factor
                    dot_k = dot_k * k_factor
                u = (v - decay * dot_k) * beta
                if const_expr(staged):
                    w = u * inv_c
                    for e in cutlass.range_constexpr(E):
                        rS[e, i] = rS[e, i] + rK[e] * w
                else:
                    w = u * k_factor  # rK holds the raw k
                    for e in cutlass.range_constexpr(E):
                        rS[e, i] = g * rS[e, i] + rK[e] * w
                if const_expr(staged):
                    # Every lane of the row group writes the same o; the CTA writes all outputs
                    # coalesced after the loop.
                    sO[row - tile * self.rows_per_cta, t] = decay * dot_q + u * kq
                elif lane_in_row == 0:
                    out = Float32(cutlass.select_(run, decay * dot_q + u * kq, fill))
                    mO[b, t, hv, row] = out.to(mO.element_type)
            scale = c if const_expr(staged) else None
            if const_expr(spec.has_intermediate):
                if run:
                    self._store_rows(rS, mInter[b, t, hv, None, None], row0, lane_in_row, scale)
            if const_expr(spec.update_state and spec.has_accepted):
                if run and accepted == t + 1:
                    self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row, scale)
        if const_expr(spec.update_state and not spec.has_accepted):
            if run:
                self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row, scale)
        if const_expr(staged):
            cute.arch.barrier()
            self._write_outputs(sO, mO, b, hv, tile, warp * 32 + lane, run, fill)

    @cute.jit
    def _write_outputs(self, sO, mO, b, hv, tile, tid, run, fill):
        """T > 1: the outputs of the CTA's rows for every token, from shared memory, coalesced
        (the (row, token) mapping of the v staging)."""
        T, rpc = self.spec.T, self.rows_per_cta
        for m in cutlass.range_constexpr(self.v_per_thread):
            f, _, padded = self._entry(tid, m)
            out = Float32(cutlass.select_(run, sO[f % rpc, f // rpc], fill)).to(mO.element_type)
            in_range = (f < T * rpc) if const_expr(padded) else True  # a static True: no branch
            if in_range:
                mO[b, f // rpc, hv, tile * rpc + f % rpc] = out
