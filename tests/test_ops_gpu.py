"""GPU tests of the torch.library ops of flashgdn.ops with the real kernels: torch.library.opcheck
of each op, and torch.compile(fullgraph=True) against eager, bit for bit (the cases of
tests/test_ops.py: dense and pool states, T = 1 and MTP with intermediate buffers, per-token
slots, accepted counts, padding rows, a padded pool, output given and not)."""
from __future__ import annotations

import pytest
import torch

from test_ops import CASES, case_call, check_compiled_equals_eager, fresh_dynamo, op_call  # noqa: F401

pytestmark = pytest.mark.gpu  # fresh_dynamo: an autouse fixture, active here by its import


@pytest.mark.parametrize("name", CASES)
def test_opcheck(name):
    """Schema against the mutations the kernel makes, fake against real, AOT dispatch with
    static and dynamic shapes, autograd registration."""
    op, args = op_call(*case_call(name, "cuda", seed=3)[:2])
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("name", CASES)
def test_compiled_equals_eager(name, backend):
    check_compiled_equals_eager(name, "cuda", backend)
