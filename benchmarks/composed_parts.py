"""The fused step's baseline in parts: the composed path (torch `hidden @ w_ba`, a conv update, flashgdn's
packed decode) and each of its three launches timed alone, beside the fused step, by fused_table.py's
method (CUDA events over graph replays, cold L2, median). With --conv-configs, the composed path again
under each config of FLA's autotuned Triton conv update (when that is the composed path's conv), to
show whether the config its autotuner picked is its fastest at this batch size.

    python benchmarks/composed_parts.py --hidden-size 5120 --num-v-heads 48 --state-dtype bf16 \\
        --batch-size 12 16 --conv-configs
"""
from __future__ import annotations

import sys

import torch

import flashgdn
from flashgdn.bench.engine_rows import (COMPOSED, conv_kernel, conv_update, fla_conv_autotuner, fused_step_decode_call,
                                        fused_step_inputs)
from fused_table import gpu_missing, median_us, step_parser, step_row  # this script's folder is on sys.path


def parts(row, iters: int, seed: int) -> dict:
    """µs of the composed path, each of its launches alone, the decode alone and the fused step."""
    inp = fused_step_inputs(row, "cuda", seed)
    composed, _ = COMPOSED.prepare(row, inp)
    conv, _ = conv_update(inp)
    return {
        "composed": median_us(composed, iters),
        "gemv": median_us(lambda: inp["hidden_states"] @ inp["w_ba"], iters),
        "conv": median_us(lambda: conv(inp), iters),
        "decode": median_us(fused_step_decode_call(row, inp), iters),
        "step": median_us(lambda: flashgdn.gdn_fused_decode_step(**inp), iters),
    }


def by_conv_config(row, iters: int, seed: int) -> list:
    """(composed µs, config) under each of the conv kernel's configs, fastest first, and the config its
    autotuner picks by itself (the last element)."""
    tuner = fla_conv_autotuner()
    configs, results = tuner.configs, []
    composed, _ = COMPOSED.prepare(row, fused_step_inputs(row, "cuda", seed))
    tuner.cache.clear()  # the configs tuned for this batch size (engine_rows.tune_fla_conv_for_batch)
    composed()
    picked = [str(c) for c in tuner.cache.values()]
    try:
        for config in configs:
            tuner.configs = [config]  # one config: the autotuner runs it without timing
            tuner.cache.clear()
            results.append((median_us(composed, iters), str(config)))
    finally:
        tuner.configs = configs
        tuner.cache.clear()
    return sorted(results) + [picked]


def main(argv=None) -> int:
    p = step_parser(__doc__, [1, 4, 16])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conv-configs", action="store_true",
                   help="also time the composed path under each config of FLA's autotuned conv update")
    args = p.parse_args(argv)
    if gpu_missing("composed_parts"):
        return 2
    if args.conv_configs and conv_kernel() != "fla":
        print(f"composed_parts: --conv-configs needs FLA's conv update; the composed path runs {conv_kernel()}'s",
              file=sys.stderr)
        return 2
    print(f"hidden={args.hidden_size} H={args.num_q_heads} HV={args.num_v_heads} K=V=128; CUDA events over graph "
          f"replays, cold L2, median of {args.iters}; µs, each part timed alone")
    for sdt in args.state_dtype:
        for B in args.batch_size:
            row = step_row(args, sdt, B)
            t = parts(row, args.iters, args.seed)
            print(f"{sdt} B={B:<4d} " + "  ".join(f"{k} {v:7.2f}" for k, v in t.items())
                  + f"  composed / step {t['composed'] / t['step']:.2f}x", flush=True)
            if args.conv_configs:
                *results, picked = by_conv_config(row, args.iters, args.seed)
                print(f"{sdt} B={B:<4d}   the autotuner's pick: {', '.join(picked)}")
                for us, config in results[:4] + results[-1:]:
                    print(f"{sdt} B={B:<4d}   composed {us:7.2f}  {config}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
