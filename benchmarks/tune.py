"""Tuning sweep: time each CTA shape of a kernel over batch sizes (how the device tables and the
regime threshold in flashgdn/kernels/policy.py are chosen).

    python benchmarks/tune.py --layout klast --state-dtype float32 --batch-size 1 4 16 64 256
    python benchmarks/tune.py --seq-len 8 --pool --batch-size 64 --tiles "(4,2,8),(4,4,8)" --rounds 6   # in turns
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools

import cutlass.cute as cute
import torch
from cutlass.cute.runtime import make_fake_stream

from flashgdn.api import CallOptions, kernel_spec
from flashgdn.bench.cli import positive_int
from flashgdn.bench.timing import copy_bandwidth, in_turns, summarize, time_fn
from flashgdn.cache import kernel_cache
from flashgdn.device import facts_of
from flashgdn.spec import KernelArgs
from flashgdn.kernels import build, policy
from flashgdn.validation import Problem

KLAST_SHAPES = [(4, 1, 16), (4, 2, 16), (4, 4, 16), (8, 1, 16), (4, 1, 8), (4, 2, 8), (4, 4, 8), (8, 1, 8), (2, 4, 8)]
KMAJOR_SHAPES = [(4, 8), (4, 4), (2, 8), (8, 4), (4, 2)]


def _args(layout, p, sdt, pool, inter, token_slots=False):
    q, k = (torch.randn(p.B, p.T, p.H, p.K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(p.B, p.T, p.HV, p.V, device="cuda", dtype=torch.bfloat16)
    a, b = (torch.randn(p.B, p.T, p.HV, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    A_log = torch.log(torch.rand(p.HV, device="cuda") * 15 + 1)
    dt_bias = torch.randn(p.HV, device="cuda")
    rows, cols = (p.V, p.K) if layout == "klast" else (p.K, p.V)
    if token_slots:  # vLLM's layout, a pool whatever `pool`: each state read from one slot, written to T others
        slots = torch.randperm(p.B * (p.T + 1), device="cuda").to(torch.int32)
        state = torch.randn(p.B * (p.T + 1), p.HV, rows, cols, device="cuda").to(sdt)
        idx, token_idx = slots[:p.B], slots[p.B:].view(p.B, p.T)
    else:
        state = torch.randn(p.B, p.HV, rows, cols, device="cuda").to(sdt)
        idx = torch.randperm(p.B, device="cuda").to(torch.int32) if pool else None
        token_idx = None
    ib = torch.empty(p.B, p.T, p.HV, rows, cols, device="cuda", dtype=sdt) if inter else None
    out = torch.empty(p.B, p.T, p.HV, p.V, device="cuda", dtype=torch.bfloat16)
    return KernelArgs(q, k, v, a, b, A_log, dt_bias, state, state_indices=idx, intermediate_states=ib, output=out,
                      token_state_indices=token_idx)


def _triton_copy():
    """A plain Triton copy kernel, run at several block sizes: the copy floor taken is the fastest
    of these and torch's own copy (one copy engine or kernel may not be the best at every size).
    With `writes` = W it writes each block W times (dst holds W copies of src): the floor of the
    write-heavy MTP calls that store T intermediate states and the pool."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, W: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n)
        for w in tl.static_range(W):
            tl.store(dst + w * n + offs, x, mask=offs < n)

    def run(src, dst, block, warps, writes=1):
        copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), W=writes, BLOCK=block, num_warps=warps)

    return run


COPY_CONFIGS = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8)]


def _best_triton_copy(triton_copy, src, dst, iters, writes=1):
    """(us, (BLOCK, warps)) of the fastest Triton copy, checked to have copied."""
    dst.zero_()
    best = min(
        (summarize(time_fn(lambda: triton_copy(src, dst, *c, writes), iters=iters)[0])["median_us"], c)
        for c in COPY_CONFIGS
    )
    torch.testing.assert_close(dst.view(writes, -1), src.expand(writes, -1))  # it really copied
    return best


def calibrate_writes(iters):
    """Floors of the MTP calls with intermediates at B = 64 (K=V=128, HV=32): read the state once
    and write it W = T + 1 times (T intermediates, then the pool; W = 1 is a plain copy), against
    the device copy bandwidth measured in the same run."""
    bw = copy_bandwidth()  # bytes/s
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    triton_copy = _triton_copy()
    print("state | W | MB moved | floor us | % of copy bw")
    for name, mib in (("fp32, B=64", 128), ("bf16, B=64", 64)):
        for writes in (1, 5, 9):
            src = torch.randn(mib << 18, device="cuda")
            dst = torch.empty(writes * src.numel(), device="cuda")
            us, _ = _best_triton_copy(triton_copy, src, dst, iters, writes=writes)
            moved = (1 + writes) * src.numel() * 4  # bytes
            print(f"{name} | {writes} | {moved / 1e6:.0f} | {us:.2f} | {100 * moved / (us * 1e-6) / bw:.1f}")


def calibrate(iters):
    """Floors to read kernel times against: a one-element kernel, and the fastest device copy of
    the bytes the K=V=128 decode moves (state read + write) at the batch sizes of the targets, for
    fp32 state (2, 8, 32, 128 MiB at B = 1, 4, 16, 64) and bf16 state (half of those)."""
    x = torch.zeros(1, device="cuda")
    print(f"1-element kernel: {summarize(time_fn(lambda: x.add_(1), iters=iters)[0])['median_us']:.2f} us")
    triton_copy = _triton_copy()
    print("state MiB | torch copy_ us | best Triton copy us (BLOCK, warps) | floor us | TB/s")
    for mib in (1, 2, 4, 8, 16, 32, 64, 128):
        src = torch.randn(mib << 18, device="cuda")
        dst = torch.empty_like(src)
        torch_us = summarize(time_fn(lambda: dst.copy_(src), iters=iters)[0])["median_us"]
        best = _best_triton_copy(triton_copy, src, dst, iters)
        floor = min(torch_us, best[0])
        print(f"{mib:9d} | {torch_us:14.2f} | {best[0]:10.2f} {best[1]} | {floor:8.2f} | {2 * (mib << 20) / floor / 1e6:.2f}")


def _times(fn, args, iters):
    """The samples (µs) of one timing of fn(*args)."""
    return time_fn(functools.partial(fn, *args), iters=iters)[0]


def _build(spec, prefetch_bytes):
    """The compiled variant of `spec`, with the policy's L2 prefetch distance replaced by
    `prefetch_bytes` (None: the policy's own, through the compile cache; 0: none)."""
    if prefetch_bytes is None:
        return kernel_cache.get(spec)
    config = policy.BuildConfig.for_spec(spec)
    config = dataclasses.replace(config, prefetch_bytes=prefetch_bytes)
    kernel = build.make_kernel(spec, config)
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(kernel, *build.fake_arguments(spec), stream,
                        options=f"--enable-tvm-ffi --gpu-arch={spec.arch}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="klast", choices=("klast", "kmajor"))
    ap.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--seq-len", type=int, default=1)
    ap.add_argument("--pool", action="store_true")
    ap.add_argument("--inter", action="store_true")
    ap.add_argument("--token-slots", action="store_true", help="the state after each token to its own pool slot")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=positive_int, default=1,
                    help="time the shapes in turns: this many rounds of --iters each, every other round in reverse "
                         "order (flashgdn.bench.timing.turns); each figure is the median of its pooled samples")
    ap.add_argument("--tiles", default=None, help='CTA shapes to try, e.g. "(4,1),(8,4)"')
    ap.add_argument("--prefetch-mib", type=float, nargs="+", default=None,
                    help="L2 prefetch distances to try (MiB of state, 0: off), each CTA shape at each")
    ap.add_argument("--calibrate", action="store_true", help="time floors: a 1-element kernel and copies")
    ap.add_argument("--calibrate-writes", action="store_true", help="time the floors of MTP with intermediates")
    ns = ap.parse_args()
    if ns.calibrate:
        return calibrate(ns.iters)
    if ns.calibrate_writes:
        return calibrate_writes(ns.iters)
    sdt = getattr(torch, ns.state_dtype)
    facts = facts_of(torch.device("cuda"))
    shapes = KLAST_SHAPES if ns.layout == "klast" else KMAJOR_SHAPES
    if ns.tiles:
        shapes = list(ast.literal_eval(f"[{ns.tiles}]"))
    prefetch = [None] if ns.prefetch_mib is None else [int(m * (1 << 20)) for m in ns.prefetch_mib]
    columns = [(tile, pf) for tile in shapes for pf in prefetch]
    rows = []
    for B in ns.batch_size:
        p = Problem(B, ns.seq_len, 16, 32, 128, 128)
        args = _args(ns.layout, p, sdt, ns.pool, ns.inter, ns.token_slots)
        fns = []  # each column's compiled function, None where its shape does not fit
        for tile, pf in columns:
            spec = dataclasses.replace(
                kernel_spec(ns.layout, p, args, CallOptions(scale=None, use_l2norm=True), facts), tile=tile)
            try:
                fns.append(_build(spec, pf))
            except ValueError:
                fns.append(None)
        timed = [(lambda: []) if fn is None else functools.partial(_times, fn, args, ns.iters) for fn in fns]
        samples = [sum(rounds, []) for rounds in in_turns(timed, ns.rounds)]
        rows.append((B, [summarize(t)["median_us"] if t else float("nan") for t in samples]))
    print(f"{ns.layout} state={ns.state_dtype} T={ns.seq_len} pool={ns.pool} inter={ns.inter} token_slots={ns.token_slots}: median us (CUPTI, cold L2)")
    names = [str(t) if pf is None else f"{t}@{pf / (1 << 20):g}M" for t, pf in columns]
    width = max(10, max(len(n) for n in names) + 1)
    print("B".rjust(5) + "".join(n.rjust(width) for n in names))
    for B, line in rows:
        print(f"{B:5d}" + "".join(f"{x:{width}.2f}" for x in line))


if __name__ == "__main__":
    main()
