"""flashgdn quick start: one Qwen3-Next GDN layer through each of the three decode functions.

    python examples/quickstart.py [--batch-size 8] [--seed N] [--iters 100]

On a supported GPU (SM90, SM100, SM103) each function runs on fresh random inputs, is checked
against `flashgdn.reference` (plain torch, computed in fp64) on output and updated state, and is
timed. Prints one OK/FAIL line per function; the exit status is 1 if any check fails.

Without a supported GPU it says so on one line, runs the reference alone on the CPU and prints the
output shapes and a checksum (exit status 0), so the script also shows the API's conventions on a
laptop.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import flashgdn
from flashgdn import reference
from flashgdn.device import unavailable_reason

# One Qwen3-Next GDN layer: 16 q/k heads, 32 value heads, head size 128.
H, HV, K, V = 16, 32, 128, 128
T_MTP = 4  # tokens per sequence for the MTP (speculative-decode verify) call

# Largest error allowed, relative to the largest |reference| value of the tensor: the output is
# bf16 (8 significand bits, a rounding step of up to 2^-8 relative), the state fp32, so its only
# differences from the fp64 reference are fp32 rounding and summation order.
TOL = {"output": 1e-2, "state": 1e-4}


def make_inputs(B, T, gen, device):
    """q, k, v, a, b in bf16 ([B, T, H|HV, K|V] and [B, T, HV]), A_log and dt_bias in fp32 [HV].

    Drawn on the CPU from `gen`, so that a seed gives the same inputs on every device."""
    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    return dict(
        q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V),
        a=randn(B, T, HV), b=randn(B, T, HV),
        # The decay rate exp(A_log) in [1, 16], the range Mamba2 initialises it in.
        A_log=torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(device),
        dt_bias=randn(HV, scale=0.1, dtype=torch.float32),
    )


def make_problems(B, gen, device):
    """The three calls as (function name, keyword arguments, name of the state argument).

    Each state is fp32 and updated in place by the call."""
    state_vk = (torch.randn(B, HV, V, K, generator=gen) * 0.1).to(device)  # K-last: [B, HV, V, K]
    # The same states in the K-major layout [B, HV, K, V], so both T=1 calls compute the same outputs.
    state_kv = state_vk.transpose(-1, -2).contiguous()
    P = 2 * B  # a pool with more slots than sequences, read at scattered slots, as a serving engine does
    pool = (torch.randn(P, HV, V, K, generator=gen) * 0.1).to(device)
    slots = torch.randperm(P, generator=gen)[:B].to(torch.int32).to(device)
    step = make_inputs(B, 1, gen, device)
    mtp = make_inputs(B, T_MTP, gen, device)
    return [
        ("gated_delta_rule_decode_pretranspose", dict(step, state=state_vk), "state"),
        ("gated_delta_rule_decode", dict(step, state=state_kv), "state"),
        ("gated_delta_rule_mtp",
         dict(mtp, initial_state=pool, initial_state_indices=slots, disable_state_update=False),
         "initial_state"),
    ]


def with_fresh_state(kwargs, state_arg):
    """A copy of kwargs whose state is a copy, so every call starts from the same state."""
    return dict(kwargs, **{state_arg: kwargs[state_arg].clone()})


def rel_error(actual, expected):
    """(max |actual - expected|, that over max |expected|)."""
    err = (actual.double() - expected.double()).abs().max().item()
    return err, err / max(expected.double().abs().max().item(), 1e-30)


def time_calls(call, iters, warmup=10):
    """Mean ms per call over `iters` back-to-back eager calls (CUDA events, after `warmup` calls),
    then the same calls captured in one CUDA graph and replayed, which removes the host overhead.

    Back to back, a state that fits in L2 stays there between calls, so small batches time faster
    than in a serving step; `flashgdn-bench` flushes L2 before every call for its numbers."""
    for _ in range(warmup):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        call()
    end.record()
    end.synchronize()
    eager = start.elapsed_time(end) / iters

    # Capture on a side stream, as torch.cuda.graph requires; warm that stream up first.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            call()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return eager, start.elapsed_time(end) / iters


def run_gpu(B, gen, iters):
    device = torch.device("cuda")
    ok = True
    for name, kwargs, state_arg in make_problems(B, gen, device):
        fn, ref_fn = getattr(flashgdn, name), getattr(reference, name)

        # The first call of a kernel variant compiles it, and the process's first also loads CuTe
        # DSL; later calls of the same signature reuse the compiled kernel.
        mine = with_fresh_state(kwargs, state_arg)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, state = fn(**mine)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0

        ref_out, ref_state = ref_fn(**with_fresh_state(kwargs, state_arg), compute_dtype=torch.float64)
        checks = [("output", out, ref_out), ("state", state, ref_state)]
        lines, good = [], True
        for what, actual, expected in checks:
            err, rel = rel_error(actual, expected)
            passed = bool(torch.isfinite(actual).all()) and rel <= TOL[what]
            good &= passed
            lines.append(f"{what} {tuple(actual.shape)} max abs err {err:.3g} ({rel:.2g} of max |ref|)")
        ok &= good
        print(f"{'OK  ' if good else 'FAIL'} {name}: " + "; ".join(lines))

        # Timed on one more copy of the state, which every call updates (the kernels write it in place).
        timed = with_fresh_state(kwargs, state_arg)
        timed["output"] = torch.empty_like(out)
        eager_ms, graph_ms = time_calls(lambda: fn(**timed), iters)
        print(f"     first call (compiles) {first_s:.2f} s; per call over {iters} calls: "
              f"{eager_ms * 1e3:.1f} us eager, {graph_ms * 1e3:.1f} us in a CUDA graph")
    return ok


def run_cpu(B, gen):
    """The reference alone on the CPU (fp32): the shapes and a checksum of what each call returns."""
    finite = True
    for name, kwargs, state_arg in make_problems(B, gen, torch.device("cpu")):
        out, state = getattr(reference, name)(**kwargs)
        finite &= bool(torch.isfinite(out).all() and torch.isfinite(state).all())
        print(f"reference.{name}: output {tuple(out.shape)} {out.dtype}, state {tuple(state.shape)} "
              f"{state.dtype}; checksum output {out.double().sum().item():.6g}, "
              f"state {state.double().sum().item():.6g}")
    return finite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences B (default: 8)")
    parser.add_argument("--seed", type=int, help="seed of the random inputs (default: a fresh one, printed)")
    parser.add_argument("--iters", type=int, default=100, help="timed calls per function (default: 100)")
    args = parser.parse_args(argv)

    seed = torch.seed() % 2**31 if args.seed is None else args.seed
    gen = torch.Generator().manual_seed(seed)
    print(f"Qwen3-Next GDN layer: B={args.batch_size}, H={H}, HV={HV}, K={K}, V={V}, MTP T={T_MTP}; "
          f"bf16 q/k/v/a/b, fp32 state; seed {seed}")
    why = unavailable_reason()
    if why is not None:
        print(f"No supported GPU ({why}): running flashgdn.reference on the CPU only.")
        return 0 if run_cpu(args.batch_size, gen) else 1
    print(f"GPU: {torch.cuda.get_device_name()}")
    return 0 if run_gpu(args.batch_size, gen, args.iters) else 1


if __name__ == "__main__":
    sys.exit(main())
