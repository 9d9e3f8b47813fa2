"""`flashgdn-bench --host`: the host time per call of each public function, beside `x.add_(1)`.

Host time per call: the wall time to enqueue `--iters` calls with one call signature, divided by
`--iters`, after warm-up calls that compile the kernel and fill the signature memo; the GPU is
synchronised only before and after the timed calls. A row reports the median and the min of
HOST_REPEATS such runs and its ratio to `x.add_(1)` on a one-element CUDA tensor, timed the same way
in turns with the row's runs (one run of each per repeat; baseline_us, their median): the ratio is
the median of the repeats' row / baseline ratios, so a drift of the host's speed within the process
moves both sides of a pair. Against TARGET_RATIO; the target is informational: it never sets the
exit status. The "floor" rows time one compiled function (kernels/floor.py) that makes one or two
empty launches with one or more one-element tensors (FLOOR_CASES): what a call making that many
launches with that many tensors pays before its own Python (the fused step makes one or two); one
of them also allocates an output as flashgdn's calls do (fastpath.output), the floor of a call
that allocates its output.

GPU time per call: GPU_CALLS calls queued behind a GPU spin, so that the GPU runs them back to
back without waiting for the host, between CUDA events. Events around the host-timed calls
would not tell: while the host is the bottleneck the GPU idles between calls and its span equals
the host's. A row whose GPU time reaches its host time is flagged GPU-bound: there the launch
queue fills and the host time measures the GPU.

`--profile` adds a breakdown of one flashgdn pretranspose call and one MTP call (pool, output
allocated) into the steps of flashgdn.api's eager path for a repeated signature
(flashgdn.fastpath), each timed the same way in isolation, and the cost of the full way (what the
first call of a signature, or one the compiled function refuses, adds): flashgdn.bench.host_profile.

Each flashgdn and FlashInfer row's loop holds the result of its latest call, as `o = f(...)` in a
caller's loop does. With FLASHGDN_HOST=1 (flashgdn.host, the repeated call in C++) each flashgdn row is
followed by its twin ("Python way") timed with that path off, in the same process, so the two compare
in one run, and a row that allocates its output by a twin whose loop holds more outputs (HELD_TWIN) than
the C++ path keeps as spares: there every call allocates.

`--python-only` needs no GPU: flashgdn's rows run on CPU tensors with every compiled function
replaced by a no-op (stubbed_launches), which times their Python part alone (the fast key and its
lookup, the views a call builds, the output allocation) beside `x.add_(1)` on the CPU. What it
leaves out is the TVM-FFI call itself (its argument checks and the launch) and what a CUDA tensor
adds to an allocation.

The measuring core (flashgdn.bench.host_timing's `host_times` and `measure`, and `run_cases`) takes
the call, the synchronisation, the clock and the GPU timer as callables, so it runs on the CPU with
stand-ins.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import sys
import unittest.mock
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import api, fastpath, host
from .cli import _one_line, environment, format_env_line, format_table, progress, supported_gpu, write_outputs
from .engine_rows import RECURRENT_VERSIONS
from .host_profile import profile_parts, profile_records
from .host_timing import HOST_FIELDS, GpuTimer, measure
from .rows import Row, call_api, make_inputs, sweep_title

TARGET_RATIO = 1.5  # the target: host time <= 1.5x that of x.add_(1)
HOST_REPEATS = 7
MTP_TOKENS = 4  # T of the gated_delta_rule_mtp rows
HELD_TWIN = 3  # outputs held by the loop of an allocating row's third twin: more than the C++ path's spares

BASELINE = "x.add_(1)"
ENGINE_FUNCTION = "fused_recurrent_gated_delta_rule_packed_decode"
# The engine entry points' rows (Case.engine) and the function each times, on the ENGINE_ROW's
# shape: the packed decode, SGLang's update (q, k, v [1, B, ...] views of one packed row),
# vLLM's recurrent op and its sigmoid-gating op on raw gates (each: its varlen decode, T = 1, and its
# varlen speculative verify of MTP_TOKENS tokens per sequence: engine_rows' recurrent inputs) and the
# fused step (hidden FUSED_STEP_HIDDEN).
ENGINE_FUNCTIONS = {"packed": ENGINE_FUNCTION, "sglang": "fused_sigmoid_gating_delta_rule_update",
                    "recurrent": "fused_recurrent_gated_delta_rule",
                    "sigmoid_vllm": "fused_sigmoid_gating_delta_rule_update_vllm",
                    "fused_step": "gdn_fused_decode_step"}
FUSED_STEP_HIDDEN = 2048  # Qwen3-Next's
FLASHINFER_MODULE = "flashinfer.gdn_decode"
# The floor rows: one compiled function making this many empty launches with this many one-element
# tensors (kernels/floor.py), with the output given or allocated first: one launch, two; with the
# tensors of the pretranspose pool call (10, one launch; its output given and allocated) and of the
# fused step (14: two launches, or one where the table says so; StepSpec.one_launch)
FLOOR_CASES = ((1, 1, True), (2, 1, True), (1, 10, True), (1, 10, False), (1, 14, True), (2, 14, True))
FLOOR_FUNCTION = "compiled function (floor)"
# (API version, pool) of the rows of each API module.
API_ROWS = (("pretranspose", False), ("pretranspose", True), ("nontranspose", False), ("mtp", True))
ENGINE_ROW = ("pretranspose", True)  # the engine's packed decode runs on this row's inputs
# The function a row's call reaches (rows.call_api), for a row whose inputs could not be built.
VERSION_FUNCTIONS = {"pretranspose": "gated_delta_rule_decode_pretranspose", "nontranspose": "gated_delta_rule_decode",
                     "mtp": "gated_delta_rule_mtp"}

# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the --host table: `impl` "torch" (the x.add_(1) baseline, `row` None), "floor"
    (one compiled function making `launches` empty launches with `tensors` one-element tensors:
    kernels/floor.py, `row` None),
    "flashgdn" or "flashinfer"; `engine`: the engine entry point (ENGINE_FUNCTIONS) on `row`."""

    impl: str
    row: Optional[Row] = None
    output_given: bool = True
    engine: str = ""
    launches: int = 0
    tensors: int = 1
    python_way: bool = False  # with FLASHGDN_HOST=1: the twin of a row, timed with flashgdn.host off
    held: int = 1  # the row's loop holds the results of its last `held` calls (1: `o = f(...)` in a loop)

    def variant(self) -> str:
        if self.impl == "floor":
            return (f"{self.launches} empty launch{'es' if self.launches > 1 else ''}, {self.tensors} one-element "
                    f"tensor{'s' if self.tensors > 1 else ''}{'' if self.output_given else ', output allocated'}")
        if self.row is None:
            return "one-element fp32 tensor"
        t = f" T={self.row.T}" if self.row.T > 1 else ""
        varlen = " varlen" if self.engine in RECURRENT_VERSIONS or self.row.version == "sglang" else ""
        held = f", last {self.held} held" if self.held > 1 else ""
        way = ", Python way" if self.python_way else ""
        return (f"{'pool' if self.row.pool else 'dense'}{t}{varlen}, "
                f"output {'given' if self.output_given else 'allocated'}{held}{way}")


def cases(args, flashinfer: bool, floors: bool = True) -> List[Case]:
    """The baseline, with `floors` the floor rows (FLOOR_CASES), then per state
    dtype and batch size flashgdn's rows (each API function with the output given and allocated, then
    the engine entry points: engine_cases) and, with `flashinfer`, FlashInfer's same API rows."""
    out = [Case("torch")] + ([Case("floor", launches=n, tensors=t, output_given=given) for n, t, given in FLOOR_CASES]
                             if floors else [])
    for state_dtype in args.state_dtype:
        for B in args.batch_size:
            rows = [Row(version, B, MTP_TOKENS if version == "mtp" else 1, args.num_q_heads, args.num_v_heads,
                        args.head_size, args.head_size, args.dtype, state_dtype, pool=pool,
                        l2norm=not args.no_l2norm, pool_slots=args.pool_slots)
                    for version, pool in API_ROWS]
            for impl in ("flashgdn", "flashinfer") if flashinfer else ("flashgdn",):
                ours = [Case(impl, row, given) for row in rows for given in (True, False)]
                if impl == "flashgdn":
                    ours = with_python_way(ours + engine_cases(rows[API_ROWS.index(ENGINE_ROW)]))
                out += ours
    return out


def with_python_way(ours: List[Case]) -> List[Case]:
    """flashgdn's cases, each followed, while FLASHGDN_HOST=1 (flashgdn.host.ENABLED), by its twin timed
    the Python way (flashgdn.host off: python_way), in the same process, and one that allocates its output
    by the twin whose loop holds the last HELD_TWIN outputs: the C++ path's spare outputs all held, every
    call allocates."""
    if not host.ENABLED:
        return ours
    return [twin for case in ours
            for twin in (case, dataclasses.replace(case, python_way=True))
            + (() if case.output_given else (dataclasses.replace(case, held=HELD_TWIN),))]


def holding(call: Callable[[], Any], held: int) -> Callable[[], Any]:
    """`call` whose results of its last `held` calls stay referenced, as a caller's variables hold them."""
    results = collections.deque(maxlen=held)

    def holding_call():
        result = call()
        results.append(result)
        return result

    return holding_call


@contextlib.contextmanager
def python_way(on: bool):
    """flashgdn.host off within (`on`): its calls go the Python way; as it was on exit."""
    saved = host.ENABLED, host.EXT
    if on:
        host.ENABLED, host.EXT = False, None
    try:
        yield
    finally:
        host.ENABLED, host.EXT = saved


def engine_cases(row: Row) -> List[Case]:
    """The engine entry points' cases on the shape of `row` (a one-token pool row): each
    ENGINE_FUNCTIONS entry (SGLang's update: its decode, and its target verify of MTP_TOKENS tokens per
    sequence as engine_rows' sglang row runs it), vLLM's recurrent op and its sigmoid-gating op each
    at T = 1 and T = MTP_TOKENS; the fused step where its contract allows the row (bf16, K = V)."""
    out = [Case("flashgdn", row, engine="packed"), Case("flashgdn", row, engine="sglang", output_given=False),
           Case("flashgdn", dataclasses.replace(row, version="sglang", T=MTP_TOKENS), engine="sglang",
                output_given=False)]
    for version in RECURRENT_VERSIONS:
        out += [Case("flashgdn", dataclasses.replace(row, version=version, T=T), engine=version, output_given=False)
                for T in (1, MTP_TOKENS)]
    if row.dtype == "bf16" and row.K == row.V:
        out.append(Case("flashgdn", dataclasses.replace(row, version="fused_step", hidden=FUSED_STEP_HIDDEN),
                        engine="fused_step"))
    return out


class _Recorder:
    """Stands in for an API module in rows.call_api: keeps the function it calls and the arguments."""

    def __getattr__(self, name: str):
        def record(*args, **kwargs):
            self.call = (name, args, kwargs)

        return record


def api_call(row: Row, inp: dict, via_pretranspose: bool) -> Tuple[str, tuple, dict]:
    """(function name, args, kwargs) of the call rows.call_api makes for `row`: the sweep's routing,
    bound once so that the timed call is the function itself, not the routing."""
    recorder = _Recorder()
    call_api(recorder, row, inp, bf16_mtp_via_pretranspose=via_pretranspose)
    return recorder.call


def packed_decode_call(row: Row, inp: dict) -> Callable[[], Any]:
    """flashgdn.engines' packed decode on a one-token pool row's inputs: mixed_qkv [B, 2HK + HV*V]
    holds q, k and v side by side, a and b [B, HV], the engines' scale K ** -0.5."""
    from .. import engines

    mixed_qkv = torch.cat([inp[n].flatten(1) for n in ("q", "k", "v")], 1)
    return functools.partial(
        engines.fused_recurrent_gated_delta_rule_packed_decode, mixed_qkv, inp["a"][:, 0], inp["b"][:, 0],
        inp["A_log"], inp["dt_bias"], row.K ** -0.5, inp["state"], inp["output"], inp["indices"],
        use_qk_l2norm_in_kernel=row.l2norm,
    )


def sglang_update_call(row: Row, inp: dict) -> Callable[[], Any]:
    """flashgdn.engines' SGLang update on a one-token pool row's inputs, as SGLang's decode calls
    it: q, k, v [1, B, ...] views of one packed projection row, cu_seqlens arange(B + 1), a and b
    [B, HV], softplus 1.0 / 20.0, the scale K ** -0.5."""
    from .. import engines

    B, HK = row.B, row.H * row.K
    mixed = torch.cat([inp[n].flatten(1) for n in ("q", "k", "v")], 1)
    q, k = (mixed[:, i * HK:(i + 1) * HK].view(1, B, row.H, row.K) for i in (0, 1))
    v = mixed[:, 2 * HK:].view(1, B, row.HV, row.V)
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=mixed.device)
    return functools.partial(
        engines.fused_sigmoid_gating_delta_rule_update, inp["A_log"], inp["a"][:, 0], inp["dt_bias"], 1.0, 20.0, q, k,
        v, inp["b"][:, 0], inp["state"], inp["indices"], scale=row.K ** -0.5, use_qk_l2norm_in_kernel=row.l2norm,
        cu_seqlens=cu_seqlens,
    )


def engine_call(case: Case, device, seed: int) -> Callable[[], Any]:
    """The call of an engine case on fresh inputs (rows.make_inputs; engine_rows for vLLM's
    recurrent ops and the fused step, as the engine sweep runs them)."""
    from .engine_rows import flashgdn_prepare

    inp = make_inputs(case.row, device, seed)
    if case.engine == "packed":
        return packed_decode_call(case.row, inp)
    if case.engine == "sglang" and case.row.version != "sglang":  # its decode, on a one-token pool row
        return sglang_update_call(case.row, inp)
    return flashgdn_prepare(case.row, inp)[0]


def baseline_call(device) -> Callable[[], Any]:
    """The baseline every ratio is to: x.add_(1) on a one-element fp32 tensor of `device`."""
    return functools.partial(torch.zeros(1, device=device).add_, 1)


def floor_call(device, launches: int, tensors: int, output_given: bool = True) -> Callable[[], Any]:
    """A floor row's call: kernels/floor.py's compiled function of `launches` empty launches, for the
    device's arch, on `tensors` one-element fp32 tensors of `device`; unless `output_given`, after
    allocating an output of the Qwen3-Next decode's shape [1, 1, 32, 128] (bf16) as flashgdn's calls
    allocate theirs."""
    from ..device import facts_of
    from ..kernels.floor import compile_floor

    call = functools.partial(compile_floor(launches, facts_of(device).arch, tensors),
                             *(torch.zeros(1, device=device) for _ in range(tensors)))
    if output_given:
        return call
    v = torch.zeros(1, 1, 32, 128, dtype=torch.bfloat16, device=device)

    def allocating_call():
        fastpath.output(None, v)
        return call()

    return allocating_call


def function_name(case: Case) -> str:
    """The function a case times (what bind names it)."""
    if case.impl == "floor":
        return FLOOR_FUNCTION
    if case.engine:
        return ENGINE_FUNCTIONS[case.engine]
    return BASELINE if case.row is None else VERSION_FUNCTIONS[case.row.version]


def bind(case: Case, modules: Dict[str, Any], device, seed: int) -> Tuple[str, Callable[[], Any]]:
    """(function name, call) of a case on fresh inputs (rows.make_inputs); `modules` maps "flashgdn"
    and "flashinfer" to their API modules."""
    if case.impl == "floor":
        return FLOOR_FUNCTION, floor_call(device, case.launches, case.tensors, case.output_given)
    if case.row is None:
        return BASELINE, baseline_call(device)
    if case.engine:
        return ENGINE_FUNCTIONS[case.engine], engine_call(case, device, seed)
    inp = make_inputs(case.row, device, seed)
    if not case.output_given:
        inp["output"] = None
    name, args, kwargs = api_call(case.row, inp, via_pretranspose=case.impl == "flashinfer")
    return name, functools.partial(getattr(modules[case.impl], name), *args, **kwargs)


def new_record(case: Case, function: str, iters: int, repeats: int) -> Dict[str, Any]:
    """A record of HOST_FIELDS for `case`, the measurements still empty."""
    rec = dict.fromkeys(HOST_FIELDS)
    rec.update(impl=case.impl, function=function, variant=case.variant(), iters=iters, repeats=repeats, error="")
    if case.row is not None:
        r = case.row
        rec.update(B=r.B, T=r.T, H=r.H, HV=r.HV, K=r.K, V=r.V, dtype=r.dtype, state_dtype=r.state_dtype)
    return rec


def run_cases(case_list: Sequence[Case], bind_case: Callable[[Case], Tuple[str, Callable[[], Any]]],
              measure_call: Callable[..., Dict[str, Any]], iters: int, repeats: int) -> List[dict]:
    """One record per case (a failing case gets its error, the others run), with ratios. The
    baseline (the "torch" case) is timed again in turns with each other row's runs
    (measure_call(call, baseline=...): measure), and a row's ratio is to those runs: this host's
    speed drifts within a process (up to 1.5x between two measurements of the same call), and a
    ratio to one early measurement would carry it."""
    records = []
    baseline = None
    for i, case in enumerate(case_list, 1):
        function = function_name(case)
        try:
            function, call = bind_case(case)
            if case.row is not None:
                call = holding(call, case.held)
            rec = new_record(case, function, iters, repeats)
            progress(f"[{i}/{len(case_list)}] {case.impl} {function} {rec['variant']} ...")
            paired = {} if case.impl == "torch" or baseline is None else {"baseline": baseline}
            if case.impl == "torch":
                baseline = call
            with counting_full_ways() as full_ways, python_way(case.python_way):
                rec.update(measure_call(call, **paired))
            if case.impl == "flashgdn":
                rec["full_way_calls"] = full_ways[0]
        except Exception as exc:
            rec = new_record(case, function, iters, repeats)
            rec["error"] = _one_line(exc)
            progress(f"  {case.impl} {function}: {rec['error']}")
        records.append(rec)
    add_ratios(records)
    return records


@contextlib.contextmanager
def counting_full_ways():
    """Counts, in the list it yields, the calls that took flashgdn's full way (each ends in
    fastpath.remember): the first call of a signature, and every call its fast path misses or
    its compiled function refuses. Of a row's calls (warm-up, timed, GPU-timed) one at most
    should: more means its repeated call pays the full checks (flashgdn.fastpath)."""
    count = [0]
    remember = fastpath.remember

    def counted(key, entry):
        count[0] += 1
        remember(key, entry)

    with unittest.mock.patch.object(fastpath, "remember", counted):
        yield count


def add_ratios(records: List[dict]) -> None:
    """ratio, where measure has not set it (the median of the pairs' ratios, timed in turns): the
    median host time over the first "torch" record's; meets_target: ratio <= TARGET_RATIO (None for
    the baseline, the floors and rows without a time)."""
    first = next((r["host_median_us"] for r in records if r["impl"] == "torch"), None)
    for r in records:
        us = r.get("host_median_us")
        if r.get("ratio") is None:
            r["ratio"] = us / first if us is not None and first else None
        r["meets_target"] = (None if r["ratio"] is None or r["impl"] in ("torch", "floor")
                             else r["ratio"] <= TARGET_RATIO)


# ----------------------------------------------------------------------------- output


def _note(r: dict) -> str:
    if r["error"]:
        return r["error"]
    if r["gpu_bound"]:
        return "GPU-bound: the GPU time reaches the host time"
    if (r.get("full_way_calls") or 0) > 1:
        return f"the full way on {r['full_way_calls']} calls: the fast path misses"
    return ""


def host_table(records: Sequence[dict]) -> str:
    headers = ["impl", "function", "variant", "B", "state", "host µs", "min µs", "GPU µs", f"vs {BASELINE}",
               f"<= {TARGET_RATIO}x", "note"]
    body = []
    for r in records:
        verdict = "" if r["meets_target"] is None else "pass" if r["meets_target"] else "FAIL"
        body.append([r["impl"], r["function"], r["variant"], r["B"], r["state_dtype"], r["host_median_us"],
                     r["host_min_us"], "n/a" if r["gpu_us"] is None and not r["error"] else r["gpu_us"],
                     None if r["ratio"] is None else f"{r['ratio']:.2f}x", verdict, _note(r)])
    return format_table(headers, body)


def profile_table(records: Sequence[dict]) -> str:
    headers = ["part", "host µs", "min µs", "GPU µs", "% of call", f"vs {BASELINE}", "note"]
    body = [[r["function"], r["host_median_us"], r["host_min_us"], r["gpu_us"],
             None if r["share_of_call"] is None else f"{100 * r['share_of_call']:.0f}%",
             None if r["ratio"] is None else f"{r['ratio']:.2f}x", _note(r)] for r in records]
    return format_table(headers, body)


def title(records: Sequence[dict], iters: int, repeats: int) -> str:
    shaped = [r for r in records if r["H"] is not None]
    shape = sweep_title(shaped) if shaped else ""
    return (f"host time per call: median (min) of {repeats} runs of {iters} calls with one signature; GPU µs: "
            f"the calls back to back on the GPU; target: <= {TARGET_RATIO}x {BASELINE} timed in turns with each row\n"
            f"{shape}")


# ----------------------------------------------------------------------------- the mode


def _flashinfer() -> Tuple[Optional[Any], str]:
    """FlashInfer's gdn_decode module, or None and why not."""
    try:
        return importlib.import_module(FLASHINFER_MODULE), ""
    except Exception as exc:  # ImportError, or a broken install
        return None, f"flashinfer: cannot import {FLASHINFER_MODULE}: {_one_line(exc)}"


def profile(args, device, measure_call: Callable[..., Dict[str, Any]]) -> List[dict]:
    """--profile: the steps of one flashgdn pretranspose call and one MTP call (T = MTP_TOKENS), each
    with a pool and the output allocated, at the first --batch-size and --state-dtype
    (profile_parts, profile_records), beside x.add_(1) timed right before the breakdown."""
    records = []
    baseline = baseline_call(device)
    for version, T in (("pretranspose", 1), ("mtp", MTP_TOKENS)):
        row = Row(version, args.batch_size[0], T, args.num_q_heads, args.num_v_heads, args.head_size,
                  args.head_size, args.dtype, args.state_dtype[0], pool=True, l2norm=not args.no_l2norm,
                  pool_slots=args.pool_slots)
        inp = dict(make_inputs(row, device, args.seed), output=None)
        name, call_args, call_kwargs = api_call(row, inp, via_pretranspose=False)
        getattr(api, name)(*call_args, **call_kwargs)  # compiles, fills the memo and the plan's function
        torch.cuda.synchronize(device)
        variant = f"flashgdn {Case('flashgdn', row, output_given=False).variant()}, B={row.B}, {row.state_dtype} state"
        baseline_us = measure_call(baseline, gpu=False)["host_median_us"]
        records += profile_records(profile_parts(name, call_args, call_kwargs), measure_call, variant, args.iters,
                                   HOST_REPEATS, baseline_us)
    return records


def _no_op(*args) -> None:
    """A compiled function under stubbed_launches: takes any arguments, launches nothing."""


@contextlib.contextmanager
def stubbed_launches(facts, compiled: Callable[[Any], Callable[..., Any]] = lambda spec: _no_op):
    """flashgdn on CPU tensors up to its launches, for --python-only: the device check takes the
    CPU, the device has `facts` (a DeviceFacts), the compiled function of a spec is `compiled(spec)`
    (_no_op), the fused step's stream is a constant, and the memos and fast-path entries start
    empty; all restored on exit (no entry holding a stand-in outlives it)."""
    from .. import fused_step
    from .. import validation as val

    with contextlib.ExitStack() as stack:
        def patch(obj, name, value):
            stack.enter_context(unittest.mock.patch.object(obj, name, value))

        patch(val, "check_devices", lambda named: torch.device("cpu"))
        for module in (api, fused_step):
            patch(module, "facts_of", lambda device: facts)
            patch(module, "_VALIDATED", {})
        patch(api.kernel_cache, "get", compiled)
        patch(fused_step, "_current_stream", lambda device: 0)
        patch(fused_step, "_WORKSPACES", {})
        patch(fastpath, "FAST", {})
        host.forget()  # the C++ path's entries (flashgdn.host) hold no stand-in either side of this
        stack.callback(host.forget)
        yield


def python_only(args) -> int:
    """`flashgdn-bench --host --python-only`: flashgdn's rows (cases) on the CPU under
    stubbed_launches, on the H200's tuning table; print the table, write --json/--csv."""
    from ..device import DeviceFacts
    from ..kernels import policy

    facts = DeviceFacts("sm_90a", 132, policy.device_class("sm_90a", 132, 141))
    device = torch.device("cpu")

    def measure_call(call, gpu=False, baseline=None):  # no GPU time on the CPU
        return measure(call, args.iters, HOST_REPEATS, args.warmup, lambda: None, baseline=baseline)

    with stubbed_launches(facts):
        records = run_cases(cases(args, flashinfer=False, floors=False),
                            lambda c: bind(c, {"flashgdn": api}, device, args.seed),
                            measure_call, args.iters, HOST_REPEATS)
    for r in records:
        r["meets_target"] = None  # the target is about the whole call on a GPU
    write_outputs(args, records, {"command": args.argv, "mode": "python-only"}, HOST_FIELDS)
    print(f"Python part per call on the CPU (compiled functions stubbed): median (min) of {HOST_REPEATS} runs of "
          f"{args.iters} calls with one signature, against {BASELINE} on a CPU tensor\n")
    headers = ["function", "variant", "state", "python µs", "min µs", f"vs {BASELINE} (CPU)", "note"]
    print(format_table(headers, [[r["function"], r["variant"], r["state_dtype"], r["host_median_us"], r["host_min_us"],
                                  None if r["ratio"] is None else f"{r['ratio']:.2f}x", r["error"]] for r in records]))
    sys.stdout.flush()
    return 0


def run(args) -> int:
    """`flashgdn-bench --host [--profile | --python-only]` on the current GPU (no GPU with
    --python-only): print the tables, write --json/--csv. Exit status 1 only without a supported
    GPU: the target is informational."""
    if args.python_only:
        return python_only(args)
    found = supported_gpu()
    if found is None:
        return 1
    device, _ = found
    flashinfer, note = _flashinfer()
    if note:
        progress(note)
    modules = {"flashgdn": api, "flashinfer": flashinfer}
    sync = functools.partial(torch.cuda.synchronize, device)
    gpu_timer = GpuTimer()

    def measure_call(call, gpu=True, baseline=None):
        return measure(call, args.iters, HOST_REPEATS, args.warmup, sync, gpu_timer if gpu else None,
                       baseline=baseline)

    records = run_cases(cases(args, flashinfer is not None), lambda c: bind(c, modules, device, args.seed),
                        measure_call, args.iters, HOST_REPEATS)
    parts, notes = [], [note] if note else []
    if args.profile:
        try:
            parts = profile(args, device, measure_call)
        except Exception as exc:  # the table above stands without it
            notes.append(f"profile: {_one_line(exc)}")
            progress(notes[-1])
    env = environment(device, command=args.argv)
    write_outputs(args, records + parts, env, HOST_FIELDS)
    print(format_env_line(env))
    print(title(records, args.iters, HOST_REPEATS) + "\n\n" + host_table(records))
    if notes:
        print("\nnotes:\n  " + "\n  ".join(notes))
    for variant in dict.fromkeys(r["variant"] for r in parts):
        print(f"\nprofile: {variant}\n\n" + profile_table([r for r in parts if r["variant"] == variant]))
    sys.stdout.flush()
    return 0
