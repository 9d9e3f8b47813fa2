"""Copy floors of the pool layouts the FlashInfer parity issue measures: what a plain Triton kernel
that moves the same state bytes in the same pattern costs, to read the decode's padded-pool and
per-token-slot rows against (K = V = 128, HV = 32; scattered pool slots, as the bench's pools).

    python benchmarks/layout_floors.py --batch-size 64 256 --seq-len 2 4 8 --padding 64

Each pattern reads the state of B rows (HV * V rows of K elements each) from scattered pool slots
and writes it W times:
- "packed" / "padded": back in place (W = 1), the pool packed or each of its rows padded by
  --padding elements (the bench's --pool-padding): the floor of the padded-pool rows, against the
  packed one.
- "buffer" / "token slots": T copies of each state (W = T), into a contiguous [B, T] buffer (the
  layout of intermediate_states_buffer) or into T scattered pool slots per row (ssm_state_indices):
  the floor of the per-token-slot rows, against the buffer.
Timed as the bench times (CUPTI where installed, cold L2, median; the fastest of a few tile sizes),
with the bytes moved (state read once, written W times) as % of the device copy bandwidth measured
in the same run.
"""
from __future__ import annotations

import argparse
import sys

import torch

HV, D = 32, 128  # value heads, K = V
TILES = [(rows, warps) for rows in (8, 16, 32) for warps in (4, 8)]


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rows_copy(src, dst, src_slots, dst_slots, rows_per_state, src_slot_stride, dst_slot_stride, src_row_stride,
                  dst_row_stride, K: tl.constexpr, W: tl.constexpr, BLOCK_R: tl.constexpr):
        # One program: BLOCK_R rows of one state, read from its source slot, written to its W destinations.
        pid = tl.program_id(0)
        blocks = rows_per_state // BLOCK_R
        b = pid // blocks
        rows = ((pid % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, K)
        s = tl.load(src_slots + b).to(tl.int64)
        x = tl.load(src + s * src_slot_stride + rows[:, None] * src_row_stride + cols[None, :])
        for w in tl.static_range(W):
            d = tl.load(dst_slots + b * W + w).to(tl.int64)
            tl.store(dst + d * dst_slot_stride + rows[:, None] * dst_row_stride + cols[None, :], x)

    return rows_copy


def copy_rows(kernel, src, dst, src_slots, dst_slots, writes: int, tile) -> None:
    """Copy state src[src_slots[b]] to dst[dst_slots[b, w]] for every b and w < writes; src and dst
    are [slots, HV, V, K] with K contiguous and one row stride (a padded pool's view)."""
    rows, warps = tile
    rows_per_state = src.shape[1] * src.shape[2]
    grid = (src_slots.numel() * rows_per_state // rows,)
    kernel[grid](src, dst, src_slots, dst_slots, rows_per_state, src.stride(0), dst.stride(0), src.stride(2),
                 dst.stride(2), K=src.shape[3], W=writes, BLOCK_R=rows, num_warps=warps)


def patterns(B: int, T: int, dtype: torch.dtype, padding: int, device, gen: torch.Generator):
    """(name, writes, src, dst, src_slots, dst_slots) of each pattern at batch B and T tokens."""
    def pool(slots, pad=0):
        return torch.randn(slots, HV, D, D + pad, device=device).to(dtype)[..., :D]

    def perm(n, k):
        return torch.randperm(n, generator=gen)[:k].to(torch.int32).to(device)

    found = []
    if T == 1:
        for name, pad in (("packed", 0), ("padded", padding)):
            p = pool(2 * B, pad)
            slots = perm(2 * B, B)
            found.append((name, 1, p, p, slots, slots))
        return found
    src = pool(2 * B)
    buffer = torch.empty(B * T, HV, D, D, device=device, dtype=dtype)
    found.append(("buffer", T, src, buffer, perm(2 * B, B), torch.arange(B * T, dtype=torch.int32, device=device)))
    slots = perm(B * (T + 1), B * (T + 1))  # each row reads one slot and writes T others
    p = pool(B * (T + 1))
    found.append(("token slots", T, p, p, slots[:B].contiguous(), slots[B:].contiguous()))
    return found


def check(src, dst, src_slots, dst_slots, writes: int) -> None:
    """The copy happened: every destination slot holds its row's source state."""
    got = dst[dst_slots.long()].view(-1, writes, *dst.shape[1:])
    torch.testing.assert_close(got, src[src_slots.long()].unsqueeze(1).expand_as(got), rtol=0, atol=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2, 4, 8], help="T of the per-token patterns")
    ap.add_argument("--padding", type=int, default=64, help="elements added to each pool row (padded pattern)")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("layout_floors: no CUDA device", file=sys.stderr)
        return 2
    from flashgdn.bench.timing import copy_bandwidth, summarize, time_fn

    kernel, device = _kernel(), torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; H V = {HV}, K = V = {D}; µs (median), % of copy bandwidth")
    print("pattern      state  B    T  W  µs        % copy bw  vs first of its group")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for B in args.batch_size:
            for T in [1] + args.seq_len:
                first = None
                for name, writes, src, dst, src_slots, dst_slots in patterns(B, T, dtype, args.padding, device, gen):
                    best = min(
                        (summarize(time_fn(lambda: copy_rows(kernel, src, dst, src_slots, dst_slots, writes, tile),
                                           iters=args.iters)[0])["median_us"], tile)
                        for tile in TILES)
                    check(src, dst, src_slots, dst_slots, writes)
                    us = best[0]
                    moved = (1 + writes) * B * HV * D * D * dtype.itemsize
                    first = first or us
                    print(f"{name:12s} {str(dtype)[6:]:6s} {B:4d} {T:2d} {writes:2d} {us:9.2f} {100 * moved / (us * 1e-6) / bw:9.1f}"
                          f"  {us / first:.3f}x  tile {best[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
