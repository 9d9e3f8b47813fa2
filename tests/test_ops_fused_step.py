"""CPU tests of the torch.library op of gdn_fused_decode_step (flashgdn.ops): its schema, the graph
torch.compile captures (one op, fake CUDA tensors), trace-time validation, a dynamic batch, that
eager calls skip the op, and the op run for real (AOT functionalization, inductor, torch.export,
opcheck) with flashgdn.reference in place of the two launches. The cases are shared with
tests/test_ops_fused_step_gpu.py, which runs them on the kernels.
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashgdn
from flashgdn import fused_step
from flashgdn import reference as ref
from flashgdn import validation as val
from helpers import BF16, F32, clone_fused, make_fused_inputs
from test_ops import Recorder, fake_cuda, fresh_dynamo  # noqa: F401  (fresh_dynamo: an autouse fixture)

OP = torch.ops.flashgdn.gdn_fused_decode_step
WRITES = {"conv_state", "ssm_state", "out"}
GEOMETRY = dict(B=3, H=2, HV=4, D=64, hidden=128)

# (id, make_fused_inputs arguments besides GEOMETRY, `out` given): SD and DS conv pools, a padding
# row, no conv bias, a bf16 state with a padded slot stride, a padded conv page stride.
CASES = {
    "sd": (dict(slots=[5, -1, 2], P=7), False),
    "ds-out": (dict(conv_layout="DS", bias=False, P=7), True),
    "bf16-padded": (dict(state_dtype=BF16, slot_pad=16, page_pad=8, width=3, slots=[0, 6, 3], P=7), True),
}


def case_kwargs(name, device="cpu", seed=0):
    """gdn_fused_decode_step's keyword arguments of case `name` (the same values for the same seed)."""
    extra, with_out = CASES[name]
    kw = make_fused_inputs(**GEOMETRY, **extra, device=device, seed=seed)
    kw["use_qk_l2norm"] = True
    if with_out:
        # Poisoned: every row is written (a padding row with zeros).
        kw["out"] = torch.full((GEOMETRY["B"], 1, GEOMETRY["HV"], GEOMETRY["D"]), float("nan"), dtype=BF16,
                               device=device)
    return kw


def op_args(kw):
    """The op's positional arguments for the call `kw` (its output allocated when not given)."""
    names = [a.name for a in OP.default._schema.arguments]
    kw = dict(kw)
    if kw.get("out") is None:
        kw["out"] = torch.empty((GEOMETRY["B"], 1, GEOMETRY["HV"], GEOMETRY["D"]), dtype=BF16,
                                device=kw["hidden_states"].device)
    return tuple(kw[n] for n in names)


def op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (OP, OP.default)]


def trace(kw, **compile_kw):
    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        kw = fake_cuda(kw)
        result = torch.compile(lambda kw: flashgdn.gdn_fused_decode_step(**kw), backend=rec, fullgraph=True,
                               **compile_kw)(kw)
    return result, kw, rec.graphs


# ----------------------------------------------------------------------------- schema


def test_schema_declares_exactly_the_written_arguments():
    schema = OP.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == WRITES and not schema.returns
    assert [a.name for a in schema.arguments] == list(inspect.signature(flashgdn.gdn_fused_decode_step).parameters)


def test_import_registers_the_op_without_cute():
    code = ("import sys, torch, flashgdn; assert 'cutlass' not in sys.modules, 'CuTe imported'; "
            "torch.ops.flashgdn.gdn_fused_decode_step.default")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- traced graphs


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_call_is_one_op_on_fake_cuda(name):
    kw = case_kwargs(name)
    (out, conv_state, ssm_state), fkw, graphs = trace(kw)
    assert len(graphs) == 1 and len(op_nodes(graphs[0])) == 1
    assert conv_state is fkw["conv_state"] and ssm_state is fkw["ssm_state"]
    assert out.shape == (3, 1, 4, 64) and out.dtype == BF16 and out.device.type == "cuda"
    if kw.get("out") is not None:
        assert out is fkw["out"]


def test_two_layers_are_two_ops():
    a, b = case_kwargs("sd", seed=1), case_kwargs("ds-out", seed=2)

    def step(a, b):
        o1 = flashgdn.gdn_fused_decode_step(**a)[0]
        o2 = flashgdn.gdn_fused_decode_step(**b)[0]
        return o1.float().sum() + o2.float().sum()

    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.compile(step, backend=rec, fullgraph=True)(fake_cuda(a), fake_cuda(b))
    assert len(rec.graphs) == 1 and len(op_nodes(rec.graphs[0])) == 2


def test_scale_zero_reaches_the_op_as_none():
    kw = dict(case_kwargs("sd"), scale=0.0)
    _, _, graphs = trace(kw)
    node, = op_nodes(graphs[0])
    assert node.args[8] is None  # FlashInfer's rule: 0.0 means "unset"


def test_batch_size_stays_dynamic():
    rec = Recorder()
    compiled = torch.compile(lambda kw: flashgdn.gdn_fused_decode_step(**kw), backend=rec, fullgraph=True,
                             dynamic=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for n in (5, 7, 9):
            kw = make_fused_inputs(n, 2, 4, 64, 128, P=32, seed=n)
            out, _, _ = compiled(fake_cuda(kw))
            assert out.shape[0] == n
    assert len(rec.graphs) == 1
    node, = op_nodes(rec.graphs[0])
    assert isinstance(node.args[0].meta["example_value"].shape[0], torch.SymInt)


@pytest.mark.parametrize("arg,bad,match", [
    ("ssm_state", lambda t: t.half(), r"ssm_state must have dtype"),
    ("state_indices", lambda t: t.long(), r"state_indices must have dtype int32"),
    ("conv_state", lambda t: t[:, :, :2], r"conv_state must have shape"),
    ("w_ba", lambda t: t[:, :6], r"w_ba must have shape"),
    ("out", lambda t: torch.ones(3, 1, 4, 64), r"out must have dtype bfloat16"),
])
def test_bad_input_raises_its_error_while_tracing(arg, bad, match):
    kw = case_kwargs("sd")
    kw[arg] = bad(kw.get(arg))
    with pytest.raises(Exception, match=match):
        trace(kw)


def test_fake_cpu_tensors_fail_the_device_check_while_tracing():
    kw = case_kwargs("sd")
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match=r"must be a CUDA tensor"):
            torch.compile(lambda kw: flashgdn.gdn_fused_decode_step(**kw), backend=Recorder(), fullgraph=True)(kw)


# ----------------------------------------------------------------------------- eager path


def test_eager_call_does_not_go_through_the_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through the custom op")

    monkeypatch.setattr(torch.ops.flashgdn, "gdn_fused_decode_step", refuse)
    with pytest.raises(ValueError, match=r"must be a CUDA tensor"):
        flashgdn.gdn_fused_decode_step(**case_kwargs("sd"))


def test_op_runs_the_eager_code():
    with pytest.raises(ValueError, match=r"must be a CUDA tensor"):
        OP(*op_args(case_kwargs("ds-out")))


# ----------------------------------------------------------------------------- the op run for real on CPU


def _reference_launch(plan, *args):
    """fused_step._launch's stand-in: flashgdn.reference on the call's tensors, in place."""
    ref.gdn_fused_decode_step(*args)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """CPU tensors pass the device check and the launches run the reference (a fresh memo of
    validated signatures, which would otherwise keep these CPU plans)."""
    monkeypatch.setattr(val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(fused_step, "_launch", _reference_launch)
    monkeypatch.setattr(fused_step, "_VALIDATED", {})


def check_compiled_equals_eager(name, device, backend):
    """Two steps of case `name`, eager and through torch.compile(fullgraph=True): the same output
    and both pools, bit for bit, and the same tensors returned."""
    eager_kw, comp_kw = case_kwargs(name, device, seed=1), case_kwargs(name, device, seed=1)
    compiled = torch.compile(lambda kw: flashgdn.gdn_fused_decode_step(**kw), backend=backend, fullgraph=True)
    for step in range(2):  # the second step starts from the updated pools
        out_e, conv_e, ssm_e = flashgdn.gdn_fused_decode_step(**eager_kw)
        out_c, conv_c, ssm_c = compiled(comp_kw)
        assert conv_c is comp_kw["conv_state"] and ssm_c is comp_kw["ssm_state"]
        assert conv_e is eager_kw["conv_state"] and ssm_e is eager_kw["ssm_state"]
        if comp_kw.get("out") is not None:
            assert out_c is comp_kw["out"]
        assert out_c.dtype == out_e.dtype and torch.equal(out_c, out_e), f"output, step {step}"
        for n in ("conv_state", "ssm_state"):
            assert torch.equal(comp_kw[n], eager_kw[n]), f"{n}, step {step}"
    assert not torch.isnan(out_c.float()).any()
    padding = comp_kw["state_indices"] < 0
    assert torch.equal(out_c[padding], torch.zeros_like(out_c[padding]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager_on_cpu(name, backend, cpu_kernels):
    check_compiled_equals_eager(name, "cpu", backend)


def test_export_runs_the_op(cpu_kernels):
    kw = case_kwargs("sd", seed=2)
    tensors = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    others = {n: t for n, t in kw.items() if not isinstance(t, torch.Tensor)}

    class Step(torch.nn.Module):
        def forward(self, tensors):
            return flashgdn.gdn_fused_decode_step(**tensors, **others)[0]

    ep = torch.export.export(Step(), (tensors,))
    assert len(op_nodes(ep.graph_module)) == 1
    kw_e, kw_x = case_kwargs("sd", seed=2), case_kwargs("sd", seed=2)
    out_e = flashgdn.gdn_fused_decode_step(**kw_e)[0]
    out_x = ep.module()({n: t for n, t in kw_x.items() if isinstance(t, torch.Tensor)})
    assert torch.equal(out_x, out_e)
    for n in ("conv_state", "ssm_state"):
        assert torch.equal(kw_x[n], kw_e[n])


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_on_cpu(name, cpu_kernels):
    """torch.library.opcheck (schema vs actual mutations, fake vs real, AOT dispatch with static
    and dynamic shapes) with the reference as the kernels."""
    torch.library.opcheck(OP.default, op_args(case_kwargs(name, seed=3)))


def test_reference_stand_in_matches_the_reference(cpu_kernels):
    """The stand-in writes what the reference computes (so the tests above compare real values)."""
    kw = case_kwargs("ds-out", seed=4)
    expect = clone_fused(kw)
    expect["out"] = kw["out"].clone()
    out = flashgdn.gdn_fused_decode_step(**kw)[0]
    ref.gdn_fused_decode_step(**expect)
    assert torch.equal(out, expect["out"]) and torch.equal(kw["ssm_state"], expect["ssm_state"])
    assert out.dtype == BF16 and kw["ssm_state"].dtype == F32
