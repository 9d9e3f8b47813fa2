"""A numpy emulation of the index math of the tensor-core split gate in 2026-12-07_conv_gate_split_mma.patch
(ConvGate._gate_mma): the cp.async units, the A and B fragments under the K permutation, the warp partition
and the sums through shared memory, with the PTX layouts of mma.m16n8k16 (the operand order kmtp_mma.py uses).
It checks the partial sums against hidden @ w_ba, partial slices and groups included. It checks the
arithmetic of the indices, not the kernel: the kernel has not run on a GPU.

    python benchmarks/history/2026-12-07_conv_gate_split_mma_emulation.py
"""
import math

import numpy as np


def mma(acc, a, b):
    """acc += a b: per lane 8 A values (a0..a7), 4 B values (b0..b3), 4 accumulators, in PTX's layouts."""
    A = np.zeros((16, 16)); Bm = np.zeros((16, 8))
    for lane in range(32):
        g, c = lane // 4, lane % 4
        A[g, 2*c:2*c+2] = a[lane][0:2]; A[g+8, 2*c:2*c+2] = a[lane][2:4]
        A[g, 2*c+8:2*c+10] = a[lane][4:6]; A[g+8, 2*c+8:2*c+10] = a[lane][6:8]
        Bm[2*c:2*c+2, g] = b[lane][0:2]; Bm[2*c+8:2*c+10, g] = b[lane][2:4]
    C = A @ Bm
    for lane in range(32):
        g, c = lane // 4, lane % 4
        acc[lane][0:2] += C[g, 2*c:2*c+2]; acc[lane][2:4] += C[g+8, 2*c:2*c+2]

def run(hidden, HV, Bsz, threads, split_rows_tab):
    """The kernel's partial sums at one shape, emulated, against hidden @ w_ba."""
    cols = 2 * HV; warps = threads // 32
    nw = math.gcd(warps, cols // 8); kw = warps // nw
    K = -(-split_rows_tab // (32 * kw)) * 32 * kw
    parts = -(-hidden // K)
    tiles, blocks = cols // 8 // nw, K // 32 // kw
    rng = np.random.default_rng(0)
    H = rng.standard_normal((Bsz, hidden)); W = rng.standard_normal((hidden, cols))
    out = np.full((parts, Bsz, cols), np.nan)
    groups = -(-Bsz // 16)
    for group in range(groups):
        for split in range(parts):
            sW = np.full((K, cols), np.nan)
            units = K * cols // 8
            for tid in range(threads):
                for m in range(-(-units // threads)):
                    u = tid + m * threads
                    if u < units:
                        row = u // (cols // 8); i = min(split * K + row, hidden - 1); cb = u % (cols // 8)
                        sW[row, cb*8:cb*8+8] = W[i, cb*8:cb*8+8]
            sAcc = np.full((16, cols, kw), np.nan)
            accs_all = {}
            for warp in range(warps):
                ng, kg = warp % nw, warp // nw
                accs = [[np.zeros(4) for _ in range(32)] for _ in range(tiles)]
                chunks = {}
                for lane in range(32):
                    g, c = lane // 4, lane % 4
                    rows = [min(group * 16 + g + 8 * h, Bsz - 1) for h in range(2)]
                    for p in range(blocks):
                        k0 = split * K + (kg * blocks + p) * 32 + 8 * c
                        for h in range(2):
                            chunks[lane, p, h] = H[rows[h], k0:k0+8] if k0 < hidden else np.zeros(8)
                for p in range(blocks):
                    for s in range(2):
                        a = []
                        for lane in range(32):
                            t0, t1 = chunks[lane, p, 0], chunks[lane, p, 1]
                            a.append(np.array([t0[4*s], t0[4*s+1], t1[4*s], t1[4*s+1],
                                               t0[4*s+2], t0[4*s+3], t1[4*s+2], t1[4*s+3]]))
                        for t in range(tiles):
                            b = []
                            for lane in range(32):
                                g, c = lane // 4, lane % 4
                                kk = (kg * blocks + p) * 32 + 8 * c
                                n = (ng * tiles + t) * 8 + g
                                b.append(np.array([sW[kk + 4*s + e, n] for e in range(4)]))
                            mma(accs[t], a, b)
                for t in range(tiles):
                    for lane in range(32):
                        g, c = lane // 4, lane % 4
                        col = (ng * tiles + t) * 8 + 2 * c
                        for e in range(2):
                            sAcc[g, col+e, kg] = accs[t][lane][e]; sAcc[g+8, col+e, kg] = accs[t][lane][2+e]
            for j in range(16 * cols):
                b = group * 16 + j // cols
                if b < Bsz:
                    out[split, b, j % cols] = sum(sAcc[j // cols, j % cols, w] for w in range(kw))
    ref = H @ W
    got = out.sum(0)
    assert not np.isnan(got).any()
    err = np.abs(got - ref).max()
    print(f"hidden={hidden} HV={HV} B={Bsz} threads={threads} K={K} parts={parts} nw,kw={nw},{kw}: max err {err:.2e}")
    assert err < 1e-9

if __name__ == "__main__":
    run(512, 48, 16, 512, 256)
    run(2048, 32, 5, 512, 256)
    run(5120, 12, 20, 128, 1728)
    run(2048, 8, 18, 128, 1728)
