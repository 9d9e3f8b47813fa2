"""CPU tests of the torch.library ops of flashgdn.ops: their schemas, the graphs torch.compile
captures of functions that call flashgdn, trace-time validation, and that eager calls skip them.

Tracing runs on fake CUDA tensors (FakeTensorMode makes "cuda" tensors on a CPU-only build) with a
backend that records Dynamo's graph. The paths that run the ops (AOT functionalization,
torch.export, opcheck) need real tensors: there the `cpu_kernels` fixture lets the device check
take CPU tensors and runs flashgdn.reference in place of the kernel launch, which tests the op
machinery and not the kernels (tests/test_ops_gpu.py runs them). The cases are shared with
tests/test_ops_gpu.py.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import flashgdn
from flashgdn import api, fastpath
from flashgdn import reference as ref
from flashgdn import validation as val
from flashgdn.device import DeviceFacts
from flashgdn.spec import CommitArgs

from helpers import batch_rows, make_inputs, make_intermediate, make_state

B, H, HV, K, V = 2, 2, 4, 64, 128
P = 8  # pool slots: the cases' read, write and per-token slots are all distinct
T_MTP = 3
OP_NAMES = ("gated_delta_rule_decode_pretranspose", "gated_delta_rule_decode", "gated_delta_rule_mtp",
            "gated_delta_rule_replayssm_commit")
WINDOWS = ("replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta")
WRITES = {  # the arguments each op declares mutated
    "gated_delta_rule_decode_pretranspose": {"state", "output", "initial_state", "intermediate_states_buffer"},
    "gated_delta_rule_decode": {"state", "output"},
    "gated_delta_rule_mtp": {"initial_state", "output", "intermediate_states_buffer", *WINDOWS},
    "gated_delta_rule_replayssm_commit": {"checkpoint_state"},
}
FLASHGDN_OPS = {getattr(torch.ops.flashgdn, n) for n in OP_NAMES} | {
    getattr(torch.ops.flashgdn, n).default for n in OP_NAMES
}


# ----------------------------------------------------------------------------- cases


def _idx(values, device, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


READ_SLOTS = {"pool": [3, -1], "pool-mtp": [3, -1], "mtp-noupdate": [-1, 0]}


def case_call(name, device="cpu", seed=0):
    """(public function, keyword arguments, name of the state argument) of case `name`: the same
    values for the same seed, so that two calls get identical inputs."""
    T = 1 if name in ("pre", "pre-out", "pool", "dec", "dec-out") else T_MTP
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, V, device=device, seed=seed)
    kw = dict(q=q, k=k, v=v, A_log=A_log, a=a, dt_bias=dt_bias, b=b)
    state = lambda n, rows=V, cols=K, pad=0: make_state(  # noqa: E731
        n, HV, rows, cols, torch.float32, device, pad=pad, seed=seed + 1)
    out = lambda dtype: torch.full((B, T, HV, V), 7.0, dtype=dtype, device=device)  # noqa: E731
    fn = flashgdn.gated_delta_rule_mtp
    if name.startswith("pre") or name.startswith("pool"):
        fn = flashgdn.gated_delta_rule_decode_pretranspose
    elif name.startswith("dec"):
        fn = flashgdn.gated_delta_rule_decode
    if name in ("pre", "pre-out"):  # dense K-last state; an fp32 output of bf16 inputs
        kw["state"] = state(B)
        if name == "pre-out":
            kw["output"] = out(torch.float32)
        return fn, kw, "state"
    if name in ("dec", "dec-out"):  # dense K-major state
        kw["state"] = state(B, K, V)
        if name == "dec-out":
            kw["output"] = out(torch.bfloat16)
        return fn, kw, "state"
    kw["initial_state"] = state(P, pad=16 if name == "mtp-acc" else 0)  # mtp-acc: a padded slot stride
    # A padding row (-1) in some cases: its output row stays zero (T = 1) or as it was (T > 1).
    kw["initial_state_indices"] = _idx(READ_SLOTS.get(name, [3, 0]), device)
    if name == "pool":  # pool, separate write slots; the pool passed as `state` too
        kw.update(state=kw["initial_state"], output_state_indices=_idx([5, 6], device))
    elif name == "pool-mtp":  # pretranspose with T > 1: intermediate states, no output (zeros)
        kw.update(state=None, intermediate_states_buffer=make_intermediate(T, n=B + 1).to(device))
    elif name == "mtp":
        kw.update(intermediate_states_buffer=make_intermediate(T).to(device), disable_state_update=False)
    elif name == "mtp-noupdate":
        kw.update(intermediate_states_buffer=make_intermediate(T).to(device), disable_state_update=True)
    elif name == "mtp-acc":  # accepted counts, separate write slots, output given
        kw.update(accepted_tokens=_idx([2, 0], device), output_state_indices=_idx([1, 4], device),
                  output=out(torch.bfloat16), disable_state_update=False)
    elif name == "mtp-slots":  # the state after every token to its own pool slot
        kw.update(ssm_state_indices=_idx([[1, 2, 4], [5, -1, 7]], device), disable_state_update=False)
    elif name == "mtp-replay":  # ReplaySSM verify: the windows of the read slots written
        kw.update(disable_state_update=True, cache_replayssm=True, **replay_windows(P, device))
    else:
        raise KeyError(name)
    return fn, kw, "initial_state"


CASES = ("pre", "pre-out", "pool", "pool-mtp", "dec", "dec-out", "mtp", "mtp-noupdate", "mtp-acc", "mtp-slots",
         "mtp-replay")


def replay_windows(n, device, layers=()):
    """ReplaySSM windows of n slots (T_MTP tokens; a leading layers dim when given), 7 until
    written."""
    return dict(
        replayssm_rawv=torch.full((*layers, n, HV, T_MTP, V), 7.0, dtype=torch.bfloat16, device=device),
        replayssm_rawk=torch.full((*layers, n, H, T_MTP, K), 7.0, dtype=torch.bfloat16, device=device),
        replayssm_g=torch.full((*layers, n, HV, T_MTP), 7.0, device=device),
        replayssm_beta=torch.full((*layers, n, HV, T_MTP), 7.0, device=device),
    )


def commit_call(device="cpu", seed=0, track=True):
    """Keyword arguments of a commit: 2 layers of P slots with random windows, row 1 a null block."""
    gen = torch.Generator().manual_seed(seed)
    L = 2
    w = replay_windows(P, "cpu", layers=(L,))
    kw = dict(checkpoint_state=torch.randn(L, P, HV, V, K, generator=gen))
    for (name, t), new in zip(w.items(), ("rawv_cache", "rawk_cache", "g_cache", "beta_cache")):
        kw[new] = torch.randn(t.shape, generator=gen).to(t.dtype)
    kw["g_cache"] = -kw["g_cache"].abs()
    kw["beta_cache"] = kw["beta_cache"].sigmoid()
    kw.update(state_indices=_idx([3, -1], "cpu"), accept_lens=_idx([2, 1], "cpu"))
    if track:
        kw.update(track_state_indices=_idx([5, 6], "cpu"), track_steps=_idx([0, 0], "cpu"))
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}


def op_call(fn, kw):
    """(op, args) of the op the public call makes while tracing: the call runs with the tracing
    branch taken and the op replaced by a recorder (the api's own argument mapping and output
    allocation, with real tensors)."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "_is_compiling", lambda: True)
        for n in OP_NAMES:
            mp.setattr(torch.ops.flashgdn, n, lambda *args, n=n: calls.append((n, args)))
        fn(**kw)
    (name, args), = calls
    return getattr(torch.ops.flashgdn, name).default, args


def flashgdn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FLASHGDN_OPS]


def named_args(node):
    """The arguments of a flashgdn op node by their schema names."""
    schema = getattr(node.target, "default", node.target)._schema
    return dict(zip((a.name for a in schema.arguments), node.args))


class Recorder:
    """A torch.compile backend that keeps Dynamo's graphs and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fake_cuda(kw):
    """`kw` (nested containers too) with each tensor replaced by a fake CUDA tensor of its shape,
    strides and dtype (call inside a FakeTensorMode)."""
    return tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                    if isinstance(t, torch.Tensor) else t, kw)


def trace(fn, kw, **compile_kw):
    """Compile `fn(**kw)` with fullgraph=True on fake CUDA tensors: (result, kw, Dynamo graphs)."""
    rec = Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True):
        kw = fake_cuda(kw)
        result = torch.compile(lambda kw: fn(**kw), backend=rec, fullgraph=True, **compile_kw)(kw)
    return result, kw, rec.graphs


# ----------------------------------------------------------------------------- schemas, registration


@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_declares_exactly_the_written_arguments(name):
    schema = getattr(torch.ops.flashgdn, name).default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == WRITES[name]
    assert not schema.returns  # nothing returned: no output may alias an input
    assert {a.name for a in schema.arguments} <= set(inspect.signature(getattr(flashgdn, name)).parameters)


def test_import_registers_the_ops_without_cute():
    code = ("import sys, torch, flashgdn; assert 'cutlass' not in sys.modules, 'CuTe imported'; "
            f"[getattr(torch.ops.flashgdn, n).default for n in {OP_NAMES!r}]")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- traced graphs


@pytest.mark.parametrize("name", CASES)
def test_compiled_call_is_one_op_on_fake_cuda(name):
    fn, kw, state_arg = case_call(name)
    (out, state), fkw, graphs = trace(fn, kw)
    assert len(graphs) == 1
    nodes = flashgdn_nodes(graphs[0])
    assert len(nodes) == 1 and getattr(torch.ops.flashgdn, fn.__name__) is nodes[0].target
    assert state is fkw[state_arg]
    assert out.shape == (B, kw["q"].shape[1], HV, V) and out.device.type == "cuda"
    if kw.get("output") is not None:
        assert out is fkw["output"] and out.dtype == kw["output"].dtype
    else:  # allocated in the graph: zeros where padding rows keep their output (T > 1)
        assert out.dtype == kw["q"].dtype
        alloc = named_args(nodes[0])["output"]
        assert alloc.target is (torch.zeros_like if kw["q"].shape[1] > 1 else torch.empty_like)


def test_compiled_calls_of_all_three_functions_are_three_ops():
    _, pre, _ = case_call("pool")
    _, dec, _ = case_call("dec")
    _, mtp, _ = case_call("mtp-slots")

    def step(pre, dec, mtp):
        o1, _ = flashgdn.gated_delta_rule_decode_pretranspose(**pre)
        o2, _ = flashgdn.gated_delta_rule_decode(**dec)
        o3, pool = flashgdn.gated_delta_rule_mtp(**mtp)
        return o1.float().sum() + o2.float().sum() + o3.float().sum(), pool

    (total, pool), fkw, graphs = trace(lambda **kw: step(**kw), dict(pre=pre, dec=dec, mtp=mtp))
    assert len(graphs) == 1 and len(flashgdn_nodes(graphs[0])) == 3
    assert total.shape == () and pool is fkw["mtp"]["initial_state"]


def test_pool_passed_as_state_too_reaches_the_op_once():
    """With a pool, pretranspose's `state` is not used: the op gets None there, so its mutated
    arguments never alias each other."""
    fn, kw, _ = case_call("pool")
    _, fkw, graphs = trace(fn, kw)
    args = named_args(*flashgdn_nodes(graphs[0]))
    assert args["state"] is None and args["initial_state"].op == "placeholder"


def batch_kwargs(fn, n):
    """Valid arguments of `fn` for a batch of n sequences (a pool of 16 slots, no padding)."""
    T = T_MTP if fn is flashgdn.gated_delta_rule_mtp else 1
    q, k, v, a, b, A_log, dt_bias = make_inputs(n, T, H, HV, K, V, seed=n)
    kw = dict(q=q, k=k, v=v, A_log=A_log, a=a, dt_bias=dt_bias, b=b)
    if fn is flashgdn.gated_delta_rule_decode:
        return dict(kw, state=make_state(n, HV, K, V, torch.float32, seed=n))
    kw.update(initial_state=make_state(16, HV, V, K, torch.float32, seed=n),
              initial_state_indices=torch.arange(n, dtype=torch.int32))
    if fn is flashgdn.gated_delta_rule_mtp:
        return dict(kw, intermediate_states_buffer=make_intermediate(T, n=n), disable_state_update=False)
    return dict(kw, state=None)


@pytest.mark.parametrize("fn", [flashgdn.gated_delta_rule_decode_pretranspose, flashgdn.gated_delta_rule_decode,
                                flashgdn.gated_delta_rule_mtp], ids=["pretranspose", "decode", "mtp"])
def test_batch_size_stays_dynamic(fn):
    """Compiled with dynamic shapes, new batch sizes reuse the graph: the fake implementation's
    checks do not specialise B (serving engines change it every step). The batch sizes differ
    from every other size, so that none shares its symbol."""
    rec = Recorder()
    compiled = torch.compile(lambda kw: fn(**kw), backend=rec, fullgraph=True, dynamic=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for n in (5, 7, 9):
            out, _ = compiled(fake_cuda(batch_kwargs(fn, n)))
            assert out.shape[0] == n
    assert len(rec.graphs) == 1
    node, = flashgdn_nodes(rec.graphs[0])
    assert isinstance(named_args(node)["q"].meta["example_value"].shape[0], torch.SymInt)


def test_mtp_default_disable_state_update_resolves_in_the_op(monkeypatch):
    """disable_state_update omitted: the op gets None (FlashInfer's default) and the one-time
    FutureWarning comes while tracing, from the op's fake implementation."""
    monkeypatch.setattr(api, "_WARNED_DISABLE_DEFAULT", False)
    fn, kw, _ = case_call("mtp")
    del kw["disable_state_update"]
    with pytest.warns(FutureWarning, match="disable_state_update"):
        _, _, graphs = trace(fn, kw)
    assert named_args(*flashgdn_nodes(graphs[0]))["disable_state_update"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        trace(fn, kw)


@pytest.mark.parametrize("name,arg,bad,match", [
    ("mtp", "initial_state", lambda t: t.to(torch.float16), r"initial_state must have dtype float32 or bfloat16"),
    ("pool", "initial_state_indices", lambda t: t[:1], r"initial_state_indices must have shape \[2\]"),
    ("dec", "state", lambda t: t.transpose(-1, -2), r"state must have shape"),
    ("mtp-slots", "ssm_state_indices", lambda t: t.to(torch.int64), r"ssm_state_indices must have dtype int32"),
    ("pool-mtp", "intermediate_states_buffer", lambda t: t[:1], r"intermediate_states_buffer must have shape"),
    ("pre", "backend", lambda _: "triton", r"backend must be one of"),
])
def test_bad_input_raises_its_error_while_tracing(name, arg, bad, match):
    """The fake implementations run the api's checks: a compiled call with bad input fails while
    tracing with the eager message."""
    fn, kw, _ = case_call(name)
    kw[arg] = bad(kw.get(arg))
    with pytest.raises(Exception, match=match):
        trace(fn, kw)


def test_fake_cpu_tensors_fail_the_device_check_while_tracing():
    fn, kw, _ = case_call("mtp")
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match=r"q must be a CUDA tensor"):
            torch.compile(lambda kw: fn(**kw), backend=Recorder(), fullgraph=True)(kw)


# ----------------------------------------------------------------------------- eager path


@pytest.mark.parametrize("name", ["pool", "dec", "mtp"])
def test_eager_calls_do_not_go_through_the_ops(name, monkeypatch):
    """Not compiling, the public functions run the eager code (CPU tensors fail its device check),
    never the op."""
    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through the custom op")

    for n in OP_NAMES:
        monkeypatch.setattr(torch.ops.flashgdn, n, refuse)
    fn, kw, _ = case_call(name)
    with pytest.raises(ValueError, match=r"^q must be a CUDA tensor"):
        fn(**kw)


@pytest.mark.parametrize("name", ["pre-out", "dec", "mtp-slots"])
def test_op_runs_the_eager_code(name):
    """Called for real, an op runs the eager body: with CPU tensors it fails the device check."""
    op, args = op_call(*case_call(name)[:2])
    with pytest.raises(ValueError, match=r"^q must be a CUDA tensor"):
        op(*args)


# ----------------------------------------------------------------------------- ops run for real on CPU


def _reference_launch(plan, layout, args, options):
    """api._launch's stand-in: flashgdn.reference on the call's tensors, in place."""
    args = batch_rows(args, plan.problem)
    output = args.output
    if output is None:
        output = fastpath.new_output(args.v, zero=not options.zero_padding_output)
    out = ref._decode(
        args.q, args.k, args.v, args.a, args.b, args.A_log, args.dt_bias, args.state, args.state_indices,
        args.output_state_indices, layout, options.scale, options.use_l2norm, output, args.intermediate_states,
        options.update_state, args.accepted_tokens, options.softplus_beta, options.softplus_threshold,
        token_slots=args.token_state_indices, zero_padding_output=options.zero_padding_output,
        intermediate_rows=args.intermediate_indices, parent_tokens=args.parent_tokens,
    )
    if args.replay_v is not None:
        ref.replay_windows(args.replay_v, args.replay_k, args.replay_g, args.replay_beta, args.state_indices,
                           args.state_indices >= 0, args.k, args.v, args.a, args.b, args.A_log, args.dt_bias,
                           options.softplus_beta, options.softplus_threshold)
    return out


def _reference_commit(spec):
    """The compile cache's stand-in for a commit: flashgdn.reference with the spec's options."""
    def run(*args):
        args = CommitArgs(*args)
        ref.gated_delta_rule_replayssm_commit(
            *args[:7], track_state_indices=args.track_state_indices, track_steps=args.track_steps,
            use_qk_l2norm=spec.use_l2norm, null_block_id=spec.null_block_id)
    return run


def _one_device(named):
    devices = {t.device for t in named.values() if t is not None}
    assert len(devices) == 1, devices
    return devices.pop()


@pytest.fixture
def cpu_kernels(monkeypatch):
    """CPU tensors pass the device check and the launch runs the reference (a fresh memo of
    validated signatures, which would otherwise keep these CPU plans)."""
    monkeypatch.setattr(val, "check_devices", _one_device)
    monkeypatch.setattr(api, "_launch", _reference_launch)
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api, "facts_of", lambda device: DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    monkeypatch.setattr(api.kernel_cache, "get", _reference_commit)


def check_compiled_equals_eager(name, device, backend):
    """Two steps of case `name`, eager and through torch.compile(fullgraph=True): the same output,
    state or pool and intermediate buffer, bit for bit, and the same tensors returned."""
    fn, eager_kw, state_arg = case_call(name, device, seed=1)
    _, comp_kw, _ = case_call(name, device, seed=1)
    compiled = torch.compile(lambda kw: fn(**kw), backend=backend, fullgraph=True)
    for step in range(2):  # the second step starts from the updated state
        out_e, state_e = fn(**eager_kw)
        out_c, state_c = compiled(comp_kw)
        assert state_e is eager_kw[state_arg] and state_c is comp_kw[state_arg]
        if comp_kw.get("output") is not None:
            assert out_c is comp_kw["output"]
        assert out_c.dtype == out_e.dtype and torch.equal(out_c, out_e), f"output, step {step}"
        for n in ("state", "initial_state", "intermediate_states_buffer", *WINDOWS):
            if comp_kw.get(n) is not None:
                assert torch.equal(comp_kw[n], eager_kw[n]), f"{n}, step {step}"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", CASES)
def test_compiled_equals_eager_on_cpu(name, backend, cpu_kernels):
    """Through AOT functionalization (and inductor) the op runs on the real tensors in place."""
    check_compiled_equals_eager(name, "cpu", backend)


@pytest.mark.parametrize("name", ["pool", "mtp-acc"])
def test_export_runs_the_op(name, cpu_kernels):
    """torch.export traces the same op (torch.compiler.is_compiling() holds while exporting)."""
    fn, kw, state_arg = case_call(name, seed=2)
    tensors = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    others = {n: t for n, t in kw.items() if not isinstance(t, torch.Tensor)}

    class Step(torch.nn.Module):
        def forward(self, tensors):
            return fn(**tensors, **others)[0]

    ep = torch.export.export(Step(), (tensors,))
    assert len(flashgdn_nodes(ep.graph_module)) == 1
    _, kw_e, _ = case_call(name, seed=2)
    out_e, _ = fn(**kw_e)
    _, kw_x, _ = case_call(name, seed=2)
    out_x = ep.module()({n: t for n, t in kw_x.items() if isinstance(t, torch.Tensor)})
    assert torch.equal(out_x, out_e) and torch.equal(kw_x[state_arg], kw_e[state_arg])


@pytest.mark.parametrize("name", CASES)
def test_opcheck_on_cpu(name, cpu_kernels):
    """torch.library.opcheck (schema vs actual mutations, fake vs real, AOT dispatch with static
    and dynamic shapes) with the reference as the kernel."""
    op, args = op_call(*case_call(name, seed=3)[:2])
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- ReplaySSM commit


def test_compiled_commit_is_one_op_on_fake_cuda():
    kw = commit_call()
    result, fkw, graphs = trace(flashgdn.gated_delta_rule_replayssm_commit, kw)
    assert result is None and len(graphs) == 1
    node, = flashgdn_nodes(graphs[0])
    assert node.target is torch.ops.flashgdn.gated_delta_rule_replayssm_commit
    assert named_args(node)["checkpoint_state"].op == "placeholder"


def test_commit_bad_input_raises_its_error_while_tracing():
    kw = commit_call()
    kw["accept_lens"] = kw["accept_lens"].long()
    with pytest.raises(Exception, match=r"accept_lens must have dtype int32"):
        trace(flashgdn.gated_delta_rule_replayssm_commit, kw)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_commit_equals_eager_on_cpu(backend, cpu_kernels):
    """A verify's windows then a commit, eager and compiled: the same checkpoint, bit for bit."""
    eager, comp = commit_call(seed=4), commit_call(seed=4)
    compiled = torch.compile(lambda kw: flashgdn.gated_delta_rule_replayssm_commit(**kw), backend=backend,
                             fullgraph=True)
    before = eager["checkpoint_state"].clone()
    flashgdn.gated_delta_rule_replayssm_commit(**eager)
    compiled(comp)
    assert torch.equal(comp["checkpoint_state"], eager["checkpoint_state"])
    assert not torch.equal(eager["checkpoint_state"][:, 3], before[:, 3])  # slot 3 committed
    assert not torch.equal(eager["checkpoint_state"][:, 5], before[:, 5])  # tracked
    assert torch.equal(eager["checkpoint_state"][:, 6], before[:, 6])  # the null block's track slot


def test_opcheck_commit_on_cpu(cpu_kernels):
    kw = commit_call(seed=5)
    args = [kw[n] for n in ("checkpoint_state", "rawv_cache", "rawk_cache", "g_cache", "beta_cache",
                            "state_indices", "accept_lens", "track_state_indices", "track_steps")]
    torch.library.opcheck(torch.ops.flashgdn.gated_delta_rule_replayssm_commit.default, (*args, True, -1, "auto"))
