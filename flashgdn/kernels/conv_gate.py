"""The fused decode step's first launch: the causal conv1d update with SiLU over the q/k/v channels
and the b/a projection GEMV, for one token per sequence, written to a workspace that the K-last
decode kernel (klast.py) then reads as q, k, v, a and b. In the "gemm" regime (no gate CTAs:
policy.ConvGateConfig) the projection is a cuBLAS GEMM launched before it, and it runs the conv
only.

A 1-D grid of CTAs in groups of gate_rows batch rows (policy.ConvGateConfig): per group
gate_rows x conv_ctas conv CTAs, then gate_ctas gate CTAs; ceil(B / gate_rows) groups. A kernel of
conv CTAs only groups conv_rows batch rows instead: conv_ctas CTAs per group, a thread serving its
channel in each of the group's rows.

- conv CTA: one channel per thread. It reads the channel's old window (width - 1 values) at the
  row's conv-state slot and its new input x, writes the activated output
  silu(sum(window * weight) + bias), rounded to bf16 as the models' conv kernels store it, and
  writes the new window (old[1:], x) back. With conv_rows rows it loads the weights once and every
  row's window and input before its first store, so that all of them are in flight at once. Each
  channel of a row has exactly one reader and writer, so the in-place update has no race. The conv
  state is addressed through its dynamic strides: one build serves the "SD" pool (a transposed
  view, channels contiguous: coalesced) and the "DS" pool (windows contiguous).
- gate CTA: one block of gate_vec columns of w_ba (one 16-byte load per row), its dot products
  with hidden_states[b] in fp32, the rows split over the threads, reduced through shared memory;
  the sums are rounded to bf16 as the projection's bf16 output is. A gate CTA serves its group's
  batch rows: each w_ba row it loads is multiplied by each of their hidden rows (a row past the
  batch reads the last one and writes nothing). With gate_prefetch the CTA first asks L2 for
  every w_ba row it will read and for its hidden rows: the loads themselves keep two rows in
  flight per thread (ptxas interleaves them with the products).
- split gate CTA (the "split" regime, config.split_rows): one slice of split_rows hidden rows, every
  column of w_ba. Thread t takes column block t % CBp (the row's 2 HV / gate_vec blocks padded to a
  power of two; the padding threads load and discard) of the rows t // CBp + m * (threads / CBp),
  so that a warp reads whole w_ba rows side by side; all its loads are issued before the CTA barrier
  behind which it reads the slice's hidden values from shared memory, so they are all in flight at
  once. The sums of one column block are added over the warp's lanes at offsets
  CBp, 2 CBp, ... (butterfly shuffles) and over the warps through shared memory, and written as
  fp32 partial sums ba_out[split, b, :]: the decode adds the splits up (common.gate_value).

A row whose slot is negative (padding) or past the conv pool touches no conv state; the decode
kernel then leaves its output zero (padding) or NaN (a slot past the ssm pool).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, const_expr

from ..spec import ConvGateArgs, ConvGateSpec, conv_gate_blocks
from . import common
from .policy import ConvGateConfig


class ConvGate:
    def __init__(self, spec: ConvGateSpec, config: ConvGateConfig):
        self.spec = spec
        self.config = config
        self.num_warps = config.threads // 32
        self.rows = config.gate_rows if config.gate_ctas else config.conv_rows
        self.conv_parts = config.gate_rows * config.conv_ctas
        self.ctas_per_group = self.conv_parts + config.gate_ctas
        self.blocks, self.blocks_pad = conv_gate_blocks(spec.HV)  # w_ba column blocks of a row, padded
        # The split gate's lanes of one column block sit blocks_pad apart: its sums are added with a
        # butterfly over those offsets only (cute.arch's warp reductions add up adjacent lanes).
        self.block_lane_offsets = [off for off in (1, 2, 4, 8, 16) if off >= self.blocks_pad]

    @cute.jit
    def __call__(self, *args_and_stream):
        """The tensors of spec.ConvGateArgs, then the stream."""
        *tensors, stream = args_and_stream
        self.kernel(*tensors).launch(grid=[self.grid_size(tensors[0].shape[0]), 1, 1],
                                     block=[self.config.threads, 1, 1], stream=stream)

    def grid_size(self, B):
        """CTAs of a batch of B rows."""
        groups = B if const_expr(self.rows == 1) else (B + self.rows - 1) // self.rows
        return groups * self.ctas_per_group

    @common.kernel_params(ConvGateArgs._fields)
    @cute.kernel
    def kernel(self, *args):
        """The tensors of spec.ConvGateArgs, in its order."""
        # The decode launched behind this kernel (KernelSpec.pdl_wait) may start once every CTA
        # here has: it loads its state meanwhile, and waits for this grid's end to read our outputs.
        cute.arch.griddepcontrol_launch_dependents()
        bidx, _, _ = cute.arch.block_idx()
        self.body(ConvGateArgs(*args), bidx)

    @cute.jit
    def body(self, gmem: ConvGateArgs, bidx: Int32):
        """The work of CTA `bidx` of the grid (kernels/step.py runs it in a fused step's one launch)."""
        group = bidx // self.ctas_per_group
        part = bidx % self.ctas_per_group
        if const_expr(not self.config.gate_ctas):
            self._conv(gmem, group, part)  # conv_rows batch rows per group (policy.ConvGateConfig)
        else:
            if part < self.conv_parts:
                if const_expr(self.rows == 1):
                    self._conv(gmem, group, part)
                else:
                    b = group * self.rows + part // self.config.conv_ctas
                    if b < gmem.hidden_states.shape[0]:
                        self._conv(gmem, b, part % self.config.conv_ctas)
            elif const_expr(self.config.split_rows):
                self._gate_split(gmem, group, part - self.conv_parts)
            else:
                self._gate(gmem, group, part - self.conv_parts)

    @cute.jit
    def _conv(self, gmem: ConvGateArgs, group: Int32, part: Int32):
        """Channel part * threads + tid of the group's batch rows (conv_rows of them; one where the
        kernel has gate CTAs, whose groups hand a conv CTA its batch row as `group`)."""
        spec = self.spec
        W = spec.width
        CR = self.config.conv_rows
        tid, _, _ = cute.arch.thread_idx()
        c = part * self.config.threads + tid
        if c < spec.qkv_dim:
            B = gmem.hidden_states.shape[0]
            pool = Int64(gmem.conv_state.shape[0])
            rows = [group * CR + r for r in range(CR)]
            # A row past the batch (a partial last group) reads the last row's slot and writes nothing.
            index = rows if const_expr(CR == 1) else [cutlass.min(b, B - 1) for b in rows]
            slots = [Int64(gmem.state_indices[b]) for b in index]
            live = [(slot >= Int64(0)) & (slot < pool) for slot in slots]
            if const_expr(CR > 1):
                live = [ok & (b < B) for ok, b in zip(live, rows)]
            rWin = cute.make_rmem_tensor((CR, W), BFloat16)  # the old window, then the new input
            for r in cutlass.range_constexpr(CR):
                if live[r]:
                    for j in cutlass.range_constexpr(W - 1):
                        rWin[r, j] = gmem.conv_state[slots[r], c, j]
                    rWin[r, W - 1] = gmem.mixed_qkv[rows[r], c]
            weights = [gmem.conv_weight[c, j].to(Float32) for j in range(W)]
            if const_expr(gmem.conv_bias is not None):
                bias = gmem.conv_bias[c].to(Float32)
            for r in cutlass.range_constexpr(CR):
                if live[r]:
                    acc = Float32(0.0)
                    for j in cutlass.range_constexpr(W):
                        acc += rWin[r, j].to(Float32) * weights[j]
                    if const_expr(gmem.conv_bias is not None):
                        acc += bias  # added last, as the models' conv kernels do
                    y = acc / (Float32(1.0) + cute.math.exp(-acc))  # SiLU
                    gmem.qkv_out[rows[r], c] = y.to(BFloat16)
                    for j in cutlass.range_constexpr(W - 1):
                        gmem.conv_state[slots[r], c, j] = rWin[r, j + 1]

    @cute.jit
    def _gate(self, gmem: ConvGateArgs, group: Int32, block: Int32):
        spec = self.spec
        n = spec.gate_vec
        R = self.rows
        threads = self.config.threads
        tid, _, _ = cute.arch.thread_idx()
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        smem = cutlass.memory.SmemAllocator()
        sPart = smem.allocate_tensor(Float32, cute.make_layout((R * n, self.num_warps)), byte_alignment=16)
        rows = self._group_rows(gmem, group)

        if const_expr(self.config.gate_prefetch):
            self._gate_prefetch(gmem, rows, block)
        rAccs = [cute.make_rmem_tensor((n,), Float32) for _ in range(R)]
        for rAcc in rAccs:
            rAcc.fill(0.0)
        rW = cute.make_rmem_tensor((n,), BFloat16)
        for m in cutlass.range_constexpr((spec.hidden + threads - 1) // threads):
            i = tid + m * threads
            if const_expr((m + 1) * threads <= spec.hidden):
                self._gate_row(gmem, rows, block, i, rW, rAccs)
            else:
                if i < spec.hidden:
                    self._gate_row(gmem, rows, block, i, rW, rAccs)
        for r in cutlass.range_constexpr(R):
            for e in cutlass.range_constexpr(n):
                rAccs[r][e] = cute.arch.warp_reduction_sum(rAccs[r][e])
        if lane == 0:
            for r in cutlass.range_constexpr(R):
                for e in cutlass.range_constexpr(n):
                    sPart[r * n + e, warp] = rAccs[r][e]
        cute.arch.barrier()
        if tid < R * n:
            acc = Float32(0.0)
            for w in cutlass.range_constexpr(self.num_warps):
                acc += sPart[tid, w]
            if const_expr(R == 1):
                gmem.ba_out[group, block * n + tid] = acc.to(BFloat16)
            else:
                b = group * R + tid // n
                if b < gmem.hidden_states.shape[0]:
                    gmem.ba_out[b, block * n + tid % n] = acc.to(BFloat16)

    def _group_rows(self, gmem: ConvGateArgs, group):
        """The hidden rows of the group's batch rows, a row past the batch reading the last one."""
        if const_expr(self.rows == 1):
            return [group]
        return [cutlass.min(group * self.rows + r, gmem.hidden_states.shape[0] - 1) for r in range(self.rows)]

    @cute.jit
    def _gate_split(self, gmem: ConvGateArgs, group: Int32, split: Int32):
        spec = self.spec
        n, R, cols = spec.gate_vec, self.rows, 2 * spec.HV
        threads, split_rows = self.config.threads, self.config.split_rows
        CB, CBp = self.blocks, self.blocks_pad
        per_pass = threads // CBp
        lanes = max(32, CBp)  # threads whose sums one shared-memory column holds
        tid, _, _ = cute.arch.thread_idx()
        lane = cute.arch.lane_idx()
        smem = cutlass.memory.SmemAllocator()
        sPart = smem.allocate_tensor(Float32, cute.make_layout((R * cols, threads // lanes)), byte_alignment=16)
        rows = self._group_rows(gmem, group)
        rAccs = [cute.make_rmem_tensor((n,), Float32) for _ in range(R)]
        for rAcc in rAccs:
            rAcc.fill(0.0)
        # The slice's hidden values go through shared memory: the products read them after a CTA
        # barrier, which no load crosses, so every w_ba row a thread needs is loaded before its first
        # product and all of them are in flight at once (read straight from global memory, ptxas
        # sinks each pair of loads to its products: one DRAM round trip per two rows). Padding
        # threads (c >= CB) load their warp's last block and write nothing; rows past hidden (a
        # partial last slice) load the last w_ba row against a zero hidden value.
        sH = smem.allocate_tensor(BFloat16, cute.make_layout((split_rows, R)), byte_alignment=16)
        c = tid % CBp
        partial = spec.hidden % split_rows != 0
        rWs = [cute.make_rmem_tensor((n,), BFloat16) for _ in range(split_rows // per_pass)]
        for m in cutlass.range_constexpr(split_rows // per_pass):
            i = split * split_rows + tid // CBp + m * per_pass
            if const_expr(partial):
                i = cutlass.min(i, spec.hidden - 1)
            cute.autovec_copy(cute.local_tile(gmem.w_ba[i, None], (n,), (cutlass.min(c, CB - 1),)), rWs[m])
        for r, b in enumerate(rows):
            for k in cutlass.range_constexpr((split_rows + threads - 1) // threads):
                j = tid + k * threads
                if j < split_rows:
                    i = split * split_rows + j
                    if const_expr(partial):
                        sH[j, r] = gmem.hidden_states[b, cutlass.min(i, spec.hidden - 1)] if i < spec.hidden else (
                            BFloat16(0.0))
                    else:
                        sH[j, r] = gmem.hidden_states[b, i]
        cute.arch.barrier()
        for m in cutlass.range_constexpr(split_rows // per_pass):
            wv = rWs[m].load().to(Float32)
            for r, rAcc in enumerate(rAccs):
                h = sH[tid // CBp + m * per_pass, r].to(Float32)
                for e in cutlass.range_constexpr(n):
                    rAcc[e] += h * wv[e]
        for rAcc in rAccs:
            for e in cutlass.range_constexpr(n):
                for off in self.block_lane_offsets:
                    rAcc[e] = rAcc[e] + cute.arch.shuffle_sync_bfly(rAcc[e], offset=off)
        if c < CB:
            if lane < CBp:
                for r in cutlass.range_constexpr(R):
                    for e in cutlass.range_constexpr(n):
                        sPart[r * cols + c * n + e, tid // lanes] = rAccs[r][e]
        cute.arch.barrier()
        for o in cutlass.range_constexpr((R * cols + threads - 1) // threads):
            j = tid + o * threads
            if j < R * cols:
                acc = Float32(0.0)
                for w in cutlass.range_constexpr(threads // lanes):
                    acc += sPart[j, w]
                if const_expr(R == 1):
                    gmem.ba_out[split, group, j] = acc
                else:
                    b = group * R + j // cols
                    if b < gmem.hidden_states.shape[0]:
                        gmem.ba_out[split, b, j % cols] = acc

    @cute.jit
    def _gate_prefetch(self, gmem: ConvGateArgs, rows, block: Int32):
        """Line prefetches into L2: this thread's w_ba rows of the block (all but the partial last
        pass), and one 128-byte line of each hidden row per thread."""
        threads = self.config.threads
        tid, _, _ = cute.arch.thread_idx()
        n = self.spec.gate_vec
        for m in cutlass.range_constexpr(self.spec.hidden // threads):
            row = gmem.w_ba[tid + m * threads, None].iterator + block * n
            cute.arch.prefetch(row.to_llvm_ptr(), cache_level="L2")
        line = 128 // 2  # bf16 elements of one line
        for m in cutlass.range_constexpr((self.spec.hidden // line + threads - 1) // threads):
            j = (tid + m * threads) * line
            if j < self.spec.hidden:
                for b in rows:
                    cute.arch.prefetch((gmem.hidden_states[b, None].iterator + j).to_llvm_ptr(), cache_level="L2")

    def _gate_row(self, gmem: ConvGateArgs, rows, block, i, rW: cute.Tensor, rAccs):
        """rAccs[r] += hidden_states[rows[r], i] * w_ba[i, this block's columns]: one load of the
        w_ba row for every batch row."""
        cute.autovec_copy(cute.local_tile(gmem.w_ba[i, None], (self.spec.gate_vec,), (block,)), rW)
        hs = [gmem.hidden_states[b, i].to(Float32) for b in rows]
        w = rW.load().to(Float32)
        for h, rAcc in zip(hs, rAccs):
            for e in range(self.spec.gate_vec):
                rAcc[e] += h * w[e]
