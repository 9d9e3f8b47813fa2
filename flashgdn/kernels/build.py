"""Compile a kernel variant once, against fake tensors, into a TVM-FFI callable.

Batch size and pool size are symbolic, so one compiled function serves every batch. The callable
takes torch tensors (through DLPack) in the order of spec.KernelArgs and launches on the current
torch stream. What is built (kernel class, tile, prefetch, token loop) is policy.BuildConfig's
choice; this module makes the kernel object, the fake arguments and the compile call. It is the
kernel layer's entry point for the API layer and never imports torch.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

from ..spec import (CommitArgs, CommitSpec, ConvGateArgs, ConvGateSpec, KernelArgs, KernelSpec, StepArgs, StepSpec,
                    SYNC_WORDS, vec_elems)
from . import policy
from .common import CUTLASS_DTYPES
from .conv_gate import ConvGate
from .klast import KLastDecode
from .kmajor import KMajorDecode
from .kmtp import KLastMTP
from .kmtp_mma import KLastMTPMma
from .replay_commit import ReplayCommit, ReplayCommitMma
from .step import FusedStep

KERNELS = {cls.__name__: cls for cls in (KLastDecode, KMajorDecode, KLastMTP, KLastMTPMma, ReplayCommit,
                                         ReplayCommitMma)}
AnySpec = Union[KernelSpec, CommitSpec, ConvGateSpec, StepSpec]


def make_kernel(spec: AnySpec, config: Optional[policy.BuildConfig] = None):
    """The kernel object that builds `spec` (with the policy's config unless one is given; a StepSpec
    takes each of its kernels' own)."""
    if isinstance(spec, StepSpec):
        return FusedStep(spec, make_kernel(spec.conv), make_kernel(spec.decode))
    if isinstance(spec, ConvGateSpec):
        return ConvGate(spec, config or policy.ConvGateConfig.for_spec(spec))
    config = config or policy.BuildConfig.for_spec(spec)
    return KERNELS[config.kernel](spec, config)


def _strided(dtype, shape, divisibility: int, inner_static: tuple = (1,)):
    """Fake tensor whose trailing strides are static and whose leading strides are dynamic
    (64-bit, multiples of `divisibility` elements, so 16-byte accesses stay provably aligned)."""
    n_dyn = len(shape) - len(inner_static)
    stride = tuple(cute.sym_int64(divisibility=divisibility) for _ in range(n_dyn)) + tuple(inner_static)
    align = max(divisibility * dtype.width // 8, dtype.width // 8)
    return make_fake_tensor(dtype, shape, stride=stride, assumed_align=align)


def fake_arguments(spec: AnySpec, batch=None):
    """Fake tensors of the variant's arguments (KernelArgs; CommitArgs for a CommitSpec,
    ConvGateArgs for a ConvGateSpec, StepArgs for a StepSpec), batch and pool sizes symbolic (the
    batch size `batch` where given: one symbol for the tensors of two kernels)."""
    if isinstance(spec, CommitSpec):
        return _fake_commit_arguments(spec)
    if isinstance(spec, ConvGateSpec):
        return _fake_conv_gate_arguments(spec, batch)
    if isinstance(spec, StepSpec):
        B = cute.sym_int()
        decode = fake_arguments(spec.decode, B)
        return StepArgs(*_fake_conv_gate_arguments(spec.conv, B), decode.A_log, decode.dt_bias, decode.state,
                        decode.output, make_fake_tensor(cutlass.Int32, (SYNC_WORDS,), stride=(1,), assumed_align=16))
    io = CUTLASS_DTYPES[spec.io_dtype]
    st = CUTLASS_DTYPES[spec.state_dtype]
    gate = CUTLASS_DTYPES[spec.gate_dtype]
    idx_t = CUTLASS_DTYPES[spec.index_dtype] if spec.pool else None
    B = cute.sym_int() if batch is None else batch
    T, H, HV, K, V = spec.T, spec.H, spec.HV, spec.K, spec.V
    # Flat rows: the B·T tokens of B sequences in dim 1 (B itself where T = 1, else a symbol of their
    # own: B is the slot indices'). Varlen: the tokens of all sequences in dim 1 ([1, total, ...]).
    tokens = B if T == 1 else cute.sym_int()
    lead = (1, cute.sym_int()) if spec.varlen else (1, tokens) if spec.row_form == "flat" else (B, T)
    io_div = vec_elems(spec.io_dtype)
    st_div = vec_elems(spec.state_dtype)
    rows, cols = (V, K) if spec.layout == "klast" else (K, V)
    inner = (rows * cols, cols, 1)
    # A strided state (a padded pool) keeps only its last dim static.
    state_inner = (1,) if spec.strided_state else inner
    raw_gates = not spec.precomputed_gates
    beta = CUTLASS_DTYPES[spec.beta_dtype or spec.gate_dtype]
    # Packed and flat rows (KernelSpec.row_form): the engine's tensors as they are, its slot indices of
    # any stride; the launch views them (DecodeKernel.batch_rows).
    packed, engine_rows = spec.row_form == "packed", spec.row_form != "batch"
    parts = (spec.gate_parts,) if spec.gate_parts else ()  # the split projection's partial sums
    # vLLM's gate rows: [rows >= B·T, HV], rows a symbol of their own
    gate_shape = ((tokens, HV) if engine_rows else (cute.sym_int(), HV) if spec.gate_rows else (*parts, *lead, HV))
    # vLLM's slot table and accepted counts may have rows past the batch (padded to its CUDA-graph
    # batch): rows of their own (the grid is q's batch, or cu_seqlens' sequences, and reads no row past it)
    own_rows = spec.vllm_slots and not engine_rows
    slot_rows, accepted_rows = (cute.sym_int(), cute.sym_int()) if own_rows else (B, B)

    def slot_index(rows=B):
        if engine_rows or spec.slot_column:
            return _strided(idx_t, (rows,), 1, inner_static=())
        return make_fake_tensor(idx_t, (rows,), stride=(1,))

    return KernelArgs(
        q=_strided(io, (B, 2 * H * K + HV * V) if packed else (*lead, H, K), io_div),
        k=None if packed else _strided(io, (*lead, H, K), io_div),
        v=None if packed else _strided(io, (*lead, HV, V), io_div),
        a=_strided(gate, gate_shape, 1),
        b=_strided(beta, gate_shape, 1),
        A_log=make_fake_tensor(cutlass.Float32, (HV,), stride=(1,), assumed_align=4) if raw_gates else None,
        dt_bias=make_fake_tensor(CUTLASS_DTYPES[spec.dt_bias_dtype], (HV,), stride=(1,)) if raw_gates else None,
        state=_strided(st, (cute.sym_int() if spec.pool else B, HV, rows, cols), st_div, inner_static=state_inner),
        # vLLM's slots come from token_state_indices alone
        state_indices=slot_index() if spec.pool and not spec.vllm_slots else None,
        output_state_indices=make_fake_tensor(idx_t, (B,), stride=(1,)) if spec.has_out_indices else None,
        accepted_tokens=(make_fake_tensor(CUTLASS_DTYPES[spec.accepted_dtype], (accepted_rows,), stride=(1,))
                         if spec.has_accepted else None),
        intermediate_states=(
            _strided(st, (cute.sym_int(), cute.sym_int(), HV, rows, cols), st_div, inner_static=inner)
            if spec.has_intermediate else None
        ),
        output=_strided(CUTLASS_DTYPES[spec.output_dtype], (*lead, HV, V), 1),
        # vLLM's slots are the engine's index tensor, of its index dtype
        token_state_indices=None if not spec.has_token_slots else (
            slot_index(slot_rows) if engine_rows or spec.slot_column
            else _strided(idx_t if spec.vllm_slots else cutlass.Int32, (slot_rows, T), 1)),
        cu_seqlens=make_fake_tensor(CUTLASS_DTYPES[spec.varlen], (cute.sym_int(),), stride=(1,)) if spec.varlen else None,
        **(_fake_windows(spec, (cute.sym_int(),)) if spec.replay_cache else {}),
        # SGLang's row table: its whole [>= B] index vector, of any stride
        intermediate_indices=(_strided(CUTLASS_DTYPES[spec.intermediate_rows], (cute.sym_int(),), 1, inner_static=())
                              if spec.intermediate_rows else None),
        # SGLang's retrieve_parent_token [>= B, T], of any strides
        parent_tokens=(_strided(CUTLASS_DTYPES[spec.tree_parents], (cute.sym_int(), T), 1, inner_static=())
                       if spec.tree_parents else None),
    )


def _fake_conv_gate_arguments(spec: ConvGateSpec, batch=None) -> ConvGateArgs:
    """Fake tensors of a conv/gate variant's arguments: batch (`batch` where given) and pool sizes
    symbolic, the conv weight, bias and state strides all dynamic (any layout), w_ba's rows whole
    column blocks."""
    bf16 = cutlass.BFloat16
    B, P = cute.sym_int() if batch is None else batch, cute.sym_int()
    C, W = spec.qkv_dim, spec.width
    parts = policy.ConvGateConfig.for_spec(spec).partial_sums
    return ConvGateArgs(
        hidden_states=_strided(bf16, (B, spec.hidden), 1),
        w_ba=_strided(bf16, (spec.hidden, 2 * spec.HV), spec.gate_vec),
        mixed_qkv=_strided(bf16, (B, C), 1),
        conv_weight=_strided(bf16, (C, W), 1, inner_static=()),
        conv_bias=_strided(bf16, (C,), 1, inner_static=()) if spec.has_bias else None,
        conv_state=_strided(bf16, (P, C, W - 1), 1, inner_static=()),
        state_indices=make_fake_tensor(cutlass.Int32, (B,), stride=(1,)),
        qkv_out=_strided(bf16, (B, C), vec_elems("bfloat16")),
        # the split regime's fp32 partial sums, else the bf16 projection
        ba_out=(_strided(cutlass.Float32, (parts, B, 2 * spec.HV), 1) if parts
                else _strided(bf16, (B, 2 * spec.HV), 1)),
    )


def _fake_windows(spec: AnySpec, leading: tuple) -> dict:
    """Fake ReplaySSM windows [*leading, ...]: replay_v [.., HV, T, V], replay_k [.., H, T, K]
    (bf16), replay_g and replay_beta [.., HV, T] (fp32); the leading dims' strides dynamic."""
    T, H, HV, K, V = spec.T, spec.H, spec.HV, spec.K, spec.V
    bf16_div = vec_elems("bfloat16")
    return dict(
        replay_v=_strided(cutlass.BFloat16, (*leading, HV, T, V), bf16_div, inner_static=(T * V, V, 1)),
        replay_k=_strided(cutlass.BFloat16, (*leading, H, T, K), bf16_div, inner_static=(T * K, K, 1)),
        replay_g=_strided(cutlass.Float32, (*leading, HV, T), 1, inner_static=(T, 1)),
        replay_beta=_strided(cutlass.Float32, (*leading, HV, T), 1, inner_static=(T, 1)),
    )


def _fake_commit_arguments(spec: CommitSpec) -> CommitArgs:
    """Checkpoint [L, P, HV, V, K] and windows with L, P and B symbolic, their layer and slot
    strides dynamic (multiples of 16 bytes for the checkpoint and the bf16 windows)."""
    B = cute.sym_int()
    leading = (cute.sym_int(), cute.sym_int())
    st_div = vec_elems(spec.state_dtype)
    index = lambda: make_fake_tensor(cutlass.Int32, (B,), stride=(1,))  # noqa: E731
    state = _strided(CUTLASS_DTYPES[spec.state_dtype], (*leading, spec.HV, spec.V, spec.K), st_div,
                     inner_static=(spec.V * spec.K, spec.K, 1))
    return CommitArgs(
        state=state, **_fake_windows(spec, leading), state_indices=index(), accept_lens=index(),
        track_state_indices=index() if spec.has_track else None, track_steps=index() if spec.has_track else None,
    )


def compile_kernel(spec: AnySpec, *, keep_dir: Optional[str] = None) -> Callable:
    """Compile `spec` (a KernelSpec, CommitSpec, ConvGateSpec or StepSpec) for `spec.arch`; returns the TVM-FFI
    callable (no GPU needed to compile)."""
    options = f"--enable-tvm-ffi --gpu-arch={spec.arch}"
    if keep_dir:
        options += f" --keep-ptx --keep-cubin --dump-dir={keep_dir}"
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(make_kernel(spec), *fake_arguments(spec), stream, options=options)


def export_object(fn, path: str, symbol: str) -> None:
    """Write compiled function `fn` as an object file whose one visible symbol is its TVM-FFI
    entry `__tvm_ffi_<symbol>`: the internal symbols of two variants loaded into one process can
    never bind to each other."""
    fn.export_to_c(path, function_name=symbol, export_only_tvm_ffi_symbols=True)


def runtime_libraries() -> list:
    """The shared libraries an exported object needs at run time (the DSL's runtime, TVM-FFI)."""
    from cutlass.runtime import find_runtime_libraries

    return list(find_runtime_libraries(enable_tvm_ffi=True))


def load_object(path: str, symbol: str) -> Callable:
    """The TVM-FFI function `__tvm_ffi_<symbol>` of an exported object file, linked in process."""
    from cutlass.cute.runtime import load_module

    return getattr(load_module(path, enable_tvm_ffi=True), symbol)


def timed_compile(spec: AnySpec, **kw) -> tuple[Callable, float]:
    start = time.perf_counter()
    fn = compile_kernel(spec, **kw)
    return fn, time.perf_counter() - start
