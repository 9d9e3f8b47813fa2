"""CPU tests of the compile cache, the cache key (KernelSpec), opt-in logging and GPU gating."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import flashgdn
from flashgdn import api, device, logging_utils
from flashgdn.cache import CompileCache
from flashgdn.device import DeviceFacts
from flashgdn.kernels import policy
from flashgdn.spec import KernelArgs, KernelSpec
from flashgdn.validation import Problem

# ----------------------------------------------------------------------------- (a) CompileCache


class FakeCompiler:
    def __init__(self, delay=0.05):
        self.delay = delay
        self.calls = []
        self._lock = threading.Lock()

    def __call__(self, spec):
        with self._lock:
            self.calls.append(spec)
        time.sleep(self.delay)
        return object()  # a fresh, distinct "compiled function" per compile


def spec_of(**changes) -> KernelSpec:
    base = dict(layout="klast", H=16, HV=32, K=128, V=128, T=1, io_dtype="bfloat16", state_dtype="float32",
                gate_dtype="bfloat16", dt_bias_dtype="float32", scale=128 ** -0.5, use_l2norm=True,
                arch="sm_90a", regime="small")
    base.update(changes)
    return KernelSpec(**base)


def _concurrent_get(cache, specs):
    barrier = threading.Barrier(len(specs))
    results = [None] * len(specs)
    errors = []

    def worker(i):
        try:
            barrier.wait()
            results[i] = cache.get(specs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def test_concurrent_same_spec_compiles_once():
    fake = FakeCompiler()
    cache = CompileCache(fake)
    spec = spec_of()
    results = _concurrent_get(cache, [spec] * 8)
    assert len(fake.calls) == 1 and cache.compiles == 1 and len(cache) == 1
    assert all(r is results[0] for r in results)
    assert cache.get(spec) is results[0]  # later lookups: the same object, no compile
    assert len(fake.calls) == 1


def test_equal_but_distinct_spec_objects_hit():
    fake = FakeCompiler(delay=0)
    cache = CompileCache(fake)
    f1 = cache.get(spec_of())
    f2 = cache.get(spec_of())  # a new, equal KernelSpec instance
    assert f1 is f2 and cache.compiles == 1


def test_different_specs_compile_separately():
    fake = FakeCompiler()
    cache = CompileCache(fake)
    specs = [spec_of(), spec_of(regime="large"), spec_of(state_dtype="bfloat16"), spec_of(T=2)]
    results = _concurrent_get(cache, specs * 2)
    assert cache.compiles == 4 and len(fake.calls) == 4 and set(fake.calls) == set(specs)
    assert len({id(r) for r in results}) == 4
    for i, s in enumerate(specs):
        assert results[i] is results[i + 4] is cache.get(s)


def test_clear_forces_recompile():
    fake = FakeCompiler(delay=0)
    cache = CompileCache(fake)
    f1 = cache.get(spec_of())
    cache.clear()
    assert len(cache) == 0
    f2 = cache.get(spec_of())
    assert f1 is not f2 and cache.compiles == 2


def test_failed_compile_is_not_cached():
    calls = []

    def failing(spec):
        calls.append(spec)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "ok"

    cache = CompileCache(failing)
    with pytest.raises(RuntimeError, match="boom"):
        cache.get(spec_of())
    assert len(cache) == 0 and cache.compiles == 0
    assert cache.get(spec_of()) == "ok" and cache.compiles == 1


# ----------------------------------------------------------------------------- (b) cache key

SM = 132
BF16, F32 = torch.bfloat16, torch.float32


def key(B=3, T=1, H=16, HV=32, K=128, V=128, layout="klast", io=BF16, state=F32, gate=BF16, dt_bias=F32,
        scale=None, l2norm=True, arch="sm_90a", sm_count=SM, index_dtype=None, has_out_indices=False,
        has_intermediate=False, update_state=True, has_accepted=False, softplus_beta=1.0,
        softplus_threshold=20.0, regime=None, memory_gib=80) -> KernelSpec:
    """The spec of a call with these facts (meta tensors: kernel_spec reads dtypes, presence and the
    state's strides)."""
    def t(dtype):
        return None if dtype is None else torch.empty(0, dtype=dtype, device="meta")

    rows, cols = (V, K) if layout == "klast" else (K, V)
    args = KernelArgs(
        q=t(io), k=t(io), v=t(io), a=t(gate), b=t(gate), A_log=t(F32), dt_bias=t(dt_bias),
        state=torch.empty(1, HV, rows, cols, dtype=state, device="meta"),
        state_indices=t(index_dtype), output_state_indices=t(index_dtype) if has_out_indices else None,
        accepted_tokens=t(torch.int32) if has_accepted else None,
        intermediate_states=t(state) if has_intermediate else None,
    )
    options = api.CallOptions(scale, l2norm, update_state, softplus_beta, softplus_threshold)
    facts = DeviceFacts(arch, sm_count, policy.device_class(arch, sm_count, memory_gib))
    return api.kernel_spec(layout, Problem(B, T, H, HV, K, V), args, options, facts, regime=regime)


def test_batch_size_does_not_change_the_spec():
    assert key(B=3) == key(B=5)
    assert key(B=3).regime == "small"
    assert hash(key(B=3)) == hash(key(B=5))


def test_batch_size_does_not_recompile():
    fake = FakeCompiler(delay=0)
    cache = CompileCache(fake)
    for B in (1, 2, 3, 5, 8):
        cache.get(key(B=B))
    assert cache.compiles == 1


def test_regime_is_the_only_batch_dependence():
    small, large = key(B=1), key(B=512)
    assert (small.regime, large.regime) == ("small", "large")
    assert small != large
    assert dataclasses.replace(large, regime="small") == small
    diff = [f.name for f in dataclasses.fields(KernelSpec) if getattr(small, f.name) != getattr(large, f.name)]
    assert diff == ["regime"]


def test_regime_boundary():
    HV = 32
    edge = 2 * SM // HV  # B * HV <= 2 * sm_count: small
    assert policy.regime(edge, HV, SM) == "small"
    assert policy.regime(edge + 1, HV, SM) == "large"
    assert policy.regime(1, 32, 1) == "large"
    assert key(B=edge).regime == "small" and key(B=edge + 1).regime == "large"
    assert key(B=edge, sm_count=SM // 2).regime == "large"  # fewer SMs: large earlier


def test_pool_size_and_batch_never_appear():
    names = {f.name for f in dataclasses.fields(KernelSpec)}
    assert not names & {"B", "P", "batch", "batch_size", "pool_size", "num_slots"}
    pooled = key(index_dtype=torch.int32)
    assert pooled == key(B=4, index_dtype=torch.int32)


def test_explicit_regime_overrides():
    assert key(B=1, regime="large").regime == "large"
    assert key(B=1, regime="large") == key(B=512)


@pytest.mark.parametrize("change", [
    dict(H=8), dict(HV=64), dict(K=64), dict(V=256), dict(T=2), dict(io=torch.float16, gate=torch.float16),
    dict(gate=F32), dict(state=BF16), dict(dt_bias=BF16), dict(scale=0.1), dict(l2norm=False),
    dict(index_dtype=torch.int32), dict(index_dtype=torch.int64), dict(arch="sm_100a"), dict(arch="sm_103a"),
    dict(has_intermediate=True), dict(update_state=False), dict(has_accepted=True),
    dict(index_dtype=torch.int32, has_out_indices=True), dict(layout="kmajor"),
    dict(softplus_beta=2.0), dict(softplus_threshold=10.0),
], ids=lambda c: "-".join(f"{k}={v}".replace("torch.", "") for k, v in c.items()))
def test_every_codegen_fact_changes_the_spec(change):
    base = key()
    changed = key(**change)
    assert changed != base
    cache = CompileCache(FakeCompiler(delay=0))
    cache.get(base)
    cache.get(changed)
    assert cache.compiles == 2


def test_index_dtypes_are_distinct():
    specs = {key(index_dtype=d) for d in (None, torch.int32, torch.int64)}
    assert len(specs) == 3
    assert {s.index_dtype for s in specs} == {None, "int32", "int64"}


def test_default_scale_equals_explicit():
    assert key(scale=None) == key(scale=128 ** -0.5)
    assert key(K=64, scale=None) == key(K=64, scale=64 ** -0.5)
    assert key(K=64, scale=None) != key(K=64, scale=128 ** -0.5)
    assert key(scale=1) == key(scale=1.0) and isinstance(key(scale=1).scale, float)


def test_dtype_names_are_strings():
    s = key(index_dtype=torch.int64)
    assert (s.io_dtype, s.state_dtype, s.gate_dtype, s.dt_bias_dtype, s.index_dtype) == (
        "bfloat16", "float32", "bfloat16", "float32", "int64")


def test_short_name():
    s = key(T=3, index_dtype=torch.int32, has_intermediate=True, update_state=False, has_accepted=True,
            l2norm=False)
    assert s.short_name() == ("klast/T3/H16/HV32/K128/V128/bfloat16/state-float32/small/sm_90a/pool/inter/"
                              "noupdate/accepted/nol2")


# ----------------------------------------------------------------------------- (c) KernelSpec checks


@pytest.mark.parametrize("change,what", [
    (dict(K=96), "K must be one of"),
    (dict(V=96), "V must be one of"),
    (dict(HV=24), "HV must be a multiple of H"),
    (dict(H=0), "HV must be a multiple of H"),
    (dict(layout="foo"), "layout must be one of"),
    (dict(layout="kmajor", T=2), "kmajor is dense T=1 only"),
    (dict(layout="kmajor", index_dtype="int32"), "kmajor is dense T=1 only"),
    (dict(T=0), "T must be in"),
    (dict(T=17), r"T must be in \[1, 16\]"),
    (dict(io_dtype="float32"), "io_dtype must be one of"),
    (dict(state_dtype="float16"), "state_dtype must be one of"),
    (dict(gate_dtype="int8"), "gate_dtype must be one of"),
    (dict(dt_bias_dtype="float16"), "dt_bias_dtype must be one of"),
    (dict(index_dtype="int16"), "index_dtype must be None or one of"),
    (dict(arch="sm_80"), "arch must be one of"),
    (dict(regime="medium"), "regime must be one of"),
    (dict(has_out_indices=True), "out indices need a pool"),
    (dict(gate_rows=True), "gate rows and a slot column are vLLM's tensors on batch rows"),
    (dict(index_dtype="int32", has_token_slots=True, vllm_slots=True, row_form="packed", slot_column=True),
     "gate rows and a slot column are vLLM's tensors on batch rows"),
    (dict(T=2, index_dtype="int32", has_token_slots=True, vllm_slots=True, slot_column=True),
     r"a slot column is one token's slots \(T = 1\)"),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_kernel_spec_rejects(change, what):
    with pytest.raises(ValueError, match=r"invalid KernelSpec: " + what):
        spec_of(**change)


def test_kernel_spec_is_frozen_and_hashable():
    s = spec_of()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.T = 2
    assert {s: 1}[spec_of()] == 1
    assert not s.pool and spec_of(index_dtype="int32").pool


# ----------------------------------------------------------------------------- (d) logging


@pytest.fixture
def reload_logging(monkeypatch):
    """Reload flashgdn.logging_utils under a given FLASHGDN_LOGLEVEL; restore afterwards."""
    logger = logging.getLogger("flashgdn")
    handlers, level = list(logger.handlers), logger.level

    def load(value):
        if value is None:
            monkeypatch.delenv("FLASHGDN_LOGLEVEL", raising=False)
        else:
            monkeypatch.setenv("FLASHGDN_LOGLEVEL", value)
        return importlib.reload(logging_utils)

    yield load
    monkeypatch.undo()
    importlib.reload(logging_utils)
    for h in list(logger.handlers):
        if h not in handlers:
            logger.removeHandler(h)
    logger.setLevel(level)


def _f(x, y=2):
    """doc"""
    return x + y


@pytest.mark.parametrize("value", [None, "", "0"])
def test_logging_off_returns_the_function(reload_logging, value):
    mod = reload_logging(value)
    assert mod.LOG_LEVEL == 0
    assert mod.logged(_f) is _f


def test_logging_level_1_wraps_and_logs(reload_logging, caplog):
    mod = reload_logging("1")
    wrapped = mod.logged(_f)
    assert wrapped is not _f and wrapped.__wrapped__ is _f
    assert wrapped.__name__ == "_f" and wrapped.__doc__ == "doc"
    with caplog.at_level(logging.INFO, logger="flashgdn"):
        assert wrapped(1, y=5) == 6
    recs = [r for r in caplog.records if r.name == "flashgdn"]
    assert len(recs) == 1 and recs[0].getMessage() == "_f"


def test_logging_level_2_describes_tensors(reload_logging, caplog):
    mod = reload_logging("2")
    wrapped = mod.logged(_f)
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="flashgdn"):
        wrapped(t, y=t)
    msg = [r.getMessage() for r in caplog.records if r.name == "flashgdn"][0]
    assert msg.startswith("_f(")
    assert "Tensor(shape=(2, 3), dtype=torch.bfloat16, stride=(3, 1), device=cpu)" in msg
    assert "y=Tensor(" in msg


def test_logging_is_restored(reload_logging):
    """After the other tests the module is back to its environment's setting."""
    mod = reload_logging(None)
    assert mod.logged(_f) is _f


# ----------------------------------------------------------------------------- (e) GPU gating


def _props(major, minor, name, sms, memory_gib=80):
    return SimpleNamespace(major=major, minor=minor, name=name, multi_processor_count=sms,
                           total_memory=memory_gib * 2**30)


def test_unsupported_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _props(8, 0, "A100", 108))
    with pytest.raises(flashgdn.UnsupportedGPUError) as e:
        device.device_facts.__wrapped__(0)
    msg = str(e.value)
    assert "SM80" in msg and "A100" in msg
    assert "SM90, SM100, SM103" in msg
    assert isinstance(e.value, RuntimeError)
    assert flashgdn.UnsupportedGPUError is device.UnsupportedGPUError


@pytest.mark.parametrize("cc,name", [((12, 0), "RTX 5090"), ((8, 9), "L40S"), ((9, 1), "future")])
def test_other_unsupported_gpus(monkeypatch, cc, name):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _props(*cc, name, 100))
    with pytest.raises(flashgdn.UnsupportedGPUError, match=rf"{name} is SM{cc[0]}{cc[1]}, which is not supported"):
        device.device_facts.__wrapped__(0)


@pytest.mark.parametrize("cc,sms,arch", [((9, 0), 132, "sm_90a"), ((10, 0), 148, "sm_100a"),
                                         ((10, 3), 148, "sm_103a")])
def test_supported_gpus(monkeypatch, cc, sms, arch):
    seen = []

    def props(i):
        seen.append(i)
        return _props(*cc, "GPU", sms)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    assert device.device_facts.__wrapped__(3) == (arch, sms, policy.device_class(arch, sms, 80))
    assert seen == [3]


@pytest.mark.parametrize("memory_gib", [80, 141])
def test_device_class_enters_the_spec(monkeypatch, memory_gib):
    """H100 (80 GiB) and H200 (141 GiB) resolve to their own tuning tables, named in the spec."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _props(9, 0, "GPU", 132, memory_gib))
    facts = device.device_facts.__wrapped__(0)
    assert facts.device_class in policy.DEVICE_TABLES
    assert key(memory_gib=memory_gib).device_class == facts.device_class
    assert facts.device_class == {80: "sm90-hbm3", 141: "sm90-hbm3e"}[memory_gib]


def test_device_facts_is_cached():
    assert hasattr(device.device_facts, "cache_info") and hasattr(device.device_facts, "__wrapped__")


def test_facts_of_uses_device_index(monkeypatch):
    calls = []
    monkeypatch.setattr(device, "device_facts", lambda i: calls.append(i) or ("sm_90a", 132, "x"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert device.facts_of(torch.device("cuda", 2)) == ("sm_90a", 132, "x")
    assert device.facts_of(torch.device("cuda")) == ("sm_90a", 132, "x")
    assert calls == [2, 5]
