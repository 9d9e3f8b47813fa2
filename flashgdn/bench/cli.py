"""`flashgdn-bench`: sweep the GDN decode kernels over batch sizes, against optional baselines.

    flashgdn-bench --api pretranspose --batch-size 1 64 512 --compare --verify --json out.json --plot out.png
    flashgdn-bench --api mtp --token-slots --pool-padding 8 --compare --verify
    flashgdn-bench --api engines --compare --verify       # packed, recurrent, sigmoid_vllm, sglang, fused_step
    flashgdn-bench --api fused_step --hidden-size 5120 --num-v-heads 48 --timer events --compare
    flashgdn-bench --compile-only --arch sm_100a          # no GPU needed: compile every variant
    flashgdn-bench --host --profile                       # host time per call (flashgdn.bench.host)

Each row times one flashgdn call (median/p10/p90 over --iters, L2 flushed before each, with the
timer of flashgdn.bench.timing), reports TFLOPS and TB/s from flashgdn.bench.metrics and the
share of the device's copy bandwidth measured in the same run. `--compare` adds FLA's
fused_recurrent kernel and FlashInfer's gdn_decode (each reported unavailable, with the reason,
when it cannot run; FlashInfer's bf16-state MTP goes through its
gated_delta_rule_decode_pretranspose) and, for the fused step, the composed path (torch GEMV +
conv update + flashgdn's packed decode); a baseline with no such function runs what comes closest
and says so in its note (flashgdn.bench.engine_rows). `--verify` first checks every implementation against
flashgdn.reference (called with the same arguments) on fresh inputs; a mismatch marks the row
FAILED and the exit status non-zero.
`--floor` adds, per row, the copy floor: the median time of a plain device-to-device copy that moves
the row's bytes (flashgdn.bench.metrics; half read, half written), timed as the row (same timer, L2
flush and iterations), and the row's time over it (flashgdn.bench.timing.CopyFloor).
`--api all` sweeps the three FlashInfer API functions; `--api engines` the serving engines' entry
points (packed, recurrent, sigmoid_vllm, sglang) and gdn_fused_decode_step (fused_step); each can be
asked for by name.
Progress goes to stderr; the table is printed to stdout last. `--plot` draws the speedup over the
fastest baseline (or µs without baselines) against batch size, per API and state dtype.

`--compile-only` prints per kernel variant the kernel class that builds it, its dynamic shared
memory, its registers per thread and its compile time, then the total compile time. The register
column needs ptxas (on PATH, under $CUDA_HOME, or from the `nvidia-cuda-nvcc` pip wheel); without
one it reads n/a.

`--host` prints the host time per call of every public function and engine entry point beside
that of `x.add_(1)` in the same process (and FlashInfer's, when installed), with the floors of one
compiled function making one or two empty launches with one or more tensors; `--profile` adds a
breakdown of one pretranspose call and one MTP call into their steps (flashgdn.bench.host).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from .. import __version__
from ..cli_args import int_at_least, positive_int  # noqa: F401  (positive_int: the benchmark scripts' type)
from ..spec import MAX_TOKENS, SUPPORTED_HEAD_DIMS
from .plot import write_plot
from .report import (  # noqa: F401  (the writers are part of this module's interface: host.py, tests)
    BASELINE_SUFFIXES, COMPILE_FIELDS, ROW_FIELDS, api_label, environment, format_env_line, format_table,
    pct_of_copy, progress, result_fields, results_table, row_failed, timer_label, write_csv, write_json,
    write_outputs,
)
from .resources import dynamic_smem_bytes, kernel_name, ptx_registers
from .rows import (
    BASELINES, ENGINE_VERSIONS, FLASHGDN, IO_DTYPES, POOL_PADDING_MULTIPLE, POOL_SLOTS, STATE_DTYPES, VERSIONS,
    Impl, Row, Unavailable, make_inputs, row_specs, verify,
)

DEFAULT_SM_COUNT = 132  # H100 SXM: regime planning for --compile-only
COMPILE_ARCHS = ("sm_90a", "sm_100a")

DEFAULT_SEQ_LEN = (2, 4, 8)  # MTP rows' T; pretranspose rows are T = 1 unless --api pretranspose --seq-len
# recurrent, sigmoid_vllm and sglang rows: T = 1 (decode, 1-D slot indices) and the MTP rows' T
# (speculative-decode verify; SGLang's target verify)
DEFAULT_RECURRENT_SEQ_LEN = (1,) + DEFAULT_SEQ_LEN
DEFAULT_HIDDEN = 2048  # Qwen3-Next's hidden size (fused_step rows)
API_GROUPS = {"all": VERSIONS, "engines": ENGINE_VERSIONS}
DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256, 512)
DEFAULT_ITERS = 100
# --host: B = 1 keeps every kernel (~3 us) shorter than the host time, and many calls per run
# average the timer's resolution away.
HOST_BATCH_SIZES = (1,)
HOST_ITERS = 2000
# Flags of the sweep that --host has no use for (its rows are fixed): given with it, a usage error.
SWEEP_ONLY = ("api", "seq_len", "pool", "pool_padding", "cache_intermediate", "token_slots", "timer", "compare",
              "verify", "plot", "compile_only", "hidden_size", "floor")

# The const of a bare `--version` (print the package version), told apart from an API name.
SHOW_VERSION = object()

# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashgdn-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--api", choices=VERSIONS + ENGINE_VERSIONS + tuple(API_GROUPS),
        help="function(s) to sweep: an API version, an engine row (packed: the engines' packed decode; recurrent: "
             "vLLM's fused_recurrent_gated_delta_rule; sigmoid_vllm: vLLM's fused_sigmoid_gating_delta_rule_update; "
             "sglang: SGLang's fused_sigmoid_gating_delta_rule_update; fused_step: gdn_fused_decode_step), 'all' "
             "(the three API functions, the default) or 'engines' (packed, recurrent, sigmoid_vllm, sglang, "
             "fused_step)")
    add("--version", nargs="?", const=SHOW_VERSION, choices=VERSIONS + ("all",), metavar="API", dest="api_alias",
        help="alone: print flashgdn's version and exit; with a value: deprecated spelling of --api")
    add("--batch-size", type=positive_int, nargs="+",
        help="batch sizes B (default: 1 4 16 64 256 512; with --host: 1)")
    add("--seq-len", type=positive_int, nargs="+",
        help="tokens per sequence T of the mtp rows (default: 2 4 8), of the recurrent, sigmoid_vllm and sglang "
             "rows (default: 1 2 4 8; T > 1: varlen speculative-decode verify, SGLang's target verify) and, with "
             "--api pretranspose, of the pretranspose rows (default: 1; T > 1 rows read a pool, as mtp rows do)")
    add("--num-q-heads", type=positive_int, default=16, help="H, q and k heads (default: 16)")
    add("--num-v-heads", type=positive_int, default=32, help="HV, value heads, a multiple of H (default: 32)")
    add("--head-size", type=int, choices=SUPPORTED_HEAD_DIMS, default=128, help="K = V (default: 128)")
    add("--hidden-size", type=positive_int, metavar="N",
        help=f"fused_step rows: the model's hidden size, a multiple of 64 (default: {DEFAULT_HIDDEN}, Qwen3-Next's; "
             f"Qwen3.5: 5120)")
    add("--dtype", choices=tuple(IO_DTYPES), default="bf16", help="q, k, v, a, b and output dtype (default: bf16)")
    add("--state-dtype", choices=tuple(STATE_DTYPES), nargs="+", default=["fp32"],
        help="state dtype(s), one row set each (default: fp32)")
    add("--no-l2norm", action="store_true", help="use_qk_l2norm=False")
    add("--pool", action="store_true",
        help="pretranspose T = 1: a state pool + indices (--pool-slots); mtp and T > 1 rows always use one")
    add("--pool-slots", choices=POOL_SLOTS, default="scattered",
        help="pool rows: 'scattered', 2B slots read at a random permutation of B of them (default); "
             "'contiguous', B slots read in order (FlashInfer's MTP benchmark)")
    add("--pool-padding", type=int_at_least(0, "an integer >= 0"), default=0, metavar="N",
        help=f"pool rows: allocate the pool [P, HV, V, K + N] and pass its [..., :K] view (padded head and row "
             f"strides); N elements, a multiple of {POOL_PADDING_MULTIPLE} (default: 0)")
    add("--cache-intermediate", action="store_true", help="mtp and T > 1 rows: also write intermediate_states_buffer")
    add("--token-slots", action="store_true",
        help="mtp: write the state after every token to its own fresh pool slot (ssm_state_indices [B, T]; "
             "B*T more slots, no final write-back)")
    add("--iters", type=positive_int,
        help="timed iterations per row (default: 100; with --host: 2000 calls per run, 7 runs)")
    add("--warmup", type=int, default=10, help="untimed iterations first (default: 10)")
    add("--rounds", type=positive_int, default=1,
        help="time a row's implementations in turns: this many rounds of --iters each, every other round in "
             "reverse order, so that an order effect (a block timed right after another measured up to 2 %% slower "
             "on small kernels) favours none; each figure is the median of all its rounds' samples (default: 1)")
    add("--timer", choices=("auto", "cupti", "events"), default="auto",
        help="auto: cupti when cupti-python works, else CUDA events around a CUDA graph (default: auto)")
    add("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    add("--compare", action="store_true", help="also time FLA (fused_recurrent) and FlashInfer (gdn_decode)")
    add("--verify", action="store_true", help="check every implementation against flashgdn.reference first")
    add("--floor", action="store_true",
        help="per row, also time a plain copy of the row's bytes (half read, half written: torch's copy_ of a "
             "contiguous uint8 buffer, i.e. cudaMemcpyAsync device-to-device, the copy the copy bandwidth is "
             "measured with; torch issues that very call, so neither is faster) with the row's timer, L2 flush and "
             "--iters (with --timer events outside a CUDA graph: a captured memcpy node is slower); report its "
             "median (floor µs) and the row's median over it (vs floor). Each byte count is timed once per run")
    add("--json", metavar="PATH", help="write environment + rows as JSON")
    add("--csv", metavar="PATH", help="write rows as CSV, after '# key: value' environment lines")
    add("--plot", metavar="PATH.png",
        help="plot vs batch size, one panel per API and state dtype: the speedup over the fastest baseline "
             "(with --compare), else µs")
    add("--compile-only", action="store_true",
        help="no GPU: compile every kernel variant the sweep needs; print kernel class, dynamic shared memory, "
             "registers (needs ptxas, e.g. from the nvidia-cuda-nvcc pip wheel) and compile time")
    add("--arch", choices=COMPILE_ARCHS, help="--compile-only target (default: sm_90a)")
    add("--sm-count", type=positive_int,
        help=f"--compile-only: SM count that picks the batch regime (default: {DEFAULT_SM_COUNT}, the H100's)")
    add("--host", action="store_true",
        help="host time per call of every public function and engine entry point (B = 1, output given and "
             "allocated) beside x.add_(1) in the same process, with the ratio to it and GPU time per call, and "
             "the floors of one compiled function making one or two empty launches with one or more tensors "
             "(one allocating an output first); "
             "FlashInfer's too when installed. Takes the shape, dtype, --batch-size, --state-dtype, --iters, "
             "--warmup, --seed, --json and --csv flags")
    add("--profile", action="store_true",
        help="with --host: also time each step of one flashgdn pretranspose call and one MTP call (pool, output "
             "allocated)")
    add("--python-only", action="store_true",
        help="with --host: no GPU; time flashgdn's calls on CPU tensors with every compiled function replaced "
             "by a no-op (their Python part: a repeated call's key, lookup, views and output allocation) beside "
             "x.add_(1) on the CPU")
    return p


# The flags whose value is an output file: the results record its name only, not the machine's folders.
OUTPUT_FLAGS = ("--csv", "--json", "--plot")


def recorded_command(argv: Sequence[str]) -> List[str]:
    """The command line as the results record it: each output file (OUTPUT_FLAGS, as `--csv F` or
    `--csv=F`) by its base name."""
    out, after_flag = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if after_flag:
            arg = os.path.basename(arg)
        elif eq and flag in OUTPUT_FLAGS:
            arg = f"{flag}={os.path.basename(value)}"
        out.append(arg)
        after_flag = arg in OUTPUT_FLAGS
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and cross-check the flags; a bad combination exits 2 with one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = recorded_command(sys.argv[1:] if argv is None else argv)
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
    elif args.profile or args.python_only:
        parser.error(f"--{'profile' if args.profile else 'python-only'} applies with --host")
    if args.python_only and args.profile:
        parser.error("--profile times the GPU call's steps: it does not go with --python-only")
    args.batch_size = args.batch_size or list(HOST_BATCH_SIZES if args.host else DEFAULT_BATCH_SIZES)
    args.iters = args.iters or (HOST_ITERS if args.host else DEFAULT_ITERS)
    args.api = args.api or "all"
    if args.num_v_heads % args.num_q_heads:
        parser.error(f"--num-v-heads ({args.num_v_heads}) must be a multiple of --num-q-heads ({args.num_q_heads})")
    versions = API_GROUPS.get(args.api, (args.api,))
    # pretranspose rows take --seq-len only when asked for alone: --api all keeps its T = 1 rows.
    args.pretranspose_seq_len = args.seq_len if args.seq_len and args.api == "pretranspose" else [1]
    args.recurrent_seq_len = args.seq_len or list(DEFAULT_RECURRENT_SEQ_LEN)
    args.seq_len = args.seq_len or list(DEFAULT_SEQ_LEN)
    if args.hidden_size is not None:
        if "fused_step" not in versions:
            parser.error("--hidden-size applies to fused_step rows (--api fused_step or engines)")
        if args.hidden_size % 64:
            parser.error(f"--hidden-size must be a multiple of 64, got {args.hidden_size}")
    args.hidden_size = args.hidden_size or DEFAULT_HIDDEN
    if "fused_step" in versions and args.dtype != "bf16":
        parser.error("fused_step rows are bf16 (gdn_fused_decode_step's contract): drop --dtype or use another --api")
    if args.cache_intermediate and args.api in ENGINE_VERSIONS + ("engines",):
        parser.error("--cache-intermediate applies to mtp and pretranspose T > 1 rows (the API's "
                     "intermediate_states_buffer)")
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
    if args.compile_only and (args.plot or args.floor):
        parser.error(f"{'--plot' if args.plot else '--floor'} needs measured times: it does not apply with "
                     f"--compile-only")
    if args.pool_padding and not any(r.pool for r in sweep_rows(args)):
        parser.error("--pool-padding applies to pool rows: add --pool, --api mtp or --api pretranspose --seq-len > 1")
    args.arch = args.arch or "sm_90a"
    args.sm_count = args.sm_count or DEFAULT_SM_COUNT
    return args


def sweep_rows(args: argparse.Namespace) -> List[Row]:
    """Every row the flags ask for: API, then state dtype, then T, then batch size."""
    tokens = {"pretranspose": args.pretranspose_seq_len, "nontranspose": [1], "mtp": args.seq_len,
              "recurrent": args.recurrent_seq_len, "sigmoid_vllm": args.recurrent_seq_len,
              "sglang": args.recurrent_seq_len, "packed": [1],
              "fused_step": [1]}
    rows = []
    for version in API_GROUPS.get(args.api, (args.api,)):
        engine = version in ENGINE_VERSIONS
        for state_dtype in args.state_dtype:
            for T in tokens[version]:
                pool = engine or version == "mtp" or (version == "pretranspose" and (args.pool or T > 1))
                for B in args.batch_size:
                    rows.append(Row(
                        version, B, T, args.num_q_heads, args.num_v_heads, args.head_size, args.head_size,
                        args.dtype, state_dtype, pool=pool,
                        intermediate=args.cache_intermediate and not engine and (version == "mtp" or T > 1),
                        l2norm=not args.no_l2norm, pool_slots=args.pool_slots,
                        token_slots=args.token_slots and version == "mtp",
                        pool_padding=args.pool_padding if pool else 0,
                        hidden=args.hidden_size if version == "fused_step" else 0,
                    ))
    return rows


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
        for spec in row_specs(row, args.arch, args.sm_count):
            specs.setdefault(spec, []).append(row.B)
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


def prepare(impl: Impl, row: Row, args, device, variant, seen: set):
    """Verify (with --verify) one implementation on one row and build its timed call: (call, verify)
    with verify "ok", "FAILED: ..." or "". `variant` names what the first call compiles (a
    KernelSpec name, a baseline's configuration); the first call of a new one runs untimed, with a
    progress line. Exceptions propagate."""
    import torch

    first, t0 = variant not in seen, time.perf_counter()
    if first:  # compiled by the first call: --verify's, else the untimed one below
        progress(f"  compiling {impl.name} {variant} ...")
    checked = ""
    if args.verify:
        problem = verify(impl, row, device, args.seed)
        checked = "ok" if problem is None else f"FAILED: {problem}"
    inp = make_inputs(row, device, args.seed + 1)
    call, _ = impl.prepare(row, inp)
    if first:
        call()
        torch.cuda.synchronize(device)
        seen.add(variant)
        progress(f"  ... ready in {time.perf_counter() - t0:.1f} s{' (with --verify)' if args.verify else ''}")
    return call, checked


def time_in_turns(calls: list, args, flusher) -> list:
    """Each call's times, summarize()d, and the timer used, in `calls`' order: --rounds rounds of
    --iters each, every other round in reverse order. A call that raises is timed no further and
    gives its exception instead."""
    from .timing import summarize, time_fn, turns

    samples, timers = [[] for _ in calls], [None] * len(calls)
    for i in turns(len(calls), args.rounds):
        if isinstance(samples[i], Exception):
            continue
        try:
            times, timers[i] = time_fn(calls[i], iters=args.iters, warmup=args.warmup, cold_l2=True,
                                       timer=args.timer, flusher=flusher)
            samples[i] += times
        except Exception as exc:
            samples[i] = exc
    return [t if isinstance(t, Exception) else (summarize(t), timer) for t, timer in zip(samples, timers)]


def _one_line(exc: BaseException) -> str:
    """The exception's first non-empty line, without terminal colour codes (the DSL's errors have them)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = (text.splitlines() or [""])[0]
    return first if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {first}"


def run_row(row: Row, args, device, arch: str, sm_count: int, flusher, copy_bw: float, seen: set,
            timers: set, floor=None) -> dict:
    """One result row (every field of result_fields()): flashgdn, then each baseline (--compare),
    then with `floor` (a timing.CopyFloor: --floor) the copy floor of the row's bytes."""
    import torch

    kernel = " + ".join(s.short_name() for s in row_specs(row, arch, sm_count))
    rec = dict.fromkeys(result_fields())
    rec.update(
        version=row.version, B=row.B, T=row.T, H=row.H, HV=row.HV, K=row.K, V=row.V, dtype=row.dtype,
        state_dtype=row.state_dtype, pool=row.pool, pool_slots=row.pool_slots if row.pool else "",
        pool_padding=row.pool_padding, intermediate=row.intermediate, token_slots=row.token_slots, l2norm=row.l2norm,
        kernel=kernel, flops=row.flops(), bytes=row.bytes(), verify="", error="", hidden=row.hidden or None,
    )
    # (implementation, what its first call compiles): flashgdn, then each baseline (--compare).
    variants = [(FLASHGDN, kernel)]
    for impl in [b for b in BASELINES if b.applies(row)] if args.compare else ():
        # What a baseline compiles per call signature (FlashInfer keys a padded pool's strides too).
        flags = (("nol2", not row.l2norm), ("inter", row.intermediate), ("token-slots", row.token_slots),
                 (f"padding={row.pool_padding}", row.pool_padding))
        variants.append((impl, " ".join([f"{row.version} T={row.T} {row.dtype}/{row.state_dtype}"]
                                        + [f for f, on in flags if on])))
    # Timed as each is ready, or with --rounds > 1 all together in turns (their inputs then live together).
    measured, pending = [], []  # (impl, verify, (times, timer) or the exception)
    for impl, variant in variants:
        try:
            call, checked = prepare(impl, row, args, device, variant, seen)
        except Exception as exc:  # Unavailable, ImportError, a TypeError on the signature, ...
            measured.append((impl, "", exc))
            continue
        if args.rounds == 1:
            measured.append((impl, checked, time_in_turns([call], args, flusher)[0]))
        else:
            pending.append((impl, call, checked))
    timed = time_in_turns([call for _, call, _ in pending], args, flusher) if pending else []
    measured += [(impl, checked, result) for (impl, _, checked), result in zip(pending, timed)]
    for impl, checked, result in sorted(measured, key=lambda m: m[0] is not FLASHGDN):
        if isinstance(result, Exception):
            why = _one_line(result)
            if impl is FLASHGDN:
                rec["error"] = why
            else:
                rec[f"{impl.name}_note"] = why = f"baseline unavailable: {why}"
            progress(f"  {impl.name}: {why}")
            continue
        times, timer = result
        timers.add(timer)
        us = times["median_us"]
        if impl is FLASHGDN:
            rec.update(times, verify=checked, tflops=row.flops() / (us * 1e-6) / 1e12,
                       tbps=row.bytes() / (us * 1e-6) / 1e12, pct_copy_bw=pct_of_copy(row.bytes(), us, copy_bw))
            continue
        rec[f"{impl.name}_us"], rec[f"{impl.name}_verify"] = us, checked
        rec[f"{impl.name}_note"] = impl.note(row)
        # flashgdn's compulsory bytes over the baseline's time (FLA, e.g., also writes an fp32 state copy).
        rec[f"{impl.name}_pct_copy_bw"] = pct_of_copy(row.bytes(), us, copy_bw)
        rec[f"{impl.name}_speedup"] = us / rec["median_us"] if rec["median_us"] else None
    if floor is not None:
        measure_floor(rec, floor, timers)
    torch.cuda.empty_cache()
    return rec


def measure_floor(rec: dict, floor, timers: set) -> None:
    """Set rec's floor_us (the copy floor of rec["bytes"]) and vs_floor (rec's median over it);
    None (n/a) where the row counts no bytes, the copy fails or flashgdn has no time."""
    if not rec["bytes"]:
        return
    try:
        times, timer = floor(rec["bytes"])
    except Exception as exc:  # e.g. out of memory: the row stands, its floor reads n/a
        progress(f"  copy floor of {rec['bytes']} bytes: {_one_line(exc)}")
        return
    timers.add(timer)
    rec["floor_us"] = times["median_us"]
    rec["vs_floor"] = rec["median_us"] / rec["floor_us"] if rec["median_us"] else None


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

    from .timing import CopyFloor, L2Flusher, copy_bandwidth

    found = supported_gpu()
    if found is None:
        return 1
    device, (arch, sm_count, _) = found
    progress(f"measuring copy bandwidth on {torch.cuda.get_device_name(device)} ...")
    timers: set = set()
    copy_bw = copy_bandwidth(device, timer=args.timer)
    progress(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    flusher, seen, results = L2Flusher(device), set(), []
    floor = CopyFloor(device, args.iters, args.warmup, args.timer, flusher) if args.floor else None
    rows = sweep_rows(args)
    env = environment(device, copy_bw, timers, args.argv)
    for i, row in enumerate(rows, 1):
        progress(f"[{i}/{len(rows)}] {row.label()} ...")
        results.append(run_row(row, args, device, arch, sm_count, flusher, copy_bw, seen, timers, floor))
        # The files hold every row finished so far: a run stopped by a time limit keeps them.
        env["timer"] = timer_label(timers)
        write_outputs(args, results, env)
    if args.plot:
        write_plot(args.plot, results)
    print(format_env_line(env))
    print(results_table(results, args.compare, args.floor))
    return 1 if any(row_failed(r) for r in results) else 0


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
