"""CPU tests of `flashgdn-bench --host`: its flags, the exit without a GPU, the measuring core with
stand-in calls, clocks and GPU timers, the ratio/target/table logic, the calls each row binds
(the sweep's routing, the engine's packed row) and the profile's steps against flashgdn.api's
internals (device facts and kernel cache stubbed)."""
from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from flashgdn import api, engines, fastpath, fused_step
from flashgdn import validation as val
from flashgdn.bench import cli, host, host_profile, host_timing
from flashgdn.bench.rows import Row, make_inputs
from flashgdn.device import DeviceFacts
from flashgdn.spec import KernelArgs


def _args(*argv):
    return cli.parse_args(["--host", *argv])


# ----------------------------------------------------------------------------- flags


def test_host_defaults_and_flags():
    a = _args()
    assert a.host and not a.profile
    assert a.batch_size == [1] and a.iters == 2000 and a.state_dtype == ["fp32"]
    a = _args("--profile", "--batch-size", "2", "--iters", "50", "--state-dtype", "bf16", "--head-size", "64")
    assert a.profile and a.batch_size == [2] and a.iters == 50 and a.state_dtype == ["bf16"] and a.head_size == 64
    assert cli.parse_args([]).batch_size == [1, 4, 16, 64, 256, 512] and cli.parse_args([]).iters == 100


@pytest.mark.parametrize("argv, phrase", [
    (["--host", "--compare"], "--compare"),
    (["--host", "--api", "mtp"], "--api"),
    (["--host", "--seq-len", "2", "--pool"], "--seq-len, --pool"),
    (["--host", "--compile-only"], "--compile-only"),
    (["--host", "--plot", "p.png"], "--plot"),
    (["--profile"], "--host"),
    (["--python-only"], "--host"),
    (["--host", "--python-only", "--profile"], "--python-only"),
])
def test_host_bad_flags_exit_2_with_one_line(argv, phrase, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_host_without_a_gpu_exits_1(capsys):
    assert cli.main(["--host", "--profile"]) == 1
    captured = capsys.readouterr()
    assert "no CUDA GPU" in captured.err and captured.out == ""


# ----------------------------------------------------------------------------- measuring core


class _FakeTime:
    """A clock that advances `us` per call of `call`, and a sync that counts itself."""

    def __init__(self, us: float):
        self.us, self.now, self.calls, self.syncs, self.log = us, 0.0, 0, 0, []

    def call(self):
        self.calls += 1
        self.now += self.us * 1e-6
        self.log.append("call")

    def clock(self):
        return self.now

    def sync(self):
        self.syncs += 1
        self.log.append("sync")


def test_host_times_divides_by_iters_and_syncs_only_around_runs():
    t = _FakeTime(7.5)
    runs = host_timing.host_times(t.call, iters=10, repeats=3, sync=t.sync, clock=t.clock)
    assert runs == pytest.approx([7.5] * 3)
    assert t.calls == 30 and t.syncs == 6
    assert t.log == (["sync"] + ["call"] * 10 + ["sync"]) * 3


@pytest.mark.parametrize("gpu_us, bound", [(3.0, False), (9.0, True), (None, False)])
def test_measure_reports_median_min_and_gpu_bound(gpu_us, bound):
    t = _FakeTime(8.0)
    seen = []

    def gpu_time(call, host_us):
        seen.append(host_us)
        return gpu_us

    m = host_timing.measure(t.call, iters=4, repeats=5, warmup=3, sync=t.sync, gpu_time=gpu_time, clock=t.clock)
    assert m["host_median_us"] == pytest.approx(8.0) and m["host_min_us"] == pytest.approx(8.0)
    assert m["gpu_us"] == gpu_us and m["gpu_bound"] is bound
    assert seen == [pytest.approx(8.0)]
    assert t.calls == 3 + 4 * 5
    t = _FakeTime(1.0)
    host_timing.measure(t.call, iters=2, repeats=1, warmup=0, sync=t.sync, clock=t.clock)
    assert t.calls == 1 + 2  # one warm-up call at least: it compiles and fills the memo


# ----------------------------------------------------------------------------- cases, ratios, table


def test_cases_cover_every_function_with_and_without_flashinfer():
    a = _args("--batch-size", "1", "4", "--state-dtype", "fp32", "bf16")
    plain = host.cases(a, flashinfer=False)
    assert plain[0] == host.Case("torch") and plain[0].row is None
    floors = len(host.FLOOR_CASES)
    assert plain[1:1 + floors] == [host.Case("floor", launches=n, tensors=t, output_given=given)
                                   for n, t, given in host.FLOOR_CASES]
    assert plain[1].variant() == "1 empty launch, 1 one-element tensor"
    assert plain[4].variant() == "1 empty launch, 10 one-element tensors, output allocated"
    assert plain[floors - 1].variant() == "1 empty launch, 14 one-element tensors"
    assert plain[floors].variant() == "2 empty launches, 14 one-element tensors"
    assert host.cases(a, flashinfer=False, floors=False) == plain[:1] + plain[1 + floors:]
    assert len(plain) == 1 + floors + 2 * 2 * (4 * 2 + 8)
    both = host.cases(a, flashinfer=True)
    assert len(both) == len(plain) + 2 * 2 * 4 * 2
    fg = [c for c in plain if c.impl == "flashgdn" and not c.engine and c.row.B == 1 and c.row.state_dtype == "fp32"]
    assert [(c.row.version, c.row.pool, c.row.T, c.output_given) for c in fg] == [
        ("pretranspose", False, 1, True), ("pretranspose", False, 1, False),
        ("pretranspose", True, 1, True), ("pretranspose", True, 1, False),
        ("nontranspose", False, 1, True), ("nontranspose", False, 1, False),
        ("mtp", True, 4, True), ("mtp", True, 4, False)]
    engine = [c for c in plain if c.engine and c.row.B == 4 and c.row.state_dtype == "bf16"]
    assert [(c.engine, c.row.version, c.row.T, c.output_given) for c in engine] == [
        ("packed", "pretranspose", 1, True), ("sglang", "pretranspose", 1, False), ("sglang", "sglang", 4, False),
        ("recurrent", "recurrent", 1, False), ("recurrent", "recurrent", 4, False),
        ("sigmoid_vllm", "sigmoid_vllm", 1, False), ("sigmoid_vllm", "sigmoid_vllm", 4, False),
        ("fused_step", "fused_step", 1, True)]
    assert engine[2].variant() == engine[4].variant() == engine[6].variant() == "pool T=4 varlen, output allocated"
    assert engine[5].variant() == "pool varlen, output allocated" and engine[7].row.hidden == host.FUSED_STEP_HIDDEN
    assert {c.impl for c in both} == {"torch", "floor", "flashgdn", "flashinfer"}
    assert not any(c.engine for c in both if c.impl == "flashinfer")
    assert fg[7].variant() == "pool T=4, output allocated" and fg[0].variant() == "dense, output given"


def test_with_the_host_path_each_flashgdn_row_has_a_python_way_twin(monkeypatch):
    """FLASHGDN_HOST=1: each flashgdn case is followed by its twin timed with flashgdn.host off, and one
    that allocates its output by a twin holding more outputs than the C++ path's spares; the Python-way
    twin's measurement runs with it off, and it is as it was afterwards."""
    from flashgdn import host as host_path

    a = _args("--batch-size", "1", "--state-dtype", "fp32")
    plain = host.cases(a, flashinfer=False)
    monkeypatch.setattr(host_path, "ENABLED", True)
    twins = host.cases(a, flashinfer=False)
    ours = [c for c in plain if c.impl == "flashgdn"]
    allocating = [c for c in ours if not c.output_given]
    assert len(twins) == len(plain) + len(ours) + len(allocating) and allocating
    i = twins.index(ours[0])
    assert twins[i + 1] == host.Case("flashgdn", ours[0].row, ours[0].output_given, python_way=True)
    assert twins[i + 1].variant() == ours[0].variant() + ", Python way"
    j = twins.index(allocating[0])
    assert twins[j + 2] == dataclasses.replace(allocating[0], held=host.HELD_TWIN) and host.HELD_TWIN > 2
    assert twins[j + 2].variant() == allocating[0].variant() + f", last {host.HELD_TWIN} held"
    ext = object()
    monkeypatch.setattr(host_path, "EXT", ext)
    seen = []

    def measure(call, gpu=True, baseline=None):
        seen.append((host_path.ENABLED, host_path.EXT))
        return {"host_median_us": 1.0, "host_min_us": 1.0, "gpu_us": None, "gpu_bound": False}

    host.run_cases(twins[i:i + 2], lambda case: ("f", lambda: None), measure, 10, 1)
    assert seen == [(True, ext), (False, None)] and (host_path.ENABLED, host_path.EXT) == (True, ext)


def _fake_run():
    """Records of run_cases with stand-in binds and measurements (µs by function)."""
    row = Row("pretranspose", 1, 1, 16, 32, 128, 128, "bf16", "fp32", pool=True)
    case_list = [host.Case("torch"), host.Case("flashgdn", row), host.Case("flashgdn", row, output_given=False),
                 host.Case("flashgdn", row, engine="packed"), host.Case("flashinfer", row)]
    times = {"x.add_(1)": (8.0, 1.5), "fast": (10.0, 3.0), "slow": (20.0, 3.0), "bound": (11.0, 12.0)}
    names = iter(["x.add_(1)", "fast", "slow", "bound"])

    def bind(case):
        if case.impl == "flashinfer":
            raise RuntimeError("no such kernel\nsecond line")
        name = next(names)
        return name, lambda: name

    def measure(call, gpu=True, baseline=None):
        us, gpu = times[call()]
        paired = {} if baseline is None else {"baseline_us": times[baseline()][0], "ratio": us / times[baseline()][0]}
        return {"host_median_us": us, "host_min_us": us - 1, "gpu_us": gpu, "gpu_bound": gpu >= us, **paired}

    return host.run_cases(case_list, bind, measure, iters=100, repeats=7)


def test_run_cases_ratios_and_target():
    base, fast, slow, bound, failed = _fake_run()
    assert base["ratio"] == 1.0 and base["meets_target"] is None
    assert fast["ratio"] == pytest.approx(1.25) and fast["meets_target"] is True
    assert slow["ratio"] == pytest.approx(2.5) and slow["meets_target"] is False
    assert bound["gpu_bound"] and bound["meets_target"] is True
    assert failed["error"] == "RuntimeError: no such kernel" and failed["ratio"] is None
    assert failed["function"] == "gated_delta_rule_decode_pretranspose" and failed["meets_target"] is None
    assert (fast["B"], fast["T"], fast["state_dtype"], fast["iters"], fast["repeats"]) == (1, 1, "fp32", 100, 7)
    assert base["B"] is None and base["variant"] == "one-element fp32 tensor"
    assert list(fast) == list(host.HOST_FIELDS)


def test_run_cases_time_the_baseline_in_turns_with_each_row():
    """The host's speed drifts within a process: each row is measured with x.add_(1) in turns."""
    row = Row("pretranspose", 1, 1, 16, 32, 128, 128, "bf16", "fp32", pool=True)
    case_list = [host.Case("torch"), host.Case("flashgdn", row), host.Case("flashgdn", row, output_given=False)]
    bound = iter(["x.add_(1)", "a", "b"])
    measured = []

    def measure(call, gpu=True, baseline=None):
        measured.append((call(), None if baseline is None else baseline()))
        return {"host_median_us": 8.0, "host_min_us": 8.0, "gpu_us": None, "gpu_bound": False,
                **({} if baseline is None else {"baseline_us": 4.0, "ratio": 1.75})}

    base, a, b = host.run_cases(case_list, lambda case: (name := next(bound), lambda: name), measure, 100, 7)
    assert measured == [("x.add_(1)", None), ("a", "x.add_(1)"), ("b", "x.add_(1)")]
    assert base["ratio"] == 1.0 and base["baseline_us"] is None
    assert a["baseline_us"] == 4.0 and a["ratio"] == 1.75 and b["meets_target"] is False


def test_measure_in_turns_pairs_each_run_with_a_baseline_run():
    """measure with a baseline: one baseline run before each of the call's runs; the ratio is the
    median of the pairs' ratios, so a host that slows down between pairs moves both sides."""
    t = _FakeTime(0.0)
    speeds = iter([1.0, 2.0, 4.0] * 10)  # the host slows down from one pair to the next

    def slowing(us):
        def call():
            t.now += us * slowing.factor * 1e-6
            t.log.append(us)
        return call

    def sync():
        t.log.append("sync")

    slowing.factor = 1.0
    row, base = slowing(10.0), slowing(5.0)

    def clock():
        return t.now

    runs = []
    orig = host_timing.host_times

    def pair_times(call, iters, repeats, sync, clock):
        if call is base:
            slowing.factor = next(speeds)
        runs.append("base" if call is base else "row")
        return orig(call, iters, repeats, sync, clock)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host_timing, "host_times", pair_times)
        m = host_timing.measure(row, iters=2, repeats=3, warmup=1, sync=sync, clock=clock, baseline=base)
    assert runs == ["base", "row"] * 3
    assert m["ratio"] == pytest.approx(2.0) and m["baseline_us"] == pytest.approx(10.0)
    assert m["host_median_us"] == pytest.approx(20.0) and m["host_min_us"] == pytest.approx(10.0)


def test_host_table_and_title():
    records = _fake_run()
    text = host.host_table(records)
    header, rule, base, fast, slow, bound, failed = text.splitlines()
    assert "host µs" in header and "GPU µs" in header and "vs x.add_(1)" in header and "<= 1.5x" in header
    assert "1.00x" in base and "pass" not in base and "FAIL" not in base
    assert "1.25x" in fast and "pass" in fast
    assert "2.50x" in slow and "FAIL" in slow
    assert "GPU-bound" in bound
    assert "RuntimeError: no such kernel" in failed and "n/a" not in failed
    title = host.title(records, 2000, 7)
    assert "7 runs of 2000 calls" in title and "H=16 HV=32 K=128 V=128 bf16 q/k/v" in title


def test_records_go_to_json_and_csv(tmp_path):
    a = _args("--json", str(tmp_path / "h.json"), "--csv", str(tmp_path / "h.csv"))
    cli.write_outputs(a, _fake_run(), {"command": "flashgdn-bench --host"}, host.HOST_FIELDS)
    rows = json.loads((tmp_path / "h.json").read_text())["rows"]
    assert rows[1]["ratio"] == pytest.approx(1.25) and rows[1]["meets_target"] is True
    header = [ln for ln in (tmp_path / "h.csv").read_text().splitlines() if not ln.startswith("#")][0]
    assert header.split(",") == list(host.HOST_FIELDS)


# ----------------------------------------------------------------------------- the calls rows bind


# A FlashInfer stand-in: its three functions exist (the calls are bound here, not run).
_FLASHINFER = types.SimpleNamespace(**{n: (lambda *a, **k: None) for n in host.VERSION_FUNCTIONS.values()})
_MODULES = {"flashgdn": api, "flashinfer": _FLASHINFER}


@pytest.mark.parametrize("impl, version, state, pool, expected", [
    ("flashgdn", "pretranspose", "fp32", False, "gated_delta_rule_decode_pretranspose"),
    ("flashgdn", "nontranspose", "fp32", False, "gated_delta_rule_decode"),
    ("flashgdn", "mtp", "bf16", True, "gated_delta_rule_mtp"),
    ("flashinfer", "mtp", "fp32", True, "gated_delta_rule_mtp"),
    ("flashinfer", "mtp", "bf16", True, "gated_delta_rule_decode_pretranspose"),  # FlashInfer's bf16-state MTP
])
@pytest.mark.parametrize("given", [True, False])
def test_bind_routes_as_the_sweep_does(impl, version, state, pool, expected, given):
    row = Row(version, 1, 4 if version == "mtp" else 1, 1, 2, 64, 64, "bf16", state, pool=pool)
    name, call = host.bind(host.Case(impl, row, output_given=given), _MODULES, "cpu", seed=0)
    assert name == expected and call.func is getattr(_MODULES[impl], expected)
    assert (call.keywords["output"] is None) != given
    if name == "gated_delta_rule_mtp":
        assert call.keywords["disable_state_update"] is False


def test_engine_row_packs_q_k_v_into_one_row():
    row = Row("pretranspose", 3, 1, 2, 4, 64, 64, "bf16", "fp32", pool=True)
    name, call = host.bind(host.Case("flashgdn", row, engine="packed"), _MODULES, "cpu", seed=1)
    assert name == "fused_recurrent_gated_delta_rule_packed_decode"
    assert call.func is engines.fused_recurrent_gated_delta_rule_packed_decode
    mixed, a, b, A_log, dt_bias, scale, pool, out, slots = call.args
    assert mixed.shape == (3, 2 * 2 * 64 + 4 * 64) and a.shape == b.shape == (3, 4)
    assert scale == 64 ** -0.5 and call.keywords == {"use_qk_l2norm_in_kernel": True}
    inp = make_inputs(row, "cpu", seed=1)
    H = engines._check_packed(mixed, a, b, pool, out, slots)  # the engine's own checks pass
    assert H == 2
    for view, key in zip(engines._packed_views(mixed, 2, 4, 64, 64), ("q", "k", "v")):
        assert torch.equal(view, inp[key])
    assert torch.equal(a, inp["a"][:, 0]) and torch.equal(slots, inp["indices"])


def test_engine_rows_call_each_entry_point_with_valid_arguments():
    """Each engine case binds its entry point on arguments that pass its checks (CPU tensors under
    host.stubbed_launches: the device check, facts, kernel cache and workspace stream stubbed) and
    launches."""
    launched = []
    row = Row("pretranspose", 3, 1, 2, 4, 64, 64, "bf16", "fp32", pool=True)
    names = []
    with host.stubbed_launches(DeviceFacts("sm_90a", 132, "sm90-hbm3"),
                               lambda spec: (lambda *args: launched.append(spec))):
        for case in host.engine_cases(row):
            name, call = host.bind(case, _MODULES, "cpu", seed=2)
            n = len(launched)
            call()
            assert len(launched) > n, name
            names.append(name)
    assert names == ["fused_recurrent_gated_delta_rule_packed_decode", "fused_sigmoid_gating_delta_rule_update",
                     "fused_sigmoid_gating_delta_rule_update", "fused_recurrent_gated_delta_rule",
                     "fused_recurrent_gated_delta_rule",
                     "fused_sigmoid_gating_delta_rule_update_vllm", "fused_sigmoid_gating_delta_rule_update_vllm",
                     "gdn_fused_decode_step"]
    # vLLM's recurrent op and its sigmoid-gating op: each its decode and its verify, both varlen as vLLM
    # calls them, on precomputed and on raw gates
    vllm = [(s.varlen, s.T, s.precomputed_gates) for s in launched if getattr(s, "vllm_slots", False)]
    assert vllm == [("int32", 1, True), ("int32", 4, True), ("int32", 1, False), ("int32", 4, False)]
    # SGLang's decode and its target verify, both in its own varlen layout (the launch views the rows)
    sglang = [(s.T, s.row_form, s.has_intermediate) for s in launched if getattr(s, "row_form", "") == "flat"]
    assert sglang == [(1, "flat", False), (4, "flat", True)]


def test_python_only_times_every_flashgdn_row_on_the_cpu(capsys, tmp_path):
    """--host --python-only: no GPU; every flashgdn row runs (stubbed launches) and gets a time, no
    target verdict; afterwards no memo or fast-path entry holds a stand-in."""
    before = (dict(api._VALIDATED), dict(fastpath.FAST), api.kernel_cache.get)
    out = tmp_path / "py.json"
    argv = ["--host", "--python-only", "--head-size", "64", "--num-q-heads", "2", "--num-v-heads", "4",
            "--iters", "3", "--warmup", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    recs = json.loads(out.read_text())["rows"]
    assert recs[0]["function"] == host.BASELINE
    assert len(recs) == len(host.cases(_args(*argv[2:]), flashinfer=False, floors=False))
    assert all(r["host_median_us"] > 0 and not r["error"] and r["meets_target"] is None for r in recs), recs
    assert {r["function"] for r in recs} >= set(host.ENGINE_FUNCTIONS.values()) and "python µs" in text
    assert (dict(api._VALIDATED), dict(fastpath.FAST), api.kernel_cache.get) == before


def test_run_cases_on_the_cpu_reports_each_failure():
    """The baseline runs on the CPU; flashgdn refuses CPU tensors, and every row says so."""
    a = _args("--head-size", "64", "--num-q-heads", "1", "--num-v-heads", "2")
    case_list = host.cases(a, flashinfer=False, floors=False)[:4]
    def measure(call, gpu=True, baseline=None):  # no GPU time on the CPU
        return host_timing.measure(call, iters=3, repeats=2, warmup=0, sync=lambda: None, baseline=baseline)

    records = host.run_cases(case_list, lambda c: host.bind(c, _MODULES, "cpu", 0), measure, 3, 2)
    assert records[0]["host_median_us"] > 0 and records[0]["ratio"] == 1.0 and not records[0]["error"]
    assert all("must be a CUDA tensor" in r["error"] for r in records[1:])


# ----------------------------------------------------------------------------- profile


def test_counting_full_ways_counts_the_calls_that_remember():
    with host.counting_full_ways() as count:
        fastpath.remember(None, None)  # a key that could not be built: kept nowhere, still a full way
        fastpath.remember(None, None)
    assert count == [2] and fastpath.remember.__name__ == "remember"
    rec = dict(error="", gpu_bound=False, full_way_calls=5)
    assert "full way on 5 calls" in host._note(rec) and host._note(dict(rec, full_way_calls=1)) == ""


def test_profile_records_fill_the_remainders():
    us = {"whole": 30.0, "backend": 0.5, "memo": 5.0, "args": 1.0, "launch": 18.0, "empty": 3.0, "fn": 12.0,
          "stream": 0.7}
    parts = [("call (the whole call)", "whole"), ("  backend", "backend"), ("  memo", "memo"), ("  args", "args"),
             ("  launch", "launch"), ("    empty", "empty"), ("    fn", "fn"), ("    rest of launch", None),
             ("  rest of the call", None), ("stream", "stream")]
    parts = [(label, None if key is None else (lambda key=key: key), key in ("whole", "fn")) for label, key in parts]

    def measure(call, gpu):
        t = us[call()]
        return {"host_median_us": t, "host_min_us": t, "gpu_us": 2.0 if gpu else None, "gpu_bound": False}

    recs = host_profile.profile_records(parts, measure, "v", 10, 7, baseline_us=10.0)
    by = {r["function"].strip(): r for r in recs}
    assert by["rest of launch"]["host_median_us"] == pytest.approx(18.0 - 3.0 - 12.0)
    assert by["rest of the call"]["host_median_us"] == pytest.approx(30.0 - 0.5 - 5.0 - 1.0 - 18.0)
    assert by["memo"]["share_of_call"] == pytest.approx(5 / 30) and by["memo"]["ratio"] == pytest.approx(0.5)
    assert all(r["impl"] == "profile" and r["variant"] == "v" for r in recs)
    assert [r["function"].strip() for r in recs if r["gpu_us"]] == ["call (the whole call)", "fn"]
    text = host.profile_table(recs)
    assert "% of call" in text and "17%" in text and "    rest of launch" in text


@pytest.mark.parametrize("version,T", [("pretranspose", 1), ("mtp", 4)])
def test_profile_parts_hit_the_calls_memo_and_plan(monkeypatch, version, T):
    """Every step the profile times is the one the warm call runs (the fast path: the same compiled
    function with the call's tensors in KernelArgs' order), and the full way's steps use the call's
    memo entry and plan."""
    launched = []

    def compiled(*args):
        launched.append(args)

    monkeypatch.setattr(val, "check_devices", lambda named: torch.device("cpu"))
    monkeypatch.setattr(api, "facts_of", lambda device: DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.kernel_cache, "get", lambda spec: compiled)
    row = Row(version, 2, T, 1, 2, 64, 64, "bf16", "fp32", pool=True)
    inp = dict(make_inputs(row, "cpu", 0), output=None)
    name, args, kwargs = host.api_call(row, inp, via_pretranspose=False)
    getattr(api, name)(*args, **kwargs)
    [plan] = api._VALIDATED.values()
    parts = host_profile.profile_parts(name, args, kwargs)
    labels = [label.strip() for label, _, _ in parts]
    assert labels[0].startswith(name) and any("TVM-FFI" in x for x in labels)
    for label, call, launches in parts:
        if call is not None and "current_stream" not in label:  # no CUDA here
            launched.clear()
            call()
            assert bool(launched) == launches, label
            if launches:
                [kargs] = launched
                assert len(kargs) == len(KernelArgs._fields) and kargs[7] is inp["state"] and kargs[8] is inp["indices"]
                assert kargs[12].shape == (2, T, 2, 64)  # the output, allocated
                assert all(x is None for x in kargs[13:])
    assert len(api._VALIDATED) == 1 and next(iter(api._VALIDATED.values())) is plan
    p, device = parts[-1][1]()  # the full validation returns what the memo keeps
    assert p == plan.problem


def test_allocating_floor_allocates_then_calls(monkeypatch):
    """The allocating floor row's call allocates an output as flashgdn's calls do (fastpath.output of
    the decode's [1, 1, 32, 128] bf16 output), then calls the compiled floor on its tensors."""
    import flashgdn.device
    import flashgdn.kernels.floor

    events = []
    monkeypatch.setattr(flashgdn.device, "facts_of", lambda device: DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    monkeypatch.setattr(flashgdn.kernels.floor, "compile_floor",
                        lambda launches, arch, tensors: (lambda *ts: events.append(("call", len(ts)))))
    real = host.fastpath.output
    monkeypatch.setattr(host.fastpath, "output",
                        lambda given, v: events.append(("alloc", given, tuple(v.shape), v.dtype)) or real(given, v))
    host.floor_call(torch.device("cpu"), 1, 10, output_given=False)()
    assert events == [("alloc", None, (1, 1, 32, 128), torch.bfloat16), ("call", 10)]
    events.clear()
    host.floor_call(torch.device("cpu"), 2, 13)()
    assert events == [("call", 13)]


def test_run_end_to_end_with_the_gpu_stubbed(monkeypatch, capsys, tmp_path):
    """The whole mode on CPU tensors: device facts, kernel cache, GPU sync, GPU timer and stream
    stubbed; every row and profile step gets a time, the tables and the JSON come out, rc 0."""
    facts = DeviceFacts("sm_90a", 132, "sm90-hbm3")
    monkeypatch.setattr(host, "supported_gpu", lambda: (torch.device("cpu"), facts))
    monkeypatch.setattr(host, "GpuTimer", lambda: (lambda call, host_us: 0.5))
    monkeypatch.setattr(host, "floor_call", lambda device, launches, tensors, output_given: (lambda: None))
    monkeypatch.setattr(host, "environment", lambda device, command: {"command": " ".join(command)})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    monkeypatch.setattr(val, "check_devices", lambda named: torch.device("cpu"))
    for module in (api, fused_step):
        monkeypatch.setattr(module, "facts_of", lambda device: facts)
    monkeypatch.setattr(api, "_VALIDATED", {})
    monkeypatch.setattr(api.kernel_cache, "get", lambda spec: (lambda *args: None))
    out_json = tmp_path / "h.json"
    rc = cli.main(["--host", "--profile", "--iters", "5", "--warmup", "1", "--head-size", "64", "--num-q-heads", "1",
                   "--num-v-heads", "2", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = json.loads(out_json.read_text())["rows"]
    main_rows = [r for r in rows if r["impl"] != "profile"]
    profile = [r for r in rows if r["impl"] == "profile"]
    floors = len(host.FLOOR_CASES)
    assert len(main_rows) == 1 + floors + 16 and not any(r["error"] for r in rows), [r["error"] for r in rows
                                                                                     if r["error"]]
    assert [r["impl"] for r in main_rows[:1 + floors]] == ["torch"] + ["floor"] * floors
    assert all(r["meets_target"] is None and r["ratio"] > 0 for r in main_rows[:1 + floors])
    assert all(r["host_median_us"] > 0 for r in main_rows) and all(r["gpu_us"] == 0.5 for r in main_rows)
    # every repeated call takes its fast path: the full way at most on a signature's first call
    assert all(r["full_way_calls"] in (0, 1) for r in main_rows if r["impl"] == "flashgdn")
    assert {r["function"] for r in main_rows} == {
        "x.add_(1)", host.FLOOR_FUNCTION, "gated_delta_rule_decode_pretranspose", "gated_delta_rule_decode",
        "gated_delta_rule_mtp",
        "fused_recurrent_gated_delta_rule_packed_decode", "fused_sigmoid_gating_delta_rule_update",
        "fused_recurrent_gated_delta_rule", "fused_sigmoid_gating_delta_rule_update_vllm", "gdn_fused_decode_step"}
    assert len(profile) == 14 and len({r["variant"] for r in profile}) == 2  # a pretranspose and an MTP call
    assert profile[0]["share_of_call"] == 1.0 and profile[7]["share_of_call"] == 1.0
    assert profile[7]["function"].startswith("gated_delta_rule_mtp")
    assert sum(r["gpu_us"] is not None for r in profile) == 4  # the steps that launch: the call, fn
    assert "fused_recurrent_gated_delta_rule_packed_decode" in captured.out and "profile:" in captured.out
    if "cannot import flashinfer" in captured.err:
        assert "notes:" in captured.out


def test_a_rows_loop_holds_its_last_results():
    """holding(call, n): the results of the last n calls stay referenced (a caller's variables), older ones
    are released; each call's result is returned."""
    import weakref

    class Result:
        pass

    made = []

    def call():
        made.append(Result())
        return made[-1]

    held = host.holding(call, 2)
    refs = [weakref.ref(held()) for _ in range(4)]
    made.clear()
    assert [r() is not None for r in refs] == [False, False, True, True]
