"""The fused decode step under several settings of its device table (policy.DeviceTable fields),
side by side in one process: CUDA events over CUDA-graph replays (the launch gap between the two
kernels counts, as in a graph-captured decode), cold L2, median.

    python benchmarks/fused_table.py --settings fused_step_pdl=False fused_step_pdl=True
    python benchmarks/fused_table.py --hidden-size 5120 --num-v-heads 48 \\
        --settings conv_gate_threads=128 conv_gate_threads=512 conv_gate_threads=512,conv_gate_prefetch=True
    python benchmarks/fused_table.py --batch-size 64 256 --settings conv_gate_rows=1 conv_gate_rows=4
    python benchmarks/fused_table.py --settings conv_gate_threads_small=None,conv_gate_rows=1 table
    python benchmarks/fused_table.py --batch-size 64 256 --settings table conv_gate_gemm_heads_per_sm=2 --composed
    python benchmarks/fused_table.py --batch-size 1 4 16 --settings table --composed --decode-alone
    python benchmarks/fused_table.py --batch-size 16 --settings table conv_gate_split_batch_rows=1 --rounds 6
        # the columns timed in turns, every other round reversed (flashgdn.bench.timing.turns)

The first setting is the baseline of the speedup columns. Each setting runs the step through
flashgdn.gdn_fused_decode_step with the device's table switched (policy.DEVICE_TABLES), the step's
remembered plans cleared and, but for "table", a compile cache of its own in memory (the process's
and the disk's key a variant by its spec, not by the table that built it:
flashgdn.bench.table_setting).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

import flashgdn
from flashgdn.bench.cli import positive_int
from flashgdn.bench.engine_rows import COMPOSED, composed_note, fused_step_decode_call, fused_step_inputs
from flashgdn.bench.rows import Row
from flashgdn.bench.table_setting import label, parse_setting, switched
from flashgdn.bench.timing import in_turns, summarize, time_fn
from flashgdn.cache import CompileCache, compile_variant
from flashgdn.device import facts_of, unavailable_reason


def median_us(call, iters: int) -> float:
    """Median µs of `call` by the script's one method (CUDA events over graph replays, cold L2): every
    column, the composed path's too, is timed by it."""
    times, _ = time_fn(call, iters=iters, timer="events")
    return summarize(times)["median_us"]


def step_us(row: Row, setting: dict, cache: CompileCache, iters: int, seed: int) -> float:
    """Median µs of one step of `row` with the device's table changed by `setting`, its variants
    from `cache` (the setting's own)."""
    with switched(facts_of(torch.device("cuda")).device_class, setting, cache):
        inp = fused_step_inputs(row, "cuda", seed)
        return median_us(lambda: flashgdn.gdn_fused_decode_step(**inp), iters)


def step_row(args, state_dtype: str, B: int) -> Row:
    """The fused-step row of the command line's shape."""
    return Row("fused_step", B, 1, args.num_q_heads, args.num_v_heads, 128, 128, "bf16", state_dtype, pool=True,
               hidden=args.hidden_size)


def composed_us(row: Row, iters: int, seed: int) -> float:
    """Median µs of the composed path (the device's table as it is) on the same inputs."""
    call, _ = COMPOSED.prepare(row, fused_step_inputs(row, "cuda", seed))
    return median_us(call, iters)


def decode_alone_us(row: Row, iters: int, seed: int) -> float:
    """Median µs of the step's decode alone (engine_rows.fused_step_decode_call), timed the same way:
    the floor the step's first launch adds to."""
    return median_us(fused_step_decode_call(row, fused_step_inputs(row, "cuda", seed)), iters)


def step_parser(doc: str, batch_sizes: list, **settings) -> argparse.ArgumentParser:
    """The arguments of a script that runs the step at one layer shape, under table settings where
    `settings` says how --settings is given (none: the script takes no --settings)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if settings:
        p.add_argument("--settings", type=parse_setting, nargs="+",
                       help="DeviceTable settings to compare, each field=value[,field=value...] (field+={...} adds "
                       "entries to a dict field); the first is the baseline", **settings)
    p.add_argument("--batch-size", type=int, nargs="+", default=batch_sizes)
    p.add_argument("--state-dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-q-heads", type=int, default=16)
    p.add_argument("--num-v-heads", type=int, default=32)
    return p


def gpu_missing(script: str) -> bool:
    """Says why on stderr when there is no GPU to time on."""
    why = unavailable_reason()
    if why:
        print(f"{script}: {why}", file=sys.stderr)
    return bool(why)


def main(argv=None) -> int:
    p = step_parser(__doc__, [1, 4, 16, 64, 256], required=True)
    p.add_argument("--composed", action="store_true",
                   help="also time the composed path (torch GEMV + conv update + packed decode) as a last column")
    p.add_argument("--decode-alone", action="store_true",
                   help="also time the decode alone (the packed decode on the same pool) as a last column")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="time the columns in turns: this many rounds of --iters each, every other round in reverse "
                        "order; each column is the median of its rounds' medians (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if gpu_missing("fused_table"):
        return 2
    labels = ([label(s) for s in args.settings] + (["composed"] if args.composed else [])
              + (["decode alone"] if args.decode_alone else []))
    print(f"hidden={args.hidden_size} H={args.num_q_heads} HV={args.num_v_heads} K=V=128; CUDA events over graph "
          f"replays, cold L2, median of {args.iters}; µs, and the speedup over {labels[0]}")
    if args.composed:
        print(f"composed: {composed_note(step_row(args, 'fp32', 1))}")
    print("state     B  " + "  ".join(f"{label:>24s}" for label in labels))
    caches = [CompileCache(compile_variant) for _ in args.settings]
    for sdt in args.state_dtype:
        for B in args.batch_size:
            row = step_row(args, sdt, B)
            columns = [functools.partial(step_us, row, s, c, args.iters, args.seed)
                       for s, c in zip(args.settings, caches)]
            if args.composed:
                columns.append(functools.partial(composed_us, row, args.iters, args.seed))
            if args.decode_alone:
                columns.append(functools.partial(decode_alone_us, row, args.iters, args.seed))
            us = [statistics.median(m) for m in in_turns(columns, args.rounds)]
            cells = [f"{t:10.2f} ({us[0] / t:5.2f}x)" for t in us]
            print(f"{sdt:5s} {B:5d}  " + "  ".join(f"{c:>24s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
