"""The fused decode step's two kernels in one compiled function (spec.StepSpec): the conv/gate
kernel (conv_gate.py), then the K-last decode (klast.py) on views of the workspace rows the first
one writes, launched back to back on the call's stream, the decode as a programmatic dependent
where its spec says so (KernelSpec.pdl_wait).

One host call instead of two: the TVM-FFI function checks every tensor of both launches before
either runs, and the views the decode reads are built here, in the compiled code, not as torch
views per call. Each kernel's code is the one its own build generates (the views carry the
strides and the alignment the decode's own fake arguments declare)."""
from __future__ import annotations

import cutlass.cute as cute
from cutlass import const_expr

from ..spec import AFTER_OUTPUT, ConvGateArgs, StepArgs, StepSpec
from .common import packed_heads, tensor_view


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

    @cute.jit
    def __call__(self, *args_and_stream):
        """The tensors of spec.StepArgs, then the stream."""
        *tensors, stream = args_and_stream
        args = StepArgs(*tensors)
        self.conv_gate(*args[:len(ConvGateArgs._fields)], stream)
        q, k, v, a, b = self.decode_views(args.qkv_out, args.ba_out)
        self.decode(q, k, v, a, b, args.A_log, args.dt_bias, args.ssm_state, args.state_indices, None, None, None,
                    args.output, *AFTER_OUTPUT, stream)

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
