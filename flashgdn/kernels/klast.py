"""K-last GDN decode kernel: state [.., HV, V, K] (K contiguous), T >= 1 tokens per sequence.

One CTA owns `rows_per_cta` rows (value channels) of one (sequence, value head). A row is split
over a group of `lanes_per_row` lanes, each holding 16-byte chunks of it in registers, so the two
dot products over K (S k and S q) are lane-group butterfly reductions. With T = 1 the kernel uses
no shared memory and no barrier: state loads are issued first and are in flight while the gates and
the q/k norms are computed. With T > 1 the normalised q/k and gates of every token are staged once
per CTA in shared memory behind one barrier. The state stays in registers across the T tokens, so
it is read once and written once (plus one write per token into the optional intermediate buffer).

Regimes differ only in CTA shape (warps, rows per thread, lanes per row): many small CTAs to fill
the GPU at small batch, bigger CTAs at large batch, fewer lanes per row when T > 1 (the per-token
reductions, not the bytes, bound the multi-token kernel).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

from ..spec import KernelSpec
from . import common
from .common import CUTLASS_DTYPES


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

    def _reg_shape(self):
        """Registers of this thread's rows: ((chunk elements, chunks), rows)."""
        return ((self.vec, self.chunks), self.rows_per_thread)

    def _chunk(self, mRows: cute.Tensor, row, j: int, lane_in_row):
        """16-byte chunk j of this lane in row `row` of a (V, K) view."""
        return cute.local_tile(mRows[row, None], (self.vec,), (j * self.lanes_per_row + lane_in_row,))

    @cute.jit
    def _load_rows(self, mRows: cute.Tensor, row0, lane_in_row) -> cute.Tensor:
        rRaw = cute.make_rmem_tensor(self._reg_shape(), self.state_dtype)
        for i in cutlass.range_constexpr(self.rows_per_thread):
            for j in cutlass.range_constexpr(self.chunks):
                cute.autovec_copy(self._chunk(mRows, row0 + i * self.row_step, j, lane_in_row), rRaw[(None, j), i])
        rS = cute.make_rmem_tensor(self._reg_shape(), Float32)
        rS.store(rRaw.load().to(Float32))
        return rS

    @cute.jit
    def _store_rows(self, rS: cute.Tensor, mRows: cute.Tensor, row0, lane_in_row):
        rRaw = cute.make_rmem_tensor(self._reg_shape(), self.state_dtype)
        rRaw.store(rS.load().to(self.state_dtype))
        for i in cutlass.range_constexpr(self.rows_per_thread):
            for j in cutlass.range_constexpr(self.chunks):
                cute.autovec_copy(rRaw[(None, j), i], self._chunk(mRows, row0 + i * self.row_step, j, lane_in_row))

    @cute.jit
    def _load_vec(self, mX: cute.Tensor, lane_in_row) -> cute.Tensor:
        """This lane's chunks of a length-K vector (q or k, global io dtype or staged fp32) in fp32."""
        rRaw = cute.make_rmem_tensor((self.vec, self.chunks), mX.element_type)
        for j in cutlass.range_constexpr(self.chunks):
            cute.autovec_copy(cute.local_tile(mX, (self.vec,), (j * self.lanes_per_row + lane_in_row,)), rRaw[None, j])
        rX = cute.make_rmem_tensor((self.vec, self.chunks), Float32)
        rX.store(rRaw.load().to(Float32))
        return rX

    @cute.jit
    def _stage_tokens(self, mQ, mK, mA, mB, mALog, mDtBias, sQK, sGate, b, h, hv, warp, lane):
        """Warp t % num_warps writes token t's q_hat (scale folded in), k_hat, g, beta, k.q."""
        spec = self.spec
        n = spec.K // 32
        for t in cutlass.range_constexpr(spec.T):
            if warp == t % self.num_warps:
                q, k, q_factor, k_factor, kq = common.warp_qk(
                    mQ[b, t, h, None], mK[b, t, h, None], lane, spec.K, spec.use_l2norm, spec.scale
                )
                for e in cutlass.range_constexpr(n):
                    sQK[lane * n + e, 0, t] = q[e] * q_factor
                    sQK[lane * n + e, 1, t] = k[e] * k_factor
                g, beta = common.gdn_gates(
                    mA, mB, mALog, mDtBias, b, t, hv, spec.softplus_beta, spec.softplus_threshold
                )
                if lane == 0:
                    sGate[0, t] = g
                    sGate[1, t] = beta
                    sGate[2, t] = kq

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
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, b, hv, h = self.cta_coords()
        lane_in_row = lane % L
        row0 = tile * self.rows_per_cta + warp * self.groups_per_warp + lane // L

        # T > 1: normalised q/k and the gates of each token are computed once per CTA (one warp
        # per token) and staged in shared memory; per-lane recomputation would cost more ALU work
        # than the recurrence itself. T = 1 keeps everything in registers (no barrier).
        staged = const_expr(T > 1)
        if const_expr(staged):
            smem = cutlass.memory.SmemAllocator()
            sQK = smem.allocate_tensor(Float32, cute.make_layout((spec.K, 2, T)), byte_alignment=16)
            sGate = smem.allocate_tensor(Float32, cute.make_layout((3, T)), byte_alignment=16)

        read_slot, write_slot, accepted, status = common.resolve_slots(
            mIdx, mOutIdx, mAcc, b, mS.shape[0], T
        )
        if status == common.RUN:
            rS = self._load_rows(mS[read_slot, hv, None, None], row0, lane_in_row)
            if const_expr(staged):
                self._stage_tokens(mQ, mK, mA, mB, mALog, mDtBias, sQK, sGate, b, h, hv, warp, lane)
                cute.arch.barrier()
            if const_expr(spec.update_state and spec.has_accepted):
                if accepted == 0:
                    self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row)
            for t in cutlass.range_constexpr(T):
                if const_expr(staged):
                    rQ = self._load_vec(sQK[None, 0, t], lane_in_row)
                    rK = self._load_vec(sQK[None, 1, t], lane_in_row)
                    g, beta, kq = sGate[0, t], sGate[1, t], sGate[2, t]
                    q_factor = Float32(1.0)
                else:
                    g, beta = common.gdn_gates(
                        mA, mB, mALog, mDtBias, b, t, hv, spec.softplus_beta, spec.softplus_threshold
                    )
                    rQ = self._load_vec(mQ[b, t, h, None], lane_in_row)
                    rK = self._load_vec(mK[b, t, h, None], lane_in_row)
                    q_factor, k_factor, kq = common.qk_factors(
                        rQ, rK, self.vec * self.chunks, L, spec.use_l2norm, spec.scale
                    )
                    for e in cutlass.range_constexpr(self.vec * self.chunks):
                        rK[e] = rK[e] * k_factor
                for i in cutlass.range_constexpr(R):
                    row = row0 + i * self.row_step
                    dot_k = Float32(0.0)
                    dot_q = Float32(0.0)
                    for e in cutlass.range_constexpr(self.vec * self.chunks):
                        dot_k += rS[e, i] * rK[e]
                        dot_q += rS[e, i] * rQ[e]
                    dot_k = cute.arch.warp_reduction_sum(dot_k, threads_in_group=L)
                    dot_q = cute.arch.warp_reduction_sum(dot_q, threads_in_group=L)
                    # S' = g S + k u^T  =>  o = S'^T q = g (S^T q) + u (k . q)
                    u = (mV[b, t, hv, row].to(Float32) - g * dot_k) * beta
                    for e in cutlass.range_constexpr(self.vec * self.chunks):
                        rS[e, i] = g * rS[e, i] + rK[e] * u
                    if lane_in_row == 0:
                        mO[b, t, hv, row] = (g * dot_q * q_factor + u * kq).to(mO.element_type)
                if const_expr(spec.has_intermediate):
                    self._store_rows(rS, mInter[b, t, hv, None, None], row0, lane_in_row)
                if const_expr(spec.update_state and spec.has_accepted):
                    if accepted == t + 1:
                        self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row)
            if const_expr(spec.update_state and not spec.has_accepted):
                self._store_rows(rS, mS[write_slot, hv, None, None], row0, lane_in_row)
        else:
            fill = common.skipped_output(status).to(mO.element_type)
            if lane_in_row == 0:
                for t in cutlass.range_constexpr(T):
                    for i in cutlass.range_constexpr(R):
                        mO[b, t, hv, row0 + i * self.row_step] = fill
