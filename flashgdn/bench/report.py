"""What `flashgdn-bench` writes: the fields of a result row, the stdout table and its notes, the
environment of a run, and the JSON and CSV files (flashgdn.bench.cli runs the sweep)."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence

from .rows import BASELINES, sweep_title

# Fields of one result row (JSON keys, CSV columns), then per baseline NAME: NAME_<suffix>.
ROW_FIELDS = (
    "version", "B", "T", "H", "HV", "K", "V", "hidden", "dtype", "state_dtype", "pool", "pool_slots", "pool_padding",
    "intermediate", "token_slots", "l2norm", "kernel", "flops", "bytes", "median_us", "p10_us", "p90_us",
    "tflops", "tbps", "pct_copy_bw", "floor_us", "vs_floor", "verify", "error",
)
BASELINE_SUFFIXES = ("us", "speedup", "pct_copy_bw", "verify", "note")
# Fields of one --compile-only row: "kernel" is the variant's name, as in a result row.
COMPILE_FIELDS = ("kernel", "kernel_class", "batch_sizes", "compile_s", "registers", "dyn_smem_bytes", "error")


def result_fields(baselines: Optional[Sequence[str]] = None) -> List[str]:
    """Every field of a result row, in order (the CSV columns); `baselines` default: all names."""
    baselines = [b.name for b in BASELINES] if baselines is None else baselines
    return list(ROW_FIELDS) + [f"{b}_{s}" for b in baselines for s in BASELINE_SUFFIXES]


# ----------------------------------------------------------------------------- output


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Left-aligned text columns, right-aligned numbers, two spaces apart."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(re.fullmatch(r"[-+0-9.,x%e]+|n/a|", r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric))  # noqa: E731
    return "\n".join(fmt(r).rstrip() for r in [headers, ["-" * w for w in widths]] + cells)


def _cell(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def timer_label(timers: Iterable[str]) -> Optional[str]:
    """The timers a run used, as its files record them ("cupti", "cupti,events"; None: none yet)."""
    return ",".join(sorted(set(timers))) or None


def environment(device=None, copy_bw: Optional[float] = None, timers: Iterable[str] = (),
                command: Sequence[str] = ()) -> Dict[str, object]:
    """Facts of this run for the JSON/CSV files (GPU ones only when `device` is given)."""
    import flashgdn
    import torch

    def version_of(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flashgdn": flashgdn.__version__, "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "nvidia-cutlass-dsl": version_of("nvidia-cutlass-dsl"), "python": sys.version.split()[0],
        "timer": timer_label(timers),
        "copy_bandwidth_GBps": None if copy_bw is None else round(copy_bw / 1e9, 1),
        "command": " ".join(["flashgdn-bench", *command]),
    }
    if device is not None:
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, driver=_driver_version())
    return env


def _driver_version() -> Optional[str]:
    import torch

    try:
        v = int(torch._C._cuda_getDriverVersion())  # CUDA driver API version, e.g. 12080
        api_version = f"CUDA {v // 1000}.{v % 1000 // 10}"
    except Exception:
        api_version = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip().splitlines()
            if out:
                return out[0] + (f" ({api_version})" if api_version else "")
        except Exception:
            pass
    return api_version


def write_json(path: str, rows: List[dict], env: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: List[dict], env: dict, fields: Optional[Sequence[str]] = None) -> None:
    """CSV of `rows` (columns `fields`, default result_fields()), after '# key: value' lines
    holding the environment (read back with pandas.read_csv(path, comment='#'))."""
    fields = list(fields or result_fields())
    with open(path, "w", newline="") as f:
        for k, v in env.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})


def pct_of_copy(nbytes: int, us: Optional[float], copy_bw: float) -> Optional[float]:
    return None if not us else 100.0 * nbytes / (us * 1e-6) / copy_bw


def write_outputs(args, rows: List[dict], env: dict, fields: Optional[Sequence[str]] = None) -> None:
    if args.json:
        write_json(args.json, rows, env)
    if args.csv:
        write_csv(args.csv, rows, env, fields)


def row_failed(rec: dict) -> bool:
    """An error, or a --verify mismatch of flashgdn or of a baseline."""
    verdicts = [rec.get("verify")] + [rec.get(f"{b.name}_verify") for b in BASELINES]
    return bool(rec.get("error")) or any((v or "").startswith("FAILED") for v in verdicts)


def api_label(rec: dict) -> str:
    """A result row's API as the table shows it: the version, "+slots" with token slots."""
    return rec["version"] + ("+slots" if rec.get("token_slots") else "")


# The table title's words on the --floor columns.
FLOOR_NOTE = ("floor µs: a device-to-device copy (cudaMemcpyAsync) of the row's bytes, half read and half written, "
              "timed as the row (timer, L2 flush, median); vs floor: median µs / floor µs")


def results_table(rows: List[dict], compare: bool, floor: bool = False) -> str:
    """The stdout table under its title (sweep_title; with `floor`, FLOOR_NOTE), then one note per
    distinct error, mismatch or unavailable baseline."""
    # A baseline's columns where some row ran it or says why not (the composed path: fused_step rows).
    names = [b.name for b in BASELINES if any(r.get(f"{b.name}_us") is not None or r.get(f"{b.name}_note")
                                               for r in rows)] if compare else []
    headers = ["version", "B", "T", "state", "pool", "median µs", "p10 µs", "p90 µs", "TFLOPS", "TB/s",
               "% copy bw"] + (["floor µs", "vs floor"] if floor else []) + ["verify"]
    headers += [h for n in names for h in (f"{n} µs", f"vs {n}")]
    body, notes = [], []
    for r in rows:
        verdict = "ERROR" if r["error"] else "FAILED" if r["verify"].startswith("FAILED") else r["verify"]
        line = [api_label(r), r["B"], r["T"], r["state_dtype"], r["pool_slots"] if r["pool"] else "no",
                r["median_us"], r["p10_us"], r["p90_us"], r["tflops"], r["tbps"], r["pct_copy_bw"]]
        if floor:
            line += ["n/a" if r.get("floor_us") is None else r["floor_us"],
                     "n/a" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}x"]
        line.append(verdict)
        where = f"{api_label(r)} B={r['B']} T={r['T']} {r['state_dtype']}"
        for msg in (r["error"], r["verify"]):
            if msg and msg != "ok":
                notes.append(f"flashgdn {where}: {msg}")
        for n in names:
            sp, failed = r[f"{n}_speedup"], (r[f"{n}_verify"] or "").startswith("FAILED")
            line += ["n/a" if r[f"{n}_us"] is None else r[f"{n}_us"],
                     "FAILED" if failed else "n/a" if sp is None else f"{sp:.2f}x"]
            if r[f"{n}_note"]:
                notes.append(f"{n}: {r[f'{n}_note']}")
            if failed:
                notes.append(f"{n} {where}: {r[f'{n}_verify']}")
        body.append(line)
    notes = list(dict.fromkeys(notes))
    title = sweep_title(rows) + (f"; {FLOOR_NOTE}" if floor else "")
    table = title + "\n\n" + format_table(headers, body)
    return table + ("\n\nnotes:\n  " + "\n  ".join(notes) if notes else "")


def format_env_line(env: dict) -> str:
    keys = ("gpu", "sm_count", "driver", "timer", "copy_bandwidth_GBps", "torch", "nvidia-cutlass-dsl")
    return " | ".join(f"{k}={env[k]}" for k in keys if env.get(k) is not None)
