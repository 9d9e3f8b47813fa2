"""The measuring core of `flashgdn-bench --host` (flashgdn.bench.host): host time per call of a
callable, in runs of back-to-back calls, optionally in turns with a baseline call, and its GPU time
per call queued behind a spin. The synchronisation, the clock and the GPU timer are callables, so
the core runs on the CPU with stand-ins."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

# Few enough that a call's kernels stay well inside the launch queue behind the spin.
GPU_CALLS = 100
GPU_ATTEMPTS = 3  # each with a 4x longer spin, when the host was not done before the spin ended
SPIN_CALIBRATION_CYCLES = 10_000_000  # about 5 ms at an H200's clock
SPIN_MARGIN_US = 1000.0

# Fields of one --host record (JSON keys, CSV columns); profile parts have impl "profile".
HOST_FIELDS = (
    "impl", "function", "variant", "B", "T", "H", "HV", "K", "V", "dtype", "state_dtype", "iters", "repeats",
    "host_median_us", "host_min_us", "gpu_us", "gpu_bound", "full_way_calls", "baseline_us", "ratio", "meets_target",
    "share_of_call", "error",
)


def host_times(call: Callable[[], Any], iters: int, repeats: int, sync: Callable[[], None],
               clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """µs per call of each of `repeats` runs of `iters` back-to-back calls; `sync()` only
    before and after each run, outside the clock readings."""
    runs = []
    for _ in range(repeats):
        sync()
        start = clock()
        for _ in range(iters):
            call()
        runs.append((clock() - start) / iters * 1e6)
        sync()
    return runs


def measure(call: Callable[[], Any], iters: int, repeats: int, warmup: int, sync: Callable[[], None],
            gpu_time: Optional[Callable[[Callable[[], Any], float], Optional[float]]] = None,
            clock: Callable[[], float] = time.perf_counter,
            baseline: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """Warm-up calls (at least one: it compiles and fills the memo), then host_times; with
    `gpu_time(call, host_us)`, the GPU time per call and whether it reaches the host time. With
    `baseline`, a run of it before each run of `call` (flashgdn.bench.host's docstring): baseline_us,
    the median of its runs, and ratio, the median of the pairs' ratios."""
    for _ in range(max(warmup, 1)):
        call()
    if baseline is None:
        runs, base_runs = host_times(call, iters, repeats, sync, clock), []
    else:
        pairs = [(host_times(baseline, iters, 1, sync, clock)[0], host_times(call, iters, 1, sync, clock)[0])
                 for _ in range(repeats)]
        base_runs, runs = [b for b, _ in pairs], [r for _, r in pairs]
    host = statistics.median(runs)
    gpu = gpu_time(call, host) if gpu_time is not None else None
    measured = {"host_median_us": host, "host_min_us": min(runs), "gpu_us": gpu,
                "gpu_bound": gpu is not None and gpu >= host}
    if base_runs:
        measured.update(baseline_us=statistics.median(base_runs),
                        ratio=statistics.median(r / b for b, r in pairs))
    return measured


class GpuTimer:
    """GPU time per call in µs: GPU_CALLS calls queued behind a spin kernel, between CUDA events.
    The spin lasts twice the calls' host time, so the GPU starts on them only once all are
    queued; when the spin ended first (checked with the start event), it retries with a 4x longer
    spin. None when every attempt failed: the call waits for the GPU itself."""

    def __init__(self, calls: int = GPU_CALLS):
        self.calls = calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # loads the spin kernel
        start.record()
        torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)
        end.record()
        end.synchronize()
        self.cycles_per_us = SPIN_CALIBRATION_CYCLES / (start.elapsed_time(end) * 1e3)

    def __call__(self, call: Callable[[], Any], host_us: float) -> Optional[float]:
        spin_us = 2 * self.calls * host_us + SPIN_MARGIN_US
        for _ in range(GPU_ATTEMPTS):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(spin_us * self.cycles_per_us))
            start.record()
            for _ in range(self.calls):
                call()
            queued = not start.query()  # the spin still runs: the GPU has run none of the calls yet
            end.record()
            end.synchronize()
            if queued:
                return start.elapsed_time(end) * 1e3 / self.calls
            spin_us *= 4
        return None
