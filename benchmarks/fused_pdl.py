"""The fused decode step with and without the programmatic dependent launch of its decode (PDL,
policy.fused_step_pdl), side by side in one process: CUDA events over CUDA-graph replays (the
launch gap between the two kernels counts, as in a graph-captured decode), cold L2, median.

    python benchmarks/fused_pdl.py --batch-size 1 4 16 64 256 --state-dtype fp32 bf16

Each setting runs the step through flashgdn.gdn_fused_decode_step with the device's table
switched (policy.DEVICE_TABLES) and the step's remembered plans cleared, so each compiles its own
decode variant (KernelSpec.pdl_wait on or off).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import flashgdn
from flashgdn import fastpath
from flashgdn import fused_step
from flashgdn.bench.engine_rows import fused_step_inputs
from flashgdn.bench.rows import Row
from flashgdn.bench.timing import summarize, time_fn
from flashgdn.device import facts_of, unavailable_reason
from flashgdn.kernels import policy


def step_us(row: Row, pdl: bool, iters: int, seed: int) -> float:
    """Median µs of one step of `row` with the decode's PDL on or off."""
    name = facts_of(torch.device("cuda")).device_class
    table = policy.DEVICE_TABLES[name]
    policy.DEVICE_TABLES[name] = dataclasses.replace(table, fused_step_pdl=pdl)
    fused_step._VALIDATED.clear()  # a remembered plan keeps the decode it looked up
    fastpath.FAST.clear()
    try:
        inp = fused_step_inputs(row, "cuda", seed)
        times, _ = time_fn(lambda: flashgdn.gdn_fused_decode_step(**inp), iters=iters, timer="events")
        return summarize(times)["median_us"]
    finally:
        policy.DEVICE_TABLES[name] = table
        fused_step._VALIDATED.clear()
        fastpath.FAST.clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--state-dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-q-heads", type=int, default=16)
    p.add_argument("--num-v-heads", type=int, default=32)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"fused_pdl: {why}", file=sys.stderr)
        return 2
    print(f"hidden={args.hidden_size} H={args.num_q_heads} HV={args.num_v_heads} K=V=128; CUDA events over graph "
          f"replays, cold L2, median of {args.iters}")
    print("state     B   plain µs     PDL µs   PDL speedup")
    for sdt in args.state_dtype:
        for B in args.batch_size:
            row = Row("fused_step", B, 1, args.num_q_heads, args.num_v_heads, 128, 128, "bf16", sdt, pool=True,
                      hidden=args.hidden_size)
            plain, pdl = (step_us(row, on, args.iters, args.seed) for on in (False, True))
            print(f"{sdt:5s} {B:5d} {plain:10.2f} {pdl:10.2f} {plain / pdl:12.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
