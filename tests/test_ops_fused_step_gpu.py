"""GPU tests of the torch.library op of gdn_fused_decode_step with the real kernels:
torch.library.opcheck, and torch.compile(fullgraph=True) against eager, bit for bit, over two
steps (the cases of tests/test_ops_fused_step.py: SD and DS conv pools, a padding row, conv bias
or none, a bf16 state with padded slot and page strides, output given and not).
tests/test_fused_step_gpu.py checks the eager results against the fp64 reference."""
from __future__ import annotations

import pytest
import torch

from test_ops_fused_step import CASES, OP, case_kwargs, check_compiled_equals_eager, fresh_dynamo, op_args  # noqa: F401

pytestmark = pytest.mark.gpu  # fresh_dynamo: an autouse fixture, active here by its import


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    """Schema against the mutations the kernels make, fake against real, AOT dispatch with static
    and dynamic shapes, autograd registration."""
    torch.library.opcheck(OP.default, op_args(case_kwargs(name, "cuda", seed=3)))


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(name, backend):
    check_compiled_equals_eager(name, "cuda", backend)
