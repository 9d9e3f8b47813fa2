"""K-major GDN decode kernel: state [B, HV, K, V] (V contiguous), one token per sequence.

One CTA owns a tile of value columns of one (sequence, value head) across all K rows. Within a
warp, `row_lanes` consecutive lanes hold different rows of the same 16-byte column chunk, and the
warps split the remaining rows; so the reductions over K (S^T k and S^T q, both taken from the
state before the update: o = g S^T q + u (k . q)) are a lane-group butterfly, then one shared-memory
exchange across warps and a single CTA barrier. Every state element is read and written once.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

from ..spec import KernelArgs, KernelSpec, vec_elems
from . import common
from .common import CUTLASS_DTYPES
from .decode_kernel import DecodeKernel


class KMajorDecode(DecodeKernel):
    def __init__(self, spec: KernelSpec, config):
        super().__init__(spec, config)
        num_warps, row_lanes = config.tile
        self.state_dtype = CUTLASS_DTYPES[spec.state_dtype]
        self.io_dtype = CUTLASS_DTYPES[spec.io_dtype]
        self.vec = vec_elems(spec.state_dtype)
        self.num_warps = num_warps
        self.row_lanes = row_lanes
        self.col_lanes = 32 // row_lanes
        self.cols_per_cta = self.col_lanes * self.vec
        self.row_step = num_warps * row_lanes
        if spec.V % self.cols_per_cta or spec.K % self.row_step:
            raise ValueError(
                f"K={spec.K}, V={spec.V} do not tile by {self.row_step} rows x {self.cols_per_cta} columns"
            )
        self.num_tiles = spec.V // self.cols_per_cta
        self.tile_rows = spec.K if self.num_tiles == 1 else 0  # whole rows only when one tile spans V
        self.rows_per_thread = spec.K // self.row_step

    def _chunk(self, mRows: cute.Tensor, row0, m: int, col_chunk):
        """This thread's 16-byte chunk of its row m in a (K, V) view (read, then written back)."""
        return cute.local_tile(mRows[row0 + m * self.row_step, None], (self.vec,), (col_chunk,))

    @common.kernel_args
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.KernelArgs, in its order."""
        gmem = KernelArgs(*args)
        spec = self.spec
        VEC = self.vec
        RL = self.row_lanes
        M = self.rows_per_thread
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        tile, b, hv, h = self.cta_coords()
        rl = lane % RL
        col_chunk = tile * self.col_lanes + lane // RL
        row0 = warp * RL + rl

        smem = cutlass.memory.SmemAllocator()
        sPart = None
        if const_expr(self.num_warps > 1):
            sPart = smem.allocate_tensor(
                Float32, cute.make_layout((2 * VEC, self.col_lanes, self.num_warps)), byte_alignment=16
            )

        # Load phase: every global load is issued up front, in fenced groups (common.load_fence),
        # into raw registers; the state and v first, the loads with arithmetic right behind last.
        read_slot, _, _, status = common.row_slots(gmem, b, 1, spec.update_state)
        mRows = gmem.state[read_slot, hv, None, None]
        rRaw = cute.make_rmem_tensor((VEC, M), self.state_dtype)
        for m in cutlass.range_constexpr(M):
            cute.autovec_copy(self._chunk(mRows, row0, m, col_chunk), rRaw[None, m])
        rVraw = cute.make_rmem_tensor((VEC,), self.io_dtype)
        cute.autovec_copy(cute.local_tile(gmem.v[b, 0, hv, None], (VEC,), (col_chunk,)), rVraw)
        common.load_fence()
        raw = common.load_gates(gmem, b, 0, hv)
        common.load_fence()
        rQraw = common.warp_slice(gmem.q[b, 0, h, None], lane, spec.K)
        rKraw = common.warp_slice(gmem.k[b, 0, h, None], lane, spec.K)
        self.prefetch_later(gmem)

        # Compute unconditionally (on slot 0 for a row that does not run); only stores depend on
        # the row status, so the compiler has no branch to sink the loads into.
        run = status == common.RUN
        rS = cute.make_rmem_tensor((VEC, M), Float32)
        rS.store(rRaw.load().to(Float32))
        g, beta = common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
        q_factor, k_factor, kq = common.qk_factors(
            rQraw.load().to(Float32), rKraw.load().to(Float32), spec.K // 32, 32, spec.use_l2norm, spec.scale
        )

        # Partial S^T k and S^T q over this thread's rows (raw q: its factor is applied later).
        rDot = cute.make_rmem_tensor((2 * VEC,), Float32)
        rDot.fill(0.0)
        rKr = cute.make_rmem_tensor((M,), Float32)
        for m in cutlass.range_constexpr(M):
            # This thread's rows of q and k: L1 hits by now (the warp slices loaded the lines).
            rKr[m] = gmem.k[b, 0, h, row0 + m * self.row_step].to(Float32) * k_factor
            q_m = gmem.q[b, 0, h, row0 + m * self.row_step].to(Float32)
            for e in cutlass.range_constexpr(VEC):
                rDot[e] += rS[e, m] * rKr[m]
                rDot[VEC + e] += rS[e, m] * q_m
        for e in cutlass.range_constexpr(2 * VEC):
            rDot[e] = cute.arch.warp_reduction_sum(rDot[e], threads_in_group=RL)
        if const_expr(self.num_warps > 1):
            if rl == 0:
                for e in cutlass.range_constexpr(2 * VEC):
                    sPart[e, lane // RL, warp] = rDot[e]
            cute.arch.barrier()
            for e in cutlass.range_constexpr(2 * VEC):
                acc = Float32(0.0)
                for w in cutlass.range_constexpr(self.num_warps):
                    acc += sPart[e, lane // RL, w]
                rDot[e] = acc

        vv = rVraw.load().to(Float32)
        rU = cute.make_rmem_tensor((VEC,), Float32)
        rOut = cute.make_rmem_tensor((VEC,), Float32)
        fill = common.skipped_output(status)
        for e in cutlass.range_constexpr(VEC):
            rU[e] = (vv[e] - g * rDot[e]) * beta
            rOut[e] = Float32(cutlass.select_(run, g * rDot[VEC + e] * q_factor + rU[e] * kq, fill))
        if run:
            for m in cutlass.range_constexpr(M):
                for e in cutlass.range_constexpr(VEC):
                    rS[e, m] = g * rS[e, m] + rKr[m] * rU[e]
            rRaw.store(rS.load().to(self.state_dtype))
            for m in cutlass.range_constexpr(M):
                cute.autovec_copy(rRaw[None, m], self._chunk(mRows, row0, m, col_chunk))
        if warp == 0 and rl == 0:
            rO = cute.make_rmem_tensor((VEC,), gmem.output.element_type)
            rO.store(rOut.load().to(gmem.output.element_type))
            cute.autovec_copy(rO, cute.local_tile(gmem.output[b, 0, hv, None], (VEC,), (col_chunk,)))
