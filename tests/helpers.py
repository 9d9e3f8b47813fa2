"""Shared test helpers: random GDN inputs (never zeros), strided variants, tolerance checks, and
the validation tests' valid arguments and failure checks."""
from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import flashgdn


def make_inputs(B, T, H, HV, K, V, dtype=torch.bfloat16, device="cpu", gate_dtype=None, strided=False, seed=None):
    """Random q, k, v, a, b, A_log, dt_bias. With `strided`, q/k/v are views of one packed
    projection row [B, T, 2HK + HV*V + pad] and a/b views of [B, T, 2HV + pad], as serving
    engines pass them."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.seed() if seed is None else seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=gen).to(dt).to(device)  # noqa: E731
    gate_dtype = gate_dtype or dtype
    if strided:
        width = 2 * H * K + HV * V + 16
        mixed = rnd(B, T, width)
        q = mixed[..., : H * K].unflatten(-1, (H, K))
        k = mixed[..., H * K : 2 * H * K].unflatten(-1, (H, K))
        v = mixed[..., 2 * H * K : 2 * H * K + HV * V].unflatten(-1, (HV, V))
        ab = rnd(B, T, 2 * HV + 8, dt=gate_dtype)
        a, b = ab[..., :HV], ab[..., HV : 2 * HV]
    else:
        q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, HV, V)
        a, b = rnd(B, T, HV, dt=gate_dtype), rnd(B, T, HV, dt=gate_dtype)
    A_log = torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(device)
    dt_bias = rnd(HV, dt=torch.float32)
    return q, k, v, a, b, A_log, dt_bias


def make_state(n, HV, rows, cols, dtype, device="cpu", pad=0, seed=None):
    """Random state [n, HV, rows, cols]; with pad > 0 the slot stride is padded (non-contiguous)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.seed() if seed is None else seed)
    flat = torch.randn(n, HV * rows * cols + pad, generator=gen).to(dtype).to(device)
    return flat[:, : HV * rows * cols].unflatten(-1, (HV, rows, cols))


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at |x| (8 significand bits)."""
    ax = x.abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def assert_close_state(actual: torch.Tensor, ref32: torch.Tensor, what="state"):
    """fp32 state: within 1e-2 abs and rel of the fp32 reference. bf16 state: within one bf16
    rounding step of the fp32 reference (the reference's own bf16 rounding), plus fp32 noise."""
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, ref32.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{what}: {m}")
    else:
        ref = ref32.float()
        err = (actual.float() - ref).abs()
        tol = bf16_ulp(ref) + 1e-4 * ref.abs() + 1e-5
        bad = err > tol
        assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond bf16 rounding, max err {err.max():.3g}"


def assert_close_output(actual: torch.Tensor, ref: torch.Tensor, what="output"):
    assert not torch.isnan(actual).any(), f"{what}: NaN (unwritten or wrong)"
    torch.testing.assert_close(actual.float(), ref.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- validation tests
# Valid CPU arguments of each public function and the checks of a call that must fail before
# touching memory (tests/test_validation.py, tests/test_validation_valid.py).

B, H, HV, K, V = 2, 2, 4, 64, 128  # K != V: a state in the wrong layout has the wrong shape
P = 5  # pool slots
T_MTP = 3
BF16, F32 = torch.bfloat16, torch.float32

FNS = {
    "pre": flashgdn.gated_delta_rule_decode_pretranspose,  # dense state [B, HV, V, K]
    "pool": flashgdn.gated_delta_rule_decode_pretranspose,  # pool initial_state [P, HV, V, K]
    "dec": flashgdn.gated_delta_rule_decode,  # dense state [B, HV, K, V]
    "mtp": flashgdn.gated_delta_rule_mtp,  # pool [P, HV, V, K], T tokens
}
ALL = tuple(FNS)
STATE_ARG = {"pre": "state", "pool": "initial_state", "dec": "state", "mtp": "initial_state"}


def tokens(api):
    return T_MTP if api == "mtp" else 1


def state_dims(api):
    """The last two dims of a state slot: [V, K] (K-last) or [K, V] (K-major)."""
    return (V, K) if api != "dec" else (K, V)


def valid_kwargs(api, *, strided=False, state_dtype=F32, pad=0, seed=0):
    """Valid keyword arguments (CPU tensors) for one API."""
    T = tokens(api)
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, V, seed=seed, strided=strided)
    kw = dict(q=q, k=k, v=v, A_log=A_log, a=a, dt_bias=dt_bias, b=b)
    if api in ("pre", "dec"):
        kw["state"] = make_state(B, HV, *state_dims(api), state_dtype, pad=pad, seed=seed + 1)
    else:
        kw["initial_state"] = make_state(P, HV, V, K, state_dtype, pad=pad, seed=seed + 1)
        kw["initial_state_indices"] = torch.tensor([3, 0], dtype=torch.int32)
        if api == "pool":
            kw["state"] = None
        else:  # FlashInfer's MTP default (None) leaves the pool untouched
            kw["disable_state_update"] = False
    return kw


def padded_state(api, dtype=F32, row_pad=0, head_pad=0, seed=0):
    """A random state (or pool) of `api` whose last dim alone is contiguous: each row is `row_pad`
    elements and each head `head_pad` elements longer than packed."""
    n = B if api in ("pre", "dec") else P
    rows, cols = state_dims(api)
    gen = torch.Generator().manual_seed(seed)
    head = rows * (cols + row_pad)
    buf = torch.randn(n, HV, head + head_pad, generator=gen).to(dtype)
    t = buf[..., :head].unflatten(-1, (rows, cols + row_pad))[..., :cols]
    assert t.stride()[1:] == (head + head_pad, cols + row_pad, 1)
    return t


def remember_valid_call(monkeypatch, api):
    """Valid CPU keyword arguments of `api` after one call with them has passed validation and been
    remembered (device check accepting the CPU, launch stubbed): later calls with the same tensors
    hit the signature memo."""
    from flashgdn import api as fapi

    monkeypatch.setattr(fapi, "_VALIDATED", {})
    monkeypatch.setattr(fapi.val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(fapi, "_launch", lambda *args: None)
    kw = valid_kwargs(api)
    FNS[api](**kw)
    assert len(fapi._VALIDATED) == 1
    return kw


def make_intermediate(T=T_MTP, dtype=F32, n=B, hv=HV, rows=V, cols=K):
    """An MTP intermediate_states_buffer [n, T, hv, rows, cols]."""
    return torch.full((n, T, hv, rows, cols), 3.0, dtype=dtype)


def expect_error(api, kw, exc, match):
    """The call raises `exc` matching `match` and leaves every tensor argument bit for bit as it was."""
    expect_call_error(FNS[api], kw, exc, match)


def expect_call_error(fn, kw, exc, match):
    """expect_error of any function `fn`."""
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        fn(**kw)
    for n, t in before.items():
        after = kw[n]
        assert after.dtype == t.dtype and after.shape == t.shape, n
        assert torch.equal(after, t), f"{n} changed by a call that failed validation"


def expect_only_device_error(api, kw):
    expect_error(api, kw, ValueError, r"must be a CUDA tensor")


# ----------------------------------------------------------------------------- fused decode step


def make_fused_inputs(B, H, HV, D, hidden, width=4, P=None, state_dtype=F32, conv_layout="SD", bias=True,
                      page_pad=0, slot_pad=0, slots=None, device="cpu", seed=0):
    """Keyword arguments of gdn_fused_decode_step (random, never zeros). conv_state is the logical
    [P, qkv_dim, width - 1] view of an "SD" pool ([P, width - 1, qkv_dim] transposed, vLLM's) or of
    a "DS" pool ([P, qkv_dim, width - 1] dense); `page_pad` pads its page stride and `slot_pad`
    ssm_state's slot stride (elements). `slots`: state_indices (default: B distinct slots in a
    shuffled order; P defaults to 2 B + 1)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=BF16: torch.randn(*s, generator=gen).to(dt).to(device)  # noqa: E731
    P = 2 * B + 1 if P is None else P
    qkv_dim = (2 * H + HV) * D
    if slots is None:
        slots = torch.randperm(P, generator=gen)[:B]
    inner = (width - 1, qkv_dim) if conv_layout == "SD" else (qkv_dim, width - 1)
    page = rnd(P, inner[0] * inner[1] + page_pad)[:, : inner[0] * inner[1]].unflatten(-1, inner)
    conv_state = page.transpose(-1, -2) if conv_layout == "SD" else page
    kw = dict(
        hidden_states=rnd(B, hidden) * 0.5,
        # Small weights keep b and a in the range of the models' gates.
        w_ba=rnd(hidden, 2 * HV) * (2.0 / hidden ** 0.5),
        mixed_qkv=rnd(B, qkv_dim),
        conv_weight=rnd(qkv_dim, width) * 0.5,
        conv_bias=rnd(qkv_dim) * 0.1 if bias else None,
        conv_state=conv_state,
        A_log=torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(device),
        dt_bias=rnd(HV, dt=F32),
        scale=None,
        ssm_state=make_state(P, HV, D, D, state_dtype, device=device, pad=slot_pad, seed=seed + 1),
        state_indices=torch.as_tensor(slots, dtype=torch.int32).to(device),
    )
    return kw


def strided_view(shape, strides, dtype=F32):
    """Random values in a view with exactly these strides (storage just large enough)."""
    n = 1 + sum((d - 1) * s for d, s in zip(shape, strides))
    return torch.randn(n).to(dtype).as_strided(shape, strides)


def clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides (a padded or transposed pool stays one)."""
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    copy.copy_(t)
    return copy


def clone_fused(kw):
    """A copy of the fused step's arguments whose pools keep their strides (in-place updates)."""
    return dict(kw, conv_state=clone_strided(kw["conv_state"]), ssm_state=clone_strided(kw["ssm_state"]))


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit equal (NaNs included)."""
    view = lambda t: t.view(_BITS[t.dtype]) if t.dtype in _BITS else t  # noqa: E731
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(view(x), view(y))


def graph_replay_equals_eager(call, static, fresh, bufs):
    """Capture call(bufs) in a CUDA graph (after an eager call of the same signature, which
    compiles), then twice: copy fresh(i) into the `static` input tensors, run call eagerly on
    copies of the written buffers `bufs` (a dict), replay, and compare bits: every buffer, and the
    returned output where call returns a tensor."""
    call({n: clone_strided(t) for n, t in bufs.items()})
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(bufs)
    for i in range(2):
        for s, f in zip(static, fresh(i)):
            s.copy_(f)
        eager_bufs = {n: clone_strided(t) for n, t in bufs.items()}
        eager_out = call(eager_bufs)
        graph.replay()
        torch.cuda.synchronize()
        for n, t in bufs.items():
            assert same_bits(t, eager_bufs[n]), f"{n}: graph replay {i + 1} differs from the eager call"
        if isinstance(captured, torch.Tensor):
            assert same_bits(captured, eager_out), f"output: graph replay {i + 1} differs from the eager call"


def ffi_checking_stub(spec, launched=None):
    """The compiled function of `spec` as CPU tests stand it in: it checks its arguments as the
    TVM-FFI wrapper that CuTe DSL generates for it does (flashgdn.fastpath: from kernels/build.py's
    fake arguments: None where the variant takes none, else a tensor of the ndim, dtype and
    alignment, its static dims and strides, its dynamic strides' divisibility (size-1 dims aside),
    symbolic dims equal where shared, one device; CPU tensors pass), raising TypeError or
    ValueError; it launches nothing (it appends its arguments to `launched`, if given)."""
    from flashgdn.kernels.build import fake_arguments
    from flashgdn.kernels.common import CUTLASS_DTYPES

    dtypes = {cls: getattr(torch, name) for name, cls in CUTLASS_DTYPES.items()}
    fakes = list(fake_arguments(spec))

    def bind(bound, want, got, what):
        if isinstance(want, int):
            if got != want:
                raise ValueError(f"{what}: expected {want}, got {got}")
        elif id(want) in bound:
            if bound[id(want)] != got:
                raise ValueError(f"{what}: expected {bound[id(want)]} (shared), got {got}")
        elif got % want.divisibility:
            raise ValueError(f"{what}: {got} is not a multiple of {want.divisibility}")
        else:
            bound[id(want)] = got

    def compiled(*args):
        if len(args) != len(fakes):
            raise TypeError(f"expected {len(fakes)} arguments, got {len(args)}")
        bound, devices = {}, set()
        for i, (fake, t) in enumerate(zip(fakes, args)):
            if fake is None or t is None:
                if fake is not None or t is not None:
                    raise TypeError(f"argument {i}: expected {'None' if fake is None else 'a tensor'}")
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != len(fake.shape):
                raise ValueError(f"argument {i}: expected a tensor of {len(fake.shape)} dims")
            if t.dtype != dtypes[fake.element_type] or t.data_ptr() % (fake._assumed_align or t.element_size()):
                raise ValueError(f"argument {i}: dtype or alignment")
            devices.add(t.device)
            for d, (want, got) in enumerate(zip(fake.shape, t.shape)):
                bind(bound, want, got, f"argument {i} shape[{d}]")
            for d, (want, got, size) in enumerate(zip(fake.stride, t.stride(), t.shape)):
                if size != 1:
                    bind(bound, want, got, f"argument {i} stride[{d}]")
        if len(devices) > 1:
            raise ValueError(f"tensors on {devices}")
        if launched is not None:
            launched.append(args)

    return compiled


def compiled_ptx(spec, directory, monkeypatch) -> str:
    """The PTX of `spec`'s build, compiled into `directory` (created), its per-object name suffixes
    removed so two builds compare as text. The DSL's file cache is off for the test: a build it loads
    writes no PTX (its environment is read once per process)."""
    from cutlass.cutlass_dsl import CuTeDSL

    from flashgdn.kernels.build import compile_kernel

    monkeypatch.setattr(CuTeDSL._get_dsl().envar, "disable_file_caching", True)
    directory.mkdir()
    compile_kernel(spec, keep_dir=str(directory))
    [ptx] = directory.rglob("*.ptx")
    return re.sub(r"_[0-9a-f]{6,}", "", ptx.read_text())


def batch_rows(args, problem):
    """KernelArgs of a launch as the kernel takes them (kernels.decode_kernel.DecodeKernel.batch_rows), in
    torch views: a launch with packed rows (KernelSpec.row_form "packed": q holds mixed_qkv, k and v
    None) gets q | k | v of each row [B, 1, heads, dim]; one with flat rows ("flat": 2-D gates beside
    state indices) gets q, k, v and the output [1, B * T, ...] split into [B, T, ...]; both get a and
    b [B, T, HV] and token slots [B, 1]. A batch-rows launch gets vLLM's 2-D gates (gate rows) split
    on q's first two dims and its one-token slots [N] as [N, 1]. Any other launch is returned as it is."""
    from flashgdn import api, engines

    form, slots = api.row_form(args), args.token_state_indices
    if form == "batch":
        B, T = args.q.shape[:2]
        a, b = ((t[:B * T].unflatten(0, (B, T)) if t.dim() == 2 else t) for t in (args.a, args.b))
        one_column = slots is not None and slots.dim() == 1
        return args._replace(a=a, b=b, token_state_indices=slots.unsqueeze(1) if one_column else slots)
    B, T = problem.B, problem.T
    if form == "packed":
        q, k, v = engines._packed_views(args.q, problem.H, problem.HV, problem.K, problem.V)
        out = args.output
    else:
        q, k, v, out = (t[0].unflatten(0, (B, T)) for t in (args.q, args.k, args.v, args.output))
    return args._replace(q=q, k=k, v=v, a=args.a.unflatten(0, (B, T)), b=args.b.unflatten(0, (B, T)), output=out,
                         token_state_indices=None if slots is None else slots.unsqueeze(1))


def stub_kernel_lookups(monkeypatch, facts):
    """A CPU run of the API up to its kernel lookup: the device check passes, the device has
    `facts`, nothing is remembered, and the compile cache records the specs it is asked for (the
    returned list) and hands back a function that checks its arguments as the compiled one does
    and launches nothing (ffi_checking_stub)."""
    from flashgdn import api
    from flashgdn import validation as val

    looked_up = []

    def get(spec):
        looked_up.append(spec)
        return ffi_checking_stub(spec)

    monkeypatch.setattr(val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "facts_of", lambda device: facts)
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.kernel_cache, "get", get)
    return looked_up


def use_h200_table(monkeypatch, **table_changes):
    """use_table with the H200 table (policy.SM90_HBM3E)."""
    return use_table(monkeypatch, "sm90-hbm3e", **table_changes)


def use_table(monkeypatch, name, **table_changes):
    """Calls (the fused step's too) take the tuning table `name` (policy.DEVICE_TABLES, with
    `table_changes`) on any device, with no remembered plan or fast-path entry (an entry keeps the
    function an earlier call with the same key looked up, under another table); returns the list of
    specs they look up. A changed table gets a compile cache of its own in memory: a spec's build
    follows the table, so the shared caches (this process's and the disk's) may hold the other
    table's build of the same spec."""
    import dataclasses

    from flashgdn import api, fastpath, fused_step
    from flashgdn.cache import CompileCache, compile_variant
    from flashgdn.kernels import policy

    monkeypatch.setattr(fastpath, "FAST", {})

    for module in (api, fused_step):
        facts = module.facts_of
        monkeypatch.setattr(module, "facts_of", lambda device, facts=facts: facts(device)._replace(
            device_class=name))
        monkeypatch.setattr(module, "_VALIDATED", {})  # a plan keeps the function it looked up first
    if table_changes:
        monkeypatch.setitem(policy.DEVICE_TABLES, name, dataclasses.replace(policy.DEVICE_TABLES[name], **table_changes))
        cache = CompileCache(compile_variant)
        monkeypatch.setattr(api, "kernel_cache", cache)
        monkeypatch.setattr(fused_step, "kernel_cache", cache)
    specs = []
    get = api.kernel_cache.get

    def record(spec):
        specs.append(spec)
        return get(spec)

    monkeypatch.setattr(api.kernel_cache, "get", record)
    return specs


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@functools.lru_cache(maxsize=None)
def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python examples/<name> --seed 0 <args>` as a newcomer runs it, once per test session and
    arguments (on a GPU it compiles kernels), shared by the tests that read its output."""
    return subprocess.run([sys.executable, str(EXAMPLES / name), "--seed", "0", *args], capture_output=True,
                          text=True, timeout=600)


def supported_gpu() -> bool:
    from flashgdn.device import unavailable_reason

    return unavailable_reason() is None


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package); its folder goes on sys.path,
    as when it runs as a script (one script imports another)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
