"""The host-side floor of a compiled call: one TVM-FFI function that launches `launches` kernels
doing nothing (one warp each) on the environment stream, taking one tensor. Timed beside flashgdn's
calls (flashgdn-bench --host), it is what any call that makes that many launches from one compiled
function pays before its own argument checks and Python: the fused decode step makes two.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream, make_fake_tensor


class EmptyLaunches:
    def __init__(self, launches: int):
        if launches < 1:
            raise ValueError(f"launches must be at least 1, got {launches}")
        self.launches = launches

    @cute.jit
    def __call__(self, mX: cute.Tensor, stream):
        for _ in cutlass.range_constexpr(self.launches):
            self.kernel(mX).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor):
        pass


def compile_floor(launches: int, arch: str):
    """EmptyLaunches(launches) compiled for `arch` into a TVM-FFI callable of one fp32 tensor of one
    element (no GPU needed to compile)."""
    fake = make_fake_tensor(cutlass.Float32, (1,), stride=(1,))
    return cute.compile(EmptyLaunches(launches), fake, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=f"--enable-tvm-ffi --gpu-arch={arch}")
