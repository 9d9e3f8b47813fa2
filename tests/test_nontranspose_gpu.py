"""Nontranspose (K-major) decode kernel against the reference and against the K-last kernel."""
import itertools

import pytest
import torch

import flashgdn
from flashgdn import reference as ref
from helpers import assert_close_output, assert_close_state, make_inputs, make_state

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _cases():
    Bs = (1, 3, 31, 32, 33, 128, 257)
    cases = []
    for i, (K, sdt) in enumerate(itertools.product((64, 128, 256), (torch.float32, torch.bfloat16))):
        for j, B in enumerate(Bs if K == 128 else Bs[i % 3 :: 3]):
            n = i + j
            cases.append(dict(B=B, K=K, sdt=sdt, ratio=(1, 2, 4)[n % 3], io=(torch.bfloat16, torch.float16)[n % 2],
                              l2=(True, False)[(n // 2) % 2], strided=(n % 3 == 2)))
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(f"{k}{v}".replace("torch.", "") for k, v in c.items()))
def test_nontranspose_matches_reference(case):
    B, K, sdt, ratio, io, l2, strided = (case[x] for x in ("B", "K", "sdt", "ratio", "io", "l2", "strided"))
    H = 2
    HV, V = H * ratio, K
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, 1, H, HV, K, V, io, DEV, strided=strided)
    scale = None if l2 else 0.5 * K ** -0.5
    state = make_state(B, HV, K, V, sdt, DEV)
    ref_state = state.double().clone()
    o_ref, _ = ref.gated_delta_rule_decode(q, k, v, ref_state, A_log, a, dt_bias, b, scale, None, l2, compute_dtype=torch.float64)
    out = torch.full((B, 1, HV, V), float("nan"), dtype=io, device=DEV)
    o, st = flashgdn.gated_delta_rule_decode(q, k, v, state, A_log, a, dt_bias, b, scale, out, l2)
    assert o is out and st is state
    assert_close_state(state, ref_state)
    assert_close_output(o, o_ref)


@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16])
def test_nontranspose_agrees_with_pretranspose(sdt):
    B, H, HV, K = 33, 4, 8, 128
    inputs = make_inputs(B, 1, H, HV, K, K, device=DEV)
    q, k, v, a, b, A_log, dt_bias = inputs
    kv = make_state(B, HV, K, K, sdt, DEV)
    vk = kv.transpose(-1, -2).contiguous()
    o1, _ = flashgdn.gated_delta_rule_decode(q, k, v, kv, A_log, a, dt_bias, b)
    o2, _ = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, vk, A_log, a, dt_bias, b)
    assert_close_output(o1, o2)
    assert_close_state(kv, vk.transpose(-1, -2).float(), "transposed states")


def test_nontranspose_cuda_graph_replay_equals_eager():
    B, H, HV, K = 8, 2, 8, 128
    static = list(make_inputs(B, 1, H, HV, K, K, device=DEV))
    graph_state = make_state(B, HV, K, K, torch.float32, DEV)
    out = torch.empty(B, 1, HV, K, dtype=torch.bfloat16, device=DEV)
    q, k, v, a, b, A_log, dt_bias = static
    flashgdn.gated_delta_rule_decode(q, k, v, graph_state.clone(), A_log, a, dt_bias, b)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashgdn.gated_delta_rule_decode(q, k, v, graph_state, A_log, a, dt_bias, b, output=out)
    for _ in range(2):
        for s, f in zip(static, make_inputs(B, 1, H, HV, K, K, device=DEV)):
            s.copy_(f)
        eager_state = graph_state.clone()
        o_eager, _ = flashgdn.gated_delta_rule_decode(q, k, v, eager_state, A_log, a, dt_bias, b)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, o_eager) and torch.equal(graph_state, eager_state)
