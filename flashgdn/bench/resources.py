"""What `flashgdn-bench --compile-only` reports about a compiled kernel variant besides its compile
time: the kernel class that builds it, its dynamic shared memory and its registers."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Optional

# cudaLaunchConfig_t as the compiled host code lays it out: grid, block, dynamicSmemBytes, stream,
# attributes, number of attributes.
LAUNCH_CONFIG = "!llvm.struct<(array<3 x i32>, array<3 x i32>, i64, ptr, ptr, i32)>"
DYNAMIC_SMEM_FIELD = "array<i32: 0, 2>"


def kernel_name(spec) -> str:
    """Name of the kernel class that builds `spec` (KLastDecode, KLastMTP, KLastMTPMma, KMajorDecode;
    ConvGate for a ConvGateSpec; "ConvGate + KLastDecode" for a StepSpec, in launch order, and
    "FusedStep(ConvGate, KLastDecode)" for a one-launch StepSpec: one kernel of both)."""
    from ..spec import ConvGateSpec, StepSpec

    if isinstance(spec, StepSpec):
        if spec.one_launch:
            return f"FusedStep({kernel_name(spec.conv)}, {kernel_name(spec.decode)})"
        return f"{kernel_name(spec.conv)} + {kernel_name(spec.decode)}"
    if isinstance(spec, ConvGateSpec):  # one kernel class, no build policy of the decode's
        from ..kernels.build import make_kernel

        return type(make_kernel(spec)).__name__
    try:
        from ..kernels.policy import BuildConfig
    except ImportError:  # a kernel layer without the build policy: ask the builder itself
        from ..kernels.build import make_kernel

        return type(make_kernel(spec)).__name__
    return BuildConfig.for_spec(spec).kernel


def dynamic_smem_bytes(compiled) -> Optional[int]:
    """Dynamic shared memory (bytes) a `cute.compile` result launches its kernel with, or None.

    The DSL sizes it at compile time from the kernel's SmemAllocator (the kernels launch without an
    explicit size) and the compiled host code stores it as a constant into the launch config; the
    PTX and the cubin do not hold it. Read from there, in the compiled function's `ir_module`."""
    module = getattr(compiled, "ir_module", None)
    if module is None:
        return None
    from cutlass._mlir import ir

    sizes = []

    def visit(op):
        if op.name == "llvm.store":
            value, ptr = (getattr(o.owner, "operation", None) for o in op.operands[:2])
            if (ptr is not None and ptr.name == "llvm.getelementptr"
                    and str(ptr.attributes["elem_type"]) == LAUNCH_CONFIG
                    and str(ptr.attributes["rawConstantIndices"]) == DYNAMIC_SMEM_FIELD
                    and value is not None and value.name == "llvm.mlir.constant"):
                sizes.append(ir.IntegerAttr(value.attributes["value"]).value)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return max(sizes) if sizes else None


def find_ptxas() -> Optional[str]:
    """ptxas on PATH, else under $CUDA_HOME or $CUDA_PATH, else from a pip wheel (nvidia-cuda-nvcc)."""
    found = shutil.which("ptxas")
    if found:
        return found
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates = [os.path.join(r, "bin", "ptxas") for r in roots]
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "bin", "ptxas")))
    except ImportError:
        pass
    return next((p for p in candidates if os.access(p, os.X_OK)), None)


def ptx_registers(ptx_path: str, arch: str) -> str:
    """Registers per thread of each kernel of a .ptx (with spill bytes when it spills), from
    `ptxas -v`; "n/a" without a ptxas that reads it."""
    ptxas = find_ptxas()
    if ptxas is None:
        return "n/a"
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull],
                         capture_output=True, text=True, timeout=300)
    if res.returncode:
        return "n/a"
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", res.stderr)] + [0] * len(regs)
    return "/".join(f"{r} (spill {s} B)" if s else r for r, s in zip(regs, spills)) or "n/a"
