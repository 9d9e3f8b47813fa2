"""The torch.library ops of flashgdn.engines' packed decodes and SGLang's update (flashgdn.ops):
their schemas, the graph torch.compile captures of a call (one op, fake CUDA tensors), trace-time
validation with the eager messages, that eager calls skip the ops, and on the CPU (the reference
in place of the kernel launch: test_ops.cpu_kernels) that the ops' real implementations, opcheck
and compiled calls give the eager results. The GPU part runs opcheck and compiled-vs-eager on the
kernels.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashgdn import engines, fastpath
from flashgdn import validation as val
from helpers import BF16, F32, same_bits
from test_engines import PACKED_FNS, expect_error, expect_only_device_error, packed_kwargs, sigmoid_kwargs
from test_engines_sglang import verify_kwargs
from test_ops import Recorder, cpu_kernels, fake_cuda, fresh_dynamo, named_args, trace  # noqa: F401  (fixtures)

PACKED_OP = torch.ops.flashgdn.fused_recurrent_gated_delta_rule_packed_decode
SIGMOID_OP = torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update
SIGMOID_FN = engines.fused_sigmoid_gating_delta_rule_update
OPS = {"packed": PACKED_OP, "sigmoid": SIGMOID_OP}
WRITES = {"packed": {"initial_state", "out"}, "sigmoid": {"initial_state_source", "intermediate_states_buffer", "o"}}
PUBLIC = {"packed": engines.fused_recurrent_gated_delta_rule_packed_decode, "sigmoid": SIGMOID_FN}
OP_ONLY = {"packed": {"vllm_padding"}, "sigmoid": {"o"}}  # the op's arguments the function does not have
SIGMOID_LAYOUTS = {"varlen": dict(varlen=True), "batched": dict(varlen=False),
                   "gates-3d": dict(varlen=False, gates_3d=True),
                   # SGLang's target verify: several tokens per sequence, the states into its buffer
                   "verify": dict(verify=True), "verify-batched": dict(verify=True, varlen=False),
                   "verify-tree": dict(verify=True, tree=True)}


def layout_kwargs(layout, **kw):
    """Valid CPU arguments of SGLang's update in one of SIGMOID_LAYOUTS."""
    opts = dict(SIGMOID_LAYOUTS[layout])
    make = verify_kwargs if opts.pop("verify", False) else sigmoid_kwargs
    return make(**opts, **kw)


def written_arg(layout) -> str:
    """The pool or buffer a call in `layout` writes (the verify freezes the pool)."""
    return "intermediate_states_buffer" if SIGMOID_LAYOUTS[layout].get("verify") else "initial_state_source"


def flashgdn_targets(gm):
    """The flashgdn ops a graph calls (overloads as their packets)."""
    targets = []
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            schema = getattr(t, "default", t)._schema
            if schema.name.startswith("flashgdn::"):
                targets.append(getattr(torch.ops.flashgdn, schema.name.split("::")[1]))
    return targets


def op_node(gm):
    node, = (n for n in gm.graph.nodes if n.op == "call_function" and n.target in (PACKED_OP, PACKED_OP.default,
                                                                                   SIGMOID_OP, SIGMOID_OP.default))
    return node


def sigmoid_output(kw):
    """The output a sigmoid call allocates (the op's `o`)."""
    return fastpath.new_output(kw["v"], False)


def packed_op_args(kw, vllm_padding):
    return (kw["mixed_qkv"], kw["a"], kw["b"], kw["A_log"], kw["dt_bias"], kw["scale"], kw["initial_state"],
            kw["out"], kw["ssm_state_indices"], kw["use_qk_l2norm_in_kernel"], vllm_padding)


def sigmoid_op_args(kw, o):
    return (kw["A_log"], kw["a"], kw["dt_bias"], kw["softplus_beta"], kw["softplus_threshold"], kw["q"], kw["k"],
            kw["v"], kw["b"], kw["initial_state_source"], kw["initial_state_indices"], kw.get("scale"),
            kw["use_qk_l2norm_in_kernel"], kw["cu_seqlens"], kw.get("disable_state_update", False),
            kw.get("intermediate_states_buffer"), kw.get("intermediate_state_indices"),
            kw.get("retrieve_parent_token"), o)


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", list(OPS))
def test_schema_declares_exactly_the_written_arguments(name):
    schema = OPS[name].default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == WRITES[name] and not schema.returns
    params = set(inspect.signature(PUBLIC[name]).parameters)
    assert {a.name for a in schema.arguments} - params == OP_ONLY[name]


# ----------------------------------------------------------------------------- traced graphs


@pytest.mark.parametrize("variant", list(PACKED_FNS))
def test_packed_compiled_call_is_one_op_on_fake_cuda(variant):
    (out, state), fkw, graphs = trace(PACKED_FNS[variant], packed_kwargs())
    assert len(graphs) == 1 and flashgdn_targets(graphs[0]) == [PACKED_OP]
    assert out is fkw["out"] and state is fkw["initial_state"]
    args = named_args(op_node(graphs[0]))
    assert args["vllm_padding"] is (variant == "vllm")
    assert args["out"].op == "placeholder" and args["initial_state"].op == "placeholder"


@pytest.mark.parametrize("layout", list(SIGMOID_LAYOUTS))
def test_sigmoid_compiled_call_is_one_op_on_fake_cuda(layout):
    kw = layout_kwargs(layout)
    o, fkw, graphs = trace(SIGMOID_FN, kw)
    assert len(graphs) == 1 and flashgdn_targets(graphs[0]) == [SIGMOID_OP]
    assert o.shape == kw["v"].shape and o.dtype == kw["q"].dtype and o.device.type == "cuda" and o.is_contiguous()
    args = named_args(op_node(graphs[0]))
    assert args["o"].target is torch.empty_like and args[written_arg(layout)].op == "placeholder"


def test_calls_of_all_engine_entry_points_are_one_op_each():
    def step(sg, vl, sig):
        o1, _ = engines.fused_recurrent_gated_delta_rule_packed_decode(**sg)
        o2, _ = engines.fused_recurrent_gated_delta_rule_packed_decode_vllm(**vl)
        return o1.float().sum() + o2.float().sum() + SIGMOID_FN(**sig).float().sum()

    _, _, graphs = trace(lambda **kw: step(**kw), dict(sg=packed_kwargs(), vl=packed_kwargs(seed=1),
                                                       sig=sigmoid_kwargs()))
    assert len(graphs) == 1 and flashgdn_targets(graphs[0]) == [PACKED_OP, PACKED_OP, SIGMOID_OP]


def _batch(name, n):
    idx = torch.arange(n, dtype=torch.int32)
    if name == "packed":
        return packed_kwargs(n=n, idx=idx)
    return dict(sigmoid_kwargs(n=n), initial_state_indices=idx, cu_seqlens=torch.arange(n + 1, dtype=torch.int32))


@pytest.mark.parametrize("name", list(OPS))
def test_batch_size_stays_dynamic(name):
    """With dynamic shapes, new batch sizes reuse the graph (the fake implementations' checks do not
    specialise N). The sizes differ from every other size of the arguments."""
    fn = PUBLIC[name]
    rec = Recorder()
    compiled = torch.compile(lambda kw: fn(**kw), backend=rec, fullgraph=True, dynamic=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for n in (5, 9, 11):
            out = compiled(fake_cuda(_batch(name, n)))
            out = out[0] if name == "packed" else out
            assert out.shape[:2] == ((n, 1) if name == "packed" else (1, n))
    assert len(rec.graphs) == 1


# ----------------------------------------------------------------------------- bad input while tracing


def _fp16(t):
    return t.to(torch.float16)


PACKED_BAD = {  # argument -> (change, exception, eager message)
    "width": ("mixed_qkv", lambda t: t[:, :-8], ValueError, r"mixed_qkv must have shape \[N, 2\*H\*K \+ HV\*V\]"),
    "row-stride": ("mixed_qkv", lambda t: torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)[:, :t.shape[1]],
                   ValueError, r"mixed_qkv stride 771 at dim 0 must be a multiple of 8"),
    "a-dtype": ("a", _fp16, TypeError, r"a must have dtype"),
    "out-shape": ("out", lambda t: t[:, :, :2], ValueError, r"out must have shape"),
    "indices-dtype": ("ssm_state_indices", lambda t: t.float(), TypeError, r"ssm_state_indices must have dtype"),
    "A_log-dtype": ("A_log", lambda t: t.to(BF16), TypeError, r"A_log must have dtype float32"),
    "state-dtype": ("initial_state", _fp16, TypeError, r"initial_state must have dtype"),
}


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("case", list(PACKED_BAD))
def test_packed_bad_input_raises_its_eager_error_while_tracing(variant, case):
    arg, change, exc, match = PACKED_BAD[case]
    kw = packed_kwargs()
    kw[arg] = change(kw[arg])
    expect_error(PACKED_FNS[variant], kw, exc, match)
    with pytest.raises(Exception, match=match):
        trace(PACKED_FNS[variant], kw)


SIGMOID_BAD = {  # changes -> (exception, eager message)
    "kda": (dict(is_kda=True), NotImplementedError, r"is_kda=True"),
    "varlen-long": (dict(cu_seqlens=torch.tensor([0, 2, 3, 4], dtype=torch.int32)), NotImplementedError,
                    r"varlen batch of 4 tokens in 3 sequences"),
    "b-shape": (dict(b=torch.zeros(4, 2, dtype=BF16)), ValueError, r"b must have shape"),
    "indices-shape": (dict(initial_state_indices=torch.zeros(2, dtype=torch.int32)), ValueError,
                      r"initial_state_indices must have shape \[4\]"),
    "state-dtype": (dict(initial_state_source=torch.zeros(7, 4, 128, 64, dtype=torch.float16)), TypeError,
                    r"initial_state_source must have dtype"),
    "softplus": (dict(softplus_beta=-1.0), ValueError, r"softplus_beta"),
}


@pytest.mark.parametrize("case", list(SIGMOID_BAD))
def test_sigmoid_bad_input_raises_its_eager_error_while_tracing(case):
    change, exc, match = SIGMOID_BAD[case]
    kw = {**sigmoid_kwargs(), **change}
    expect_error(SIGMOID_FN, kw, exc, match)
    with pytest.raises(Exception, match=match):
        trace(SIGMOID_FN, kw)


def test_sigmoid_op_refuses_an_output_of_another_layout():
    """The op's `o` must be what the function allocates (its row views assume it)."""
    kw = sigmoid_kwargs()
    o = sigmoid_output(kw).transpose(2, 3).contiguous().transpose(2, 3)
    for call in (SIGMOID_OP, SIGMOID_OP.default):
        with pytest.raises(ValueError, match=r"^o must be contiguous"):
            call(*sigmoid_op_args(kw, o))
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=r"^o must be contiguous"):
        SIGMOID_OP(*fake_cuda(sigmoid_op_args(kw, o)))


def test_address_checks_skip_tensors_dynamo_traces():
    """validation.has_address: a check that Dynamo traces reads no data pointer (no graph break);
    eager, an unaligned tensor still fails it."""
    check = lambda t: val.check_inner_contiguous("t", t, 1, align_leading=True) or t + 1  # noqa: E731
    _, _, graphs = trace(check, dict(t=torch.zeros(4, 16, dtype=BF16)))
    assert len(graphs) == 1
    with pytest.raises(ValueError, match=r"^t data pointer must be 16-byte aligned"):
        check(torch.zeros(65, dtype=BF16)[1:].view(4, 16))


# ----------------------------------------------------------------------------- eager path


def _refuse_ops(monkeypatch):
    for op in ("fused_recurrent_gated_delta_rule_packed_decode", "fused_sigmoid_gating_delta_rule_update",
               "gated_delta_rule_decode_pretranspose"):
        monkeypatch.setattr(torch.ops.flashgdn, op, lambda *a, **k: pytest.fail("an eager call went through an op"))


@pytest.mark.parametrize("variant", list(PACKED_FNS))
def test_packed_eager_calls_do_not_go_through_the_op(variant, monkeypatch):
    """Not compiling, the eager body runs (CPU tensors stop at flashgdn's device check)."""
    _refuse_ops(monkeypatch)
    expect_only_device_error(PACKED_FNS[variant], packed_kwargs())


def test_sigmoid_eager_calls_do_not_go_through_the_op(monkeypatch):
    _refuse_ops(monkeypatch)
    expect_only_device_error(SIGMOID_FN, sigmoid_kwargs())


# ----------------------------------------------------------------------------- the ops run for real on CPU


@pytest.fixture
def cpu_engines(cpu_kernels, monkeypatch):
    """cpu_kernels (the reference as the launch), with no fast-path entry of another test."""
    monkeypatch.setattr(fastpath, "FAST", {})


def _call(name, variant, seed, sdt=F32):
    """(call, arguments, state argument) of an entry point; the same values for the same seed."""
    if name == "packed":
        return PACKED_FNS[variant], packed_kwargs(seed=seed, sdt=sdt), "initial_state"
    return SIGMOID_FN, layout_kwargs(variant, seed=seed, sdt=sdt), written_arg(variant)


CALLS = [("packed", "sglang"), ("packed", "vllm"), *(("sigmoid", layout) for layout in SIGMOID_LAYOUTS)]
CALL_IDS = [f"{n}-{v}" for n, v in CALLS]


def _outputs(name, result):
    return result[0] if name == "packed" else result


@pytest.mark.parametrize("name,variant", CALLS, ids=CALL_IDS)
def test_op_equals_the_eager_call_on_cpu(name, variant, cpu_engines):
    """The op's real implementation writes what the eager call writes and returns."""
    fn, eager, state_arg = _call(name, variant, seed=1)
    before = eager[state_arg].clone()
    out_e = _outputs(name, fn(**eager))
    _, kw, _ = _call(name, variant, seed=1)
    if name == "packed":
        PACKED_OP(*packed_op_args(kw, variant == "vllm"))
        out_o = kw["out"]
    else:
        out_o = sigmoid_output(kw)
        SIGMOID_OP(*sigmoid_op_args(kw, out_o))
    assert same_bits(out_o, out_e) and same_bits(kw[state_arg], eager[state_arg])
    assert not torch.equal(eager[state_arg], before), "the call wrote no slot"


@pytest.mark.parametrize("name,variant", CALLS, ids=CALL_IDS)
def test_compiled_equals_eager_on_cpu(name, variant, cpu_engines):
    """Through AOT functionalization the op runs on the real tensors in place: two steps (the second
    from the updated pool) equal the eager ones bit for bit, the same tensors returned."""
    fn, eager, state_arg = _call(name, variant, seed=2)
    _, comp, _ = _call(name, variant, seed=2)
    compiled = torch.compile(lambda kw: fn(**kw), backend="aot_eager", fullgraph=True)
    for step in range(2):
        res_e, res_c = fn(**eager), compiled(comp)
        if name == "packed":
            assert res_c[0] is comp["out"] and res_c[1] is comp["initial_state"]
        assert same_bits(_outputs(name, res_c), _outputs(name, res_e)), f"output, step {step}"
        assert same_bits(comp[state_arg], eager[state_arg]), f"{state_arg}, step {step}"


@pytest.mark.parametrize("name,variant", CALLS, ids=CALL_IDS)
def test_opcheck_on_cpu(name, variant, cpu_engines):
    """torch.library.opcheck (schema vs actual mutations, fake vs real, AOT dispatch with static and
    dynamic shapes) with the reference as the kernel."""
    _, kw, _ = _call(name, variant, seed=3)
    if name == "packed":
        torch.library.opcheck(PACKED_OP.default, packed_op_args(kw, variant == "vllm"))
    else:
        torch.library.opcheck(SIGMOID_OP.default, sigmoid_op_args(kw, sigmoid_output(kw)))


# ----------------------------------------------------------------------------- on the GPU


def _cuda(kw):
    """`kw` on the GPU, each tensor at its own strides (row-padded views and padded pools stay so)."""
    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda").copy_(t)
    return {n: move(t) for n, t in kw.items()}


GPU_CALLS = [(n, v, sdt) for n, v in CALLS for sdt in (F32, BF16)]
GPU_IDS = [f"{n}-{v}-{str(sdt)[6:]}" for n, v, sdt in GPU_CALLS]


def _gpu_call(name, variant, sdt, seed):
    fn, kw, state_arg = _call(name, variant, seed, sdt)
    if name == "packed":
        kw["out"].fill_(float("nan"))  # every row is written (padding rows with zeros)
    return fn, _cuda(kw), state_arg


@pytest.mark.gpu
@pytest.mark.parametrize("name,variant,sdt", GPU_CALLS, ids=GPU_IDS)
def test_opcheck_on_the_kernels(name, variant, sdt):
    _, kw, _ = _gpu_call(name, variant, sdt, seed=5)
    if name == "packed":
        torch.library.opcheck(PACKED_OP.default, packed_op_args(kw, variant == "vllm"))
    else:
        torch.library.opcheck(SIGMOID_OP.default, sigmoid_op_args(kw, sigmoid_output(kw)))


@pytest.mark.gpu
@pytest.mark.parametrize("name,variant,sdt", GPU_CALLS, ids=GPU_IDS)
def test_compiled_equals_eager_on_the_kernels(name, variant, sdt):
    """torch.compile (inductor) of a call, two steps: output and pool bit for bit the eager ones."""
    fn, eager, state_arg = _gpu_call(name, variant, sdt, seed=6)
    _, comp, _ = _gpu_call(name, variant, sdt, seed=6)
    before = eager[state_arg].clone()
    compiled = torch.compile(lambda kw: fn(**kw), fullgraph=True)
    for step in range(2):
        res_e, res_c = fn(**eager), compiled(comp)
        out_e, out_c = _outputs(name, res_e), _outputs(name, res_c)
        if name == "packed":
            assert out_c is comp["out"] and res_c[1] is comp[state_arg]
        assert not out_e.isnan().any(), f"eager output, step {step}"
        assert same_bits(out_c, out_e), f"output, step {step}"
        assert same_bits(comp[state_arg], eager[state_arg]), f"{state_arg}, step {step}"
    assert not torch.equal(eager[state_arg], before), "the calls wrote no slot"
