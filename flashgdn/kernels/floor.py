"""The host-side floor of a compiled call: one TVM-FFI function that launches `launches` kernels
doing nothing (one warp each) on the environment stream, taking `tensors` one-element fp32 tensors
(which it checks as every compiled function checks its arguments, and does not read). Timed beside
flashgdn's calls (flashgdn-bench --host), it is what a call that makes that many launches with that
many tensors pays before its own Python: the pretranspose pool call passes 10 tensors to one launch,
the fused step 14 to two, or to one (StepSpec.one_launch).
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
    def __call__(self, *tensors_and_stream):
        *_, stream = tensors_and_stream
        for _ in cutlass.range_constexpr(self.launches):
            self.kernel().launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self):
        pass


def compile_floor(launches: int, arch: str, tensors: int = 1):
    """EmptyLaunches(launches) compiled for `arch` into a TVM-FFI callable of `tensors` fp32 tensors
    of one element (no GPU needed to compile)."""
    if tensors < 1:
        raise ValueError(f"tensors must be at least 1, got {tensors}")
    fakes = [make_fake_tensor(cutlass.Float32, (1,), stride=(1,)) for _ in range(tensors)]
    return cute.compile(EmptyLaunches(launches), *fakes, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=f"--enable-tvm-ffi --gpu-arch={arch}")
