"""The fused decode step's kernels on the GPU's timeline (CUPTI kernel records, cold L2, median over
calls): how long each kernel runs, when the next one starts, the call's span, and beside it the
decode alone (the packed decode on the same pool), so that what the conv/gate kernel adds shows.

    python benchmarks/fused_timeline.py --hidden-size 5120 --num-v-heads 48 --batch-size 1 4 16 \\
        --settings table conv_gate_threads_small=128 fused_step_pdl=False
    python benchmarks/fused_timeline.py --hidden-size 5120 --num-v-heads 48 --batch-size 16 --graph
    python benchmarks/fused_timeline.py --hidden-size 5120 --num-v-heads 48 --batch-size 64 256 --graph --composed

Eager, the second kernel's launch reaches the GPU several microseconds after the first kernel starts,
so a start time there may be the launch's arrival, not the GPU's; --graph replays each call from a
CUDA graph, as the events tables time it.
"""
from __future__ import annotations

import statistics
import sys

import torch

import flashgdn
from flashgdn.bench.engine_rows import COMPOSED, fused_step_decode_call, fused_step_inputs
from flashgdn.bench.table_setting import label, switched
from flashgdn.bench.timing import L2Flusher, graph_replay
from flashgdn.cache import CompileCache, compile_variant
from flashgdn.device import facts_of
from fused_table import gpu_missing, step_parser, step_row  # this script's folder is on sys.path


def kernel_records(fn, iters: int) -> list:
    """Per call of `fn` (cold L2), its kernels as (start_ns, end_ns, name), in start order."""
    from cupti import cupti

    records, brackets = [], []
    kind = cupti.ActivityKind.CONCURRENT_KERNEL

    def completed(activities):
        records.extend((a.start, a.end, getattr(a, "name", "?")) for a in activities if int(a.kind) == int(kind))

    flush = L2Flusher()
    cupti.activity_register_callbacks(lambda: (8 << 20, 0), completed)
    try:
        cupti.activity_enable(kind)
        for _ in range(iters):
            flush()
            torch.cuda.synchronize()
            t0 = cupti.get_timestamp()
            fn()
            torch.cuda.synchronize()
            brackets.append((t0, cupti.get_timestamp()))
        cupti.activity_flush_all(1)
    finally:
        cupti.activity_disable(kind)
        cupti.finalize()
    return [sorted(r for r in records if t0 <= r[0] <= t1) for t0, t1 in brackets]


def summary(calls: list) -> str:
    """Median duration of each kernel, the start of each after the first, the span (µs), and the
    kernels' names (their first 24 characters)."""
    n = min(len(c) for c in calls)
    med = lambda xs: statistics.median(xs) / 1e3  # noqa: E731
    parts = [f"k{i} {med([c[i][1] - c[i][0] for c in calls]):6.2f}" for i in range(n)]
    parts += [f"k{i}@{med([c[i][0] - c[0][0] for c in calls]):5.2f}" for i in range(1, n)]
    parts.append(f"span {med([max(r[1] for r in c) - c[0][0] for c in calls]):6.2f}")
    parts.append("[" + " | ".join(r[2][:24] for r in calls[0][:n]) + "]")
    return "  ".join(parts)


def main(argv=None) -> int:
    p = step_parser(__doc__, [1, 4, 16], default=[{}])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--graph", action="store_true", help="replay each call from a CUDA graph (no host launch gaps)")
    p.add_argument("--composed", action="store_true",
                   help="also the composed path's kernels (torch GEMV + conv update + packed decode), same inputs")
    args = p.parse_args(argv)
    if gpu_missing("fused_timeline"):
        return 2
    device_class = facts_of(torch.device("cuda")).device_class
    caches = [CompileCache(compile_variant) for _ in args.settings]
    mode = "CUDA graph replays" if args.graph else "eager calls"
    print(f"hidden={args.hidden_size} H={args.num_q_heads} HV={args.num_v_heads}; CUPTI kernel records of {mode}, "
          f"cold L2, median of {args.iters}: kN duration, kN@ start after k0, span (µs)")

    def run(fn):
        return graph_replay(fn) if args.graph else fn

    for sdt in args.state_dtype:
        for B in args.batch_size:
            row = step_row(args, sdt, B)
            inp = fused_step_inputs(row, "cuda", 0)
            for setting, cache in zip(args.settings, caches):
                with switched(device_class, setting, cache):
                    calls = kernel_records(run(lambda: flashgdn.gdn_fused_decode_step(**inp)), args.iters)
                print(f"{sdt} B={B:<4d} {label(setting):40s} {summary(calls)}", flush=True)
            if args.composed:
                call, _ = COMPOSED.prepare(row, fused_step_inputs(row, "cuda", 0))
                call()  # untimed: its conv's first call at a batch size may autotune (engine_rows)
                calls = kernel_records(run(call), args.iters)
                print(f"{sdt} B={B:<4d} {'composed':40s} {summary(calls)}", flush=True)
            decode = fused_step_decode_call(row, inp)
            calls = kernel_records(run(decode), args.iters)
            print(f"{sdt} B={B:<4d} {'decode alone (packed decode)':40s} {summary(calls)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
