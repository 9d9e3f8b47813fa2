"""The launch's views of the engines' rows (kernels.decode_kernel.DecodeKernel.batch_rows: KernelSpec.row_form,
gate_rows, slot_column), traced on CPU: with fake tensors of static shapes and strides the views'
layouts are Python values while the launch is traced, and each must equal the torch view of the same
tensor that the CPU tests' reference launch takes (helpers.batch_rows): shapes, and strides where a
dim is stepped (size > 1). The kernels' code does not depend on these values (their strides are
launch parameters), so this checks what a GPU run of the new forms would otherwise be the first to see.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")

import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_tensor  # noqa: E402

from flashgdn import validation as val  # noqa: E402
from flashgdn.kernels.build import make_kernel  # noqa: E402
from flashgdn.kernels.common import CUTLASS_DTYPES  # noqa: E402
from flashgdn.spec import KernelArgs  # noqa: E402
from helpers import batch_rows, strided_view  # noqa: E402
from test_compile import spec  # noqa: E402

BF16, F32, I32 = torch.bfloat16, torch.float32, torch.int32
N, H, HV, K = 3, 2, 4, 64
WIDTH = 2 * H * K + HV * K  # one token's q | k | v


def _fake(t):
    if t is None:
        return None
    return make_fake_tensor(CUTLASS_DTYPES[val.dtype_name(t.dtype)], tuple(t.shape), stride=tuple(t.stride()),
                            assumed_align=t.element_size())


def _launch_views(s, args: KernelArgs) -> dict:
    """(shape, stride) of each tensor of the kernel's arguments, as the launch of spec `s` views `args`."""
    kernel, seen = make_kernel(s), {}

    def record(views):  # plain Python, outside the traced function's control flow
        for name, view in zip(KernelArgs._fields, views):
            if view is not None:
                seen[name] = (tuple(view.shape), tuple(view.stride))

    @cute.jit
    def trace(*tensors):
        record(kernel.batch_rows(KernelArgs(*tensors)))

    cute.compile(trace, *(_fake(t) for t in args))
    return seen


def _stepped(shape, stride):
    """The strides of the dims of more than one element (a size-1 dim's stride is never used)."""
    return tuple(shape), tuple(st for n, st in zip(shape, stride) if n > 1)


def _rows(T):
    """q, k, v [1, N * T, ...] as views of SGLang's projection (row stride past its width), and the
    output [1, N * T, HV, K]."""
    row = WIDTH + 16
    qkv = [strided_view((1, N * T, heads, K), (N * T * row, row, K, 1), BF16) for heads in (H, H, HV)]
    return dict(zip("qkv", qkv), output=strided_view((1, N * T, HV, K), (N * T * HV * K, HV * K, K, 1), BF16))


def _gates(rows):
    """b and a [rows, HV], column blocks of one [rows, 2 HV + 8] projection."""
    return {name: strided_view((rows, HV), (2 * HV + 8, 1), BF16) for name in "ba"}


CASES = {
    # SGLang's decode and target verify in its varlen layout
    "flat-decode": lambda: (dict(index_dtype="int32", row_form="flat"), 1,
                            dict(**_rows(1), **_gates(N), state_indices=strided_view((N,), (1,), I32))),
    "flat-verify": lambda: (dict(regime="large", index_dtype="int32", row_form="flat", has_intermediate=True,
                                 intermediate_rows="int32", update_state=False), 4,
                            dict(**_rows(4), **_gates(N * 4), state_indices=strided_view((N,), (1,), I32))),
    # vLLM's packed decode: one row per token, its slots a column of a block table (stride 2)
    "packed-vllm": lambda: (dict(index_dtype="int32", has_token_slots=True, vllm_slots=True, row_form="packed"), 1,
                            dict(q=strided_view((N, WIDTH), (WIDTH + 64, 1), BF16), k=None, v=None,
                                 output=strided_view((N, 1, HV, K), (HV * K, HV * K, K, 1), BF16), **_gates(N),
                                 token_state_indices=strided_view((N,), (2,), I32))),
    # vLLM's sigmoid op: varlen decode with [tokens + 3, HV] gates and [N] slots of stride 2 ...
    "vllm-varlen-decode": lambda: (dict(index_dtype="int32", has_token_slots=True, vllm_slots=True, varlen="int32",
                                        gate_rows=True, slot_column=True), 1,
                                   dict(**_rows(1), **_gates(N + 3), token_state_indices=strided_view((N,), (2,), I32),
                                        cu_seqlens=strided_view((N + 1,), (1,), I32))),
    # ... and a dense verify of 4 tokens per sequence, gates with rows past the tokens
    "vllm-dense-verify": lambda: (dict(regime="large", index_dtype="int32", has_token_slots=True,
                                       vllm_slots=True, gate_rows=True), 4,
                                  dict(q=strided_view((N, 4, H, K), (4 * WIDTH, WIDTH, K, 1), BF16),
                                       k=strided_view((N, 4, H, K), (4 * WIDTH, WIDTH, K, 1), BF16),
                                       v=strided_view((N, 4, HV, K), (4 * WIDTH, WIDTH, K, 1), BF16),
                                       output=strided_view((N, 4, HV, K), (4 * HV * K, HV * K, K, 1), BF16),
                                       **_gates(N * 4 + 2), token_state_indices=strided_view((N, 4), (4, 1), I32))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_launch_views_the_rows_as_torch_does(case):
    kw, T, tensors = CASES[case]()
    s = spec("sm_90a", T=T, H=H, HV=HV, K=K, V=K, **kw)
    tensors.setdefault("state", strided_view((5, HV, K, K), (HV * K * K, K * K, K, 1), F32))
    tensors.setdefault("A_log", strided_view((HV,), (1,), F32))
    tensors.setdefault("dt_bias", strided_view((HV,), (1,), F32))
    if s.has_intermediate:
        tensors.update(intermediate_states=strided_view((N + 1, T, HV, K, K), (T * HV * K * K, HV * K * K, K * K, K, 1),
                                                    F32),
                       intermediate_indices=strided_view((N + 1,), (1,), I32))
    args = KernelArgs(**{f: tensors.get(f) for f in KernelArgs._fields})
    launched = _launch_views(s, args)
    expected = batch_rows(args, val.Problem(N, T, H, HV, K, K))
    for name in ("q", "k", "v", "a", "b", "output", "token_state_indices"):
        want = getattr(expected, name)
        if want is None:
            assert name not in launched, name
            continue
        assert _stepped(*launched[name]) == _stepped(want.shape, want.stride()), name
