"""A serving engine's decode loop on flashgdn: a stack of GDN layers, one CUDA graph per step.

    python examples/engine_decode_loop.py [--engine vllm|sglang] [--layers 4] [--batch-size 8]
                                          [--steps 4] [--seed N]

What vLLM and SGLang do at decode, on flashgdn.engines: every GDN layer has its own K-last state
pool [P, HV, V, K] and calls the packed decode on the rows of its in-projection (mixed_qkv, the
q/k/v part of a wider row that also holds z, so its row stride exceeds its width; b and a the two
halves of one gate row). The batch is padded to the CUDA graph's size: `--engine vllm` runs
`fused_recurrent_gated_delta_rule_packed_decode_vllm` and pads with slot 0 (vLLM's null block,
never a request's slot), `--engine sglang` runs `fused_recurrent_gated_delta_rule_packed_decode`
and pads with -1. The whole stack's calls for one step are captured once in a CUDA graph; each
step writes its inputs and slots into the graph's static buffers and replays it. Requests keep
their slot from step to step, and the batch changes: fewer real rows, another row order.

On a supported GPU (SM90, SM100, SM103) each replayed step is checked bit for bit against the
same calls run eagerly on copies of the pools, and against flashgdn.reference (fp64) on output
and state; one OK/FAIL line per step, then the time per replayed step. Exit status 1 if any
check fails. Without one it says so and runs the reference loop on the CPU (shapes, checksum).
"""
from __future__ import annotations

import argparse
import sys

import torch

from flashgdn import engines, reference
from flashgdn.device import unavailable_reason

# One Qwen3-Next GDN layer at tensor parallelism 2: 8 q/k heads, 16 value heads, head size 128.
H, HV, K, V = 8, 16, 128, 128
WIDTH = 2 * H * K + HV * V  # q, k, v of one token side by side
ROW = WIDTH + HV * V  # the in-projection row: q, k, v, then z (the output gate, not used here)

# Largest error allowed, relative to the largest |reference| value: the output is bf16 (a rounding
# step of up to 2^-8 relative), the state fp32 (only rounding and summation order differ).
TOL = {"output": 1e-2, "state": 1e-4}

DECODE = {
    "vllm": engines.fused_recurrent_gated_delta_rule_packed_decode_vllm,
    "sglang": engines.fused_recurrent_gated_delta_rule_packed_decode,
}


def padding_slot(engine: str) -> int:
    return 0 if engine == "vllm" else -1


def request_slots(engine: str, batch: int, pool_slots: int, gen) -> torch.Tensor:
    """One pool slot per request, distinct; vLLM never gives a request slot 0 (its null block)."""
    first = 1 if engine == "vllm" else 0
    return torch.randperm(pool_slots - first, generator=gen)[:batch] + first


def step_batch(engine: str, step: int, slots: torch.Tensor, gen) -> torch.Tensor:
    """The slot of each batch row in one step: the first `real` requests in a new order, then
    padding rows up to the graph's batch size."""
    batch = slots.numel()
    real = batch - step % 3
    rows = torch.full((batch,), padding_slot(engine), dtype=torch.int32)
    rows[:real] = slots[torch.randperm(real, generator=gen)].to(torch.int32)
    return rows


def reference_packed_decode(engine, mixed_qkv, a, b, A_log, dt_bias, scale, pool, out, slots,
                            use_qk_l2norm_in_kernel=True):
    """The packed decode's contract in plain torch (flashgdn.reference, fp64 when the pool is):
    split each row into q, k, v; a padding row (negative slot, and slot 0 for vLLM) gets a zero
    output row and touches no slot; the others run one step on their slot, in place."""
    N = mixed_qkv.shape[0]
    q, k, v = torch.split(mixed_qkv, [H * K, H * K, HV * V], dim=1)
    padding = slots <= 0 if engine == "vllm" else slots < 0
    read = torch.where(padding, -1, slots.long())
    reference.gated_delta_rule_decode_pretranspose(
        q.reshape(N, 1, H, K), k.reshape(N, 1, H, K), v.reshape(N, 1, HV, V), None, A_log,
        a.reshape(N, 1, HV), dt_bias, b.reshape(N, 1, HV), scale, out, use_qk_l2norm_in_kernel,
        initial_state=pool, initial_state_indices=read, compute_dtype=pool.dtype)
    return out, pool


class Stack:
    """The layers' weights and pools, and the static input buffers that a CUDA graph reads."""

    def __init__(self, layers, batch, device, gen):
        def randn(*shape, scale=1.0, dtype=torch.bfloat16):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

        self.pool_slots = 2 * batch + 1
        self.A_log = [torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(device) for _ in range(layers)]
        self.dt_bias = [randn(HV, scale=0.1) for _ in range(layers)]  # the model's dtype, as vLLM keeps it
        self.pools = [randn(self.pool_slots, HV, V, K, scale=0.1, dtype=torch.float32) for _ in range(layers)]
        # Static inputs: what the in-projections and the causal conv write each step.
        self.proj = [torch.zeros(batch, ROW, dtype=torch.bfloat16, device=device) for _ in range(layers)]
        self.ba = [torch.zeros(batch, 2 * HV, dtype=torch.bfloat16, device=device) for _ in range(layers)]
        self.slots = torch.zeros(batch, dtype=torch.int32, device=device)

    def fill(self, step_slots, gen):
        """A step's inputs into the static buffers (in place: a captured graph reads these)."""
        for proj, ba in zip(self.proj, self.ba):
            proj.copy_(torch.randn(proj.shape, generator=gen))
            ba.copy_(torch.randn(ba.shape, generator=gen))
        self.slots.copy_(step_slots)

    def run(self, decode, pools, outs):
        """Every layer's decode call of one step, on `pools`, into `outs`."""
        for proj, ba, A_log, dt_bias, pool, out in zip(self.proj, self.ba, self.A_log, self.dt_bias, pools, outs):
            b, a = ba.chunk(2, dim=-1)
            decode(proj[:, :WIDTH], a, b, A_log, dt_bias, K ** -0.5, pool, out, self.slots, True)


def new_outputs(layers, batch, device):
    return [torch.zeros(batch, 1, HV, V, dtype=torch.bfloat16, device=device) for _ in range(layers)]


def rel_error(actual, expected):
    err = (actual.double() - expected.double()).abs().max().item()
    return err / max(expected.double().abs().max().item(), 1e-30)


def run_gpu(engine, layers, batch, steps, gen) -> bool:
    device = torch.device("cuda")
    decode = DECODE[engine]
    stack = Stack(layers, batch, device, gen)
    slots = request_slots(engine, batch, stack.pool_slots, gen)
    outs = new_outputs(layers, batch, device)
    ref_pools = [p.double() for p in stack.pools]
    null_slots = [p[0].clone() for p in stack.pools]  # vLLM's null block: never written

    # The first call of a kernel variant compiles it: run one step eagerly, on copies, before the
    # capture (on a side stream, as torch.cuda.graph wants its warm-up).
    stack.fill(step_batch(engine, 0, slots, gen), gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stack.run(decode, [p.clone() for p in stack.pools], new_outputs(layers, batch, device))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stack.run(decode, stack.pools, outs)

    ok = True
    for step in range(steps):
        rows = step_batch(engine, step, slots, gen)
        stack.fill(rows, gen)
        eager_pools, eager_outs = [p.clone() for p in stack.pools], new_outputs(layers, batch, device)
        stack.run(decode, eager_pools, eager_outs)
        graph.replay()
        ref_outs = new_outputs(layers, batch, device)
        for proj, ba, A_log, dt_bias, pool, out in zip(stack.proj, stack.ba, stack.A_log, stack.dt_bias,
                                                       ref_pools, ref_outs):
            b, a = ba.chunk(2, dim=-1)
            reference_packed_decode(engine, proj[:, :WIDTH], a, b, A_log, dt_bias, K ** -0.5, pool, out, stack.slots)
        torch.cuda.synchronize()
        same = all(torch.equal(x, y) for x, y in zip(stack.pools + outs, eager_pools + eager_outs))
        out_err = max(rel_error(o, r) for o, r in zip(outs, ref_outs))
        state_err = max(rel_error(p, r) for p, r in zip(stack.pools, ref_pools))
        null_kept = engine != "vllm" or all(torch.equal(p[0], z) for p, z in zip(stack.pools, null_slots))
        good = same and null_kept and out_err <= TOL["output"] and state_err <= TOL["state"]
        ok &= good
        real = int((rows > 0).sum() if engine == "vllm" else (rows >= 0).sum())
        print(f"{'OK  ' if good else 'FAIL'} step {step}: {real} of {batch} rows real; replay "
              f"{'equals' if same else 'DIFFERS FROM'} the eager calls; vs reference: output {out_err:.2g}, "
              f"state {state_err:.2g} of max |ref|{'' if null_kept else '; SLOT 0 WRITTEN'}")

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    print(f"one replayed step ({layers} layers): {start.elapsed_time(end) / 20 * 1e3:.1f} us")
    return ok


def run_cpu(engine, layers, batch, steps, gen) -> bool:
    """The reference decode loop on the CPU, with the same buffers and slots as the GPU run."""
    stack = Stack(layers, batch, torch.device("cpu"), gen)
    slots = request_slots(engine, batch, stack.pool_slots, gen)
    outs = new_outputs(layers, batch, "cpu")
    for step in range(steps):
        stack.fill(step_batch(engine, step, slots, gen), gen)
        stack.run(lambda *args: reference_packed_decode(engine, *args), stack.pools, outs)
    checksum = sum(o.double().sum().item() for o in outs) + sum(p.double().sum().item() for p in stack.pools)
    finite = all(bool(torch.isfinite(t).all()) for t in outs + stack.pools)
    print(f"reference decode loop: {steps} steps of {layers} layers, outputs {tuple(outs[0].shape)} "
          f"{outs[0].dtype}, pools {tuple(stack.pools[0].shape)} {stack.pools[0].dtype}; checksum {checksum:.6g}")
    return finite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=sorted(DECODE), default="vllm", help="padding rule (default: vllm)")
    parser.add_argument("--layers", type=int, default=4, help="GDN layers (default: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="the CUDA graph's batch size (default: 8)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps (default: 4)")
    parser.add_argument("--seed", type=int, help="seed of the random inputs (default: a fresh one, printed)")
    args = parser.parse_args(argv)
    if args.batch_size < 3 or args.layers < 1 or args.steps < 1:
        parser.error("--batch-size must be at least 3, --layers and --steps at least 1")

    seed = torch.seed() % 2**31 if args.seed is None else args.seed
    gen = torch.Generator().manual_seed(seed)
    print(f"{args.engine} decode loop: {args.layers} GDN layers (H={H}, HV={HV}, K={K}, V={V}), graph batch "
          f"{args.batch_size}, {args.steps} steps; bf16 inputs, fp32 state pools; seed {seed}")
    why = unavailable_reason()
    if why is not None:
        print(f"No supported GPU ({why}): running the reference decode loop on the CPU only.")
        return 0 if run_cpu(args.engine, args.layers, args.batch_size, args.steps, gen) else 1
    print(f"GPU: {torch.cuda.get_device_name()}")
    return 0 if run_gpu(args.engine, args.layers, args.batch_size, args.steps, gen) else 1


if __name__ == "__main__":
    sys.exit(main())
