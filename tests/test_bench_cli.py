"""CPU tests of the benchmark CLI: flags, the rows a sweep makes, FLOP/byte formulas, writers, the
plot, verify plumbing, the call routing (flashgdn, FlashInfer, FLA), the KernelSpec of each row
against the API's own lookup, and real `--compile-only` runs (CuTe DSL compiles without a GPU)."""
from __future__ import annotations

import csv
import dataclasses
import json
import types

import pytest
import torch

import flashgdn
from flashgdn.bench import cli, plot
from flashgdn.bench import rows as rows_module
from flashgdn.bench.metrics import gdn_bytes, gdn_flops
from flashgdn.bench.resources import dynamic_smem_bytes
from flashgdn.bench.rows import (
    BASELINES, FLASHGDN, REFERENCE, Impl, Row, Unavailable, call_api, make_inputs, row_spec, state_rows, verify,
)
from flashgdn.device import DeviceFacts
from helpers import stub_kernel_lookups


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
    assert a.pool_slots == "scattered" and a.pool_padding == 0 and not a.token_slots
    assert a.pretranspose_seq_len == [1]
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
    (["--pool-padding", "4"], "multiple of 8"),
    (["--pool-padding", "-8"], "--pool-padding"),
    (["--api", "nontranspose", "--pool-padding", "8"], "pool rows"),
    (["--api", "pretranspose", "--pool-padding", "8"], "pool rows"),
    (["--api", "pretranspose", "--token-slots"], "mtp rows"),
    (["--api", "mtp", "--token-slots", "--seq-len", "1", "2"], ">= 2"),
    (["--api", "mtp", "--token-slots", "--cache-intermediate"], "exclude"),
    (["--rounds", "0"], "positive"),
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
    full = gdn_bytes(**kw, index_bytes=4, state_writes=1, intermediate=True)
    assert full == 2 * state + 3 * state + q_k + v_o + a_b + params + 2 * 4 == 332360
    # Dense state, no update, nothing cached:
    assert gdn_bytes(**kw, state_writes=0) == state + q_k + v_o + a_b + params == 70208
    # Token slots: read once, written once per token (3), B*T int32 ssm_state_indices besides the B indices:
    slots = gdn_bytes(**kw, index_bytes=4, state_writes=3, token_index_bytes=4)
    assert slots == state + 3 * state + q_k + v_o + a_b + params + 2 * 4 + 2 * 3 * 4 == 266848


def test_row_metrics_use_the_formulas():
    r = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True)
    assert r.flops() == 344064 and r.bytes() == 332360
    r16 = Row("nontranspose", 2, 1, 1, 2, 64, 64, "fp16", "bf16", pool=False)
    assert r16.bytes() == gdn_bytes(B=2, T=1, H=1, HV=2, K=64, V=64, io_bytes=2, state_bytes=2, gate_bytes=2)
    slots = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True)
    assert slots.flops() == 344064 and slots.bytes() == 266848
    # Padding is not traffic; a pretranspose row with T > 1 counts as the mtp row does.
    padded = Row("pretranspose", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True, pool_padding=8)
    assert padded.bytes() == 332360 and padded.flops() == 344064


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
    title, blank, header, rule, first, second = text.splitlines()[:6]
    assert title == "H=16 HV=32 K=128 V=128 bf16 q/k/v" and blank == ""
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


@pytest.mark.parametrize("version, B, state_dtype, intermediate, skips", [
    ("mtp", 64, "bf16", True, True), ("pretranspose", 64, "bf16", True, True),
    ("mtp", 63, "bf16", True, False),  # B * HV = 126: its other kernel writes the final state
    ("mtp", 64, "fp32", True, False), ("mtp", 64, "bf16", False, False),
])
def test_flashinfer_final_state_with_a_buffer(version, B, state_dtype, intermediate, skips, monkeypatch):
    """FlashInfer 0.7.2's bf16-state T > 1 path with intermediate_states_buffer writes no final state
    from B * HV >= 128 on: those rows leave FlashInfer's state out of the verification and say so."""
    row = Row(version, B, 2, 1, 2, 64, 64, "bf16", state_dtype, pool=True, intermediate=intermediate)
    inp = make_inputs(row, "cpu", seed=0)
    monkeypatch.setattr(rows_module.importlib, "import_module", lambda name: _Recorder())
    _, collect = BASELINES[1].prepare(row, inp)
    output, state, inter = collect((inp["output"], inp["state"]))
    assert (state is None) == skips and output is inp["output"] and inter is inp["inter"]
    note = BASELINES[1].note(row) or ""
    assert ("writes no final state" in note) == skips


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


# ----------------------------------------------------------------------------- T > 1 pretranspose, token slots, padding


def test_pretranspose_rows_take_seq_len_with_api_pretranspose():
    argv = ["--api", "pretranspose", "--seq-len", "1", "2", "4", "--batch-size", "1", "4"]
    rows = cli.sweep_rows(cli.parse_args(argv))
    assert [(r.T, r.B, r.pool) for r in rows] == [(1, 1, False), (1, 4, False), (2, 1, True), (2, 4, True),
                                                   (4, 1, True), (4, 4, True)]
    assert {r.version for r in rows} == {"pretranspose"} and not any(r.intermediate or r.token_slots for r in rows)
    assert "pretranspose B=4 T=2 " in rows[3].label() and "T=" not in rows[0].label()
    mtp_twin = dataclasses.replace(rows[3], version="mtp")  # bytes and FLOPs counted as the mtp row's
    assert (rows[3].bytes(), rows[3].flops()) == (mtp_twin.bytes(), mtp_twin.flops())
    inter = cli.sweep_rows(cli.parse_args(["--api", "pretranspose", "--seq-len", "1", "2", "--cache-intermediate"]))
    assert {(r.T, r.intermediate) for r in inter} == {(1, False), (2, True)}
    # Without --seq-len, or with --api all, pretranspose rows stay T = 1.
    assert {r.T for r in cli.sweep_rows(cli.parse_args(["--api", "pretranspose"]))} == {1}
    every = cli.sweep_rows(cli.parse_args(["--api", "all", "--seq-len", "2", "--batch-size", "1"]))
    assert {(r.version, r.T) for r in every} == {("pretranspose", 1), ("nontranspose", 1), ("mtp", 2)}


@pytest.mark.parametrize("pool_slots, read_slots", [("contiguous", 3), ("scattered", 6)])
def test_token_slot_rows_and_inputs(pool_slots, read_slots):
    a = cli.parse_args(["--api", "all", "--token-slots", "--seq-len", "2", "4", "--batch-size", "3",
                        "--head-size", "64", "--pool-slots", pool_slots])
    rows = cli.sweep_rows(a)
    assert [r.token_slots for r in rows] == [r.version == "mtp" for r in rows]
    row = next(r for r in rows if r.token_slots and r.T == 4)
    assert "token-slots" in row.label()
    inp = make_inputs(row, "cpu", seed=5)
    B, T = 3, 4
    assert inp["state"].shape[0] == read_slots + B * T  # B*(T+1) slots or more
    slots, read = inp["slots"], inp["indices"]
    assert slots.shape == (B, T) and slots.dtype == torch.int32 and inp["inter"] is None
    written = slots.flatten().tolist()
    assert len(set(written)) == B * T and min(written) >= read_slots and max(written) < read_slots + B * T
    assert max(read.tolist()) < read_slots  # read slots apart from the written ones
    if pool_slots == "contiguous":
        assert written == list(range(read_slots, read_slots + B * T))
    assert state_rows(row, inp["state"], inp).shape == (B, 1 + T, 32, 64, 64)


def test_pool_padding_rows_and_inputs():
    a = cli.parse_args(["--api", "all", "--pool", "--pool-padding", "16", "--seq-len", "2", "--batch-size", "2",
                        "--head-size", "64", "--state-dtype", "fp32", "bf16"])
    rows = cli.sweep_rows(a)
    assert {(r.version, r.pool_padding) for r in rows} == {("pretranspose", 16), ("nontranspose", 0), ("mtp", 16)}
    row = next(r for r in rows if r.version == "mtp" and r.state_dtype == "bf16")
    assert "padding=16" in row.label()
    state = make_inputs(row, "cpu", seed=0)["state"]
    HV, K = 32, 64
    assert state.shape == (4, HV, 64, K) and state.stride() == (HV * 64 * (K + 16), 64 * (K + 16), K + 16, 1)
    dense = next(r for r in rows if r.version == "nontranspose")
    assert make_inputs(dense, "cpu", seed=0)["state"].is_contiguous()
    assert make_inputs(dataclasses.replace(row, pool_padding=0), "cpu", seed=0)["state"].is_contiguous()


def test_rows_refuse_impossible_modes():
    with pytest.raises(ValueError, match="pool rows"):
        Row("pretranspose", 1, 1, 1, 2, 64, 64, "bf16", "fp32", pool=False, pool_padding=8)
    with pytest.raises(ValueError, match="token_slots"):
        Row("mtp", 1, 2, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True, token_slots=True)
    with pytest.raises(ValueError, match="token_slots"):
        Row("pretranspose", 1, 2, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True)


@pytest.mark.parametrize("row", [
    Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True),
    Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "bf16", pool=True, token_slots=True, pool_padding=8,
        pool_slots="contiguous"),
    Row("pretranspose", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, pool_padding=8),
    Row("pretranspose", 2, 2, 1, 2, 64, 64, "bf16", "bf16", pool=True, intermediate=True),
    Row("pretranspose", 3, 1, 1, 2, 64, 64, "bf16", "bf16", pool=True, pool_padding=16),
    Row("mtp", 2, 4, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True, pool_padding=8),
], ids=lambda r: r.label().replace(" ", "_"))
def test_verify_new_modes_on_cpu(row):
    assert verify(REFERENCE, row, "cpu", seed=2) is None


def test_verify_catches_a_final_write_back_with_token_slots():
    """A token-slot call that also (or only) writes the final state to the read slot is caught."""
    row = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True)

    def plain_mtp(r, inp):  # the plain MTP call: final state to the read slot, no token slots
        call, collect = REFERENCE.prepare(dataclasses.replace(r, token_slots=False), inp)
        return call, lambda ret: (ret[0], state_rows(r, ret[1], inp), None)

    problem = verify(Impl("write-back", plain_mtp), row, "cpu", seed=1)
    assert problem is not None and problem.startswith("state:")


def test_token_slot_routing():
    row = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True, pool_padding=8)
    inp = make_inputs(row, "cpu", seed=0)
    for via in (False, True):  # flashgdn / FlashInfer: both through gated_delta_rule_mtp for an fp32 state
        module = _Recorder()
        call_api(module, row, inp, bf16_mtp_via_pretranspose=via)
        [(fn, args, kw)] = module.calls
        assert fn == "gated_delta_rule_mtp" and kw["ssm_state_indices"] is inp["slots"]
        assert kw["disable_state_update"] is False and kw["intermediate_states_buffer"] is None
        assert args[3] is inp["state"] and args[3].stride()[-2] == 64 + 8  # the padded view as it is
    fla, flashinfer = BASELINES[:2]
    bf16 = dataclasses.replace(row, state_dtype="bf16")
    with pytest.raises(Unavailable, match="fp32 state"):
        flashinfer.prepare(bf16, make_inputs(bf16, "cpu", seed=0))
    with pytest.raises(Unavailable, match="ssm_state_indices"):
        fla.prepare(row, inp)
    inter = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, intermediate=True)
    with pytest.raises(Unavailable, match="intermediate_states_buffer"):
        fla.prepare(inter, make_inputs(inter, "cpu", seed=0))


@pytest.mark.parametrize("token_slots, packed", [(True, True), (False, False)])
def test_flashinfer_gets_a_packed_pool_for_padded_token_slots(token_slots, packed, monkeypatch):
    """FlashInfer's fp32 token-slot kernel indexes the pool flat: a padded pool goes as a packed
    copy there, and as its view everywhere else."""
    row = Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=token_slots, pool_padding=8)
    inp = make_inputs(row, "cpu", seed=0)
    module = _Recorder()
    monkeypatch.setattr(rows_module.importlib, "import_module", lambda name: module)
    call, _ = BASELINES[1].prepare(row, inp)
    call()
    [(fn, args, kw)] = module.calls
    assert fn == "gated_delta_rule_mtp" and args[3].is_contiguous() == packed
    assert (args[3] is inp["state"]) != packed and torch.equal(args[3], inp["state"])


def test_every_mtp_call_passes_disable_state_update():
    for row in (Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True),
                Row("mtp", 2, 3, 1, 2, 64, 64, "bf16", "bf16", pool=True, intermediate=True)):
        module = _Recorder()
        call_api(module, row, make_inputs(row, "cpu", seed=0))
        [(fn, _, kw)] = module.calls
        assert fn == "gated_delta_rule_mtp" and kw["disable_state_update"] is False
        assert "ssm_state_indices" not in kw  # only with token slots: older FlashInfers lack it


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_multi_token_pretranspose_routing(state_dtype):
    """flashgdn and FlashInfer alike: gated_delta_rule_decode_pretranspose, q [B, T > 1, ...], the
    pool (padded view) as initial_state."""
    row = Row("pretranspose", 2, 4, 1, 2, 64, 64, "bf16", state_dtype, pool=True, pool_padding=8)
    inp = make_inputs(row, "cpu", seed=0)
    for via in (False, True):
        module = _Recorder()
        call_api(module, row, inp, bf16_mtp_via_pretranspose=via)
        [(fn, args, kw)] = module.calls
        assert fn == "gated_delta_rule_decode_pretranspose" and args[3] is None
        assert args[0].shape == (2, 4, 1, 64) and kw["initial_state"] is inp["state"]
        assert kw["initial_state_indices"] is inp["indices"] and not inp["state"].is_contiguous()


# ----------------------------------------------------------------------------- row_spec == the API's lookup


_SPEC_ROWS = [
    Row("pretranspose", 3, 1, 1, 2, 64, 64, "bf16", "fp32", pool=False),
    Row("pretranspose", 3, 1, 1, 2, 64, 64, "bf16", "bf16", pool=True, pool_padding=8),
    Row("pretranspose", 3, 4, 1, 2, 64, 64, "bf16", "fp32", pool=True, pool_padding=16),
    Row("pretranspose", 3, 2, 1, 2, 64, 64, "fp16", "bf16", pool=True, intermediate=True, l2norm=False),
    Row("nontranspose", 3, 1, 1, 2, 64, 64, "bf16", "bf16", pool=False),
    Row("mtp", 3, 3, 1, 2, 64, 64, "bf16", "fp32", pool=True),
    Row("mtp", 3, 8, 1, 2, 64, 64, "bf16", "bf16", pool=True, intermediate=True, pool_padding=8),
    Row("mtp", 3, 2, 1, 2, 64, 64, "bf16", "fp32", pool=True, token_slots=True),
    Row("mtp", 300, 5, 1, 2, 64, 64, "bf16", "bf16", pool=True, token_slots=True, pool_padding=8),
]


@pytest.mark.parametrize("row", _SPEC_ROWS, ids=lambda r: r.label().replace(" ", "_"))
def test_row_spec_is_what_the_api_looks_up(row, monkeypatch):
    """The spec --compile-only builds for a row is the one flashgdn's API looks up for the row's
    call (CPU tensors; the device check, the device facts and the kernel cache stubbed)."""
    facts = DeviceFacts("sm_90a", 132, "sm90-hbm3")
    looked_up = stub_kernel_lookups(monkeypatch, facts)
    inp = make_inputs(row, "cpu", seed=0)
    FLASHGDN.prepare(row, inp)[0]()
    assert looked_up == [row_spec(row, *facts)]
    spec = looked_up[0]
    assert spec.has_token_slots == row.token_slots and spec.strided_state == bool(row.pool_padding)
    assert spec.zero_padding_output == (row.T == 1) and spec.update_state


# ----------------------------------------------------------------------------- writers for the new fields


def test_new_fields_in_json_csv_and_table(tmp_path):
    rec = dict(_fake_rows()[0], version="mtp", T=4, pool=True, pool_slots="scattered", pool_padding=8,
               token_slots=True)
    fields = cli.result_fields()
    assert fields.index("pool_padding") == fields.index("pool_slots") + 1 and "token_slots" in fields
    cli.write_json(str(tmp_path / "r.json"), [rec], {})
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["pool_padding"] == 8 and row["token_slots"] is True
    cli.write_csv(str(tmp_path / "r.csv"), [rec], {})
    [line] = csv.DictReader((tmp_path / "r.csv").read_text().splitlines())
    assert line["pool_padding"] == "8" and line["token_slots"] == "True"
    text = cli.results_table([rec], compare=False)
    title = text.splitlines()[0]
    assert "pool padded by 8 elements" in title and "ssm_state_indices" in title
    assert text.splitlines()[4].startswith("mtp+slots")


# ----------------------------------------------------------------------------- compile-only of the new modes


def test_compile_only_token_slots_and_padded_pools(capsys, tmp_path):
    """One token-slot variant, then a padded pool at T = 1 and T = 2 (K = V = 64: small builds)."""
    common = ["--compile-only", "--arch", "sm_90a", "--batch-size", "1", "--head-size", "64"]
    out_json = tmp_path / "slots.json"
    rc = cli.main(common + ["--api", "mtp", "--token-slots", "--seq-len", "2", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    [rec] = json.loads(out_json.read_text())["rows"]
    assert rec["kernel"] == "klast/T2/H16/HV32/K64/V64/bfloat16/state-float32/small/sm_90a/pool/tokslots/keeppad"
    assert rec["kernel_class"] == "KLastMTP" and not rec.get("error")
    rc = cli.main(common + ["--api", "pretranspose", "--pool", "--pool-padding", "8", "--seq-len", "1", "2",
                            "--state-dtype", "bf16", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    names = [r["kernel"] for r in json.loads(out_json.read_text())["rows"]]
    assert names == ["klast/T1/H16/HV32/K64/V64/bfloat16/state-bfloat16/small/sm_90a/pool/strided",
                     "klast/T2/H16/HV32/K64/V64/bfloat16/state-bfloat16/small/sm_90a/pool/strided/keeppad"]


def test_recorded_command_keeps_only_output_file_names():
    """The results record the command without the machine's folders of its output files."""
    argv = ["--api", "all", "--csv", "/some/dir/a.csv", "--json=/x/y/b.json", "--plot", "c.png", "--verify"]
    assert cli.recorded_command(argv) == ["--api", "all", "--csv", "a.csv", "--json=b.json", "--plot", "c.png",
                                          "--verify"]
    assert cli.parse_args(argv).argv == cli.recorded_command(argv)


def test_sweep_writes_the_rows_done_before_a_stop(tmp_path):
    """The sweep's CSV and JSON hold every row finished so far after each row: a run cut off by a
    time limit (here: the third row raising) keeps the two rows it finished, in order."""
    from flashgdn.bench import timing

    done = []

    def run_row(row, *rest):
        if len(done) == 2:
            raise KeyboardInterrupt  # the time limit's signal, as far as the sweep can tell
        done.append(row)
        return {"version": row.version, "B": row.B, "T": row.T, "state_dtype": row.state_dtype,
                "median_us": 10.0 + len(done)}

    csv_path, json_path = tmp_path / "rows.csv", tmp_path / "rows.json"
    args = cli.parse_args(["--api", "pretranspose", "--batch-size", "1", "4", "16", "--state-dtype", "fp32",
                           "--csv", str(csv_path), "--json", str(json_path)])
    patches = [(cli, "supported_gpu", lambda: (torch.device("cpu"), ("sm_90a", 132, None))),
               (cli, "run_row", run_row), (cli, "environment", lambda *a, **k: {"gpu": "stand-in"}),
               (timing, "copy_bandwidth", lambda *a, **k: 4.0e12), (timing, "L2Flusher", lambda *a, **k: None),
               (torch.cuda, "get_device_name", lambda device: "stand-in")]
    with pytest.MonkeyPatch.context() as mp:
        for obj, name, value in patches:
            mp.setattr(obj, name, value)
        with pytest.raises(KeyboardInterrupt):
            cli.sweep(args)
    with open(csv_path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [(r["B"], float(r["median_us"])) for r in rows] == [("1", 11.0), ("4", 12.0)]
    assert [r["B"] for r in json.loads(json_path.read_text())["rows"]] == [1, 4]


def test_time_in_turns_reverses_every_other_round(monkeypatch):
    """--rounds R: R rounds of --iters per call, every other round in reverse order, each call's
    samples pooled; a call that raises gives its exception and is timed no further."""
    from flashgdn.bench import timing

    order = []

    def fake_time_fn(fn, iters, **kw):
        order.append(fn.__name__)
        if fn.__name__ == "broken" and len(order) > 3:
            raise RuntimeError("out of memory")
        return [float(len(order))] * iters, "cupti"

    def a(): pass
    def b(): pass
    def broken(): pass
    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    args = types.SimpleNamespace(rounds=3, iters=2, warmup=0, timer="cupti")
    out = cli.time_in_turns([a, b, broken], args, flusher=None)
    assert order == ["a", "b", "broken", "broken", "b", "a", "a", "b"]
    # a's samples 1, 6, 7 (twice each), b's 2, 5, 8: medians of the pooled samples.
    assert out[0] == (timing.summarize([1.0, 1.0, 6.0, 6.0, 7.0, 7.0]), "cupti")
    assert out[1][0]["median_us"] == 5.0
    assert isinstance(out[2], RuntimeError)
