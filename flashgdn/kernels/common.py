"""Device helpers shared by the GDN decode kernels: dtypes, gates, q/k norms, slot resolution.

Everything here is traced into the calling kernel; nothing allocates shared memory or synchronises
the CTA, so a kernel built from these helpers has no serial CTA-wide phase.
"""
from __future__ import annotations

import inspect

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, const_expr
from cutlass._mlir.dialects import nvvm

from ..spec import KernelArgs, KernelSpec

CUTLASS_DTYPES = {
    "float32": cutlass.Float32,
    "bfloat16": cutlass.BFloat16,
    "float16": cutlass.Float16,
    "int32": cutlass.Int32,
    "int64": cutlass.Int64,
}

L2NORM_EPS = 1e-6
# Row status computed by resolve_slots.
RUN, PADDING, INVALID = 0, 1, 2


@cute.jit
def softplus(x: Float32, beta: cutlass.Constexpr[float], threshold: cutlass.Constexpr[float]) -> Float32:
    """torch.nn.functional.softplus: linear above `threshold` (in units of beta * x).

    Branch-free (clamp, then select): a branch here would keep the loads that follow the gates
    from being issued before the gate inputs arrive."""
    bx = x * Float32(beta)
    out = cute.math.log1p(cute.math.exp(cute.arch.fmin(bx, Float32(threshold))))
    if const_expr(beta != 1.0):
        out = out * Float32(1.0 / beta)
    return Float32(cutlass.select_(bx > Float32(threshold), x, out))


@cute.jit
def gdn_gates(raw, sp_beta: cutlass.Constexpr[float], sp_threshold: cutlass.Constexpr[float]):
    """Decay g = exp(-exp(A_log) * softplus(a + dt_bias)) and beta = sigmoid(b), in fp32, from the
    raw (a, b, A_log, dt_bias) values of load_gates; from precomputed (log decay, beta) values,
    decay exp(g) and beta as they are."""
    if const_expr(len(raw) == 2):
        return cute.math.exp(raw[0].to(Float32)), raw[1].to(Float32)
    a, b, a_log, dt_bias = raw[0].to(Float32), raw[1].to(Float32), raw[2].to(Float32), raw[3].to(Float32)
    g = cute.math.exp(_log_decay(a, a_log, dt_bias, sp_beta, sp_threshold))
    return g, _sigmoid(b)


@cute.jit
def gdn_log_gates(raw, sp_beta: cutlass.Constexpr[float], sp_threshold: cutlass.Constexpr[float]):
    """gdn_gates with the decay as its log, -exp(A_log) * softplus(a + dt_bias) (what a ReplaySSM
    window stores)."""
    a, b, a_log, dt_bias = raw[0].to(Float32), raw[1].to(Float32), raw[2].to(Float32), raw[3].to(Float32)
    return _log_decay(a, a_log, dt_bias, sp_beta, sp_threshold), _sigmoid(b)


@cute.jit
def window_gates(raw, sp_beta: cutlass.Constexpr[float], sp_threshold: cutlass.Constexpr[float], window, t, writer):
    """gdn_gates of a ReplaySSM verify: also stores token t's log decay and beta into the windows.
    `window` is (gmem, the row's read slot, tile, hv, h, whether the row runs); tile 0 of a running
    row stores where `writer` (the caller's one thread per real token)."""
    gmem, slot, tile, hv, _, run = window
    log_g, beta = gdn_log_gates(raw, sp_beta, sp_threshold)
    if run and tile == 0 and writer:
        gmem.replay_g[slot, hv, t] = log_g
        gmem.replay_beta[slot, hv, t] = beta
    return cute.math.exp(log_g), beta


@cute.jit
def writes_window_k(spec: cutlass.Constexpr, tile, hv):
    """Whether the CTA of (tile, value head hv) stores the raw k of its q/k head into a ReplaySSM
    window: k is shared by the head's value heads, so tile 0 of the first of them does."""
    return tile == 0 and hv % (spec.HV // spec.H) == 0


def _log_decay(a, a_log, dt_bias, sp_beta: float, sp_threshold: float):
    return -cute.math.exp(a_log) * softplus(a + dt_bias, sp_beta, sp_threshold)


def _sigmoid(b):
    # Approximate reciprocal (1 ulp): IEEE division adds a slow-path branch.
    return cute.arch.rcp_approx(Float32(1.0) + cute.math.exp(-b))


def load_gates(gmem, b, t, hv):
    """The raw gate inputs (a, b, A_log, dt_bias) of (batch row b, token t, value head hv) from the
    KernelArgs gmem, in their own dtypes: converting here would make the caller wait for them.
    With precomputed gates (no A_log in gmem) the pair (log decay g, beta) from a and b."""
    if gmem.A_log is None:
        return gmem.a[b, t, hv], gmem.b[b, t, hv]
    return gate_value(gmem.a, b, t, hv), gate_value(gmem.b, b, t, hv), gmem.A_log[hv], gmem.dt_bias[hv]


def gate_value(mGate, b, t, hv):
    """mGate[b, t, hv]; where mGate holds the split projection's partial sums [S, B, T, HV]
    (KernelSpec.gate_parts), their sum rounded to bf16 as the projection's bf16 output is."""
    if const_expr(cute.rank(mGate.layout) == 4):
        parts = [mGate[s, b, t, hv] for s in range(mGate.shape[0])]
        acc = parts[0]
        for p in parts[1:]:
            acc += p
        return acc.to(BFloat16)
    return mGate[b, t, hv]


def load_fence():
    """Pins the global loads issued before it above the ones issued after it (a warp sync: it
    waits for nothing, but no load moves across it). The compiler schedules a load next to its
    first use; kernels put the loads needed last (state, v) before this fence and the ones whose
    arithmetic comes first (gates, q/k) after it, so no load waits behind arithmetic on another
    and all DRAM round trips overlap."""
    cute.arch.sync_warp()


def inv_l2norm(sum_sq):
    """1 / |x| of the l2norm from sum(x^2), with its eps."""
    return cute.math.rsqrt(sum_sq + Float32(L2NORM_EPS))


@cute.jit
def qk_factors(
    q,
    k,
    n: cutlass.Constexpr[int],
    group: cutlass.Constexpr[int],
    use_l2norm: cutlass.Constexpr[bool],
    scale: cutlass.Constexpr[float],
):
    """From this lane's n raw q and k values (fp32), reduced over a lane group of `group` lanes
    that together hold the whole vectors: (q_factor, k_factor, k_hat . q_hat), where
    q_hat = q * q_factor (scale included) and k_hat = k * k_factor."""
    sum_qq = Float32(0.0)
    sum_kk = Float32(0.0)
    sum_qk = Float32(0.0)
    for e in cutlass.range_constexpr(n):
        sum_qq += q[e] * q[e]
        sum_kk += k[e] * k[e]
        sum_qk += q[e] * k[e]
    sum_qk = cute.arch.warp_reduction_sum(sum_qk, threads_in_group=group)
    q_factor = Float32(scale)
    k_factor = Float32(1.0)
    if const_expr(use_l2norm):
        sum_qq = cute.arch.warp_reduction_sum(sum_qq, threads_in_group=group)
        sum_kk = cute.arch.warp_reduction_sum(sum_kk, threads_in_group=group)
        q_factor = inv_l2norm(sum_qq) * Float32(scale)
        k_factor = inv_l2norm(sum_kk)
    return q_factor, k_factor, sum_qk * q_factor * k_factor


def group_reduce_scatter(values, group: int, lane_in_group):
    """Sums of n values (n a power of two, n <= group) over each group of `group` lanes, one sum
    per lane: lane l of a group holds the sum of values[l // (group // n)]. Each butterfly level
    first halves the list (a lane keeps one half and sends the other), so it costs
    n - 1 + log2(group / n) shuffles where n separate reductions (warp_reduction_sum) cost
    n * log2(group)."""
    vals = list(values)
    offset = group // 2
    while len(vals) > 1:
        half = len(vals) // 2
        upper = (lane_in_group & offset) != 0
        vals = [
            Float32(cutlass.select_(upper, vals[j + half], vals[j]))
            + cute.arch.shuffle_sync_bfly(Float32(cutlass.select_(upper, vals[j], vals[j + half])), offset)
            for j in range(half)
        ]
        offset //= 2
    total = vals[0]
    while offset:
        total = total + cute.arch.shuffle_sync_bfly(total, offset)
        offset //= 2
    return total


@cute.jit
def resolve_slots(mIdx, mOutIdx, mAcc, b: Int32, pool_size, num_tokens: cutlass.Constexpr[int],
                  stores_state: cutlass.Constexpr[bool] = True):
    """Read/write slots of batch row b (64-bit), tokens to commit, and the row status.

    status RUN; PADDING for a negative read index (zero output, state untouched); INVALID for a
    read index >= pool size, a write index >= pool size where the state is stored
    (`stores_state`), or accepted tokens outside [0, T] (NaN output so the error shows, state
    untouched). A negative write index leaves the row running (its output, its intermediate
    states) and stores no final state (FlashInfer's rule: commits_state)."""
    read_slot = Int64(b)
    if const_expr(mIdx is not None):
        read_slot = Int64(mIdx[b])
    write_slot = read_slot
    if const_expr(mOutIdx is not None):
        write_slot = Int64(mOutIdx[b])
    accepted = Int32(num_tokens)
    if const_expr(mAcc is not None):
        accepted = Int32(mAcc[b])
    status = Int32(RUN)
    if read_slot < Int64(0):
        status = Int32(PADDING)
    elif read_slot >= Int64(pool_size):
        status = Int32(INVALID)
    elif stores_state and write_slot >= Int64(pool_size):
        status = Int32(INVALID)
    elif accepted < Int32(0) or accepted > Int32(num_tokens):
        status = Int32(INVALID)
    # A row that does not run reads slot 0 (validation requires a non-empty pool) and writes
    # nothing: its state load needs no branch, which would pin the conversions behind it.
    read_slot = Int64(cutlass.select_(status == Int32(RUN), read_slot, Int64(0)))
    return read_slot, write_slot, accepted, status


@cute.jit
def resolve_vllm_slots(mTok, mAcc, b: Int32, pool_size, num_tokens: cutlass.Constexpr[int]):
    """resolve_slots under vLLM's rule (KernelSpec.vllm_slots): row b reads slot
    mTok[b, mAcc[b] - 1] (column 0 without accepted counts), and writes it too where it runs one
    token. PADDING for a read slot <= 0 or an accepted count of 0 (a row vLLM sends without an
    accepted token; its kernel masks it so); INVALID for an accepted count outside [0, T] or a read
    slot >= the pool size."""
    acc = Int64(1)
    if const_expr(mAcc is not None):
        acc = Int64(mAcc[b])
    status = Int32(RUN)
    if acc == Int64(0):
        status = Int32(PADDING)
    elif acc < Int64(0) or acc > Int64(num_tokens):
        status = Int32(INVALID)
    column = Int32(cutlass.select_(status == Int32(RUN), acc - Int64(1), Int64(0)))
    read_slot = Int64(mTok[b, column])
    if status == Int32(RUN):
        if read_slot <= Int64(0):
            status = Int32(PADDING)
        elif read_slot >= Int64(pool_size):
            status = Int32(INVALID)
    read_slot = Int64(cutlass.select_(status == Int32(RUN), read_slot, Int64(0)))
    return read_slot, read_slot, Int32(acc), status


def row_slots(gmem, b, num_tokens: int, stores_state: bool = True):
    """resolve_slots of batch row b from the KernelArgs gmem (resolve_vllm_slots where the read
    slot comes from the token slots: vLLM's rule, no state_indices). `stores_state`: the kernel
    stores the row's state (KernelSpec.update_state), so its write index must be in the pool."""
    if gmem.state_indices is None and gmem.token_state_indices is not None:
        return resolve_vllm_slots(gmem.token_state_indices, gmem.accepted_tokens, b, gmem.state.shape[0], num_tokens)
    return resolve_slots(gmem.state_indices, gmem.output_state_indices, gmem.accepted_tokens, b, gmem.state.shape[0],
                         num_tokens, stores_state)


@cute.jit
def commits_state(status: Int32, write_slot: Int64):
    """Whether a row stores its final (committed) state: it runs and its write index is not
    negative (resolve_slots)."""
    return status == Int32(RUN) and write_slot >= Int64(0)


@cute.jit
def token_slots(mTok, b, pool_size, num_tokens: cutlass.Constexpr[int], status: Int32,
                null_slot: cutlass.Constexpr[bool] = False, count=None):
    """The pool slots (64-bit) that take the state after each token of batch row b
    (token_state_indices[b, t]; negative: not written), and the row status: a slot >= the pool
    size makes a running row INVALID (NaN output, nothing written). With `null_slot` (vLLM's
    rule) slot 0 is not written either; tokens from `count` on (the sequence's length, varlen)
    write nothing."""
    slots = []
    for t in cutlass.range_constexpr(num_tokens):
        slot = Int64(mTok[b, t])
        if const_expr(null_slot):
            slot = Int64(cutlass.select_(slot > Int64(0), slot, Int64(-1)))
        if const_expr(count is not None):
            slot = Int64(cutlass.select_(Int64(t) < count, slot, Int64(-1)))
        slots.append(slot)
    for t in cutlass.range_constexpr(num_tokens):
        if slots[t] >= Int64(pool_size) and status == Int32(RUN):
            status = Int32(INVALID)
    return slots, status


@cute.jit
def intermediate_row(mRows, b, rows, status: Int32):
    """(mRows[b], whether row b's states go there, status) of a row table (KernelSpec
    .intermediate_rows): a negative entry writes nothing; one >= the buffer's `rows` makes a
    running row INVALID (NaN output, nothing written)."""
    row = Int64(mRows[b])
    if row >= Int64(rows) and status == Int32(RUN):
        status = Int32(INVALID)
    return row, row >= Int64(0), status


def inter_row(gmem, b, status):
    """The intermediate buffer row of batch row b from the KernelArgs gmem, whether its states go
    there, and the status: intermediate_row with a row table, else row b (a static True)."""
    if gmem.intermediate_indices is None:
        return b, True, status
    return intermediate_row(gmem.intermediate_indices, b, gmem.intermediate_states.shape[0], status)


@cute.jit
def tree_parents(mPar, b, num_tokens: cutlass.Constexpr[int], reloads, status: Int32):
    """The parent token of each token t >= 1 of batch row b (KernelSpec.tree_parents; entry t - 1
    of the list), and the row status: where the row `reloads` (it writes its intermediates), a
    parent outside [0, t) makes a running row INVALID (NaN output, nothing written). Parents
    outside that range are clamped into it (the reload's address stays inside the row's states)."""
    parents = []
    for t in cutlass.range_constexpr(1, num_tokens):
        p = Int32(mPar[b, t])
        if p < Int32(0) or p >= Int32(t):
            if reloads and status == Int32(RUN):
                status = Int32(INVALID)
            p = Int32(t - 1)
        parents.append(p)
    return parents, status


@cute.jit
def varlen_span(mCu, b, num_tokens: cutlass.Constexpr[int], total, status: Int32):
    """(first flat token row, token count, status) of sequence b from cu_seqlens. A sequence of
    no tokens becomes PADDING (nothing read or written); cu_seqlens values that do not make a
    span of at most num_tokens tokens inside [0, total) make it INVALID with no tokens (nothing
    written: the span gives no place to write)."""
    start = Int64(mCu[b])
    count = Int64(mCu[b + 1]) - start
    if start < Int64(0) or count < Int64(0) or count > Int64(num_tokens) or start + count > Int64(total):
        status = Int32(INVALID)
        count = Int64(0)
    elif count == Int64(0) and status == Int32(RUN):
        status = Int32(PADDING)
    return start, count, status


def sequence_span(gmem, b, num_tokens: int, status):
    """(first token row, token count, status) of batch row b: varlen_span with cu_seqlens, else
    (None, num_tokens, status), static (token t of row b is [b, t])."""
    if gmem.cu_seqlens is None:
        return None, num_tokens, status
    return varlen_span(gmem.cu_seqlens, b, num_tokens, gmem.q.shape[1], status)


def token_at(gmem, b, t, start, count):
    """(dim 0, dim 1) indices of token t of batch row b in q/k/v/a/b/output: (b, t) dense; varlen
    (0, start + t), t clamped to the sequence's last token and the row to the tensor, so that
    every load reads a real token (the tokens past the sequence are computed, never stored)."""
    if start is None:
        return b, t
    last = Int64(cutlass.select_(count > Int64(0), count - Int64(1), Int64(0)))
    row = start + Int64(cutlass.select_(Int64(t) < last, Int64(t), last))
    total = Int64(gmem.q.shape[1])
    row = Int64(cutlass.select_(row < total, row, total - Int64(1)))
    return 0, Int64(cutlass.select_(row > Int64(0), row, Int64(0)))


def token_stored(t, count):
    """Whether token t's output and state are stored: a static True for a dense row (t < T)."""
    return True if isinstance(count, int) else Int64(t) < count


def writes_output(spec: KernelSpec, status):
    """Whether a row stores its output: always where padding rows write zeros, else all but the
    padding rows (a static True where no test is needed)."""
    return True if spec.zero_padding_output else status != Int32(PADDING)


@cute.jit
def skipped_output(status: Int32) -> Float32:
    """Output value of a row that does not run: 0 for padding, NaN for an invalid row."""
    out = Float32(0.0)
    if status == Int32(INVALID):
        out = Float32(float("nan"))
    return out


@cute.jit
def warp_slice(mRow: cute.Tensor, lane: Int32, head_dim: cutlass.Constexpr[int]) -> cute.Tensor:
    """This lane's contiguous slice (head_dim / 32 elements) of a length-head_dim vector, raw: the
    whole-warp view of one q or k row that qk_factors reduces over 32 lanes."""
    n = head_dim // 32
    rRaw = cute.make_rmem_tensor((n,), mRow.element_type)
    cute.autovec_copy(cute.local_tile(mRow, (n,), (lane,)), rRaw)
    return rRaw


def kernel_params(fields):
    """Decorator that gives a @cute.kernel `kernel(self, *args)` the parameters `fields` (a
    NamedTuple's _fields) by name (put above @cute.kernel): the DSL binds a kernel's arguments to
    its named parameters, and the list is written only in the NamedTuple."""
    def decorate(kernel):
        param = inspect.Parameter
        inspect.unwrap(kernel).__signature__ = inspect.Signature(
            [param(name, param.POSITIONAL_OR_KEYWORD) for name in ("self", *fields)]
        )
        return kernel

    return decorate


kernel_args = kernel_params(KernelArgs._fields)  # the decode kernels' parameters


def bulk_prefetch(start, nbytes) -> None:
    """Have the TMA engine bring `nbytes` (a multiple of 16) of global memory from iterator `start`
    into L2: one instruction, no registers held, no wait."""
    nvvm.cp_async_bulk_prefetch(start.to_llvm_ptr(), Int32(nbytes).ir_value())


def tensor_view(mX: cute.Tensor, offset, shape, stride) -> cute.Tensor:
    """The view of `mX`'s memory from element `offset` on with `shape` and `stride` (no copy)."""
    return cute.make_tensor(mX.iterator + offset, cute.make_layout(shape, stride=stride))


def packed_heads(mQKV: cute.Tensor, H: int, HV: int, K: int, V: int):
    """q, k [B, 1, H, K] and v [B, 1, HV, V] of packed rows mQKV [B, 2·H·K + HV·V] (q | k | v of one
    token side by side), at static column offsets that keep the rows' 16-byte alignment; the token
    dim is never stepped (T = 1): its stride is 0."""
    B, row = mQKV.shape[0], mQKV.stride[0]

    def heads(offset: int, n: int, d: int):
        return tensor_view(mQKV, offset, (B, 1, n, d), (row, 0, d, 1))

    return heads(0, H, K), heads(H * K, H, K), heads(2 * H * K, HV, V)
