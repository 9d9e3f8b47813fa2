"""`flashgdn-bench`: sweep the GDN decode kernels over batch sizes, against optional baselines.

    flashgdn-bench --api pretranspose --batch-size 1 64 512 --compare --verify --json out.json --plot out.png
    flashgdn-bench --api mtp --token-slots --pool-padding 8 --compare --verify
    flashgdn-bench --compile-only --arch sm_100a          # no GPU needed: compile every variant
    flashgdn-bench --host --profile                       # host time per call (flashgdn.bench.host)

Each row times one flashgdn call (median/p10/p90 over --iters, L2 flushed before each, with the
timer of flashgdn.bench.timing), reports TFLOPS and TB/s from flashgdn.bench.metrics and the
share of the device's copy bandwidth measured in the same run. `--compare` adds FLA's
fused_recurrent kernel and FlashInfer's gdn_decode (each reported unavailable, with the reason,
when it cannot run; FlashInfer's bf16-state MTP goes through its
gated_delta_rule_decode_pretranspose). `--verify` first checks every implementation against
flashgdn.reference (called with the same arguments) on fresh inputs; a mismatch marks the row
FAILED and the exit status non-zero.
Progress goes to stderr; the table is printed to stdout last. `--plot` draws the speedup over the
fastest baseline (or µs without baselines) against batch size, per API and state dtype.

`--compile-only` prints per kernel variant the kernel class that builds it, its dynamic shared
memory, its registers per thread and its compile time, then the total compile time. The register
column needs ptxas (on PATH, under $CUDA_HOME, or from the `nvidia-cuda-nvcc` pip wheel); without
one it reads n/a.

`--host` prints the host time per call of every public function and engine entry point beside
that of `x.add_(1)` in the same process (and FlashInfer's, when installed); `--profile` adds a
breakdown of one pretranspose call into its steps (flashgdn.bench.host).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

from .. import __version__
from ..spec import MAX_TOKENS, SUPPORTED_HEAD_DIMS
from .plot import write_plot
from .resources import dynamic_smem_bytes, kernel_name, ptx_registers
from .rows import (
    BASELINES, FLASHGDN, IO_DTYPES, POOL_PADDING_MULTIPLE, POOL_SLOTS, STATE_DTYPES, VERSIONS, Impl, Row,
    Unavailable, make_inputs, row_spec, sweep_title, verify,
)

DEFAULT_SM_COUNT = 132  # H100 SXM: regime planning for --compile-only
COMPILE_ARCHS = ("sm_90a", "sm_100a")

DEFAULT_SEQ_LEN = (2, 4, 8)  # MTP rows' T; pretranspose rows are T = 1 unless --api pretranspose --seq-len
DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256, 512)
DEFAULT_ITERS = 100
# --host: B = 1 keeps every kernel (~3 us) shorter than the host time, and many calls per run
# average the timer's resolution away.
HOST_BATCH_SIZES = (1,)
HOST_ITERS = 2000
# Flags of the sweep that --host has no use for (its rows are fixed): given with it, a usage error.
SWEEP_ONLY = ("api", "seq_len", "pool", "pool_padding", "cache_intermediate", "token_slots", "timer", "compare",
              "verify", "plot", "compile_only")

# Fields of one result row (JSON keys, CSV columns), then per baseline NAME: NAME_<suffix>.
ROW_FIELDS = (
    "version", "B", "T", "H", "HV", "K", "V", "dtype", "state_dtype", "pool", "pool_slots", "pool_padding",
    "intermediate", "token_slots", "l2norm", "kernel", "flops", "bytes", "median_us", "p10_us", "p90_us",
    "tflops", "tbps", "pct_copy_bw", "verify", "error",
)
BASELINE_SUFFIXES = ("us", "speedup", "pct_copy_bw", "verify", "note")
# Fields of one --compile-only row: "kernel" is the variant's name, as in a result row.
COMPILE_FIELDS = ("kernel", "kernel_class", "batch_sizes", "compile_s", "registers", "dyn_smem_bytes", "error")
# The const of a bare `--version` (print the package version), told apart from an API name.
SHOW_VERSION = object()


def result_fields(baselines: Optional[Sequence[str]] = None) -> List[str]:
    """Every field of a result row, in order (the CSV columns); `baselines` default: all names."""
    baselines = [b.name for b in BASELINES] if baselines is None else baselines
    return list(ROW_FIELDS) + [f"{b}_{s}" for b in baselines for s in BASELINE_SUFFIXES]


# ----------------------------------------------------------------------------- arguments


def _int_from(lowest: int, what: str):
    """An argparse type: an integer >= `lowest` (`what` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_from(1, "a positive integer")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashgdn-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--api", choices=VERSIONS + ("all",), help="API function(s) to sweep (default: all)")
    add("--version", nargs="?", const=SHOW_VERSION, choices=VERSIONS + ("all",), metavar="API", dest="api_alias",
        help="alone: print flashgdn's version and exit; with a value: deprecated spelling of --api")
    add("--batch-size", type=_positive_int, nargs="+",
        help="batch sizes B (default: 1 4 16 64 256 512; with --host: 1)")
    add("--seq-len", type=_positive_int, nargs="+",
        help="tokens per sequence T of the mtp rows (default: 2 4 8) and, with --api pretranspose, of the "
             "pretranspose rows (default: 1; T > 1 rows read a pool, as mtp rows do)")
    add("--num-q-heads", type=_positive_int, default=16, help="H, q and k heads (default: 16)")
    add("--num-v-heads", type=_positive_int, default=32, help="HV, value heads, a multiple of H (default: 32)")
    add("--head-size", type=int, choices=SUPPORTED_HEAD_DIMS, default=128, help="K = V (default: 128)")
    add("--dtype", choices=tuple(IO_DTYPES), default="bf16", help="q, k, v, a, b and output dtype (default: bf16)")
    add("--state-dtype", choices=tuple(STATE_DTYPES), nargs="+", default=["fp32"],
        help="state dtype(s), one row set each (default: fp32)")
    add("--no-l2norm", action="store_true", help="use_qk_l2norm=False")
    add("--pool", action="store_true",
        help="pretranspose T = 1: a state pool + indices (--pool-slots); mtp and T > 1 rows always use one")
    add("--pool-slots", choices=POOL_SLOTS, default="scattered",
        help="pool rows: 'scattered', 2B slots read at a random permutation of B of them (default); "
             "'contiguous', B slots read in order (FlashInfer's MTP benchmark)")
    add("--pool-padding", type=_int_from(0, "an integer >= 0"), default=0, metavar="N",
        help=f"pool rows: allocate the pool [P, HV, V, K + N] and pass its [..., :K] view (padded head and row "
             f"strides); N elements, a multiple of {POOL_PADDING_MULTIPLE} (default: 0)")
    add("--cache-intermediate", action="store_true", help="mtp and T > 1 rows: also write intermediate_states_buffer")
    add("--token-slots", action="store_true",
        help="mtp: write the state after every token to its own fresh pool slot (ssm_state_indices [B, T]; "
             "B*T more slots, no final write-back)")
    add("--iters", type=_positive_int,
        help="timed iterations per row (default: 100; with --host: 2000 calls per run, 7 runs)")
    add("--warmup", type=int, default=10, help="untimed iterations first (default: 10)")
    add("--timer", choices=("auto", "cupti", "events"), default="auto",
        help="auto: cupti when cupti-python works, else CUDA events around a CUDA graph (default: auto)")
    add("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    add("--compare", action="store_true", help="also time FLA (fused_recurrent) and FlashInfer (gdn_decode)")
    add("--verify", action="store_true", help="check every implementation against flashgdn.reference first")
    add("--json", metavar="PATH", help="write environment + rows as JSON")
    add("--csv", metavar="PATH", help="write rows as CSV, after '# key: value' environment lines")
    add("--plot", metavar="PATH.png",
        help="plot vs batch size, one panel per API and state dtype: the speedup over the fastest baseline "
             "(with --compare), else µs")
    add("--compile-only", action="store_true",
        help="no GPU: compile every kernel variant the sweep needs; print kernel class, dynamic shared memory, "
             "registers (needs ptxas, e.g. from the nvidia-cuda-nvcc pip wheel) and compile time")
    add("--arch", choices=COMPILE_ARCHS, help="--compile-only target (default: sm_90a)")
    add("--sm-count", type=_positive_int,
        help=f"--compile-only: SM count that picks the batch regime (default: {DEFAULT_SM_COUNT}, the H100's)")
    add("--host", action="store_true",
        help="host time per call of every public function and engine entry point (B = 1, output given and "
             "allocated) beside x.add_(1) in the same process, with the ratio to it and GPU time per call; "
             "FlashInfer's too when installed. Takes the shape, dtype, --batch-size, --state-dtype, --iters, "
             "--warmup, --seed, --json and --csv flags")
    add("--profile", action="store_true",
        help="with --host: also time each step of one flashgdn pretranspose call (pool, output allocated)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and cross-check the flags; a bad combination exits 2 with one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.api_alias is SHOW_VERSION:
        print(f"flashgdn {__version__}")
        parser.exit(0)
    if args.api_alias is not None:
        if args.api is not None:
            parser.error("--version API is the deprecated spelling of --api: give --api alone")
        print(f"{parser.prog}: --version {args.api_alias} is deprecated, use --api {args.api_alias}",
              file=sys.stderr)
        args.api = args.api_alias
    if args.host:
        given = [f"--{d.replace('_', '-')}" for d in SWEEP_ONLY if getattr(args, d) != parser.get_default(d)]
        if given:
            parser.error(f"--host times a fixed set of calls: it does not take {', '.join(given)}")
    elif args.profile:
        parser.error("--profile applies with --host")
    args.batch_size = args.batch_size or list(HOST_BATCH_SIZES if args.host else DEFAULT_BATCH_SIZES)
    args.iters = args.iters or (HOST_ITERS if args.host else DEFAULT_ITERS)
    args.api = args.api or "all"
    if args.num_v_heads % args.num_q_heads:
        parser.error(f"--num-v-heads ({args.num_v_heads}) must be a multiple of --num-q-heads ({args.num_q_heads})")
    # pretranspose rows take --seq-len only when asked for alone: --api all keeps its T = 1 rows.
    args.pretranspose_seq_len = args.seq_len if args.seq_len and args.api == "pretranspose" else [1]
    args.seq_len = args.seq_len or list(DEFAULT_SEQ_LEN)
    if max(args.seq_len) > MAX_TOKENS:
        parser.error(f"--seq-len values must be at most {MAX_TOKENS}, got {max(args.seq_len)}")
    if args.token_slots:
        if args.api not in ("mtp", "all"):
            parser.error("--token-slots applies to mtp rows (--api mtp or all): it is gated_delta_rule_mtp's "
                         "ssm_state_indices")
        if min(args.seq_len) < 2:
            parser.error(f"--token-slots needs --seq-len values >= 2 (ssm_state_indices), got {min(args.seq_len)}")
        if args.cache_intermediate:
            parser.error("--token-slots and --cache-intermediate exclude each other (as the API's arguments do)")
    if args.pool_padding % POOL_PADDING_MULTIPLE:
        parser.error(f"--pool-padding must be a multiple of {POOL_PADDING_MULTIPLE} elements, got {args.pool_padding}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.compile_only and (args.arch or args.sm_count):
        parser.error("--arch and --sm-count only apply with --compile-only (a GPU run uses the GPU's own)")
    if args.compile_only and args.plot:
        parser.error("--plot needs measured times: it does not apply with --compile-only")
    if args.pool_padding and not any(r.pool for r in sweep_rows(args)):
        parser.error("--pool-padding applies to pool rows: add --pool, --api mtp or --api pretranspose --seq-len > 1")
    args.arch = args.arch or "sm_90a"
    args.sm_count = args.sm_count or DEFAULT_SM_COUNT
    return args


def sweep_rows(args: argparse.Namespace) -> List[Row]:
    """Every row the flags ask for: API, then state dtype, then T, then batch size."""
    versions = VERSIONS if args.api == "all" else (args.api,)
    tokens = {"pretranspose": args.pretranspose_seq_len, "nontranspose": [1], "mtp": args.seq_len}
    rows = []
    for version in versions:
        for state_dtype in args.state_dtype:
            for T in tokens[version]:
                pool = version == "mtp" or (version == "pretranspose" and (args.pool or T > 1))
                for B in args.batch_size:
                    rows.append(Row(
                        version, B, T, args.num_q_heads, args.num_v_heads, args.head_size, args.head_size,
                        args.dtype, state_dtype, pool=pool,
                        intermediate=args.cache_intermediate and (version == "mtp" or T > 1),
                        l2norm=not args.no_l2norm, pool_slots=args.pool_slots,
                        token_slots=args.token_slots and version == "mtp",
                        pool_padding=args.pool_padding if pool else 0,
                    ))
    return rows


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
        "timer": ",".join(sorted(set(timers))) or None,
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


# ----------------------------------------------------------------------------- compile-only


def compile_only(args) -> int:
    """Compile every distinct KernelSpec of the sweep for args.arch (no GPU); print a table."""
    try:
        from ..kernels.build import timed_compile
    except ImportError as exc:
        print(f"flashgdn-bench: cannot load the kernel compiler (nvidia-cutlass-dsl): {exc}", file=sys.stderr)
        return 1

    specs: Dict[object, List[int]] = {}
    for row in sweep_rows(args):
        specs.setdefault(row_spec(row, args.arch, args.sm_count), []).append(row.B)
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="flashgdn-bench-") as tmp:
        for i, (spec, batches) in enumerate(specs.items(), 1):
            progress(f"[{i}/{len(specs)}] compiling {spec.short_name()} ...")
            keep = os.path.join(tmp, str(i))
            os.makedirs(keep)
            rec = {"kernel": spec.short_name(), "batch_sizes": " ".join(map(str, sorted(set(batches))))}
            try:
                rec["kernel_class"] = kernel_name(spec)
                compiled, rec["compile_s"] = timed_compile(spec, keep_dir=keep)
                smem = dynamic_smem_bytes(compiled)
                rec["dyn_smem_bytes"] = "n/a" if smem is None else smem
                ptx = sorted(f for f in os.listdir(keep) if f.endswith(".ptx"))
                rec["registers"] = ptx_registers(os.path.join(keep, ptx[0]), spec.arch) if ptx else "n/a"
            except Exception as exc:  # report every variant, fail at the end
                failed = True
                rec["error"] = _one_line(exc)
            results.append(rec)
    write_outputs(args, results, environment(command=args.argv), COMPILE_FIELDS)
    print(format_table(
        ("variant", "kernel class", "batch sizes", "compile s", "registers", "dyn smem B", "error"),
        [[r.get(k) for k in COMPILE_FIELDS] for r in results],
    ))
    total = sum(r.get("compile_s") or 0.0 for r in results)
    print(f"\ntotal compile time: {total:.1f} s for {len(results)} variant(s)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- GPU sweep


def measure(impl: Impl, row: Row, args, device, flusher, variant, seen: set) -> dict:
    """Verify (with --verify) and time one implementation on one row.

    `variant` names what the first call compiles (a KernelSpec name, a baseline's configuration);
    the first call of a new one runs untimed, with a progress line. Returns {"verify": "ok" |
    "FAILED: ..." | "", "times": summarize(...), "timer": name}. Exceptions propagate."""
    import torch

    from .timing import summarize, time_fn

    first, t0 = variant not in seen, time.perf_counter()
    if first:  # compiled by the first call: --verify's, else the untimed one below
        progress(f"  compiling {impl.name} {variant} ...")
    out = {"verify": ""}
    if args.verify:
        problem = verify(impl, row, device, args.seed)
        out["verify"] = "ok" if problem is None else f"FAILED: {problem}"
    inp = make_inputs(row, device, args.seed + 1)
    call, _ = impl.prepare(row, inp)
    if first:
        call()
        torch.cuda.synchronize(device)
        seen.add(variant)
        progress(f"  ... ready in {time.perf_counter() - t0:.1f} s{' (with --verify)' if args.verify else ''}")
    times, out["timer"] = time_fn(call, iters=args.iters, warmup=args.warmup, cold_l2=True,
                                  timer=args.timer, flusher=flusher)
    out["times"] = summarize(times)
    return out


def _one_line(exc: BaseException) -> str:
    """The exception's first non-empty line, without terminal colour codes (the DSL's errors have them)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = (text.splitlines() or [""])[0]
    return first if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {first}"


def run_row(row: Row, args, device, arch: str, sm_count: int, flusher, copy_bw: float, seen: set,
            timers: set) -> dict:
    """One result row (every field of result_fields()): flashgdn, then each baseline (--compare)."""
    import torch

    kernel = row_spec(row, arch, sm_count).short_name()
    rec = dict.fromkeys(result_fields())
    rec.update(
        version=row.version, B=row.B, T=row.T, H=row.H, HV=row.HV, K=row.K, V=row.V, dtype=row.dtype,
        state_dtype=row.state_dtype, pool=row.pool, pool_slots=row.pool_slots if row.pool else "",
        pool_padding=row.pool_padding, intermediate=row.intermediate, token_slots=row.token_slots, l2norm=row.l2norm,
        kernel=kernel, flops=row.flops(), bytes=row.bytes(), verify="", error="",
    )
    try:
        m = measure(FLASHGDN, row, args, device, flusher, kernel, seen)
        timers.add(m["timer"])
        us = m["times"]["median_us"]
        rec.update(m["times"], verify=m["verify"], tflops=row.flops() / (us * 1e-6) / 1e12,
                   tbps=row.bytes() / (us * 1e-6) / 1e12, pct_copy_bw=pct_of_copy(row.bytes(), us, copy_bw))
    except Exception as exc:
        rec["error"] = _one_line(exc)
        progress(f"  flashgdn: {rec['error']}")
    for impl in BASELINES if args.compare else ():
        # What a baseline compiles per call signature (FlashInfer keys a padded pool's strides too).
        flags = (("nol2", not row.l2norm), ("inter", row.intermediate), ("token-slots", row.token_slots),
                 (f"padding={row.pool_padding}", row.pool_padding))
        variant = " ".join([f"{row.version} T={row.T} {row.dtype}/{row.state_dtype}"] + [f for f, on in flags if on])
        try:
            m = measure(impl, row, args, device, flusher, variant, seen)
        except Exception as exc:  # Unavailable, ImportError, a TypeError on the signature, ...
            rec[f"{impl.name}_note"] = f"baseline unavailable: {_one_line(exc)}"
            progress(f"  {impl.name}: {rec[f'{impl.name}_note']}")
            continue
        timers.add(m["timer"])
        b_us = m["times"]["median_us"]
        rec[f"{impl.name}_us"], rec[f"{impl.name}_verify"] = b_us, m["verify"]
        # flashgdn's compulsory bytes over the baseline's time (FLA, e.g., also writes an fp32 state copy).
        rec[f"{impl.name}_pct_copy_bw"] = pct_of_copy(row.bytes(), b_us, copy_bw)
        rec[f"{impl.name}_speedup"] = b_us / rec["median_us"] if rec["median_us"] else None
    torch.cuda.empty_cache()
    return rec


def row_failed(rec: dict) -> bool:
    """An error, or a --verify mismatch of flashgdn or of a baseline."""
    verdicts = [rec.get("verify")] + [rec.get(f"{b.name}_verify") for b in BASELINES]
    return bool(rec.get("error")) or any((v or "").startswith("FAILED") for v in verdicts)


def api_label(rec: dict) -> str:
    """A result row's API as the table shows it: the version, "+slots" with token slots."""
    return rec["version"] + ("+slots" if rec.get("token_slots") else "")


def results_table(rows: List[dict], compare: bool) -> str:
    """The stdout table under its title (sweep_title), then one note per distinct error, mismatch
    or unavailable baseline."""
    names = [b.name for b in BASELINES] if compare else []
    headers = ["version", "B", "T", "state", "pool", "median µs", "p10 µs", "p90 µs", "TFLOPS", "TB/s",
               "% copy bw", "verify"]
    headers += [h for n in names for h in (f"{n} µs", f"vs {n}")]
    body, notes = [], []
    for r in rows:
        verdict = "ERROR" if r["error"] else "FAILED" if r["verify"].startswith("FAILED") else r["verify"]
        line = [api_label(r), r["B"], r["T"], r["state_dtype"], r["pool_slots"] if r["pool"] else "no",
                r["median_us"], r["p10_us"], r["p90_us"], r["tflops"], r["tbps"], r["pct_copy_bw"], verdict]
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
    table = sweep_title(rows) + "\n\n" + format_table(headers, body)
    return table + ("\n\nnotes:\n  " + "\n  ".join(notes) if notes else "")


def supported_gpu():
    """(the current CUDA device, its DeviceFacts), or None after saying why not on stderr."""
    import torch

    from .. import device as gdn_device

    if not torch.cuda.is_available():
        print("flashgdn-bench: no CUDA GPU visible (use --compile-only to just compile)", file=sys.stderr)
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        return device, gdn_device.facts_of(device)
    except gdn_device.UnsupportedGPUError as exc:
        print(f"flashgdn-bench: {exc}", file=sys.stderr)
        return None


def sweep(args) -> int:
    """Time every row on the current GPU; print the table; write --json/--csv/--plot."""
    import torch

    from .timing import L2Flusher, copy_bandwidth

    found = supported_gpu()
    if found is None:
        return 1
    device, (arch, sm_count, _) = found
    progress(f"measuring copy bandwidth on {torch.cuda.get_device_name(device)} ...")
    timers: set = set()
    copy_bw = copy_bandwidth(device, timer=args.timer)
    progress(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    flusher, seen, results = L2Flusher(device), set(), []
    rows = sweep_rows(args)
    for i, row in enumerate(rows, 1):
        progress(f"[{i}/{len(rows)}] {row.label()} ...")
        results.append(run_row(row, args, device, arch, sm_count, flusher, copy_bw, seen, timers))
    env = environment(device, copy_bw, timers, args.argv)
    write_outputs(args, results, env)
    if args.plot:
        write_plot(args.plot, results)
    print(format_env_line(env))
    print(results_table(results, args.compare))
    return 1 if any(row_failed(r) for r in results) else 0


def format_env_line(env: dict) -> str:
    keys = ("gpu", "sm_count", "driver", "timer", "copy_bandwidth_GBps", "torch", "nvidia-cutlass-dsl")
    return " | ".join(f"{k}={env[k]}" for k in keys if env.get(k) is not None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `flashgdn-bench` and benchmarks/bench_gdn_decode.py; returns the exit status."""
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    if args.host:
        from .host import run

        return run(args)
    return sweep(args)


if __name__ == "__main__":
    raise SystemExit(main())
