"""flashgdn.engines on the GPU, against plain torch implementations of each engine contract.

The contracts, as engines.py states them: the packed decode splits each row of mixed_qkv into q,
k, v (H from the width), computes one GDN step per row from pool slot ssm_state_indices[i] and
writes the state back in place; a padding row (negative index; for the vLLM variant also index 0)
gets a zero output row and touches no slot. SGLang's decode does the same from q, k, v in its
varlen [1, N, ...] or batched [N, 1, ...] layout and returns the output in q's layout. The
expected values come from the independent split of the inputs (torch.split + reshape, which copy
where they must) and flashgdn.reference computed in fp64.

vLLM's fused_recurrent_gated_delta_rule (precomputed gates) is checked against
flashgdn.reference.fused_recurrent_gated_delta_rule_vllm in fp64: varlen with unequal lengths
(empty sequences and spare tokens included), dense batches, [N] and [N, T] slot tables,
accepted counts 0..T (0: a padding sequence), padding read slots (0 and -1), unwritten token slots, fp32/bf16 states,
g and beta in fp32 and bf16, and CUDA graph replay with new lengths and slots per replay.

Covered: both padding rules, strided views (mixed_qkv with a row stride larger than its width, a
and b views of one gate tensor, a strided index vector), a padded pool slot stride (the padding
never written), fp32 and bf16 states, K != V, GVA ratios, both batch regimes, and CUDA graph
replay equal to the eager call; examples/engine_decode_loop.py on the GPU.
"""
from __future__ import annotations


import pytest
import torch

from flashgdn import engines
from flashgdn import reference as ref
from helpers import BF16, F32, assert_close_output, assert_close_state, graph_replay_equals_eager, run_example

pytestmark = pytest.mark.gpu
DEV = "cuda"
F16 = torch.float16

PACKED_FNS = {
    "sglang": engines.fused_recurrent_gated_delta_rule_packed_decode,
    "vllm": engines.fused_recurrent_gated_delta_rule_packed_decode_vllm,
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=BF16):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


def padded_pool(P, HV, V, K, dtype, pad, seed):
    """(pool [P, HV, V, K], its allocation [P, HV*V*K + pad]): the slot stride padded by `pad`."""
    flat = torch.randn(P, HV * V * K + pad, generator=_gen(seed)).to(dtype).to(DEV)
    return flat[:, :HV * V * K].unflatten(1, (HV, V, K)), flat


def slots(variant, N, P, seed):
    """N slot indices into a pool of P slots with padding rows every third row (from row 2). The
    SGLang rule pads with -1 and uses slot 0 like any other; the vLLM rule also pads with slot 0
    (row 0), and its real rows never use slot 0."""
    idx = torch.randperm(P - 1, generator=_gen(seed))[:N] + 1
    idx[0 if variant == "vllm" else 1] = 0
    idx[2::3] = -1
    return idx


def padding_rows(variant, idx):
    return (idx <= 0) if variant == "vllm" else (idx < 0)


def packed_inputs(N, H, HV, K, V, io, strided, seed):
    """mixed_qkv [N, 2HK + HV*V] (a view of [N, width + 24] when strided), a, b [N, HV] (views of
    one [N, 2HV + 8] gate tensor when strided), A_log, dt_bias."""
    gen = _gen(seed)
    width = 2 * H * K + HV * V
    mixed = _randn(gen, N, width + (24 if strided else 0), dtype=io)[:, :width]
    if strided:
        ab = _randn(gen, N, 2 * HV + 8, dtype=io)
        b, a = ab[:, :HV], ab[:, HV:2 * HV]
    else:
        a, b = _randn(gen, N, HV, dtype=io), _randn(gen, N, HV, dtype=io)
    A_log = torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(DEV)
    dt_bias = _randn(gen, HV, dtype=F32)
    return mixed, a, b, A_log, dt_bias


def expected_packed(variant, mixed, a, b, A_log, dt_bias, scale, pool64, idx, l2):
    """The packed decode contract in plain torch: split the rows, map padding to -1, one step of
    flashgdn.reference in fp64 on pool64 (updated in place). Returns the output [N, 1, HV, V]."""
    N, width = mixed.shape
    HV, V, K = pool64.shape[1:]
    H = (width - HV * V) // (2 * K)
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=1)
    q, k, v = q.reshape(N, 1, H, K), k.reshape(N, 1, H, K), v.reshape(N, 1, HV, V)
    read = torch.where(padding_rows(variant, idx), -1, idx.long())
    out, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, A_log, a.reshape(N, 1, HV), dt_bias, b.reshape(N, 1, HV), scale, None, l2,
        initial_state=pool64, initial_state_indices=read, compute_dtype=torch.float64)
    return out


def check_pool(pool, flat, flat_before, pool64, idx, pad_rows):
    """Written slots close to the reference; every other slot, and the slot padding, unchanged."""
    written = torch.zeros(pool.shape[0], dtype=torch.bool, device=DEV)
    written[idx[~pad_rows].long()] = True
    before = flat_before[:, :pool[0].numel()].unflatten(1, pool.shape[1:])
    assert torch.equal(pool[~written], before[~written]), "a slot that no row writes changed"
    assert torch.equal(flat[:, pool[0].numel():], flat_before[:, pool[0].numel():]), "the slot padding changed"
    assert_close_state(pool[written], pool64[written])


PACKED_CASES = [
    dict(variant="sglang", N=5, H=2, HV=4, K=128, V=128, sdt=F32, io=BF16, strided=True, pad=16, l2=True, scale=None),
    dict(variant="vllm", N=5, H=2, HV=4, K=128, V=128, sdt=BF16, io=BF16, strided=True, pad=16, l2=True,
         scale=128 ** -0.5),
    dict(variant="sglang", N=7, H=2, HV=8, K=64, V=128, sdt=BF16, io=BF16, strided=False, pad=0, l2=True,
         scale=None, idx_dtype=torch.int64),
    dict(variant="vllm", N=7, H=4, HV=8, K=64, V=128, sdt=F32, io=BF16, strided=True, pad=0, l2=False,
         scale=0.5 * 64 ** -0.5, idx_dtype=torch.int64, idx_column=True),
    dict(variant="sglang", N=4, H=1, HV=2, K=128, V=64, sdt=F32, io=F16, strided=True, pad=32, l2=True, scale=None,
         idx_column=True),
    dict(variant="vllm", N=130, H=2, HV=16, K=128, V=128, sdt=F32, io=BF16, strided=True, pad=16, l2=True, scale=None),
    dict(variant="sglang", N=130, H=2, HV=16, K=128, V=128, sdt=BF16, io=BF16, strided=True, pad=16, l2=True,
         scale=None),
]


def _case_id(c):
    return "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items())


@pytest.mark.parametrize("case", PACKED_CASES, ids=_case_id)
def test_packed_decode_matches_the_contract(case):
    c = dict(case)
    variant, N, H, HV, K, V = c["variant"], c["N"], c["H"], c["HV"], c["K"], c["V"]
    seed = N * 7 + HV
    mixed, a, b, A_log, dt_bias = packed_inputs(N, H, HV, K, V, c["io"], c["strided"], seed)
    P = 2 * N + 3
    pool, flat = padded_pool(P, HV, V, K, c["sdt"], c["pad"], seed + 1)
    idx = slots(variant, N, P, seed + 2).to(c.get("idx_dtype", torch.int32)).to(DEV)
    if c.get("idx_column"):  # a column of a block table: stride 2
        idx = torch.stack([idx, idx + 1], 1)[:, 0]
    pad_rows = padding_rows(variant, idx)
    assert pad_rows.any() and (~pad_rows).any()
    flat_before, idx_before = flat.clone(), idx.clone()
    pool64 = pool.double()
    out = torch.full((N, 1, HV, V), float("nan"), dtype=c["io"], device=DEV)

    expected = expected_packed(variant, mixed, a, b, A_log, dt_bias, c["scale"], pool64, idx, c["l2"])
    o, st = PACKED_FNS[variant](mixed, a, b, A_log, dt_bias, c["scale"], pool, out, idx, c["l2"])
    torch.cuda.synchronize()

    assert o is out and st is pool
    assert torch.equal(idx, idx_before)
    assert torch.all(out[pad_rows] == 0), "padding rows must be zero"
    assert_close_output(out[~pad_rows], expected[~pad_rows])
    check_pool(pool, flat, flat_before, pool64, idx, pad_rows)
    if variant == "vllm":
        assert torch.equal(pool[0], flat_before[0, :pool[0].numel()].view(pool[0].shape)), "slot 0 was touched"
    else:
        assert (idx[~pad_rows] == 0).any(), "the case must use slot 0 as a real slot"


def test_packed_decode_without_rows():
    mixed, a, b, A_log, dt_bias = packed_inputs(0, 2, 4, 128, 128, BF16, True, 3)
    pool, flat = padded_pool(3, 4, 128, 128, F32, 0, 4)
    before = flat.clone()
    out = torch.empty(0, 1, 4, 128, dtype=BF16, device=DEV)
    for fn in PACKED_FNS.values():
        o, st = fn(mixed, a, b, A_log, dt_bias, None, pool, out, torch.empty(0, dtype=torch.int32, device=DEV), True)
        assert o is out and st is pool
    torch.cuda.synchronize()
    assert torch.equal(flat, before)


# ----------------------------------------------------------------------------- SGLang's decode

SIGMOID_CASES = [
    dict(varlen=True, gates_3d=False, N=6, H=2, HV=4, K=128, V=128, sdt=F32, softplus=(1.0, 20.0), scale=None),
    dict(varlen=True, gates_3d=True, N=6, H=2, HV=8, K=64, V=128, sdt=BF16, softplus=(2.0, 5.0), scale=0.1),
    dict(varlen=False, gates_3d=False, N=5, H=1, HV=4, K=128, V=64, sdt=BF16, softplus=(1.0, 20.0), scale=None),
    dict(varlen=False, gates_3d=True, N=130, H=2, HV=16, K=128, V=128, sdt=F32, softplus=(1.0, 20.0), scale=None),
    # SGLang's own layout (KernelSpec.row_form "flat") at large batch
    dict(varlen=True, gates_3d=False, N=130, H=2, HV=16, K=128, V=128, sdt=BF16, softplus=(1.0, 20.0), scale=None),
    dict(varlen=True, gates_3d=False, N=67, H=4, HV=8, K=64, V=64, sdt=F32, softplus=(1.0, 20.0), scale=0.2),
]


def sigmoid_inputs(varlen, gates_3d, N, H, HV, K, V, seed):
    """q, k, v views of one packed projection row (in SGLang's layout), a, b views of one gate
    tensor, A_log, dt_bias, cu_seqlens."""
    mixed, a, b, A_log, dt_bias = packed_inputs(N, H, HV, K, V, BF16, True, seed)
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unsqueeze(1))
    q = lead(mixed[:, :H * K].unflatten(1, (H, K)))
    k = lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K)))
    v = lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V)))
    if gates_3d:
        a, b = lead(a), lead(b)
    cu = torch.arange(N + 1, dtype=torch.int32, device=DEV) if varlen else None
    return q, k, v, a, b, A_log, dt_bias, cu


def expected_sigmoid(q, k, v, a, b, A_log, dt_bias, softplus, scale, pool64, idx, l2, varlen):
    """SGLang's decode contract in plain torch: one token per sequence in rows [N, 1, ...], one
    step of flashgdn.reference in fp64 (a negative index: zero row, no state). Returns [N, 1, HV, V]."""
    rows = (lambda t: t.transpose(0, 1)) if varlen else (lambda t: t)
    N, HV = (q.shape[1] if varlen else q.shape[0]), v.shape[2]
    out, _ = ref.gated_delta_rule_decode_pretranspose(
        rows(q).contiguous(), rows(k).contiguous(), rows(v).contiguous(), None, A_log,
        a.reshape(N, 1, HV), dt_bias, b.reshape(N, 1, HV), scale, None, l2,
        initial_state=pool64, initial_state_indices=idx, compute_dtype=torch.float64,
        softplus_beta=softplus[0], softplus_threshold=softplus[1])
    return out


@pytest.mark.parametrize("case", SIGMOID_CASES, ids=_case_id)
def test_sigmoid_gating_update_matches_the_contract(case):
    c = dict(case)
    varlen, N, H, HV, K, V = c["varlen"], c["N"], c["H"], c["HV"], c["K"], c["V"]
    seed = 11 * N + HV
    q, k, v, a, b, A_log, dt_bias, cu = sigmoid_inputs(varlen, c["gates_3d"], N, H, HV, K, V, seed)
    P = 2 * N + 3
    pool, flat = padded_pool(P, HV, V, K, c["sdt"], 16, seed + 1)
    idx = slots("sglang", N, P, seed + 2).to(torch.int32).to(DEV)
    pad_rows = idx < 0
    flat_before = flat.clone()
    pool64 = pool.double()

    expected = expected_sigmoid(q, k, v, a, b, A_log, dt_bias, c["softplus"], c["scale"], pool64, idx, True, varlen)
    o = engines.fused_sigmoid_gating_delta_rule_update(
        A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=a, b=b, initial_state_source=pool,
        initial_state_indices=idx, cu_seqlens=cu, use_qk_l2norm_in_kernel=True, scale=c["scale"],
        softplus_beta=c["softplus"][0], softplus_threshold=c["softplus"][1])
    torch.cuda.synchronize()

    assert tuple(o.shape) == (*q.shape[:2], HV, V) and o.dtype == q.dtype
    rows = o.transpose(0, 1) if varlen else o
    assert torch.all(rows[pad_rows] == 0), "padding rows must be zero"
    assert_close_output(rows[~pad_rows], expected[~pad_rows])
    check_pool(pool, flat, flat_before, pool64, idx, pad_rows)


# ----------------------------------------------------------------------------- CUDA graphs


# The decode step of the graph tests: N rows of a packed projection (q | k | v, then b | a) in
# static buffers wider than they are read, over a padded pool of P slots.
N, H, HV, K, V = 9, 2, 8, 128, 128
P = 2 * N + 3
width = 2 * H * K + HV * V


def _graph_static_inputs(variant, seed):
    """The static buffers a captured decode step reads ([mixed_qkv rows, b | a rows, slot indices],
    filled with fresh(-1)) and fresh(i): new values for replay i (new slots, padding rows among them,
    under `variant`'s padding rule)."""
    static = [torch.zeros(N, width + 24, dtype=BF16, device=DEV), torch.zeros(N, 2 * HV + 8, dtype=BF16, device=DEV),
              torch.zeros(N, dtype=torch.int32, device=DEV)]

    def fresh(i):
        gen = _gen(seed + i)
        return [_randn(gen, N, width + 24), _randn(gen, N, 2 * HV + 8), slots(variant, N, P, seed + 100 + i).to(DEV)]

    for s, f in zip(static, fresh(-1)):
        s.copy_(f)
    return static, fresh


@pytest.mark.parametrize("variant", list(PACKED_FNS))
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_packed_decode_cuda_graph_replay_equals_eager(variant, sdt):
    """New inputs and new slots (padding rows included) per replay, as an engine's decode step."""
    static, fresh = _graph_static_inputs(variant, seed=100)
    mixed_buf, ab_buf, idx = static
    _, _, _, A_log, dt_bias = packed_inputs(N, H, HV, K, V, BF16, True, 1)
    pool, _ = padded_pool(P, HV, V, K, sdt, 16, 5)
    bufs = dict(pool=pool, out=torch.zeros(N, 1, HV, V, dtype=BF16, device=DEV))

    def call(t):
        o, _ = PACKED_FNS[variant](mixed_buf[:, :width], ab_buf[:, HV:2 * HV], ab_buf[:, :HV], A_log, dt_bias,
                                   K ** -0.5, t["pool"], t["out"], idx, True)
        return o

    graph_replay_equals_eager(call, [mixed_buf, ab_buf, idx], fresh, bufs)


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
def test_sigmoid_gating_update_cuda_graph_replay_equals_eager(varlen):
    static, fresh = _graph_static_inputs("sglang", seed=300)
    mixed_buf, ab_buf, idx = static
    cu = torch.arange(N + 1, dtype=torch.int32, device=DEV) if varlen else None
    _, _, _, A_log, dt_bias = packed_inputs(N, H, HV, K, V, BF16, True, 2)
    lead = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t.unsqueeze(1))
    mixed = mixed_buf[:, :width]
    q = lead(mixed[:, :H * K].unflatten(1, (H, K)))
    k = lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K)))
    v = lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V)))
    pool, _ = padded_pool(P, HV, V, K, BF16, 16, 6)

    def call(t):
        return engines.fused_sigmoid_gating_delta_rule_update(
            A_log, ab_buf[:, HV:2 * HV], dt_bias, 1.0, 20.0, q, k, v, ab_buf[:, :HV], t["pool"], idx,
            use_qk_l2norm_in_kernel=True, cu_seqlens=cu)

    graph_replay_equals_eager(call, [mixed_buf, ab_buf, idx], fresh, dict(pool=pool))


# ----------------------------------------------------------------------------- the example

@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_decode_loop_example_on_the_gpu(engine):
    proc = run_example("engine_decode_loop.py", "--engine", engine)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not any(line.startswith("FAIL") for line in lines), proc.stdout
    steps = [line for line in lines if line.startswith("OK   step")]
    assert len(steps) == 4, proc.stdout


# ----------------------------------------------------------------------------- vLLM's precomputed-gate op
# The contract (flashgdn.recurrent): sequence i (rows cu_seqlens[i]..cu_seqlens[i + 1] of dim 1,
# or row i of a dense batch) reads slot ssm_state_indices[i, num_accepted_tokens[i] - 1] and writes
# the state after its token t to slot ssm_state_indices[i, t]; a read slot <= 0 or no accepted token
# is a padding sequence (zero output rows, no slot touched), a write slot <= 0 is not written. Expected values:
# flashgdn.reference.fused_recurrent_gated_delta_rule_vllm in fp64.

RECURRENT_CASES = [
    dict(varlen=True, lengths=[3, 1, 0, 4, 2, 4, 3], T=4, H=2, HV=4, K=128, V=128, sdt=F32, gdt=F32, bdt=BF16,
         acc=True, l2=True, scale=None, padded_table=True),
    dict(varlen=True, lengths=[2, 2, 1, 2] * 3, T=2, H=2, HV=8, K=64, V=128, sdt=BF16, gdt=BF16, bdt=BF16,
         acc=False, l2=False, scale=0.1, cu_dtype=torch.int64),
    dict(varlen=False, N=5, T=3, H=1, HV=4, K=128, V=64, sdt=BF16, gdt=F32, bdt=F32, acc=True, l2=True, scale=None,
         idx_dtype=torch.int64),
    dict(varlen=False, N=6, T=1, one_d=True, H=2, HV=4, K=128, V=128, sdt=F32, gdt=F32, bdt=BF16, acc=False,
         l2=True, scale=None, idx_column=True),
    dict(varlen=True, lengths=[1] * 60 + [0] + [1] * 69, T=1, one_d=True, H=2, HV=16, K=128, V=128, sdt=BF16,
         gdt=F32, bdt=BF16, acc=False, l2=True, scale=None),
    dict(varlen=True, lengths=[8, 1, 5, 8, 2, 7, 3, 8] * 5, T=8, H=2, HV=16, K=128, V=128, sdt=F32, gdt=F32,
         bdt=BF16, acc=True, l2=True, scale=None),
    dict(varlen=True, lengths=[16, 5, 11, 16, 9], T=16, H=2, HV=4, K=128, V=128, sdt=BF16, gdt=F32, bdt=BF16,
         acc=True, l2=True, scale=None),
]


def recurrent_inputs(c, seed):
    """q, k, v views of one packed projection row per token, g (log decay) and beta strided views,
    in vLLM's layout ([1, tokens, ...] with two spare tokens of no sequence, or [N, T, ...]), and
    cu_seqlens. Without l2norm in the kernel, q and k arrive normalised (as vLLM passes them)."""
    gen = _gen(seed)
    H, HV, K, V = c["H"], c["HV"], c["K"], c["V"]
    lengths = c["lengths"] if c["varlen"] else [c["T"]] * c["N"]
    tokens = sum(lengths) + (2 if c["varlen"] else 0)
    width = 2 * H * K + HV * V
    mixed = _randn(gen, tokens, width + 24)[:, :width]
    if not c["l2"]:
        for lo in (0, H * K):
            qk = mixed[:, lo:lo + H * K].unflatten(1, (H, K))
            qk.copy_(torch.nn.functional.normalize(qk.float(), dim=-1))
    g = torch.nn.functional.logsigmoid(_randn(gen, tokens, HV + 8, dtype=F32) + 3).to(c["gdt"])[:, :HV]
    beta = torch.sigmoid(_randn(gen, tokens, HV + 8, dtype=F32)).to(c["bdt"])[:, :HV]
    lead = (lambda t: t.unsqueeze(0)) if c["varlen"] else (lambda t: t.unflatten(0, (c["N"], c["T"])))
    q = lead(mixed[:, :H * K].unflatten(1, (H, K)))
    k = lead(mixed[:, H * K:2 * H * K].unflatten(1, (H, K)))
    v = lead(mixed[:, 2 * H * K:].unflatten(1, (HV, V)))
    cu = None
    if c["varlen"]:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=c.get("cu_dtype", torch.int32), device=DEV)
    return q, k, v, lead(g), lead(beta), cu, lengths


def vllm_slot_table(N, T, P, acc, gen):
    """[N, T] distinct slots in 1..P-1; every third sequence (from 1) pads its read slot (0, then
    -1 alternately); a real sequence's write column after its read column is 0 or -1 (not written)
    every other row. A sequence with no accepted token (acc 0) is padding whatever its slots."""
    idx = (torch.randperm(P - 1, generator=gen)[:N * T] + 1).view(N, T)
    for i in range(N):
        read = max(int(acc[i]) - 1, 0)
        if i % 3 == 1:
            idx[i, read] = 0 if i % 2 else -1
        elif T > 1 and i % 2 == 0:
            idx[i, (read + 1) % T] = -1 if i % 4 == 0 else 0
    return idx


def recurrent_expectations(idx, acc, lengths, tokens):
    """(token rows of real sequences, token rows of padding sequences, slots written) from the
    slot table on the host."""
    real, pad = torch.zeros(tokens, dtype=torch.bool), torch.zeros(tokens, dtype=torch.bool)
    written, start = [], 0
    for i, n in enumerate(lengths):
        a = 1 if acc is None else int(acc[i])
        if n and (a == 0 or int(idx[i, a - 1]) <= 0):
            pad[start:start + n] = True
        elif n:
            real[start:start + n] = True
            written += [int(s) for s in idx[i, :n] if int(s) > 0]
        start += n
    return real, pad, written


def _recurrent_id(c):
    return _case_id({("seqs" if n == "lengths" else n): (len(x) if n == "lengths" else x) for n, x in c.items()})


def check_vllm_recurrent(case, raw_gates: bool):
    """One call of vLLM's recurrent op (precomputed gates) or of its sigmoid-gating op (raw gates a,
    b [tokens, HV] as vLLM passes them, the gates computed in the kernel; softplus beta 1.5,
    threshold 15) on `case`, against the contract in fp64: outputs, padding rows, written slots,
    untouched slots and the slot padding."""
    c = dict(case)
    seed = 13 * len(c.get("lengths", [])) + c["T"] + c["HV"]
    gen = _gen(seed + 5)
    q, k, v, g, beta, cu, lengths = recurrent_inputs(c, seed)
    N, T, HV, V, K = len(lengths), c["T"], c["HV"], c["V"], c["K"]
    P = N * T + 5
    pool, flat = padded_pool(P, HV, V, K, c["sdt"], 16, seed + 1)
    acc = torch.randint(1, T + 1, (N,), generator=gen) if c["acc"] else None
    if acc is not None and N > 4:
        acc[4::5] = 0  # no accepted token: vLLM sends such rows, its kernel masks them (zero rows, no state)
    table = vllm_slot_table(N, T, P, acc if acc is not None else torch.ones(N, dtype=torch.long), gen)
    idx = table.to(c.get("idx_dtype", torch.int32)).to(DEV)
    if c.get("one_d"):
        idx = idx[:, 0]
        if c.get("idx_column"):  # a column of a block table: stride 2
            idx = torch.stack([idx, idx + 1], 1)[:, 0]
    acc_dev = None if acc is None else acc.to(DEV)
    if c.get("padded_table"):  # vLLM's CUDA-graph batch: rows past the N sequences (not read)
        idx = torch.cat([idx, torch.full((3, *idx.shape[1:]), -1, dtype=idx.dtype, device=DEV)])
        acc_dev = None if acc_dev is None else torch.cat([acc_dev, torch.full((3,), 99, device=DEV)])
    real, pad, written = recurrent_expectations(table, acc, lengths, q.shape[0] * q.shape[1])
    assert real.any() and pad.any() and len(set(written)) == len(written)
    flat_before, idx_before, cu_before = flat.clone(), idx.clone(), None if cu is None else cu.clone()
    pool64 = pool.double()

    if raw_gates:  # b | a of one projection row per token, as vLLM's GDN layer splits it, with rows past
        # the tokens (its whole batch's gates beside the speculative tokens; not read)
        tokens = q.shape[0] * q.shape[1]
        ba = _randn(gen, tokens + 3, 2 * HV + 8, dtype=c["gdt"])
        b, a = ba[:, :HV], ba[:, HV:2 * HV]
        A_log, dt_bias = torch.rand(HV, generator=gen).to(DEV), _randn(gen, HV, dtype=F32)
        g, beta = ref.log_gates(A_log, a[:tokens], dt_bias, b[:tokens], 1.5, 15.0, dtype=torch.float64)
        g, beta = g.view(*q.shape[:2], HV), beta.view(*q.shape[:2], HV)
    expected = ref.fused_recurrent_gated_delta_rule_vllm(q, k, v, g, beta, c["scale"], pool64, cu, idx, acc_dev,
                                                         c["l2"], compute_dtype=torch.float64)
    if raw_gates:
        o, st = engines.fused_sigmoid_gating_delta_rule_update_vllm(
            A_log, a, b, dt_bias, q, k, v, 1.5, 15.0, c["scale"], pool, True, cu, idx, acc_dev, c["l2"])
    else:
        o, st = engines.fused_recurrent_gated_delta_rule(q, k, v, g, beta, c["scale"], pool, True, cu, idx, acc_dev,
                                                         c["l2"])
    torch.cuda.synchronize()

    assert st is pool and o.shape == v.shape and o.dtype == q.dtype
    assert torch.equal(idx, idx_before) and (cu is None or torch.equal(cu, cu_before))
    rows, exp_rows = o.reshape(-1, HV, V).cpu(), expected.reshape(-1, HV, V).cpu()
    assert torch.all(rows[pad] == 0), "padding sequences' rows must be zero"
    assert_close_output(rows[real], exp_rows[real])
    mask = torch.zeros(P, dtype=torch.bool, device=DEV)
    mask[torch.tensor(written, dtype=torch.long, device=DEV)] = True
    before = flat_before[:, :pool[0].numel()].unflatten(1, pool.shape[1:])
    assert torch.equal(pool[~mask], before[~mask]), "a slot that no token writes changed"
    assert torch.equal(flat[:, pool[0].numel():], flat_before[:, pool[0].numel():]), "the slot padding changed"
    assert_close_state(pool[mask], pool64[mask])


@pytest.mark.parametrize("case", RECURRENT_CASES, ids=_recurrent_id)
def test_vllm_recurrent_matches_the_contract(case):
    check_vllm_recurrent(case, raw_gates=False)


# vLLM's sigmoid-gating op: its speculative verify (varlen, accepted counts; fp32 and bf16 gates),
# its decode (one token per sequence, [N] slots, large batch), a dense batch.
SIGMOID_VLLM_CASES = [RECURRENT_CASES[i] for i in (0, 1, 2, 4, 5)]


@pytest.mark.parametrize("case", SIGMOID_VLLM_CASES, ids=_recurrent_id)
def test_vllm_sigmoid_gating_matches_the_contract(case):
    check_vllm_recurrent(case, raw_gates=True)


def _composition(total, N, T, gen):
    """N lengths in 0..T summing to total (a CUDA-graph batch of fixed token count)."""
    lengths = [total // N] * N
    for _ in range(4 * N):
        i, j = torch.randint(0, N, (2,), generator=gen).tolist()
        if i != j and lengths[i] > 0 and lengths[j] < T:
            lengths[i] -= 1
            lengths[j] += 1
    return lengths


@pytest.mark.parametrize("raw_gates", [False, True], ids=["recurrent", "sigmoid"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_vllm_recurrent_cuda_graph_replay_equals_eager(sdt, raw_gates):
    """New tokens, sequence lengths, slots and accepted counts per replay, as a spec-decode step; the
    sigmoid-gating op on the same buffers (g and beta standing in for a and b [tokens, HV])."""
    N, T, H, HV, K, V = 6, 4, 2, 8, 128, 128
    total, P = 12, N * T + 5
    width = 2 * H * K + HV * V
    mixed_buf = torch.zeros(total, width + 24, dtype=BF16, device=DEV)
    g_buf = torch.zeros(total, HV, dtype=F32, device=DEV)
    beta_buf = torch.zeros(total, HV, dtype=F32 if raw_gates else BF16, device=DEV)  # raw gates: b of a's dtype
    cu = torch.zeros(N + 1, dtype=torch.int32, device=DEV)
    idx = torch.zeros(N, T, dtype=torch.int32, device=DEV)
    acc = torch.ones(N, dtype=torch.int32, device=DEV)
    mixed = mixed_buf[:, :width]
    q = mixed[:, :H * K].unflatten(1, (H, K)).unsqueeze(0)
    k = mixed[:, H * K:2 * H * K].unflatten(1, (H, K)).unsqueeze(0)
    v = mixed[:, 2 * H * K:].unflatten(1, (HV, V)).unsqueeze(0)

    def fresh(i):
        gen = _gen(500 + i)
        lengths = _composition(total, N, T, gen)
        a = torch.randint(1, T + 1, (N,), generator=gen)
        return [_randn(gen, total, width + 24),
                torch.nn.functional.logsigmoid(_randn(gen, total, HV, dtype=F32) + 3),
                torch.sigmoid(_randn(gen, total, HV, dtype=F32)).to(beta_buf.dtype),
                torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEV),
                vllm_slot_table(N, T, P, a, gen).to(torch.int32).to(DEV), a.to(torch.int32).to(DEV)]

    static = [mixed_buf, g_buf, beta_buf, cu, idx, acc]
    for s, f in zip(static, fresh(-1)):
        s.copy_(f)
    pool, _ = padded_pool(P, HV, V, K, sdt, 16, 7)

    A_log, dt_bias = torch.rand(HV, generator=_gen(9)).to(DEV), _randn(_gen(10), HV, dtype=F32)

    def call(t):
        if raw_gates:
            o, _ = engines.fused_sigmoid_gating_delta_rule_update_vllm(
                A_log, g_buf, beta_buf, dt_bias, q, k, v, initial_state=t["pool"], cu_seqlens=cu,
                ssm_state_indices=idx, num_accepted_tokens=acc, use_qk_l2norm_in_kernel=True)
            return o
        o, _ = engines.fused_recurrent_gated_delta_rule(q, k, v, g_buf.unsqueeze(0), beta_buf.unsqueeze(0), None,
                                                        t["pool"], True, cu, idx, acc, True)
        return o

    graph_replay_equals_eager(call, static, fresh, dict(pool=pool))
