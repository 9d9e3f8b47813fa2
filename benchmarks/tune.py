"""Tuning sweep: time each CTA shape of a kernel over batch sizes (how the regime tables in
flashgdn/kernels/build.py and the regime threshold in flashgdn/api.py were chosen).

    python benchmarks/tune.py --layout klast --state-dtype float32 --batch-size 1 4 16 64 256
"""
from __future__ import annotations

import argparse
import ast
import dataclasses

import torch

from flashgdn.api import kernel_spec
from flashgdn.bench.timing import summarize, time_fn
from flashgdn.cache import kernel_cache
from flashgdn.device import arch_of
from flashgdn.validation import Problem

KLAST_SHAPES = [(4, 1, 16), (4, 2, 16), (4, 4, 16), (8, 1, 16), (4, 1, 8), (4, 2, 8), (4, 4, 8), (8, 1, 8), (2, 4, 8)]
KMAJOR_SHAPES = [(4, 8), (4, 4), (2, 8), (8, 4), (4, 2)]


def _args(layout, p, sdt, pool, inter):
    q, k = (torch.randn(p.B, p.T, p.H, p.K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(p.B, p.T, p.HV, p.V, device="cuda", dtype=torch.bfloat16)
    a, b = (torch.randn(p.B, p.T, p.HV, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    A_log = torch.log(torch.rand(p.HV, device="cuda") * 15 + 1)
    dt_bias = torch.randn(p.HV, device="cuda")
    rows, cols = (p.V, p.K) if layout == "klast" else (p.K, p.V)
    state = torch.randn(p.B, p.HV, rows, cols, device="cuda").to(sdt)
    idx = torch.randperm(p.B, device="cuda").to(torch.int32) if pool else None
    ib = torch.empty(p.B, p.T, p.HV, rows, cols, device="cuda", dtype=sdt) if inter else None
    out = torch.empty(p.B, p.T, p.HV, p.V, device="cuda", dtype=torch.bfloat16)
    return (q, k, v, a, b, A_log, dt_bias, state, idx, None, None, ib, out)


def _triton_copy():
    """A plain Triton copy kernel, run at several block sizes: the copy floor taken is the fastest
    of these and torch's own copy (one copy engine or kernel may not be the best at every size)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    def run(src, dst, block, warps):
        copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block, num_warps=warps)

    return run


def calibrate(iters):
    """Floors to read kernel times against: a one-element kernel, and the fastest device copy of
    the bytes the K=V=128 decode moves (state read + write) at the batch sizes of the targets, for
    fp32 state (2, 8, 32, 128 MiB at B = 1, 4, 16, 64) and bf16 state (half of those)."""
    x = torch.zeros(1, device="cuda")
    print(f"1-element kernel: {summarize(time_fn(lambda: x.add_(1), iters=iters)[0])['median_us']:.2f} us")
    triton_copy = _triton_copy()
    configs = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8)]
    print("state MiB | torch copy_ us | best Triton copy us (BLOCK, warps) | floor us | TB/s")
    for mib in (1, 2, 4, 8, 16, 32, 64, 128):
        src = torch.randn(mib << 18, device="cuda")
        dst = torch.empty_like(src)
        torch_us = summarize(time_fn(lambda: dst.copy_(src), iters=iters)[0])["median_us"]
        dst.zero_()  # so the check below sees what the Triton copy wrote
        best = min(
            (summarize(time_fn(lambda: triton_copy(src, dst, *c), iters=iters)[0])["median_us"], c) for c in configs
        )
        torch.testing.assert_close(dst, src)  # the Triton copy really copied
        floor = min(torch_us, best[0])
        print(f"{mib:9d} | {torch_us:14.2f} | {best[0]:10.2f} {best[1]} | {floor:8.2f} | {2 * (mib << 20) / floor / 1e6:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="klast", choices=("klast", "kmajor"))
    ap.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--seq-len", type=int, default=1)
    ap.add_argument("--pool", action="store_true")
    ap.add_argument("--inter", action="store_true")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tiles", default=None, help='CTA shapes to try, e.g. "(4,1),(8,4)"')
    ap.add_argument("--calibrate", action="store_true", help="time floors: a 1-element kernel and copies")
    ns = ap.parse_args()
    if ns.calibrate:
        return calibrate(ns.iters)
    sdt = getattr(torch, ns.state_dtype)
    arch, sms = arch_of(torch.device("cuda"))
    shapes = KLAST_SHAPES if ns.layout == "klast" else KMAJOR_SHAPES
    if ns.tiles:
        shapes = list(ast.literal_eval(f"[{ns.tiles}]"))
    rows = []
    for B in ns.batch_size:
        p = Problem(B, ns.seq_len, 16, 32, 128, 128)
        args = _args(ns.layout, p, sdt, ns.pool, ns.inter)
        line = []
        for tile in shapes:
            spec = kernel_spec(ns.layout, p, torch.bfloat16, sdt, torch.bfloat16, torch.float32, None, True, arch,
                               sms, index_dtype=torch.int32 if ns.pool else None, has_intermediate=ns.inter)
            try:
                fn = kernel_cache.get(dataclasses.replace(spec, tile=tile))
            except ValueError:
                line.append(float("nan"))
                continue
            us = summarize(time_fn(lambda: fn(*args), iters=ns.iters)[0])["median_us"]
            line.append(us)
        rows.append((B, line))
    print(f"{ns.layout} state={ns.state_dtype} T={ns.seq_len} pool={ns.pool} inter={ns.inter}: median us (CUPTI, cold L2)")
    print("B".rjust(5) + "".join(f"{str(s):>10}" for s in shapes))
    for B, line in rows:
        print(f"{B:5d}" + "".join(f"{x:10.2f}" for x in line))


if __name__ == "__main__":
    main()
