"""CPU tests of `flashgdn-bench --floor`: the flag, CopyFloor's memoised copies (timing stubbed),
a whole stubbed sweep writing the floor columns into the table, the CSV and the JSON, and n/a
where a row has no bytes, no time or no floor."""
from __future__ import annotations

import csv
import json
import types

import pytest
import torch

from flashgdn.bench import cli, timing


def _times(us: float):
    return {"median_us": us, "p10_us": 0.9 * us, "p90_us": 1.1 * us}


# ----------------------------------------------------------------------------- flags


def test_floor_flag():
    assert not cli.parse_args([]).floor and cli.parse_args(["--floor"]).floor
    text = cli.build_parser().format_help()
    assert "--floor" in text and "cudaMemcpyAsync" in text


@pytest.mark.parametrize("argv", [["--compile-only", "--floor"], ["--host", "--floor"]])
def test_floor_needs_a_timed_sweep(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--floor" in err


# ----------------------------------------------------------------------------- CopyFloor


def _stub_copies(monkeypatch):
    """Stub the copy and time_fn: returns the list of (copied bytes, time_fn kwargs) of each timing;
    a copy of n bytes takes n / 1000 µs."""
    timed = []

    def copy_call(nbytes, device=None):
        return lambda: nbytes

    def time_fn(fn, **kw):
        timed.append((fn(), kw))
        return [fn() / 1000.0] * kw["iters"], "cupti"

    monkeypatch.setattr(timing, "_copy_call", copy_call)
    monkeypatch.setattr(timing, "time_fn", time_fn)
    return timed


def test_copy_floor_times_each_byte_count_once(monkeypatch):
    timed = _stub_copies(monkeypatch)
    flusher = object()
    floor = timing.CopyFloor("dev", iters=7, warmup=3, timer="events", flusher=flusher)
    first = floor(4000)
    assert first == ({"median_us": 2.0, "p10_us": 2.0, "p90_us": 2.0}, "cupti")
    assert floor(4000) is first and floor(4001)[0]["median_us"] == 2.001
    # Half the bytes copied (read + written = the row's bytes; an odd count rounds up), each count once.
    assert [n for n, _ in timed] == [2000, 2001]
    # Timed as the rows are: their timer, iterations, warm-up and L2 flush.
    kw = timed[0][1]
    assert (kw["iters"], kw["warmup"], kw["timer"], kw["cold_l2"], kw["flusher"]) == (7, 3, "events", True, flusher)
    assert kw["use_graph"] is False


# ----------------------------------------------------------------------------- a stubbed sweep


def _stub_gpu(monkeypatch):
    """A sweep without a GPU: flashgdn's time of a row is its bytes / 500 µs, the copy bandwidth
    3 TB/s, the copies as _stub_copies; returns its list of timed copies."""
    timed = _stub_copies(monkeypatch)
    monkeypatch.setattr(cli, "supported_gpu", lambda: (torch.device("cpu"), ("sm_90a", 132, None)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
    monkeypatch.setattr(timing, "copy_bandwidth", lambda device=None, timer="auto": 3.0e12)
    monkeypatch.setattr(timing, "L2Flusher", lambda device=None: "flusher")
    real_environment = cli.environment
    monkeypatch.setattr(cli, "environment", lambda device, *a: real_environment(None, *a))

    # An implementation's "call" is its time: the row's bytes / 500 µs.
    monkeypatch.setattr(cli, "prepare", lambda impl, row, args, device, variant, seen: (row.bytes() / 500.0, ""))
    monkeypatch.setattr(cli, "time_in_turns", lambda calls, args, flusher: [(_times(c), "cupti") for c in calls])
    return timed


def test_sweep_with_floor_writes_table_csv_and_json(monkeypatch, tmp_path, capsys):
    timed = _stub_gpu(monkeypatch)
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    # T = 1 pretranspose and nontranspose rows (dense states) count the same bytes.
    argv = ["--api", "all", "--batch-size", "1", "4", "--seq-len", "2", "--iters", "5", "--floor",
            "--json", str(out_json), "--csv", str(out_csv)]
    assert cli.main(argv) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["version"] for r in rows] == ["pretranspose"] * 2 + ["nontranspose"] * 2 + ["mtp"] * 2
    assert rows[0]["bytes"] == rows[2]["bytes"] and rows[1]["bytes"] == rows[3]["bytes"]
    distinct = sorted({r["bytes"] for r in rows})
    assert len(distinct) == 4 and sorted(n for n, _ in timed) == sorted(-(-b // 2) for b in distinct)
    assert all(kw["iters"] == 5 and kw["cold_l2"] and kw["flusher"] == "flusher" for _, kw in timed)
    for r in rows:
        assert r["floor_us"] == pytest.approx(-(-r["bytes"] // 2) / 1000.0)
        assert r["vs_floor"] == pytest.approx(r["median_us"] / r["floor_us"])
    lines = [ln for ln in out_csv.read_text().splitlines() if not ln.startswith("#")]
    first = next(csv.DictReader(lines))
    assert float(first["floor_us"]) == rows[0]["floor_us"] and float(first["vs_floor"]) == rows[0]["vs_floor"]
    text = capsys.readouterr().out
    title = next(ln for ln in text.splitlines() if ln.startswith("H=16"))
    assert "floor µs: a device-to-device copy" in title
    header = next(ln for ln in text.splitlines() if ln.startswith("version"))
    assert header.index("% copy bw") < header.index("floor µs") < header.index("vs floor") < header.index("verify")
    assert f"{rows[0]['vs_floor']:.2f}x" in text


def test_sweep_without_floor_times_no_copy(monkeypatch, tmp_path, capsys):
    timed = _stub_gpu(monkeypatch)
    out_json = tmp_path / "r.json"
    assert cli.main(["--api", "mtp", "--batch-size", "1", "--seq-len", "2", "--json", str(out_json)]) == 0
    assert timed == []
    [row] = json.loads(out_json.read_text())["rows"]
    assert row["floor_us"] is None and row["vs_floor"] is None
    text = capsys.readouterr().out
    assert "floor" not in text


# ----------------------------------------------------------------------------- n/a


def _rec(**kw):
    rec = dict.fromkeys(cli.result_fields())
    rec.update(version="mtp", B=4, T=2, H=16, HV=32, K=128, V=128, dtype="bf16", state_dtype="fp32", pool=True,
               pool_slots="scattered", bytes=8000, median_us=8.0, p10_us=7.0, p90_us=9.0, verify="ok", error="")
    rec.update(kw)
    return rec


def test_floor_reads_na_without_bytes_time_or_copy(capsys):
    asked = []

    def floor(nbytes):
        asked.append(nbytes)
        if nbytes == 666:
            raise RuntimeError("CUDA out of memory")
        return _times(4.0), "cupti"

    timers = set()
    no_bytes, no_time, no_copy, ok = (_rec(bytes=0), _rec(median_us=None, error="RuntimeError: boom"),
                                      _rec(bytes=666), _rec())
    for rec in (no_bytes, no_time, no_copy, ok):
        cli.measure_floor(rec, floor, timers)
    assert asked == [8000, 666, 8000] and timers == {"cupti"}
    assert no_bytes["floor_us"] is None and no_bytes["vs_floor"] is None
    assert no_time["floor_us"] == 4.0 and no_time["vs_floor"] is None
    assert no_copy["floor_us"] is None and "CUDA out of memory" in capsys.readouterr().err
    assert ok["floor_us"] == 4.0 and ok["vs_floor"] == 2.0
    body = cli.results_table([no_bytes, no_time, no_copy, ok], compare=False, floor=True).splitlines()[4:8]
    # The floor columns are the last two before the verdict (ok; ERROR for the row without a time).
    assert [ln.split()[-3:] for ln in body] == [["n/a", "n/a", "ok"], ["4.00", "n/a", "ERROR"],
                                                 ["n/a", "n/a", "ok"], ["4.00", "2.00x", "ok"]]


def test_sweep_in_turns_times_every_implementation_together(monkeypatch, capsys):
    """--rounds R > 1: a row's implementations are prepared first and timed together in turns
    (one time_in_turns call with all of them); a baseline that fails to time reads unavailable."""
    _stub_gpu(monkeypatch)
    batches = []

    def in_turns(calls, args, flusher):
        batches.append(len(calls))
        assert args.rounds == 4
        return [(_times(10.0), "cupti"), (_times(12.0), "cupti"), RuntimeError("out of memory")][:len(calls)]

    monkeypatch.setattr(cli, "time_in_turns", in_turns)
    monkeypatch.setattr(cli, "BASELINES", [types.SimpleNamespace(name=n, applies=lambda row: True,
                                                                note=lambda row: "")
                                           for n in ("fla", "flashinfer")])
    args = cli.parse_args(["--api", "pretranspose", "--batch-size", "1", "--rounds", "4", "--compare"])
    row = cli.sweep_rows(args)[0]
    rec = cli.run_row(row, args, torch.device("cpu"), "sm_90a", 132, None, 3.0e12, set(), set())
    assert batches == [3]
    assert rec["median_us"] == 10.0 and rec["fla_us"] == 12.0 and rec["fla_speedup"] == 1.2
    assert rec["flashinfer_us"] is None and "unavailable: RuntimeError: out of memory" in rec["flashinfer_note"]
