"""CPU tests of the C++ repeated-call path (flashgdn.host, FLASHGDN_HOST=1): built here with
torch.utils.cpp_extension, on CPU tensors with the launches stubbed (flashgdn.bench.host.stubbed_launches),
its launches must be the Python fast path's, argument for argument, and every signature it has not
seen must go the Python way."""
import shutil
import warnings

import pytest
import torch

from flashgdn import api, fastpath, host
from flashgdn.bench.host import stubbed_launches
from flashgdn.device import DeviceFacts
from flashgdn.spec import AFTER_OUTPUT, AFTER_REPLAY, KernelArgs
from flashgdn.validation import MEMO_MAX
import test_fastpath_engines
from test_fastpath_engines import ENTRIES

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build flashgdn.host's extension")

FACTS = DeviceFacts("sm_90a", 132, "sm90-hbm3")
calls = test_fastpath_engines.calls  # its fixture: compiled functions that check and record their arguments
B, T, H, HV, D = 3, 1, 2, 4, 64


@pytest.fixture
def on(monkeypatch):
    """FLASHGDN_HOST=1 for the test, the launches stubbed by a recorder: (launched arguments, extension)."""
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)  # built (or loaded) here; None again after the test
    ext = host.extension()
    assert ext is not None and host.EXT is ext
    launched = []
    with stubbed_launches(FACTS, lambda spec: (lambda *args: launched.append(args))):
        yield launched, ext


def _inputs(T=1, pool=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=g).to(dtype)
    kw = dict(q=r(B, T, H, D), k=r(B, T, H, D), v=r(B, T, HV, D), A_log=r(HV, dtype=torch.float32), a=r(B, T, HV),
              dt_bias=r(HV, dtype=torch.float32), b=r(B, T, HV))
    state = r(2 * B if pool else B, HV, D, D, dtype=torch.float32)
    indices = torch.tensor([4, -1, 1], dtype=torch.int32)
    return kw, state, indices


def _hits(ext) -> int:
    return ext.stats()[0]


def _same(got, want) -> bool:
    return len(got) == len(want) and all(x is y for x, y in zip(got, want))


@pytest.mark.parametrize("given", [False, True], ids=["allocated", "given"])
@pytest.mark.parametrize("pool", [False, True], ids=["dense", "pool"])
def test_pretranspose_launches_as_the_python_way(on, pool, given):
    """Second call served by the C++ path: the compiled function gets the Python fast path's arguments
    (the same objects, in KernelArgs' order), the output is given or a new packed tensor like v, and
    the result is (output, state or pool)."""
    launched, ext = on
    kw, state, idx = _inputs(pool=pool)
    out = torch.empty(B, T, HV, D, dtype=torch.bfloat16) if given else None
    extra = dict(initial_state=state, initial_state_indices=idx) if pool else {}
    call = lambda: api.gated_delta_rule_decode_pretranspose(state=None if pool else state, output=out, **kw, **extra)
    call()  # the full way: its function is remembered for the fast key and for this signature
    hits = _hits(ext)
    o, s = call()
    assert _hits(ext) == hits + 1 and s is state and (o is out if given else o.is_contiguous())
    assert o.shape == kw["v"].shape and o.dtype == kw["v"].dtype
    want = (kw["q"], kw["k"], kw["v"], kw["a"], kw["b"], kw["A_log"], kw["dt_bias"], state,
            idx if pool else None, None, None, None, o, *AFTER_OUTPUT)
    assert _same(launched[1], want)
    assert len(launched[0]) == len(want) and _same(launched[0][:12], want[:12])  # the full way's launch


def test_decode_and_mtp_launch_as_the_python_way(on):
    launched, ext = on
    kw, state, idx = _inputs()
    api.gated_delta_rule_decode(state=state.transpose(-1, -2).contiguous(), **kw)
    hits = _hits(ext)
    kstate = launched[-1][7]
    o, s = api.gated_delta_rule_decode(state=kstate, **kw)
    assert _hits(ext) == hits + 1 and s is kstate
    assert _same(launched[-1], (kw["q"], kw["k"], kw["v"], kw["a"], kw["b"], kw["A_log"], kw["dt_bias"], kstate,
                                None, None, None, None, o, *AFTER_OUTPUT))
    kw, pool, idx = _inputs(T=4, pool=True, seed=1)
    mtp = lambda: api.gated_delta_rule_mtp(initial_state=pool, initial_state_indices=idx, disable_state_update=False,
                                           **kw)
    mtp()
    hits = _hits(ext)
    o, s = mtp()
    assert _hits(ext) == hits + 1 and s is pool and o.shape == kw["v"].shape
    assert _same(launched[-1], (kw["q"], kw["k"], kw["v"], kw["a"], kw["b"], kw["A_log"], kw["dt_bias"], pool, idx,
                                None, None, None, o, None, None, None, None, None, None, *AFTER_REPLAY))


@pytest.mark.parametrize("change", ["scale_int", "scale_bool", "strided_v", "permuted_pool", "grad", "int64_indices"])
def test_a_new_signature_goes_the_python_way(on, change):
    """Whatever differs from the remembered call (a scalar's type, a stride, requires_grad, a dtype)
    misses: the call runs the Python way, which checks it (and keeps it where it passes)."""
    launched, ext = on
    kw, state, idx = _inputs(pool=True)
    base = dict(kw, state=None, initial_state=state, initial_state_indices=idx, scale=0.125)
    api.gated_delta_rule_decode_pretranspose(**base)
    hits = _hits(ext)
    api.gated_delta_rule_decode_pretranspose(**base)
    assert _hits(ext) == hits + 1
    hits += 1
    new = dict(base)
    if change == "scale_int":
        new["scale"] = 1
    elif change == "scale_bool":
        new["scale"] = True
    elif change == "strided_v":
        new["v"] = torch.cat([kw["v"], kw["v"]], dim=-1)[..., :D]
    elif change == "permuted_pool":
        new["initial_state"] = state.transpose(0, 1).contiguous().transpose(0, 1)
    elif change == "grad":
        new["A_log"] = kw["A_log"].clone().requires_grad_()
    else:
        new["initial_state_indices"] = idx.long()
    try:
        api.gated_delta_rule_decode_pretranspose(**new)
    except (TypeError, ValueError):
        pass  # the Python way's checks refuse it: the point is that the C++ path did not run it
    assert _hits(ext) == hits


def test_allocated_output_is_packed_for_a_permuted_v(on):
    launched, ext = on
    kw, state, idx = _inputs()
    kw["v"] = kw["v"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, HV, V] with its dims out of order
    for _ in range(3):
        o, _ = api.gated_delta_rule_decode_pretranspose(state=state, **kw)
    assert _hits(ext) >= 1 and o.is_contiguous() and o.shape == kw["v"].shape


def test_a_refusal_takes_the_python_way(monkeypatch):
    """The compiled function's own checks refusing the arguments on the C++ path: the Python way runs
    the call (here its fast path, whose try passes)."""
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    ext = host.extension()
    tries = []

    def compiled(*args):
        tries.append(args)
        if len(tries) == 2:  # the C++ path's first launch
            raise ValueError("refused")

    with stubbed_launches(FACTS, lambda spec: compiled):
        kw, state, _ = _inputs()
        api.gated_delta_rule_decode_pretranspose(state=state, **kw)
        hits = _hits(ext)
        o, s = api.gated_delta_rule_decode_pretranspose(state=state, **kw)
        assert len(tries) == 3 and _hits(ext) == hits and s is state and tries[-1][12] is o
        api.gated_delta_rule_decode_pretranspose(state=state, **kw)
        assert len(tries) == 4 and _hits(ext) == hits + 1


def test_forget_and_the_bound(on, monkeypatch):
    launched, ext = on
    kw, state, _ = _inputs()
    for _ in range(2):
        api.gated_delta_rule_decode_pretranspose(state=state, **kw)
    assert ext.stats()[1] >= 1
    fastpath.forget()
    assert ext.stats()[1] == 0 and not fastpath.FAST
    assert ext.stats()[2] == MEMO_MAX  # bounded as fastpath.FAST is
    ext.set_max_entries(1)
    try:
        for scale in (0.5, 0.25, 0.125):
            for _ in range(2):
                api.gated_delta_rule_decode_pretranspose(state=state, scale=scale, **kw)
        assert ext.stats()[1] == 1
    finally:
        ext.set_max_entries(MEMO_MAX)


def test_remember_refuses_bad_templates(on):
    launched, ext = on
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        ext.remember(host.PRETRANSPOSE, print, (0, 5), (0,), 0, 0, (), -1, x)  # index 5 of one argument
    with pytest.raises(ValueError):
        ext.remember(host.PRETRANSPOSE, print, (0,), (0,), 1, 1, (), -1, x, None)  # an output allocated like None
    with pytest.raises(ValueError):
        ext.remember(host.PRETRANSPOSE, print, (0,), (), 1, 0, (), -1, x, None)  # nothing to return
    with pytest.raises(ValueError):
        ext.remember(host.PRETRANSPOSE, print, (host.const(1),), (0,), 1, 0, (x,), -1, x, None)  # one constant
    with pytest.raises(ValueError):
        ext.remember(host.PRETRANSPOSE, print, (0,), (0,), 1, 0, (), 1, x, None)  # a stream of None
    assert ext.remember(host.PRETRANSPOSE, print, (0,), (0,), 1, 0, (), -1, x, None) is True
    assert ext.call(host.PRETRANSPOSE, object()) is None  # an argument of another kind: a miss


def test_a_failed_allocation_raises_torchs_error(on):
    """An output that cannot be allocated raises torch's Python exception from the C++ path (no crash, no
    miss), as the Python way's allocation would."""
    launched, ext = on
    x = torch.zeros(2)
    huge = torch.empty(1).expand(1 << 40, 1 << 22)  # 2^62 elements: no allocator serves them
    assert ext.remember(host.PRETRANSPOSE, print, (host.OUTPUT,), (host.OUTPUT,), host.NONE, host.const(0), (huge,),
                        host.NONE, x) is True
    with pytest.raises(RuntimeError):
        ext.call(host.PRETRANSPOSE, x)


def _allocating_entry(ext, shape=(2, 5)):
    """An entry whose call launches a no-op on the output, allocated like a constant tensor of `shape`, and
    returns it alone."""
    x, like = torch.zeros(3), torch.zeros(shape)
    assert ext.remember(host.PRETRANSPOSE, lambda *args: None, (host.OUTPUT,), (host.OUTPUT,), host.NONE,
                        host.const(0), (like,), host.NONE, x) is True
    return lambda: ext.call(host.PRETRANSPOSE, x)


def test_a_dropped_output_is_handed_out_again(on):
    """An allocated output that only the entry holds any more is the next call's output; with both spares
    held by the caller a call allocates (replacing the older spare), and the spares' bytes are counted."""
    launched, ext = on
    call = _allocating_entry(ext)
    o = call()
    first, reused = id(o), ext.stats()[3]
    del o
    o = call()
    assert id(o) == first and ext.stats()[3] == reused + 1 and ext.stats()[4] == 40
    p = call()  # o held: a new output, the second spare
    q = call()  # both held: a new one again
    assert len({id(o), id(p), id(q)}) == 3 and ext.stats()[3] == reused + 1 and ext.stats()[4] == 80
    del o, p
    r = call()  # p, now free, is a spare; o was replaced by q
    assert ext.stats()[3] == reused + 2 and r.shape == (2, 5) and r is not q


@pytest.mark.parametrize("keep", ["reference", "view", "weakref", "storage", "transposed", "size1_stride",
                                  "requires_grad", "inference", "float64"])
def test_an_output_referenced_or_changed_is_not_handed_out(on, keep):
    """A spare that something else still reaches (a view, a weak reference, a tensor of its storage) or
    that the caller changed in place (shape, strides, dtype, autograd) is not reused; nor is an inference
    tensor outside inference mode."""
    import weakref

    launched, ext = on
    shape = (2, 1, 5)
    call = _allocating_entry(ext, shape)
    if keep == "inference":
        with torch.inference_mode():
            o = call()
    else:
        o = call()
    reused, first = ext.stats()[3], id(o)
    kept = None
    if keep == "reference":
        kept = o
    elif keep == "view":
        kept = o.view(-1)
    elif keep == "weakref":
        kept = weakref.ref(o)
    elif keep == "storage":
        kept = torch.empty(0).set_(o.untyped_storage())
    elif keep == "transposed":
        o.transpose_(0, 2)
    elif keep == "size1_stride":  # still is_contiguous(), but not at::empty's strides
        o.as_strided_(shape, (5, 7, 1))
    elif keep == "requires_grad":
        o.requires_grad_()
    elif keep == "float64":
        o.data = torch.zeros(shape, dtype=torch.float64)
    del o
    fresh = call()
    assert ext.stats()[3] == reused and id(fresh) != first and kept is not fresh
    assert fresh.shape == shape and fresh.stride() == (5, 5, 1) and fresh.dtype == torch.float32
    assert not fresh.requires_grad and not fresh.is_inference()


def test_no_spares_under_a_zero_bound(on):
    launched, ext = on
    ext.set_max_spare_bytes(0)
    try:
        call = _allocating_entry(ext)
        reused = ext.stats()[3]
        for _ in range(3):
            call()
        assert ext.stats()[3] == reused and ext.stats()[4] == 0
    finally:
        ext.set_max_spare_bytes(host.SPARE_BYTES)
    with pytest.raises(ValueError):
        ext.set_max_spare_bytes(-1)


def test_an_api_call_hands_its_dropped_output_to_the_kernel_again(on):
    launched, ext = on
    kw, state, _ = _inputs()
    call = lambda: api.gated_delta_rule_decode_pretranspose(state=state, **kw)[0]
    call()
    o = call()
    first = id(o)
    launched.clear()  # the stub's record of its arguments holds the output
    del o
    o = call()
    assert id(o) == first and launched[-1][12] is o and o.shape == kw["v"].shape
    fastpath.forget()
    assert ext.stats()[4] == 0  # forgetting the entries releases their spares


def test_a_failed_build_warns_once_and_the_python_way_serves(monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    monkeypatch.setattr(host, "_built", None)
    monkeypatch.setattr(host, "_failed", False)
    monkeypatch.setattr(cpp, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="does not build"):
        assert host.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert host.extension() is None
    launched = []
    with stubbed_launches(FACTS, lambda spec: (lambda *args: launched.append(args))):
        kw, state, _ = _inputs()
        for _ in range(2):
            o, s = api.gated_delta_rule_decode_pretranspose(state=state, **kw)
    assert len(launched) == 2 and s is state


def _strides(t):
    """t's strides but in size-1 dims, which no kernel steps: the C++ path allocates contiguous outputs,
    the Python way's empty_like may keep v's stride there."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


# The engine calls (test_fastpath_engines.ENTRIES) that the C++ path serves, and the one it leaves to the
# Python way: SGLang's row views (a batched layout).
ENGINE_SERVED = ["packed", "packed_vllm", "sigmoid", "sigmoid_verify", "sigmoid_tree", "recurrent_varlen",
                 "recurrent_one_token", "recurrent_padded", "sigmoid_vllm_verify", "sigmoid_vllm_decode",
                 "sigmoid_vllm_padded_decode", "sigmoid_vllm_wide_decode", "fused_step"]
ENGINE_PYTHON_WAY = ["sigmoid_batched"]


@pytest.mark.parametrize("name", ENGINE_SERVED + ENGINE_PYTHON_WAY)
def test_engine_calls_launch_as_the_python_way(calls, monkeypatch, name):
    """An engine entry point's repeated call on the C++ path hands its compiled function (the stand-in
    that checks arguments as TVM-FFI does) what the Python fast path hands it, the same objects in the
    same places, an allocated output of the same layout; and it returns what the Python way returns."""
    full, launched = calls
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    ext = host.extension()
    fn, make = ENTRIES[name]
    kw = make()
    fn(**kw)  # the full way, which the C++ path learns
    hits, n_full = _hits(ext), len(full)
    hosted = fn(**kw)
    assert _hits(ext) == hits + (name in ENGINE_SERVED)
    monkeypatch.setattr(host, "ENABLED", False)
    monkeypatch.setattr(host, "EXT", None)
    python = fn(**kw)  # the Python fast path
    assert len(full) == n_full
    out = KernelArgs._fields.index("output")
    for i, (x, y) in enumerate(zip(launched[-2], launched[-1])):
        if x is y:
            continue
        # an output allocated by each call, or a view that the Python way builds per call
        assert i == out or name in ENGINE_PYTHON_WAY, f"argument {i}"
        assert (x.shape, _strides(x), x.dtype) == (y.shape, _strides(y), y.dtype), f"argument {i}"
        assert i == out or x.data_ptr() == y.data_ptr(), f"argument {i}"
    if isinstance(python, tuple):
        assert isinstance(hosted, tuple) and len(hosted) == len(python) and _same(hosted[1:], python[1:])
        hosted, python = hosted[0], python[0]
    assert isinstance(hosted, torch.Tensor) and (hosted.shape, _strides(hosted), hosted.dtype) == (
        python.shape, _strides(python), python.dtype)
    assert (hosted is python) == ("packed" in name)  # the packed decodes return the `out` given


def test_vllm_ones_beta_is_never_served(calls, monkeypatch):
    """vLLM's beta=None (ones, allocated by each call) goes the Python way every time: what the C++ path
    learns is the call with the beta that went to the kernel."""
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    ext = host.extension()
    fn, make = ENTRIES["recurrent_varlen"]
    kw = dict(make(), beta=None)
    fn(**kw)
    hits = _hits(ext)
    fn(**kw)
    assert _hits(ext) == hits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
@pytest.mark.parametrize("name", ["dense", "pool", "pool-given", "decode", "mtp"])
def test_gpu_results_equal_the_python_ways(monkeypatch, name):
    """On the GPU: the third call of a signature (the C++ path's hit) gives the outputs and states of
    the same call the Python way, bit for bit, from equal starting states (fresh random inputs, poisoned
    outputs)."""
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    g = torch.Generator(device="cuda").manual_seed(7)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=g, device="cuda").to(dtype)
    T = 4 if name == "mtp" else 1
    kw = dict(q=r(B, T, H, 128), k=r(B, T, H, 128), v=r(B, T, HV, 128), A_log=r(HV, dtype=torch.float32),
              a=r(B, T, HV), dt_bias=r(HV, dtype=torch.float32), b=r(B, T, HV))
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device="cuda")
    state = r(2 * B, HV, 128, 128, dtype=torch.float32) * 0.1

    def run(s, out):
        if name == "dense":
            return api.gated_delta_rule_decode_pretranspose(state=s[:B], output=out, **kw)
        if name == "decode":
            return api.gated_delta_rule_decode(state=s[:B], output=out, **kw)
        if name == "mtp":
            return api.gated_delta_rule_mtp(initial_state=s, initial_state_indices=idx, output=out,
                                            disable_state_update=False, **kw)
        return api.gated_delta_rule_decode_pretranspose(state=None, initial_state=s, initial_state_indices=idx,
                                                        output=out, **kw)

    given = name == "pool-given"
    results = []
    for hosted in (False, True):
        s = state.clone()
        fastpath.forget()
        monkeypatch.setattr(host, "ENABLED", hosted)
        for _ in range(3):
            out = torch.full_like(kw["v"], float("nan")) if given else None
            o, _ = run(s, out)
        torch.cuda.synchronize()
        results.append((o.clone(), s.clone()))
    assert host.EXT is not None and host.EXT.stats()[0] >= 1
    (o0, s0), (o1, s1) = results
    assert torch.equal(o0, o1) and torch.equal(s0, s1) and o1[0].isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
@pytest.mark.parametrize("name", ["packed", "packed_vllm", "sigmoid", "sigmoid_verify", "recurrent_varlen",
                                  "sigmoid_vllm_verify", "sigmoid_vllm_decode", "fused_step"])
def test_gpu_engine_results_equal_the_python_ways(monkeypatch, name):
    """On the GPU: an engine entry point's third call (the C++ path's hit) writes the outputs, the pool
    and the speculative buffer that the same call writes the Python way, bit for bit, from equal
    starting tensors (test_fastpath_engines.ENTRIES' random inputs, on the GPU; outputs poisoned)."""
    fn, make = ENTRIES[name]
    cpu = make()
    results = []
    for hosted in (False, True):
        fastpath.forget()
        monkeypatch.setattr(host, "ENABLED", hosted)
        monkeypatch.setattr(host, "EXT", None)
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in cpu.items()}
        for _ in range(3):
            if "out" in kw:
                kw["out"].fill_(float("nan"))
            got = fn(**kw)
        torch.cuda.synchronize()
        o = got[0] if isinstance(got, tuple) else got
        written = [kw[k] for k in ("initial_state", "initial_state_source", "intermediate_states_buffer", "conv_state",
                                   "ssm_state") if k in kw]
        results.append([o.clone()] + [t.clone() for t in written])
        if hosted:
            assert host.EXT is not None and host.EXT.stats()[0] >= 1
    assert len(results[0]) >= 2
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert results[1][0].float().isfinite().any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
def test_gpu_fused_step_on_another_stream_goes_the_python_way(monkeypatch):
    """The fused step's entry keeps the workspace of the stream it was learnt on: a call on another stream
    misses (the Python way runs it on that stream's workspace and the entry follows it), and its results
    equal the first stream's from the same starting pools."""
    monkeypatch.setattr(host, "ENABLED", True)
    monkeypatch.setattr(host, "EXT", None)
    fn, make = ENTRIES["fused_step"]
    cpu = make()
    results = []
    ext = host.extension()
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in cpu.items()}
        with torch.cuda.stream(stream):
            hits = ext.stats()[0]
            o, conv_state, ssm_state = fn(**kw)  # no entry yet, or one of the other stream: a miss
            assert ext.stats()[0] == hits
            for _ in range(2):
                o, conv_state, ssm_state = fn(**kw)
            assert ext.stats()[0] == hits + 2
            stream.synchronize()
        results.append((o.clone(), conv_state.clone(), ssm_state.clone()))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
def test_gpu_spare_outputs_serve_the_default_stream_only(monkeypatch):
    """On the GPU: outputs handed out again on the default stream hold the values the Python way's new
    outputs hold, call after call (fresh random inputs, outputs dropped between calls); on another stream
    and under CUDA-graph capture no spare is reused or kept, and the captured graph's replay equals the
    eager call from the same state."""
    monkeypatch.setattr(host, "EXT", None)
    g = torch.Generator(device="cuda").manual_seed(11)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=g, device="cuda").to(dtype)
    kw = dict(q=r(B, 1, H, 128), k=r(B, 1, H, 128), v=r(B, 1, HV, 128), A_log=r(HV, dtype=torch.float32),
              a=r(B, 1, HV), dt_bias=r(HV, dtype=torch.float32), b=r(B, 1, HV))
    state = r(B, HV, 128, 128, dtype=torch.float32) * 0.1
    call = lambda s: api.gated_delta_rule_decode_pretranspose(state=s, **kw)[0]
    results = []
    for hosted in (False, True):
        fastpath.forget()
        monkeypatch.setattr(host, "ENABLED", hosted)
        s, outs = state.clone(), []
        for _ in range(5):
            o = call(s)
            outs.append(o.clone())
            del o
        torch.cuda.synchronize()
        results.append((outs, s.clone()))
    ext = host.EXT
    assert ext is not None and ext.stats()[3] >= 3
    for x, y in zip(results[0][0] + [results[0][1]], results[1][0] + [results[1][1]]):
        assert torch.equal(x, y)
    assert results[1][0][-1].isfinite().all()
    reused, held = ext.stats()[3], ext.stats()[4]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s = state.clone()
        for _ in range(3):
            o = call(s)
            del o
        eager_state = state.clone()
        eager = call(eager_state)
        graph_state = state.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            captured = call(graph_state)
    assert ext.stats()[3:] == (reused, held)
    graph_state.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(graph_state, eager_state)
