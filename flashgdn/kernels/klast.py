"""K-last GDN decode kernel: state [.., HV, V, K] (K contiguous), one token per sequence.

One CTA owns `rows_per_cta` rows (value channels) of one (sequence, value head). A row is split
over a group of `lanes_per_row` lanes, each holding 16-byte chunks of it in registers, so the two
dot products over K (S k and S q) are lane-group butterfly reductions.

Every global load (state, v, q/k, gate inputs) is issued up front, in an order pinned by
common.load_fence, so no load waits behind arithmetic on another: one DRAM round trip per CTA; with
a pool the state waits for its slot index, and the other loads go first to overlap that wait.
Everything then stays in registers; each state element is read and written once.

Regimes differ only in CTA shape (warps, rows per thread, lanes per row): many small CTAs to fill
the GPU at small batch, bigger CTAs at large batch. kmtp.KLastMTP (T > 1) reuses the row helpers.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

from ..spec import KernelArgs, KernelSpec, vec_elems
from . import common, policy
from .common import CUTLASS_DTYPES
from .decode_kernel import DecodeKernel


class KLastDecode(DecodeKernel):
    def __init__(self, spec: KernelSpec, config):
        super().__init__(spec, config)
        num_warps, rows_per_thread, lanes_per_row = config.tile
        self.state_dtype = CUTLASS_DTYPES[spec.state_dtype]
        self.vec = vec_elems(spec.state_dtype)
        # Fewer lanes per row: fewer butterfly levels per dot product, more elements per lane.
        self.lanes_per_row = policy.klast_lanes_per_row(config.tile, spec.K, spec.state_dtype)
        self.chunks = spec.K // (self.lanes_per_row * self.vec)
        self.groups_per_warp = 32 // self.lanes_per_row
        self.num_warps = num_warps
        self.rows_per_thread = rows_per_thread
        # Rows handled together by one load instruction of the CTA; consecutive rows go to
        # consecutive lane groups and warps so every warp access is one contiguous segment.
        self.row_step = num_warps * self.groups_per_warp
        self.rows_per_cta = policy.klast_cta_rows(config.tile, spec.K, spec.state_dtype)
        if spec.V % self.rows_per_cta:
            raise ValueError(f"V={spec.V} is not a multiple of the CTA tile ({self.rows_per_cta} rows)")
        self.num_tiles = spec.V // self.rows_per_cta
        self.tile_rows = self.rows_per_cta  # whole rows of K
        self.pdl = isinstance(spec, KernelSpec) and spec.pdl_wait  # kmtp's ReplayCommit builds from a CommitSpec

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
        """Store this thread's rows (fp32 registers, times `scale` when given) in the state dtype."""
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

    def _io_loads(self, gmem: KernelArgs, b, h, hv, row0, lane_in_row):
        """T = 1: v of this thread's rows, its q/k chunks, then (fenced: their arithmetic comes
        first) the gate inputs; all raw. b, t: the token's indices (common.token_at)."""
        b, t = b
        v_raw = [gmem.v[b, t, hv, row0 + i * self.row_step] for i in range(self.rows_per_thread)]
        rQraw = self._load_vec(gmem.q[b, t, h, None], lane_in_row)
        rKraw = self._load_vec(gmem.k[b, t, h, None], lane_in_row)
        common.load_fence()
        return v_raw, rQraw, rKraw, common.load_gates(gmem, b, t, hv)

    def _thread_coords(self):
        """(lane, warp, tile, b, hv, h, lane in its row group, first row of this thread)."""
        lane = cute.arch.lane_idx()
        warp = self.launch_coords()[3]
        tile, b, hv, h = self.cta_coords()
        row0 = tile * self.rows_per_cta + warp * self.groups_per_warp + lane // self.lanes_per_row
        return lane, warp, tile, b, hv, h, lane % self.lanes_per_row, row0

    @cute.jit
    def _row_partials(self, rS: cute.Tensor, rK: cute.Tensor, rQ: cute.Tensor, i: int):
        """This lane's parts of (S k, S q) of its row i, before the lane-group reduction."""
        dot_k = Float32(0.0)
        dot_q = Float32(0.0)
        for e in cutlass.range_constexpr(self.vec * self.chunks):
            dot_k += rS[e, i] * rK[e]
            dot_q += rS[e, i] * rQ[e]
        return dot_k, dot_q

    def _row_dots(self, rS: cute.Tensor, rK: cute.Tensor, rQ: cute.Tensor, i: int):
        """(S k, S q) of this thread's row i, reduced over the row's lane group."""
        dot_k, dot_q = self._row_partials(rS, rK, rQ, i)
        L = self.lanes_per_row
        return (cute.arch.warp_reduction_sum(dot_k, threads_in_group=L),
                cute.arch.warp_reduction_sum(dot_q, threads_in_group=L))

    def _f32(self, rRaw: cute.Tensor) -> cute.Tensor:
        rX = cute.make_rmem_tensor(rRaw.shape, Float32)
        rX.store(rRaw.load().to(Float32))
        return rX

    @common.kernel_args
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.KernelArgs, in its order."""
        self.body(KernelArgs(*args))

    @cute.jit
    def body(self, gmem: KernelArgs):
        """The kernel's work on its tensors (kernels/step.py runs it in a fused step's one launch)."""
        spec = self.spec
        L = self.lanes_per_row
        R = self.rows_per_thread
        E = self.vec * self.chunks  # elements of one row held by this lane
        lane, warp, tile, b, hv, h, lane_in_row, row0 = self._thread_coords()

        # Load phase: raw registers only, no arithmetic that waits for a load.
        read_slot, write_slot, _, status = common.row_slots(gmem, b, 1, spec.update_state)
        start, count, status = common.sequence_span(gmem, b, 1, status)
        token = common.token_at(gmem, b, 0, start, count)
        if const_expr(spec.pdl_wait):
            # q/k/v and the gates are the previous kernel's outputs: the slot index and the state
            # load while it finishes, the rest once its grid has ended (griddepcontrol.wait).
            rRaw = self._load_rows(gmem.state[read_slot, hv, None, None], row0, lane_in_row)
            common.load_fence()
            self.wait_inputs()
            v_raw, rQraw, rKraw, raw = self._io_loads(gmem, token, h, hv, row0, lane_in_row)
        elif const_expr(gmem.state_indices is None and gmem.token_state_indices is None):
            rRaw = self._load_rows(gmem.state[read_slot, hv, None, None], row0, lane_in_row)
            common.load_fence()  # the state first: the other loads have arithmetic right behind them
            v_raw, rQraw, rKraw, raw = self._io_loads(gmem, token, h, hv, row0, lane_in_row)
        else:
            # The state address waits for the slot index: the other loads go first, in flight
            # meanwhile; the second fence keeps ptxas from sinking the state loads below their
            # arithmetic (where they would wait for q/k too).
            v_raw, rQraw, rKraw, raw = self._io_loads(gmem, token, h, hv, row0, lane_in_row)
            common.load_fence()
            rRaw = self._load_rows(gmem.state[read_slot, hv, None, None], row0, lane_in_row)
            common.load_fence()
        self.prefetch_later(gmem)

        rS = self._f32(rRaw)
        g, beta = common.gdn_gates(raw, spec.softplus_beta, spec.softplus_threshold)
        rQ = self._f32(rQraw)
        rK = self._f32(rKraw)
        # The norm factors are applied after the dot reductions, so the norm and the dot
        # reductions are independent (interleaved, not one after the other).
        q_factor, k_factor, kq = common.qk_factors(rQ, rK, E, L, spec.use_l2norm, spec.scale)

        # The recurrence runs unconditionally (on slot 0 for a row that does not run) and only the
        # stores depend on the row status: a branch around the compute would let the compiler
        # sink loads into it.
        run = status == common.RUN
        fill = common.skipped_output(status)
        for i in cutlass.range_constexpr(R):
            dot_k, dot_q = self._row_dots(rS, rK, rQ, i)
            dot_k = dot_k * k_factor
            dot_q = dot_q * q_factor
            # S' = g S + k u^T  =>  o = S'^T q = g (S^T q) + u (k . q)
            u = (v_raw[i].to(Float32) - g * dot_k) * beta
            w = u * k_factor  # rK holds the raw k
            for e in cutlass.range_constexpr(E):
                rS[e, i] = g * rS[e, i] + rK[e] * w
            if lane_in_row == 0 and common.writes_output(spec, status) and common.token_stored(0, count):
                out = Float32(cutlass.select_(run, g * dot_q + u * kq, fill))
                gmem.output[token[0], token[1], hv, row0 + i * self.row_step] = out.to(gmem.output.element_type)
        if const_expr(spec.update_state):
            if common.commits_state(status, write_slot):
                self._store_rows(rS, gmem.state[write_slot, hv, None, None], row0, lane_in_row)
