"""Timing core shared by the benchmark CLI and every measurement in benchmarks/RESULTS.md.

Two timers:
- "cupti": CUPTI activity records of the GPU's own kernel start/end. Every kernel, memcpy and
  memset launched inside one timed call is summed (launch records are matched to the GPU work by
  correlation id), so helper kernels a call hides still count, and a device-to-device
  `Tensor.copy_` (a cudaMemcpyAsync, not a kernel) can be timed too.
- "events": CUDA events around the replay of a CUDA graph that holds one call (fallback when
  cupti-python is missing; it includes the graph's launch gaps).

Before every timed iteration the L2 is flushed by writing a buffer twice its size, outside the
timed region. Results are per-iteration microseconds; `summarize` gives median, p10 and p90.
"""
from __future__ import annotations

import bisect
import statistics
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch


def cupti_available() -> bool:
    try:
        from cupti import cupti  # noqa: F401
    except Exception:  # ImportError, or a missing libcupti
        return False
    return True


class L2Flusher:
    """Evicts the L2 by writing a buffer twice its size (a memset, not timed)."""

    def __init__(self, device: Optional[torch.device] = None):
        device = device or torch.device("cuda")
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.buf = torch.empty(max(2 * l2, 1 << 20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def _cupti_times(fn: Callable[[], None], iters: int, flush: Optional[Callable[[], None]]) -> List[float]:
    from cupti import cupti

    launch_kinds = {int(cupti.ActivityKind.RUNTIME), int(cupti.ActivityKind.DRIVER)}
    work_kinds = (
        cupti.ActivityKind.CONCURRENT_KERNEL, cupti.ActivityKind.MEMCPY, cupti.ActivityKind.MEMSET,
    )
    work_kind_ids = {int(k) for k in work_kinds}
    launches: list = []
    kernels: list = []  # (correlation id, start, end) of every kernel, memcpy and memset

    def requested():
        return 8 * 1024 * 1024, 0

    def completed(activities):
        for a in activities:
            kind = int(a.kind)
            if kind in launch_kinds:
                launches.append((a.start, a.correlation_id))
            elif kind in work_kind_ids:
                kernels.append((a.correlation_id, a.start, a.end))

    kinds = (cupti.ActivityKind.RUNTIME, cupti.ActivityKind.DRIVER) + work_kinds
    cupti.activity_register_callbacks(requested, completed)
    brackets = []
    try:
        for kind in kinds:
            cupti.activity_enable(kind)
        for _ in range(iters):
            if flush is not None:
                flush()
            torch.cuda.synchronize()
            t0 = cupti.get_timestamp()
            fn()
            t1 = cupti.get_timestamp()
            torch.cuda.synchronize()
            brackets.append((t0, t1))
        cupti.activity_flush_all(1)
    finally:
        for kind in kinds:
            cupti.activity_disable(kind)
        cupti.finalize()

    by_corr: Dict[int, list] = {}
    for corr, start, end in kernels:
        by_corr.setdefault(corr, []).append(end - start)
    launches.sort()
    starts = [s for s, _ in launches]
    times = []
    for t0, t1 in brackets:
        lo, hi = bisect.bisect_left(starts, t0), bisect.bisect_right(starts, t1)
        corrs = {launches[i][1] for i in range(lo, hi)}
        ns = sum(d for c in corrs for d in by_corr.get(c, ()))
        if ns == 0:
            raise RuntimeError("CUPTI saw no kernel, memcpy or memset inside a timed call")
        times.append(ns / 1e3)
    return times


def _event_times(
    fn: Callable[[], None], iters: int, flush: Optional[Callable[[], None]], use_graph: bool = True
) -> List[float]:
    return _time_events(graph_replay(fn) if use_graph else fn, iters, flush)


def graph_replay(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (after one warm call on the capture stream): its replay, which
    makes the same launches without the host's launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_events(run: Callable[[], None], iters: int, flush: Optional[Callable[[], None]]) -> List[float]:
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        if flush is not None:
            flush()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def time_fn(
    fn: Callable[[], None], iters: int = 100, warmup: int = 10, cold_l2: bool = True, timer: str = "auto",
    flusher: Optional[L2Flusher] = None, use_graph: bool = True,
) -> tuple[List[float], str]:
    """Per-iteration GPU time of `fn` in microseconds, and the timer used ("cupti" or "events")."""
    if timer == "auto":
        timer = "cupti" if cupti_available() else "events"
    flush = (flusher or L2Flusher()) if cold_l2 else None
    for _ in range(warmup):
        if flush is not None:
            flush()
        fn()
    torch.cuda.synchronize()
    if timer == "cupti":
        return _cupti_times(fn, iters, flush), timer
    if timer == "events":
        return _event_times(fn, iters, flush, use_graph), timer
    raise ValueError(f"timer must be 'auto', 'cupti' or 'events', got {timer!r}")


def turns(count: int, rounds: int) -> Iterator[int]:
    """The order in which to time `count` calls in turns: `rounds` rounds, every other one in reverse,
    so that what the order does to a timing (a block timed right after another ran up to 2 % slower
    on small kernels; benchmarks/RESULTS.md "ReplaySSM") favours none of them."""
    for r in range(rounds):
        yield from (range(count) if r % 2 == 0 else reversed(range(count)))


def in_turns(calls: Sequence[Callable[[], Any]], rounds: int) -> List[List[Any]]:
    """Each call's results, one per round: `rounds` rounds of `calls` in turns' order."""
    results: List[List[Any]] = [[] for _ in calls]
    for i in turns(len(calls), rounds):
        results[i].append(calls[i]())
    return results


def summarize(times_us: List[float]) -> Dict[str, float]:
    s = sorted(times_us)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median_us": statistics.median(s), "p10_us": q[0], "p90_us": q[-1]}


def _copy_call(nbytes: int, device=None) -> Callable[[], None]:
    """A device-to-device copy of `nbytes` bytes: torch's copy_ of one contiguous uint8 buffer into
    another, which is a cudaMemcpyAsync D2D (CUPTI records it as a memcpy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device or "cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(device=None, nbytes: int = 1 << 30, iters: int = 20, timer: str = "auto") -> float:
    """Device copy bandwidth in bytes/s: a `nbytes` device-to-device copy, bytes read + written."""
    # No graph capture: a captured memcpy node took a slower path than the plain copy on the H100.
    times, _ = time_fn(_copy_call(nbytes, device), iters=iters, warmup=3, cold_l2=False, timer=timer,
                       use_graph=False)
    return 2 * nbytes / (statistics.median(times) * 1e-6)


class CopyFloor:
    """The copy floor of a byte count: the time of a device-to-device copy (copy_bandwidth's) that
    moves that many bytes, half read and half written, timed as the benchmark rows are (`timer`,
    `iters`, `warmup`, the L2 flushed by `flusher` before each iteration; no CUDA graph, as
    copy_bandwidth). `floor(nbytes)` gives summarize() of its times and the timer used; each byte
    count is timed once per CopyFloor (rows of equal bytes share it)."""

    def __init__(self, device=None, iters: int = 100, warmup: int = 10, timer: str = "auto",
                 flusher: Optional[L2Flusher] = None):
        self.device, self.iters, self.warmup, self.timer, self.flusher = device, iters, warmup, timer, flusher
        self.measured: Dict[int, tuple] = {}

    def __call__(self, nbytes: int) -> tuple:
        if nbytes not in self.measured:
            # The buffers live only while timed: the largest rows' copies take gigabytes.
            times, timer = time_fn(_copy_call(-(-nbytes // 2), self.device), iters=self.iters, warmup=self.warmup,
                                   cold_l2=True, timer=self.timer, flusher=self.flusher, use_graph=False)
            self.measured[nbytes] = summarize(times), timer
        return self.measured[nbytes]
