"""The launch that the decode kernels share (DecodeKernel): the grid of (batch row, value head, state
tile) CTAs, the views of the engines' row forms, the CTA's coordinates (the launch's own, or those of the
decode CTA it plays in a fused step's one launch) and the L2 prefetch of a later CTA's state tile.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import const_expr

from ..spec import DTYPE_BYTES, VEC_BYTES, KernelArgs, KernelSpec
from .common import RUN, bulk_prefetch, packed_heads, resolve_slots, resolve_vllm_slots, tensor_view


class DecodeKernel:
    """Launch shared by the decode kernels: a 1-D grid of B x HV x num_tiles CTAs, one per
    (batch row, value head, tile of that head's state), then B x window_ctas more where a
    subclass sets window_ctas (kmtp.KLastMTP). Subclasses call __init__ with the spec and its
    policy.BuildConfig, set num_tiles, num_warps and tile_rows (the state rows of a CTA's tile
    when that tile is whole rows, one contiguous range, else 0), and define the @cute.kernel
    `kernel`, which takes the tensors of spec.KernelArgs in their order."""

    tile_rows = 0
    window_ctas = 0
    pdl = False  # launched as a programmatic dependent of the previous kernel (KernelSpec.pdl_wait)
    # In a fused step's one launch, the decode CTA that this thread's warps play while the kernel is
    # traced (kernels/step.py DecodeCta: block, grid, thread, warp, wait); None: the launch's own.
    cta = None

    def __init__(self, spec: KernelSpec, config):
        self.spec = spec
        self.config = config
        # How the per-row tensors arrive (KernelSpec.row_form, gate_rows, slot_column; a CommitSpec's
        # kernel takes its own list)
        decode = isinstance(spec, KernelSpec)
        self.row_form = spec.row_form if decode else "batch"
        self.views_rows = decode and (spec.row_form != "batch" or spec.gate_rows or spec.slot_column)

    @property
    def tile_bytes(self) -> int:
        """Bytes of a CTA's state tile when it is whole rows (tile_rows of them; one contiguous
        range unless the state is strided), else 0."""
        row = self.spec.K if self.spec.layout == "klast" else self.spec.V
        return self.tile_rows * row * DTYPE_BYTES[self.spec.state_dtype]

    @property
    def prefetch_ctas(self) -> int:
        """L2 prefetch distance of prefetch_later in CTAs (0: none): the policy's distance in
        bytes in whole tiles, at least one; none where the tile is not whole rows."""
        if not self.config.prefetch_bytes or not self.tile_bytes:
            return 0
        return max(1, self.config.prefetch_bytes // self.tile_bytes)

    @property
    def prefetch_inputs(self) -> bool:
        """prefetch_later also brings in the later CTA's q/k/v and gates, where the policy asks
        for it and the CTA's v values make whole 16-byte units (a TMA bulk prefetch moves those)."""
        if not self.config.prefetch_inputs:  # a CommitSpec has no q/k/v (nor io_dtype)
            return False
        v_bytes = self.tile_rows * DTYPE_BYTES[self.spec.io_dtype]
        return v_bytes > 0 and v_bytes % VEC_BYTES == 0

    @cute.jit
    def __call__(self, *args_and_stream):
        """The tensors of spec.KernelArgs, then the stream."""
        *tensors, stream = args_and_stream
        if const_expr(self.views_rows):
            tensors = self.batch_rows(KernelArgs(*tensors))
        grid = self.grid_rows(tensors) * (self.spec.HV * self.num_tiles + self.window_ctas)
        self.kernel(*tensors).launch(grid=[grid, 1, 1], block=[self.num_warps * 32, 1, 1], stream=stream,
                                     use_pdl=self.pdl)

    def batch_rows(self, args: KernelArgs) -> KernelArgs:
        """The kernel's tensors of a call whose rows arrive as an engine passes them
        (KernelSpec.row_form, gate_rows, slot_column), as views, no copy: q, k [B, T, H, K], v and
        the output [B, T, HV, V], a and b [B, T, HV], vLLM's token slots [B, 1]. "packed" (T = 1):
        q | k | v of each row of mixed_qkv (packed_heads); "flat": dim 1 of q, k, v and the output
        (dim 0 of a and b) split into the slot indices' B sequences of T tokens. "batch" rows keep q,
        k, v and the output; vLLM's gate rows (KernelSpec.gate_rows) are split on q's first two dims,
        and a slot column (KernelSpec.slot_column) becomes [B, 1]. A token dim of a static size 1 is
        never stepped: its stride is 0."""
        T = self.spec.T

        def token_rows(mX, dim, rows, tokens):  # [.., rows·tokens, ...] (dims before `dim` of size 1)
            s = mX.stride[dim]  # -> [rows, tokens, ...]: token t of row b at b·tokens + t
            one = isinstance(tokens, int) and tokens == 1
            return tensor_view(mX, 0, (rows, tokens, *mX.shape[dim + 1:]),
                               (s if one else tokens * s, 0 if one else s, *mX.stride[dim + 1:]))

        def with_token(mX):  # [B, ...] -> [B, 1, ...]
            return token_rows(mX, 0, mX.shape[0], 1)

        mTok = args.token_state_indices
        if const_expr(self.row_form == "batch"):
            a, b = args.a, args.b
            if const_expr(self.spec.gate_rows):
                a, b = (token_rows(a, 0, args.q.shape[0], args.q.shape[1]),
                        token_rows(b, 0, args.q.shape[0], args.q.shape[1]))
            if const_expr(self.spec.slot_column):
                mTok = with_token(mTok)
            return args._replace(a=a, b=b, token_state_indices=mTok)
        if const_expr(self.row_form == "packed"):
            (q, k, v), out = packed_heads(args.q, self.spec.H, self.spec.HV, self.spec.K, self.spec.V), args.output
            a, b = with_token(args.a), with_token(args.b)
        else:  # flat: the batch is the slot indices' (T = 1: the tokens', the same symbol)
            B = args.state_indices.shape[0]
            q, k, v, out = (token_rows(x, 1, B, T) for x in (args.q, args.k, args.v, args.output))
            a, b = token_rows(args.a, 0, B, T), token_rows(args.b, 0, B, T)
        return args._replace(q=q, k=k, v=v, a=a, b=b, output=out,
                             token_state_indices=None if mTok is None else with_token(mTok))

    def grid_rows(self, tensors):
        """Rows of the grid: the batch size (q's first dim; for varlen, where q holds tokens, not
        sequences, cu_seqlens' sequences)."""
        return KernelArgs(*tensors).cu_seqlens.shape[0] - 1 if self.spec.varlen else tensors[0].shape[0]

    def launch_coords(self):
        """(block index, grid size, thread index, warp index) of this CTA: the launch's, or self.cta's."""
        if self.cta is not None:
            return self.cta.block, self.cta.grid, self.cta.thread, self.cta.warp
        return cute.arch.block_idx()[0], cute.arch.grid_dim()[0], cute.arch.thread_idx()[0], cute.arch.warp_idx()

    def wait_inputs(self):
        """Wait until the kernel that writes this decode's inputs has written them: its grid's end after a
        programmatic dependent launch, or in a fused step's one launch its conv/gate CTAs (self.cta)."""
        if self.cta is not None:
            self.cta.wait()
        else:
            cute.arch.griddepcontrol_wait()

    def cta_coords(self, bidx=None):
        """(tile, grid row b (the batch row), value head hv, q/k head h) of this CTA (or of CTA `bidx`)."""
        if bidx is None:
            bidx = self.launch_coords()[0]
        bh = bidx // self.num_tiles
        hv = bh % self.spec.HV
        return bidx % self.num_tiles, bh // self.spec.HV, hv, hv // (self.spec.HV // self.spec.H)

    @cute.jit
    def prefetch_later(self, gmem, with_inputs: cutlass.Constexpr[bool] = False):
        """Thread 0 has the TMA engine bring into L2 the state tile (tile_bytes from its first row)
        of the CTA prefetch_ctas CTAs later: that CTA runs within a wave and its loads then hit
        L2, which shortens the tail of the kernel. One instruction, no registers held, no wait. A
        row that would not read (padding, slot out of range: resolve_slots) fetches nothing.
        With prefetch_inputs and `with_inputs`, that CTA's q/k/v and gates follow (_prefetch_inputs)."""
        if const_expr(self.prefetch_ctas > 0):
            bidx, grid, tid, _ = self.launch_coords()
            later = bidx + self.prefetch_ctas
            # Builds without the inputs test the prefetching threads and the grid together (one branch).
            if const_expr(self.prefetch_inputs and with_inputs):
                if later < grid:
                    tile, b, hv, h = self.cta_coords(later)
                    if tid < self._state_prefetchers:
                        self._prefetch_state(gmem, tile, b, hv, tid)
                    self._prefetch_inputs(gmem, tile, b, hv, h, tid)
            elif tid < self._state_prefetchers and later < grid:
                tile, b, hv, _ = self.cta_coords(later)
                self._prefetch_state(gmem, tile, b, hv, tid)

    @property
    def _state_prefetchers(self) -> int:
        """Threads that prefetch the state tile: one for a packed state (the tile is one range),
        one per row for a strided one (a padded pool: rows are separate ranges)."""
        return min(self.tile_rows, self.num_warps * 32) if self.spec.strided_state else 1

    @cute.jit
    def _prefetch_state(self, gmem, tile, b, hv, tid):
        """The state tile of (tile, batch row b, value head hv) into L2, if that row reads one:
        one bulk prefetch of the whole tile, or, for a strided state, thread `tid` prefetches rows
        tid, tid + prefetchers, ..."""
        mS = gmem.state
        if const_expr(self.spec.vllm_slots):
            slot, _, _, status = resolve_vllm_slots(gmem.token_state_indices, gmem.accepted_tokens, b, mS.shape[0],
                                                    self.spec.T)
        else:
            slot, _, _, status = resolve_slots(gmem.state_indices, None, None, b, mS.shape[0], 1)
        if status == RUN:
            if const_expr(self.spec.strided_state):
                row_bytes = self.tile_bytes // self.tile_rows
                n = self._state_prefetchers
                for r in cutlass.range_constexpr((self.tile_rows + n - 1) // n):
                    row = tid + r * n
                    if row < self.tile_rows:
                        start = mS[slot, hv, tile * self.tile_rows + row, None].iterator
                        bulk_prefetch(start, row_bytes)
            else:
                start = mS[slot, hv, tile * self.tile_rows, None].iterator
                bulk_prefetch(start, self.tile_bytes)

    @cute.jit
    def _prefetch_inputs(self, gmem, tile, b, hv, h, tid):
        """Into L2, one line or row per thread: for every token, the v values of the CTA's rows
        and the q and k rows (TMA bulk prefetches), and the gate inputs a and b (line prefetches:
        their addresses need not be 16-byte aligned). Without it, the CTAs that run last wait on
        DRAM for these small loads after their state has arrived (benchmarks/RESULTS.md "Input
        prefetch")."""
        T, threads = self.spec.T, self.num_warps * 32
        io_bytes = DTYPE_BYTES[self.spec.io_dtype]
        for r in cutlass.range_constexpr((5 * T + threads - 1) // threads):
            e = tid + r * threads
            t = e % T
            kind = e // T  # 0 v, 1 q, 2 k, 3 a, 4 b; none past 4
            if kind == 0:
                start = gmem.v[b, t, hv, None].iterator + tile * self.tile_rows
                bulk_prefetch(start, self.tile_rows * io_bytes)
            for which, mRow in ((1, gmem.q), (2, gmem.k)):
                if kind == which:
                    start = mRow[b, t, h, None].iterator
                    bulk_prefetch(start, self.spec.K * io_bytes)
            for which, mGate in ((3, gmem.a), (4, gmem.b)):
                if kind == which:
                    cute.arch.prefetch((mGate[b, t, None].iterator + hv).to_llvm_ptr(), cache_level="L2")
