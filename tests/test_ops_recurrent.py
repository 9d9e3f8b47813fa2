"""CPU tests of the torch.library op of vLLM's fused_recurrent_gated_delta_rule (flashgdn.ops): its
schema, the graph torch.compile captures of a call (one op, fake CUDA tensors, varlen and dense),
trace-time validation, and that eager calls skip the op.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashgdn import engines, recurrent
from test_ops import Recorder, fake_cuda, fresh_dynamo  # noqa: F401  (fresh_dynamo: an autouse fixture)
from test_recurrent import LAYOUTS, recurrent_kwargs

OP = torch.ops.flashgdn.fused_recurrent_gated_delta_rule
FN = engines.fused_recurrent_gated_delta_rule


def op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (OP, OP.default)]


def trace(kw):
    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        kw = fake_cuda(kw)
        result = torch.compile(lambda kw: FN(**kw), backend=rec, fullgraph=True)(kw)
    return result, kw, rec.graphs


def test_schema_declares_exactly_the_written_arguments():
    schema = OP.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"initial_state", "o"} and not schema.returns


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_call_is_one_op_on_fake_cuda(layout):
    kw = recurrent_kwargs(**LAYOUTS[layout])
    (o, state), fkw, graphs = trace(kw)
    assert len(graphs) == 1 and len(op_nodes(graphs[0])) == 1
    assert state is fkw["initial_state"]
    assert o.shape == kw["v"].shape and o.dtype == kw["q"].dtype and o.device.type == "cuda"


def test_two_calls_are_two_ops():
    a, b = recurrent_kwargs(seed=1), recurrent_kwargs(seed=2, varlen=False)

    def step(a, b):
        return FN(**a)[0].float().sum() + FN(**b)[0].float().sum()

    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.compile(step, backend=rec, fullgraph=True)(fake_cuda(a), fake_cuda(b))
    assert len(rec.graphs) == 1 and len(op_nodes(rec.graphs[0])) == 2


def test_bad_input_raises_its_error_while_tracing():
    kw = recurrent_kwargs()
    kw["g"] = kw["g"][..., :-1]
    with pytest.raises(Exception, match=r"g must have shape"):
        trace(kw)


def test_refused_mode_raises_while_tracing():
    kw = dict(recurrent_kwargs(), inplace_final_state=False)
    with pytest.raises(Exception, match="inplace_final_state=False"):
        trace(kw)


def test_eager_calls_do_not_go_through_the_op(monkeypatch):
    """An eager call runs the eager body (here up to its device check on CPU tensors), never the op."""
    monkeypatch.setattr(torch.ops.flashgdn, "fused_recurrent_gated_delta_rule",
                        lambda *a: pytest.fail("the op ran in an eager call"))
    bodies = []
    monkeypatch.setattr(recurrent, "_recurrent", lambda *a: bodies.append(a))
    kw = recurrent_kwargs()
    o, state = FN(**kw)
    assert len(bodies) == 1 and bodies[0][-1] is o and state is kw["initial_state"]


# ----------------------------------------------------------------------------- on the GPU


def _cuda_kwargs(layout, seed):
    """The CPU case `layout` on the GPU (the same values for the same seed)."""
    kw = recurrent_kwargs(seed=seed, **LAYOUTS[layout])
    return {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}


def _with_strides(kw):
    """`kw` with the pool copied at its own (padded) strides: calls on it write only the copy."""
    s = kw["initial_state"]
    pool = torch.empty_strided(s.shape, s.stride(), dtype=s.dtype, device=s.device)
    return dict(kw, initial_state=pool.copy_(s))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_on_the_kernels(layout):
    kw = _cuda_kwargs(layout, seed=3)
    o = torch.empty(kw["v"].shape, dtype=kw["q"].dtype, device="cuda")
    args = (kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], kw["scale"], kw["initial_state"], kw["cu_seqlens"],
            kw["ssm_state_indices"], kw["num_accepted_tokens"], kw["use_qk_l2norm_in_kernel"], o)
    torch.library.opcheck(OP.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_equals_eager_on_the_kernels(layout):
    kw = _cuda_kwargs(layout, seed=4)
    eager = _with_strides(kw)
    o_eager, _ = FN(**eager)
    compiled = _with_strides(kw)
    o_compiled, _ = torch.compile(lambda kw: FN(**kw), fullgraph=True)(compiled)
    assert torch.equal(torch.nan_to_num(o_compiled), torch.nan_to_num(o_eager))
    assert torch.equal(compiled["initial_state"], eager["initial_state"])
