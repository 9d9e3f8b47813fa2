"""The fused decode step's two kernels in one compiled function (spec.StepSpec): the conv/gate
kernel (conv_gate.py), then the K-last decode (klast.py) on views of the workspace rows the first
one writes.

Two launches: back to back on the call's stream, the decode as a programmatic dependent where its
spec says so (KernelSpec.pdl_wait). One host call instead of two: the TVM-FFI function checks every
tensor of both launches before either runs, and the views the decode reads are built here, in the
compiled code, not as torch views per call. Each kernel's code is the one its own build generates
(the views carry the strides and the alignment the decode's own fake arguments declare).

One launch (StepSpec.one_launch): one grid of the conv/gate kernel's CTA size, its CTAs first, then
the decode's, per_cta decode CTAs (whole warps each) in one CTA. A CTA's role is its ticket, the
order in which it took a counter (sync[TICKET]), not its block index: a CTA with a decode ticket
started after every conv/gate CTA had taken its own, so those run (they wait on nothing) however
many decode CTAs sit waiting, and the grid cannot deadlock. A decode CTA loads its slot indices and
state, then waits until every conv/gate CTA has counted itself done (sync[DONE], release/acquire at
GPU scope, as a grid barrier's arrival and wait) before it reads the workspace. The last CTA to
finish (sync[EXIT]) sets the counters back to zero for the next launch, which stream order puts
after this grid's end."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from ..spec import AFTER_OUTPUT, ConvGateArgs, KernelArgs, StepArgs, StepSpec
from . import policy
from .common import kernel_params, packed_heads, tensor_view

TICKET, DONE, EXIT = 0, 1, 2  # words of StepArgs.sync


class DecodeCta(NamedTuple):
    """The decode CTA that a thread's warps play in the one launch (decode_kernel.DecodeKernel.cta)."""

    block: Any  # its block index in the decode's own grid
    grid: Any  # that grid's size
    thread: Any  # the thread's index in it
    warp: Any
    wait: Callable[[], None]  # waits for the conv/gate CTAs' outputs (the whole CTA calls it)


class FusedStep:
    def __init__(self, spec: StepSpec, conv_gate, decode):
        """`conv_gate` and `decode`: the kernel objects of spec.conv and spec.decode (build.make_kernel)."""
        parts = conv_gate.config.partial_sums
        if parts != spec.decode.gate_parts:
            raise ValueError(f"the decode adds up {spec.decode.gate_parts} partial sums of the projection, "
                             f"the conv/gate build writes {parts}")
        self.spec = spec
        self.conv_gate = conv_gate
        self.decode = decode
        self.threads = conv_gate.config.threads
        self.decode_threads = decode.num_warps * 32
        self.per_cta = self.threads // self.decode_threads  # decode CTAs per CTA of the one launch
        self.per_row = spec.decode.HV * decode.num_tiles  # decode CTAs per batch row
        if spec.one_launch and (decode.views_rows or not policy.one_launch_fits(spec.conv, spec.decode)):
            raise ValueError(f"one launch: {self.per_row} decode CTAs of {self.decode_threads} threads per batch row "
                             f"do not fill whole CTAs of {self.threads} threads")

    @cute.jit
    def __call__(self, *args_and_stream):
        """The tensors of spec.StepArgs, then the stream."""
        *tensors, stream = args_and_stream
        args = StepArgs(*tensors)
        if const_expr(self.spec.one_launch):
            B = args.hidden_states.shape[0]
            grid = self.conv_gate.grid_size(B) + B * (self.per_row // self.per_cta)
            self.kernel(*tensors).launch(grid=[grid, 1, 1], block=[self.threads, 1, 1], stream=stream)
        else:
            self.conv_gate(*args[:len(ConvGateArgs._fields)], stream)
            q, k, v, a, b = self.decode_views(args.qkv_out, args.ba_out)
            self.decode(q, k, v, a, b, args.A_log, args.dt_bias, args.ssm_state, args.state_indices, None, None,
                        None, args.output, *AFTER_OUTPUT, stream)

    @kernel_params(StepArgs._fields)
    @cute.kernel
    def kernel(self, *args):
        """The one launch (module docstring): the tensors of spec.StepArgs, in its order."""
        gmem = StepArgs(*args)
        tid, _, _ = cute.arch.thread_idx()
        B = gmem.hidden_states.shape[0]
        conv_ctas = self.conv_gate.grid_size(B)
        smem = cutlass.memory.SmemAllocator()
        sTicket = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=4)
        if tid == 0:
            sTicket[0] = cute.arch.atomic_add(gmem.sync.iterator + TICKET, Int32(1), sem="relaxed", scope="gpu")
        cute.arch.barrier()
        ticket = sTicket[0]
        warp = cute.arch.warp_idx()
        per_warps = self.decode.num_warps
        self.decode.cta = DecodeCta((ticket - conv_ctas) * self.per_cta + warp // per_warps, B * self.per_row,
                                    tid % self.decode_threads, warp % per_warps,
                                    lambda: self._wait_conv_gate(gmem.sync, conv_ctas))
        if ticket < conv_ctas:
            self._conv_gate_role(gmem, ticket)
        else:
            self._decode_role(gmem)
        self.decode.cta = None
        if tid == 0:
            # Relaxed: a release here would hold the CTA (and the SM slot a later CTA waits for) until
            # its stores land. The counters need no more: a decode CTA counts itself after the fence
            # that ends its wait (a release pattern), so the last count comes after every conv/gate
            # CTA's done count, and the fence below makes the reset follow it.
            grid, _, _ = cute.arch.grid_dim()
            if cute.arch.atomic_add(gmem.sync.iterator + EXIT, Int32(1), sem="relaxed", scope="gpu") == grid - 1:
                cute.arch.fence_acq_rel_gpu()
                for word in cutlass.range_constexpr(EXIT + 1):
                    gmem.sync[word] = Int32(0)

    @cute.jit
    def _conv_gate_role(self, gmem: StepArgs, ticket: Int32):
        """Conv/gate CTA `ticket`, then (every thread's stores done) one release of the done count."""
        self.conv_gate.body(ConvGateArgs(*gmem[:len(ConvGateArgs._fields)]), ticket)
        cute.arch.barrier()
        tid, _, _ = cute.arch.thread_idx()
        if tid == 0:
            # A release is cumulative: the barrier orders every thread's stores before it (one
            # membar; a fence before it would add a second).
            cute.arch.atomic_add(gmem.sync.iterator + DONE, Int32(1), sem="release", scope="gpu")

    @cute.jit
    def _decode_role(self, gmem: StepArgs):
        q, k, v, a, b = self.decode_views(gmem.qkv_out, gmem.ba_out)
        self.decode.body(KernelArgs(q, k, v, a, b, gmem.A_log, gmem.dt_bias, gmem.ssm_state, gmem.state_indices,
                                    output=gmem.output))

    @cute.jit
    def _wait_conv_gate(self, mSync: cute.Tensor, conv_ctas: Int32):
        """Thread 0 waits until every conv/gate CTA has counted itself done: relaxed loads, then one
        fence (with the last load, an acquire pattern). An acquire load per poll would invalidate the
        SM's L1 each time (CCTL.IVALL), under the conv/gate CTAs that share the SM. The CTA barrier
        then holds every thread's workspace loads behind the fence."""
        tid, _, _ = cute.arch.thread_idx()
        if tid == 0:
            done = cute.arch.load(mSync.iterator + DONE, Int32, sem="relaxed", scope="gpu")
            while done < conv_ctas:
                done = cute.arch.load(mSync.iterator + DONE, Int32, sem="relaxed", scope="gpu")
            cute.arch.fence_acq_rel_gpu()
        cute.arch.barrier()

    def decode_views(self, mQKV: cute.Tensor, mBA: cute.Tensor):
        """q, k [B, 1, H, D] and v [B, 1, HV, D] of the q | k | v rows mQKV [B, qkv_dim] (the packed
        rows of common.packed_heads); b = mBA[..., :HV] and a = mBA[..., HV:] [B, 1, HV] of the b | a
        rows mBA [B, 2 HV], or [parts, B, 1, HV] of its partial sums [parts, B, 2 HV]. The token dim
        is never stepped (T = 1): its stride is 0."""
        H, HV, D = self.spec.conv.H, self.spec.conv.HV, self.spec.conv.D
        q, k, v = packed_heads(mQKV, H, HV, D, D)
        B = mQKV.shape[0]
        if const_expr(self.spec.decode.gate_parts):
            shape, stride = (mBA.shape[0], B, 1, HV), (mBA.stride[0], mBA.stride[1], 0, 1)
        else:
            shape, stride = (B, 1, HV), (mBA.stride[0], 0, 1)
        return q, k, v, tensor_view(mBA, HV, shape, stride), tensor_view(mBA, 0, shape, stride)
