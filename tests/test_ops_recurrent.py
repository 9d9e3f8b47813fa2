"""CPU tests of the torch.library ops of vLLM's fused_recurrent_gated_delta_rule and
fused_sigmoid_gating_delta_rule_update (flashgdn.ops): their schemas, the graph torch.compile captures
of a call (one op, fake CUDA tensors, varlen and dense), trace-time validation, and that eager calls
skip the op.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashgdn import engines, recurrent
from test_ops import Recorder, fake_cuda, fresh_dynamo  # noqa: F401  (fresh_dynamo: an autouse fixture)
from test_recurrent import LAYOUTS, recurrent_kwargs
from test_recurrent_sigmoid import LAYOUTS as SIGMOID_LAYOUTS
from test_recurrent_sigmoid import sigmoid_kwargs

OP = torch.ops.flashgdn.fused_recurrent_gated_delta_rule
FN = engines.fused_recurrent_gated_delta_rule
SIGMOID_OP = torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update_vllm
SIGMOID_FN = engines.fused_sigmoid_gating_delta_rule_update_vllm
# (function, its op, its valid keyword arguments): each layout of both
CALLS = {**{f"recurrent-{n}": (FN, OP, lambda n=n: recurrent_kwargs(**LAYOUTS[n])) for n in LAYOUTS},
         **{f"sigmoid-{n}": (SIGMOID_FN, SIGMOID_OP, lambda n=n: sigmoid_kwargs(**SIGMOID_LAYOUTS[n]))
            for n in SIGMOID_LAYOUTS}}


def op_nodes(gm, op=OP):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]


def trace(kw, fn=FN):
    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        kw = fake_cuda(kw)
        result = torch.compile(lambda kw: fn(**kw), backend=rec, fullgraph=True)(kw)
    return result, kw, rec.graphs


@pytest.mark.parametrize("op", [OP, SIGMOID_OP], ids=["recurrent", "sigmoid"])
def test_schema_declares_exactly_the_written_arguments(op):
    schema = op.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"initial_state", "o"} and not schema.returns


@pytest.mark.parametrize("call", list(CALLS))
def test_compiled_call_is_one_op_on_fake_cuda(call):
    fn, op, make = CALLS[call]
    kw = make()
    (o, state), fkw, graphs = trace(kw, fn)
    assert len(graphs) == 1 and len(op_nodes(graphs[0], op)) == 1
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


def test_bad_softplus_raises_while_tracing():
    with pytest.raises(Exception, match=r"beta must be > 0"):
        trace(dict(sigmoid_kwargs(), beta=-1.0), SIGMOID_FN)


def test_refused_mode_raises_while_tracing():
    kw = dict(recurrent_kwargs(), inplace_final_state=False)
    with pytest.raises(Exception, match="inplace_final_state=False"):
        trace(kw)


@pytest.mark.parametrize("call", ["recurrent-varlen", "sigmoid-varlen-accepted"])
def test_eager_calls_do_not_go_through_the_op(monkeypatch, call):
    """An eager call runs the eager body (here up to its device check on CPU tensors), never the op."""
    fn, op, make = CALLS[call]
    monkeypatch.setattr(torch.ops.flashgdn, op.__name__, lambda *a: pytest.fail("the op ran in an eager call"))
    bodies = []
    monkeypatch.setattr(recurrent, "_recurrent", lambda *a: bodies.append(a))
    kw = make()
    o, state = fn(**kw)
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
