"""CPU tests of the benchmark CLI: flags, FLOP/byte formulas, writers, the plot, verify plumbing,
the FlashInfer call routing, and one real `--compile-only` run (CuTe DSL compiles without a GPU)."""
from __future__ import annotations

import csv
import dataclasses
import json
import types

import pytest
import torch

import flashgdn
from flashgdn.bench import cli, plot
from flashgdn.bench.metrics import gdn_bytes, gdn_flops
from flashgdn.bench.resources import dynamic_smem_bytes
from flashgdn.bench.rows import REFERENCE, Impl, Row, Unavailable, call_api, make_inputs, verify


# ----------------------------------------------------------------------------- flags


def test_defaults():
    a = cli.parse_args([])
    assert a.api == "all" and a.api_alias is None
    assert a.batch_size == [1, 4, 16, 64, 256, 512]
    assert a.seq_len == [2, 4, 8]
    assert (a.num_q_heads, a.num_v_heads, a.head_size) == (16, 32, 128)
    assert (a.dtype, a.state_dtype) == ("bf16", ["fp32"])
    assert (a.iters, a.warmup, a.timer) == (100, 10, "auto")
    assert not (a.no_l2norm or a.pool or a.cache_intermediate or a.compare or a.verify or a.compile_only)
    assert a.pool_slots == "scattered"
    assert (a.json, a.csv, a.plot) == (None, None, None)
    assert (a.arch, a.sm_count) == ("sm_90a", 132)


def test_lists_and_sweep_rows():
    a = cli.parse_args(["--batch-size", "1", "8", "--seq-len", "3", "5", "--state-dtype", "fp32", "bf16",
                        "--pool", "--cache-intermediate", "--no-l2norm"])
    assert a.batch_size == [1, 8] and a.seq_len == [3, 5] and a.state_dtype == ["fp32", "bf16"]
    rows = cli.sweep_rows(a)
    # pretranspose and nontranspose: 2 state dtypes x 2 B; mtp: 2 state dtypes x 2 T x 2 B.
    assert [r.version for r in rows].count("pretranspose") == 4
    assert [r.version for r in rows].count("nontranspose") == 4
    assert [r.version for r in rows].count("mtp") == 8
    for r in rows:
        assert r.pool == (r.version != "nontranspose")
        assert r.intermediate == (r.version == "mtp")
        assert not r.l2norm and (r.version == "mtp" or r.T == 1)
    assert {r.T for r in rows if r.version == "mtp"} == {3, 5}
    assert {r.pool_slots for r in rows} == {"scattered"}
    contiguous = cli.sweep_rows(cli.parse_args(["--api", "mtp", "--pool-slots", "contiguous"]))
    assert contiguous and all(r.pool and r.pool_slots == "contiguous" for r in contiguous)


def test_default_sweep_size():
    rows = cli.sweep_rows(cli.parse_args([]))
    assert len(rows) == 6 + 6 + 3 * 6


@pytest.mark.parametrize("argv, phrase", [
    (["--api", "bogus"], "--api"),
    (["--version", "bogus"], "--version"),
    (["--api", "mtp", "--version", "pretranspose"], "deprecated"),
    (["--compile-only", "--plot", "p.png"], "--plot"),
    (["--num-q-heads", "3", "--num-v-heads", "32"], "multiple"),
    (["--head-size", "96"], "--head-size"),
    (["--batch-size", "0"], "positive"),
    (["--batch-size", "4", "-2"], "positive"),
    (["--seq-len", "32"], "--seq-len"),
    (["--pool-slots", "random"], "--pool-slots"),
    (["--arch", "sm_90a"], "--compile-only"),
    (["--dtype", "fp32"], "--dtype"),
])
def test_bad_flags_exit_2_with_one_line(argv, phrase, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and phrase in err


def test_version_alone_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr()
    assert out.out == f"flashgdn {flashgdn.__version__}\n" and out.err == ""


def test_version_with_a_value_is_a_deprecated_api(capsys):
    a = cli.parse_args(["--version", "mtp", "--batch-size", "4"])
    assert a.api == "mtp" and a.batch_size == [4]
    assert {r.version for r in cli.sweep_rows(a)} == {"mtp"}
    err = capsys.readouterr().err
    assert "deprecated" in err and "--api mtp" in err
    cli.parse_args(["--api", "mtp"])
    assert capsys.readouterr().err == ""  # the new spelling: no notice


def test_help_names_api_and_ptxas():
    text = cli.build_parser().format_help()
    assert "--api" in text and "deprecated spelling of --api" in text
    assert "ptxas" in text and "nvidia-cuda-nvcc" in text


# ----------------------------------------------------------------------------- formulas


def test_flops_hand_computed():
    # 7 FLOPs per state element per token: B=2, T=3, HV=2, K=V=64 -> 7 * 2*3*2 * 64*64.
    assert gdn_flops(B=2, T=3, H=1, HV=2, K=64, V=64) == 7 * 12 * 4096 == 344064
    assert gdn_flops(B=2, T=3, H=2, HV=2, K=64, V=64) == 344064  # H does not change the work


def test_bytes_hand_computed():
    kw = dict(B=2, T=3, H=1, HV=2, K=64, V=64, io_bytes=2, state_bytes=4, gate_bytes=2, dt_bias_bytes=4)
    state = 2 * 2 * 64 * 64 * 4  # B*HV*K*V*4 = 65536
    q_k = 2 * 2 * 3 * 1 * 64 * 2  # 2 tensors * B*T*H*K * 2 B = 1536
    v_o = 2 * 2 * 3 * 2 * 64 * 2  # 2 tensors * B*T*HV*V * 2 B = 3072
    a_b = 2 * 2 * 3 * 2 * 2  # 2 tensors * B*T*HV * 2 B = 48
    params = 2 * 4 + 2 * 4  # A_log + dt_bias, HV fp32 each = 16
    assert (state, q_k, v_o, a_b, params) == (65536, 1536, 3072, 48, 16)
    # Pool (int32 indices), state updated, 3 intermediate states cached:
    full = gdn_bytes(**kw, index_bytes=4, update_state=True, intermediate=True)
    assert full == 2 * state + 3 * state + q_k + v_o + a_b + params + 2 * 4 == 332360
    # Dense state, no update, nothing cached:
    assert gdn_bytes(**kw, update_state=False) == state + q_k + v_o + a_b + params == 70208


def test_row_metrics_use_the_formulas():
    r = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True)
    assert r.flops() == 344064 and r.bytes() == 332360
    r16 = Row("nontranspose", 2, 1, 1, 2, 64, 64, "fp16", "bf16", pool=False)
    assert r16.bytes() == gdn_bytes(B=2, T=1, H=1, HV=2, K=64, V=64, io_bytes=2, state_bytes=2, gate_bytes=2)


# ----------------------------------------------------------------------------- writers and table


def _fake_rows():
    rec = dict.fromkeys(cli.result_fields())
    rec.update(version="pretranspose", B=4, T=1, H=16, HV=32, K=128, V=128, dtype="bf16", state_dtype="fp32",
               pool=False, intermediate=False, l2norm=True, kernel="klast/T1/...", flops=1, bytes=2,
               median_us=5.0, p10_us=4.5, p90_us=5.5, tflops=0.1, tbps=1.5, pct_copy_bw=50.0, verify="ok",
               error="", fla_us=10.0, fla_speedup=2.0, fla_pct_copy_bw=25.0, fla_verify="ok",
               flashinfer_note="baseline unavailable: cannot import flashinfer.gdn_decode: nope")
    return [rec, dict(rec, B=64, median_us=20.0, verify="FAILED: output: 3/10 elements off")]


def test_json_schema(tmp_path):
    env = cli.environment(copy_bw=3.0e12, timers=["cupti"], command=["--json", "x"])
    path = tmp_path / "r.json"
    cli.write_json(str(path), _fake_rows(), env)
    data = json.loads(path.read_text())
    assert set(data) == {"environment", "rows"}
    for key in ("date", "flashgdn", "torch", "nvidia-cutlass-dsl", "timer", "copy_bandwidth_GBps", "command"):
        assert key in data["environment"]
    assert data["environment"]["timer"] == "cupti" and data["environment"]["copy_bandwidth_GBps"] == 3000.0
    assert list(data["rows"][0]) == cli.result_fields()
    for name in ("fla", "flashinfer"):
        for suffix in ("us", "speedup", "pct_copy_bw", "verify", "note"):
            assert f"{name}_{suffix}" in data["rows"][0]


def test_csv_schema(tmp_path):
    path = tmp_path / "r.csv"
    cli.write_csv(str(path), _fake_rows(), cli.environment(copy_bw=2e12, timers=["events"]))
    lines = path.read_text().splitlines()
    env_lines = [ln for ln in lines if ln.startswith("#")]
    assert "# timer: events" in env_lines and "# copy_bandwidth_GBps: 2000.0" in env_lines
    rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
    assert list(rows[0]) == cli.result_fields()
    assert rows[0]["median_us"] == "5.0" and rows[1]["B"] == "64"


def test_results_table_marks_failures_and_notes():
    text = cli.results_table(_fake_rows(), compare=True)
    header, rule, first, second = text.splitlines()[:4]
    assert "median µs" in header and "vs fla" in header and set(rule) <= {"-", " "}
    assert "2.00x" in first and "ok" in first
    assert "FAILED" in second
    assert "flashinfer: baseline unavailable" in text and "3/10 elements off" in text
    assert cli.row_failed(_fake_rows()[1]) and not cli.row_failed(_fake_rows()[0])


def _synthetic_sweep(baselines: bool):
    """Result rows of every API and state dtype (MTP: T = 2 4 8 16), with or without baseline times."""
    rows = []
    for version in ("pretranspose", "nontranspose", "mtp"):
        for state in ("fp32", "bf16"):
            for T in (2, 4, 8, 16) if version == "mtp" else (1,):
                for B in (1, 4, 16, 64, 256, 512):
                    rec = dict.fromkeys(cli.result_fields())
                    us = 3.0 + 0.05 * B * T
                    rec.update(version=version, B=B, T=T, H=16, HV=32, K=128, V=128, dtype="bf16",
                               state_dtype=state, median_us=us)
                    if baselines:
                        rec.update(fla_us=2.0 * us, flashinfer_us=None if T == 16 else 1.2 * us)
                    rows.append(rec)
    return rows


@pytest.mark.parametrize("baselines", [True, False])
def test_plot_writes_a_png(tmp_path, baselines):
    path = tmp_path / "p.png"
    cli.write_plot(str(path), _synthetic_sweep(baselines))
    assert path.read_bytes()[:4] == b"\x89PNG"
    cli.write_plot(str(path), _fake_rows())  # a single panel, one baseline unavailable
    assert path.stat().st_size > 1000


def test_plot_speedup_and_series():
    r = dict(median_us=10.0, fla_us=30.0, flashinfer_us=15.0)
    assert plot.speedup_over_best_baseline(r) == 1.5
    assert plot.speedup_over_best_baseline(dict(r, flashinfer_us=None)) == 3.0
    assert plot.speedup_over_best_baseline(dict(median_us=10.0, fla_us=None, flashinfer_us=None)) is None
    assert plot.speedup_over_best_baseline(dict(r, median_us=None)) is None
    assert plot._pick([2, 4, 8], 6) == [2, 4, 8]
    picked = plot._pick(list(range(1, 17)), plot.MAX_SERIES)
    assert len(picked) == plot.MAX_SERIES and picked[0] == 1 and picked[-1] == 16


# ----------------------------------------------------------------------------- inputs and verify (CPU)


def test_inputs_and_verify_on_cpu():
    row = Row("mtp", 2, 2, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True)
    inp = make_inputs(row, "cpu", seed=0)
    assert inp["state"].shape == (4, 2, 64, 64) and inp["indices"].dtype == torch.int32
    assert inp["inter"].shape == (2, 2, 2, 64, 64)
    assert all(float(inp[k].abs().sum()) > 0 for k in ("q", "k", "v", "a", "b", "state"))
    assert bool(((inp["A_log"].exp() >= 1) & (inp["A_log"].exp() <= 16)).all())
    assert torch.equal(make_inputs(row, "cpu", seed=0)["q"], inp["q"])
    assert verify(REFERENCE, row, "cpu", seed=1) is None

    def off_by_one(r, i):
        call, collect = REFERENCE.prepare(r, i)
        return call, lambda ret: (collect(ret)[0] + 1, *collect(ret)[1:])

    problem = verify(Impl("broken", off_by_one), row, "cpu", seed=1)
    assert problem is not None and problem.startswith("output:")


def test_pool_slot_layouts():
    """Scattered: 2B slots, B distinct ones read in a random order; contiguous: B slots in order."""
    row = Row("mtp", 8, 2, 1, 2, 64, 64, "bf16", "fp32", pool=True)
    scattered = make_inputs(row, "cpu", seed=3)
    idx = scattered["indices"]
    assert scattered["state"].shape[0] == 16
    assert len(set(idx.tolist())) == 8 and 0 <= int(idx.min()) and int(idx.max()) < 16
    flat = dataclasses.replace(row, pool_slots="contiguous")
    inp = make_inputs(flat, "cpu", seed=3)
    assert inp["state"].shape[0] == 8 and inp["indices"].tolist() == list(range(8))
    assert "pool=contiguous" in flat.label() and verify(REFERENCE, flat, "cpu", seed=4) is None


def test_fla_unavailable_is_reported():
    try:
        import fla  # noqa: F401
    except ImportError:
        row = Row("pretranspose", 1, 1, 1, 2, 64, 64, "bf16", "fp32", pool=False)
        with pytest.raises(Unavailable, match="cannot import"):
            cli.BASELINES[0].prepare(row, make_inputs(row, "cpu", 0))
    else:
        pytest.skip("fla is installed")


# ----------------------------------------------------------------------------- FlashInfer routing


class _Recorder(types.SimpleNamespace):
    """A module with flashgdn's three API functions that records which one a call reaches."""

    def __init__(self):
        super().__init__(calls=[])
        for fn in ("gated_delta_rule_decode", "gated_delta_rule_decode_pretranspose", "gated_delta_rule_mtp"):
            setattr(self, fn, lambda *a, _fn=fn, **kw: self.calls.append((_fn, a, kw)))


@pytest.mark.parametrize("state_dtype, via_pretranspose, expected", [
    ("bf16", True, "gated_delta_rule_decode_pretranspose"),
    ("fp32", True, "gated_delta_rule_mtp"),
    ("bf16", False, "gated_delta_rule_mtp"),
])
def test_bf16_mtp_routing(state_dtype, via_pretranspose, expected):
    row = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", state_dtype, pool=True)
    inp = make_inputs(row, "cpu", seed=0)
    module = _Recorder()
    call_api(module, row, inp, bf16_mtp_via_pretranspose=via_pretranspose)
    [(fn, args, kw)] = module.calls
    assert fn == expected
    if fn == "gated_delta_rule_decode_pretranspose":  # state=None, the pool + indices as initial_state
        assert args[3] is None and kw["initial_state"] is inp["state"]
        assert kw["initial_state_indices"] is inp["indices"] and "intermediate_states_buffer" not in kw
        assert args[0].shape == (2, 3, 1, 64)  # q [B, T, H, K] with T > 1


def test_bf16_mtp_routing_passes_intermediates():
    row = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "bf16", pool=True, intermediate=True)
    inp = make_inputs(row, "cpu", seed=0)
    module = _Recorder()
    call_api(module, row, inp, bf16_mtp_via_pretranspose=True)
    assert module.calls[0][2]["intermediate_states_buffer"] is inp["inter"]
    assert cli.BASELINES[1].name == "flashinfer"


# ----------------------------------------------------------------------------- compile-only


def test_dynamic_smem_without_a_module():
    assert dynamic_smem_bytes(object()) is None


def test_compile_only_pretranspose_sm90(capsys, tmp_path):
    out_json = tmp_path / "c.json"
    rc = cli.main(["--compile-only", "--arch", "sm_90a", "--api", "pretranspose", "--batch-size", "1",
                   "--head-size", "128", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured
    name = "klast/T1/H16/HV32/K128/V128/bfloat16/state-float32/small/sm_90a"
    header = captured.out.splitlines()[0].split("  ")
    assert [h.strip() for h in header if h.strip()] == [
        "variant", "kernel class", "batch sizes", "compile s", "registers", "dyn smem B", "error"]
    assert name in captured.out and "KLastDecode" in captured.out
    assert "total compile time:" in captured.out.splitlines()[-1]
    assert "compiling" in captured.err
    rec = json.loads(out_json.read_text())["rows"][0]
    assert rec["kernel"] == name and rec["kernel_class"] == "KLastDecode"
    assert rec["compile_s"] > 0 and not rec.get("error")
    assert isinstance(rec["dyn_smem_bytes"], int) and rec["dyn_smem_bytes"] >= 0
    # Registers come from ptxas when one is found and reads the kept PTX, else "n/a" (best effort).
    assert rec["registers"] == "n/a" or rec["registers"].split()[0].isdigit()
