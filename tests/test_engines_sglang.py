"""CPU tests of flashgdn.engines.fused_sigmoid_gating_delta_rule_update (SGLang's decode and target
verify): valid arguments reach flashgdn's device check, each unsupported mode and bad argument
raises an error naming it (nothing written), and the views handed to flashgdn are views (no copies).
"""
from __future__ import annotations

import pytest
import torch

from flashgdn import api, engines
from flashgdn.kernels import policy
from flashgdn.spec import MAX_TOKENS

from helpers import BF16, F32
from flashgdn.validation import Problem
from helpers import batch_rows
from test_engines import (H, HV, K, N, P, V, _capture_launch, _kmajor, _shares_storage, _strided_last_dim, expect_error,
                          expect_only_device_error, sigmoid_kwargs)

# ----------------------------------------------------------------------------- SGLang's decode


SIGMOID_FN = engines.fused_sigmoid_gating_delta_rule_update


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
@pytest.mark.parametrize("gates_3d", [False, True], ids=["gates-2d", "gates-3d"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
def test_sigmoid_valid_inputs_reach_the_device_check(varlen, gates_3d, sdt):
    expect_only_device_error(SIGMOID_FN, sigmoid_kwargs(varlen=varlen, gates_3d=gates_3d, sdt=sdt))


@pytest.mark.parametrize("extra", [
    dict(cache_steps=4), dict(num_warps=4), dict(scale=0.05), dict(use_qk_l2norm_in_kernel=False),
    dict(softplus_beta=2, softplus_threshold=-5.0), dict(is_kda=False, disable_state_update=False, cache_ring=False),
    dict(intermediate_state_indices=torch.arange(N), retrieve_parent_token=torch.zeros(N, 2, dtype=torch.int64)),
], ids=["cache_steps", "num_warps", "scale", "no-l2norm", "softplus", "flags-off", "tree-without-buffer"])
def test_sigmoid_accepted_arguments(extra):
    """cache_steps (unused upstream too) and num_warps (a Triton launch setting) are accepted; the
    row table and the tree are not read without a buffer (SGLang's kernel neither)."""
    expect_only_device_error(SIGMOID_FN, {**sigmoid_kwargs(), **extra})


def test_sigmoid_int64_cu_seqlens_and_indices():
    kw = sigmoid_kwargs()
    kw["cu_seqlens"] = kw["cu_seqlens"].long()
    kw["initial_state_indices"] = kw["initial_state_indices"].long()
    expect_only_device_error(SIGMOID_FN, kw)


SIGMOID_NOT_IMPLEMENTED = {
    "no-state": (dict(initial_state_source=None), r"initial_state_source=None"),
    "kda": (dict(is_kda=True), r"is_kda=True"),
    "lower-bound": (dict(lower_bound=-5.0), r"lower_bound"),
    "one-token-frozen": (dict(disable_state_update=True),
                         r"disable_state_update / intermediate_states_buffer with one token per sequence"),
    "one-token-intermediate": (dict(intermediate_states_buffer=torch.zeros(N, 2, HV, V, K),
                                    intermediate_state_indices=torch.arange(N)),
                               r"disable_state_update / intermediate_states_buffer with one token per sequence"),
    "ring": (dict(cache_ring=True), r"cache_ring"),
    "ring-buffer": (dict(replayssm_g=torch.zeros(P, HV, 4)), r"replayssm_"),
    "varlen-long": (dict(cu_seqlens=torch.tensor([0, 2, 3, 4], dtype=torch.int32)),
                    r"varlen batch of 4 tokens in 3 sequences"),
    "varlen-empty-seqs": (dict(cu_seqlens=torch.tensor([0, 1, 1, 2, 3, 4], dtype=torch.int32)),
                          r"varlen batch of 4 tokens in 5 sequences"),
}


@pytest.mark.parametrize("case", list(SIGMOID_NOT_IMPLEMENTED))
def test_sigmoid_unsupported_mode(case):
    extra, match = SIGMOID_NOT_IMPLEMENTED[case]
    expect_error(SIGMOID_FN, {**sigmoid_kwargs(), **extra}, NotImplementedError, match)




def _q_views(kw, f):
    kw.update(q=f(kw["q"]), k=f(kw["k"]), v=f(kw["v"]))


SIGMOID_BAD = {
    "q-3d": (lambda kw: kw.update(q=kw["q"][0]), ValueError, r"^q must have shape \[\*, \*, \*, \*\]"),
    "q-fp32": (lambda kw: kw.update(q=kw["q"].float()), TypeError, r"^q must have dtype bfloat16 or float16"),
    "k-shape": (lambda kw: kw.update(k=kw["k"][..., :32]), ValueError, r"^k must have shape \[1, 4, 2, 64\]"),
    "v-tokens": (lambda kw: kw.update(v=kw["v"][:, :N - 1]), ValueError, r"^v must have shape \[1, 4, \*, \*\]"),
    "varlen-batch": (lambda kw: _q_views(kw, lambda t: t.expand(2, -1, -1, -1)), ValueError,
                     r"^with cu_seqlens, q must have shape \[1, tokens, H, K\]"),
    "cu-list": (lambda kw: kw.update(cu_seqlens=list(range(N + 1))), TypeError,
                r"^cu_seqlens must be a torch.Tensor or None, got list"),
    "cu-float": (lambda kw: kw.update(cu_seqlens=kw["cu_seqlens"].float()), TypeError,
                 r"^cu_seqlens must have dtype int32 or int64"),
    "cu-2d": (lambda kw: kw.update(cu_seqlens=kw["cu_seqlens"][None]), ValueError,
              r"^cu_seqlens must have shape \[\*\]"),
    "cu-empty": (lambda kw: kw.update(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError,
                 r"^cu_seqlens must have shape \[sequences \+ 1\]"),
    "a-shape": (lambda kw: kw.update(a=kw["a"][:, :HV - 1]), ValueError,
                r"^a must have shape \[4, 4\] or \[1, 4, 4\] \(per token and value head\), got \[4, 3\]"),
    "b-rows": (lambda kw: kw.update(b=kw["b"][:N - 1]), ValueError, r"^b must have shape \[4, 4\] or \[1, 4, 4\]"),
    "a-not-tensor": (lambda kw: kw.update(a=None), TypeError, r"^a must be a torch.Tensor, got NoneType"),
    "a-dtype": (lambda kw: kw.update(a=kw["a"].half()), TypeError, r"^a must have dtype bfloat16 or float32"),
    "a-last-dim": (lambda kw: kw.update(a=_strided_last_dim(kw["a"])), ValueError,
                   r"^a must have its last dim contiguous"),
    "q-row-stride": (lambda kw: _q_views(kw, lambda t: torch.zeros(1, N, H * K + 3, dtype=BF16)[..., :H * K]
                                          .unflatten(-1, (H, K)) if t.shape[-1] == K and t.shape[-2] == H
                                          else t), ValueError, r"^q stride \d+ at dim 0 must be a multiple of 8"),
    "head-dim": (lambda kw: _q_views(kw, lambda t: t[..., :48] if t.shape[-1] == K else t), ValueError,
                 r"^q.shape\[3\] \(K\) must be one of"),
    "state-fp16": (lambda kw: kw.update(initial_state_source=kw["initial_state_source"].half()), TypeError,
                   r"^initial_state_source must have dtype float32 or bfloat16"),
    "state-k-major": (lambda kw: kw.update(initial_state_source=_kmajor(kw["initial_state_source"])), ValueError,
                      r"^initial_state_source must have shape \[\*, 4, 128, 64\], got \[7, 4, 64, 128\]"),
    "state-heads": (lambda kw: kw.update(initial_state_source=torch.zeros(P, HV + 1, V, K)), ValueError,
                    r"^initial_state_source must have shape \[\*, 4, 128, 64\]"),
    "state-no-slots": (lambda kw: kw.update(initial_state_source=torch.zeros(0, HV, V, K)), ValueError,
                       r"^initial_state_source has no slots"),
    "state-overlap": (lambda kw: kw.update(initial_state_source=kw["initial_state_source"][:1].expand(P, -1, -1, -1)),
                      ValueError, r"^initial_state_source must not overlap itself"),
    "scale-negative": (lambda kw: kw.update(scale=-0.1), ValueError, r"^scale must be positive, got -0.1"),
    "scale-zero": (lambda kw: kw.update(scale=0), ValueError, r"^scale must be positive, got 0"),
    "scale-str": (lambda kw: kw.update(scale="x"), TypeError, r"^scale must be a float or None"),
    # flashgdn's own checks, under the same names
    "indices-shape": (lambda kw: kw.update(initial_state_indices=torch.zeros(N + 1, dtype=torch.int32)), ValueError,
                      r"^initial_state_indices must have shape \[4\]"),
    "indices-dtype": (lambda kw: kw.update(initial_state_indices=kw["initial_state_indices"].float()), TypeError,
                      r"^initial_state_indices must have dtype int32 or int64"),
    "softplus-beta": (lambda kw: kw.update(softplus_beta=0.0), ValueError, r"^softplus_beta must be > 0"),
    "A_log-shape": (lambda kw: kw.update(A_log=kw["A_log"][:2]), ValueError, r"^A_log must have shape \[4\]"),
}


@pytest.mark.parametrize("case", list(SIGMOID_BAD))
def test_sigmoid_bad_argument(case):
    change, exc, match = SIGMOID_BAD[case]
    kw = sigmoid_kwargs()
    change(kw)
    expect_error(SIGMOID_FN, kw, exc, match)


def test_sigmoid_bad_gate_shape_without_cu_seqlens():
    kw = sigmoid_kwargs(varlen=False)
    kw["a"] = kw["a"].unsqueeze(0)  # the varlen layout, in a batched call
    expect_error(SIGMOID_FN, kw, ValueError, r"^a must have shape \[4, 4\] or \[4, 1, 4\]")


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
@pytest.mark.parametrize("gates_3d", [False, True], ids=["gates-2d", "gates-3d"])
def test_sigmoid_hands_views_to_flashgdn(monkeypatch, varlen, gates_3d):
    """SGLang's own layout (varlen, 2-D gates) goes to the kernel as it is (KernelSpec.row_form "flat":
    the kernel views it); the other layouts as row views. Either way the kernel's q, k, v, a, b and
    output are views of the engine's tensors, no copies."""
    launched = _capture_launch(monkeypatch)
    kw = sigmoid_kwargs(varlen=varlen, gates_3d=gates_3d)
    kw.update(scale=0.1, softplus_beta=2.0, softplus_threshold=15.0)
    o = SIGMOID_FN(**kw)
    assert tuple(o.shape) == (*kw["q"].shape[:2], HV, V) and o.dtype == kw["q"].dtype
    (spec, args), = launched
    flat = varlen and not gates_3d
    assert spec.row_form == ("flat" if flat else "batch")
    if flat:
        assert all(getattr(args, n) is kw[n] for n in ("q", "k", "v", "a", "b")) and args.output is o
    assert (spec.scale, spec.use_l2norm, spec.softplus_beta, spec.softplus_threshold) == (0.1, True, 2.0, 15.0)
    assert args.state is kw["initial_state_source"] and args.state_indices is kw["initial_state_indices"]
    got = batch_rows(args, Problem(N, 1, H, HV, K, V))._asdict()
    for name, heads, size in (("q", H, K), ("k", H, K), ("v", HV, V)):
        t = got[name]
        assert _shares_storage(t, kw[name]) and t.data_ptr() == kw[name].data_ptr(), f"{name} was copied"
        assert tuple(t.shape) == (N, 1, heads, size)
        assert torch.equal(t[:, 0], kw[name][0] if varlen else kw[name][:, 0])
    for name in ("a", "b"):
        t = got[name]
        assert _shares_storage(t, kw[name]) and t.data_ptr() == kw[name].data_ptr()
        assert tuple(t.shape) == (N, 1, HV) and torch.equal(t[:, 0], kw[name].reshape(N, HV))
    out = got["output"]
    assert _shares_storage(out, o) and tuple(out.shape) == (N, 1, HV, V)


def test_sigmoid_checks_cu_seqlens_values_when_asked(monkeypatch):
    """FLASHGDN_CHECK_INDICES (api.CHECK_INDICES) reads cu_seqlens back: not arange(0, N * T + 1, T) raises."""
    _capture_launch(monkeypatch)
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    kw = sigmoid_kwargs()
    SIGMOID_FN(**kw)
    kw["cu_seqlens"] = torch.tensor([0, 1, 3, 3, 4], dtype=torch.int32)
    expect_error(SIGMOID_FN, kw, ValueError, r"^cu_seqlens must be arange\(0, N \* T \+ 1, T\) with T = 1")


# ----------------------------------------------------------------------------- SGLang's target verify


def verify_kwargs(*, T=3, varlen=True, sdt=F32, gates_3d=False, seed=0, steps=None, rows=(2, -1, 0, 5), tree=False):
    """Valid CPU arguments of SGLang's target verify: sigmoid_kwargs' T tokens per sequence, the
    pool frozen, the state after every token into a speculative buffer [6, steps, HV, V, K] (packed
    in its row dims, its slot stride padded) at the rows `rows` (a negative one: not written); with
    `tree`, an EAGLE tree (retrieve_parent_token: token t's parent (t - 1) // 2)."""
    kw = sigmoid_kwargs(seed=seed, varlen=varlen, sdt=sdt, gates_3d=gates_3d, tokens=T)
    steps = T + 1 if steps is None else steps
    buffer = torch.zeros(6, steps * HV * V * K + 64, dtype=sdt)[:, :steps * HV * V * K].unflatten(1, (steps, HV, V, K))
    kw.update(disable_state_update=True, intermediate_states_buffer=buffer,
              intermediate_state_indices=torch.tensor(rows, dtype=torch.int32), cache_steps=steps)
    if tree:
        kw["retrieve_parent_token"] = torch.tensor([-1] + [(t - 1) // 2 for t in range(1, T)]).repeat(N, 1)
    return kw


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
@pytest.mark.parametrize("gates_3d", [False, True], ids=["gates-2d", "gates-3d"])
@pytest.mark.parametrize("sdt", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_verify_valid_inputs_reach_the_device_check(varlen, gates_3d, sdt, tree):
    expect_only_device_error(SIGMOID_FN, verify_kwargs(varlen=varlen, gates_3d=gates_3d, sdt=sdt, tree=tree))


@pytest.mark.parametrize("extra", [
    dict(disable_state_update=False), dict(intermediate_states_buffer=None, intermediate_state_indices=None),
    dict(intermediate_states_buffer=None), dict(intermediate_state_indices=torch.arange(N + 3, dtype=torch.int64)),
    dict(intermediate_state_indices=torch.arange(2 * N, dtype=torch.int32)[::2]),
    dict(retrieve_parent_token=torch.zeros(N + 2, 3, dtype=torch.int32)),
    dict(retrieve_parent_token=torch.zeros(3, 2 * N, dtype=torch.int64).t()[:, :3]),
], ids=["state-written", "no-buffer", "indices-without-buffer", "long-int64-indices", "strided-indices",
        "long-int32-tree", "strided-tree"])
def test_verify_accepted_arguments(extra):
    """Several tokens per sequence with or without the verify's arguments; SGLang's row table may be
    longer than the batch (its whole arange), int64, strided, and is ignored without a buffer."""
    expect_only_device_error(SIGMOID_FN, {**verify_kwargs(), **extra})


def test_verify_most_tokens():
    expect_only_device_error(SIGMOID_FN, verify_kwargs(T=MAX_TOKENS, steps=MAX_TOKENS))
    kw = sigmoid_kwargs(n=1, tokens=MAX_TOKENS + 1)
    expect_error(SIGMOID_FN, kw, NotImplementedError, rf"varlen batch of {MAX_TOKENS + 1} tokens in 1 sequences")
    kw = sigmoid_kwargs(n=1, tokens=MAX_TOKENS + 1, varlen=False)
    expect_error(SIGMOID_FN, kw, NotImplementedError, rf"{MAX_TOKENS + 1} tokens per sequence")


def test_verify_of_no_sequences():
    """An empty batch (N = 0): accepted dense ([0, T, ...]); varlen its T is unknown, so the verify's
    arguments go as for one token (NotImplementedError, which a fallback wrapper takes)."""
    kw = verify_kwargs(varlen=False)
    kw.update(q=kw["q"][:0], k=kw["k"][:0], v=kw["v"][:0], a=kw["a"][:0], b=kw["b"][:0],
              initial_state_indices=kw["initial_state_indices"][:0])
    expect_only_device_error(SIGMOID_FN, kw)
    kw = verify_kwargs()
    kw.update(q=kw["q"][:, :0], k=kw["k"][:, :0], v=kw["v"][:, :0], a=kw["a"][:0], b=kw["b"][:0],
              initial_state_indices=kw["initial_state_indices"][:0], cu_seqlens=kw["cu_seqlens"][:1])
    expect_error(SIGMOID_FN, kw, NotImplementedError, r"with one token per sequence")


VERIFY_BAD = {
    "no-indices": (dict(intermediate_state_indices=None), ValueError,
                   r"^intermediate_states_buffer needs intermediate_state_indices \[N\]"),
    "indices-float": (dict(intermediate_state_indices=torch.zeros(N)), TypeError,
                      r"^intermediate_state_indices must have dtype int32 or int64"),
    "indices-short": (dict(intermediate_state_indices=torch.zeros(N - 1, dtype=torch.int32)), ValueError,
                      r"^intermediate_state_indices must have at least B=4 entries"),
    "indices-2d": (dict(intermediate_state_indices=torch.zeros(N, 1, dtype=torch.int32)), ValueError,
                   r"^intermediate_state_indices must have shape \[\*\]"),
    "buffer-dtype": (dict(intermediate_states_buffer=torch.zeros(6, 4, HV, V, K, dtype=BF16)), TypeError,
                     r"^intermediate_states_buffer must have dtype float32"),
    "buffer-steps": (dict(intermediate_states_buffer=torch.zeros(6, 2, HV, V, K)), ValueError,
                     r"^intermediate_states_buffer must have shape \[>= 1, >= T=3, \.\.\.\]"),
    "buffer-layout": (dict(intermediate_states_buffer=torch.zeros(6, 4, HV, K, V)), ValueError,
                      r"^intermediate_states_buffer must have shape \[\*, \*, 4, 128, 64\]"),
    "buffer-no-rows": (dict(intermediate_states_buffer=torch.zeros(0, 4, HV, V, K)), ValueError,
                       r"^intermediate_states_buffer has no slots"),
    "disable-not-bool": (dict(disable_state_update=1), TypeError, r"^disable_state_update must be a bool, got int"),
    "tree-float": (dict(retrieve_parent_token=torch.zeros(N, 3)), TypeError,
                   r"^retrieve_parent_token must have dtype int32 or int64"),
    "tree-tokens": (dict(retrieve_parent_token=torch.zeros(N, 4, dtype=torch.int32)), ValueError,
                    r"^retrieve_parent_token must have shape \[\*, 3\]"),
    "tree-rows": (dict(retrieve_parent_token=torch.zeros(N - 1, 3, dtype=torch.int32)), ValueError,
                  r"^retrieve_parent_token must have at least B=4 rows"),
}


@pytest.mark.parametrize("case", list(VERIFY_BAD))
def test_verify_bad_argument(case):
    extra, exc, match = VERIFY_BAD[case]
    expect_error(SIGMOID_FN, {**verify_kwargs(), **extra}, exc, match)


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "batched"])
@pytest.mark.parametrize("gates_3d", [False, True], ids=["gates-2d", "gates-3d"])
def test_verify_hands_views_and_the_buffer_to_the_mtp_kernel(monkeypatch, varlen, gates_3d):
    """The verify runs one MTP variant with SGLang's buffer and row table as they are and the pool
    frozen: in SGLang's own varlen layout (2-D gates) on the engine's tensors as they are
    (KernelSpec.row_form "flat": the launch views them), else on row views [N, T, ...] of them (no
    copy)."""
    launched = _capture_launch(monkeypatch)
    T = 3
    kw = verify_kwargs(T=T, varlen=varlen, gates_3d=gates_3d)
    o = SIGMOID_FN(**kw)
    assert tuple(o.shape) == (*kw["q"].shape[:2], HV, V) and o.dtype == kw["q"].dtype
    (spec, args), = launched
    flat = varlen and not gates_3d
    assert (spec.T, spec.row_form, spec.has_intermediate, spec.update_state) == (T, "flat" if flat else "batch",
                                                                                  True, False)
    assert spec.intermediate_rows == "int32" and spec.multi_token
    assert args.intermediate_states is kw["intermediate_states_buffer"]
    assert args.intermediate_indices is kw["intermediate_state_indices"] and args.parent_tokens is None
    assert args.state is kw["initial_state_source"] and args.state_indices is kw["initial_state_indices"]
    if flat:
        assert all(getattr(args, n) is kw[n] for n in ("q", "k", "v", "a", "b")) and args.output is o
        return
    for name, heads, size in (("q", H, K), ("k", H, K), ("v", HV, V)):
        t = getattr(args, name)
        assert _shares_storage(t, kw[name]) and t.data_ptr() == kw[name].data_ptr(), f"{name} was copied"
        assert tuple(t.shape) == (N, T, heads, size)
        assert torch.equal(t.flatten(0, 1), kw[name].flatten(0, 1))
    for name in ("a", "b"):
        t = getattr(args, name)
        assert _shares_storage(t, kw[name]) and tuple(t.shape) == (N, T, HV)
        assert torch.equal(t.flatten(0, 1), kw[name].reshape(N * T, HV))
    assert _shares_storage(args.output, o) and tuple(args.output.shape) == (N, T, HV, V)


def test_verify_hands_the_tree_to_the_token_loop(monkeypatch):
    launched = _capture_launch(monkeypatch)
    kw = verify_kwargs(T=4, tree=True)
    kw["retrieve_parent_token"] = kw["retrieve_parent_token"].long()
    SIGMOID_FN(**kw)
    (spec, args), = launched
    assert args.parent_tokens is kw["retrieve_parent_token"]
    assert (spec.tree_parents, spec.intermediate_rows, spec.T) == ("int64", "int32", 4)
    assert policy.BuildConfig.for_spec(spec).kernel == policy.KMTP


def test_verify_without_buffer_drops_the_row_table_and_the_tree(monkeypatch):
    launched = _capture_launch(monkeypatch)
    SIGMOID_FN(**{**verify_kwargs(tree=True), "intermediate_states_buffer": None, "disable_state_update": False})
    (spec, args), = launched
    assert args.intermediate_states is None and args.intermediate_indices is None and args.parent_tokens is None
    assert (spec.has_intermediate, spec.intermediate_rows, spec.tree_parents, spec.update_state) == (
        False, None, None, True)


VERIFY_INDEX_VALUES = {  # FLASHGDN_CHECK_INDICES: a value the kernel would refuse, or a race
    "cu_seqlens": (dict(cu_seqlens=torch.tensor([0, 1, 4, 6, 8], dtype=torch.int32)),
                   r"^cu_seqlens must be arange\(0, N \* T \+ 1, T\) with T = 2"),
    "row-past": (dict(intermediate_state_indices=torch.tensor([2, -1, 6, 5], dtype=torch.int32)),
                 r"^intermediate_state_indices values must be in \[0, 6\)"),
    "row-twice": (dict(intermediate_state_indices=torch.tensor([2, -1, 2, 5], dtype=torch.int32)),
                  r"^intermediate_state_indices must not repeat a written slot"),
    "parent-later": (dict(retrieve_parent_token=torch.tensor([[-1, 0]] * 3 + [[-1, 1]], dtype=torch.int32)),
                     r"^retrieve_parent_token\[3, 1\] must be an earlier token of its sequence"),
}


@pytest.mark.parametrize("case", list(VERIFY_INDEX_VALUES))
def test_verify_checks_index_values_when_asked(monkeypatch, case):
    """FLASHGDN_CHECK_INDICES (api.CHECK_INDICES) reads the index tensors back; the valid call runs,
    and a padding sequence's (row 1: slot -1) values are not its concern."""
    _capture_launch(monkeypatch)
    monkeypatch.setattr(api, "CHECK_INDICES", True)
    kw = verify_kwargs(T=2, tree=True)
    kw["initial_state_indices"] = torch.tensor([3, -1, 0, 5], dtype=torch.int32)
    SIGMOID_FN(**kw)
    SIGMOID_FN(**{**kw, "intermediate_state_indices": torch.tensor([2, 9, 0, 5], dtype=torch.int32)})
    change, match = VERIFY_INDEX_VALUES[case]
    expect_error(SIGMOID_FN, {**kw, **change}, ValueError, match)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("T, state, tree", [(4, "float32", "int64"), (8, "bfloat16", None)],
                         ids=["token-loop-tree", "tensor-cores"])
def test_the_verify_in_its_own_layout_keeps_the_kernels_accesses(tmp_path, monkeypatch, arch, T, state, tree):
    """SGLang's varlen verify as it comes (KernelSpec.row_form "flat") compiles, for Hopper and
    Blackwell, into the MTP kernel of its row views [N, T, ...] with the same global loads and stores
    (16-byte ones included): only the index arithmetic differs (the launch's views, slot indices of
    any stride). The token loop with an EAGLE tree, the tensor cores without."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")
    import dataclasses
    import re

    from helpers import compiled_ptx
    from test_compile import spec

    views = spec(arch, T=T, regime="large", state=state, index_dtype="int32", has_intermediate=True,
                 intermediate_rows="int32", tree_parents=tree, update_state=False)
    monkeypatch.setenv("CUTE_DSL_ARCH", arch)
    accesses = [sorted(re.findall(r"\b(?:ld|st)\.global[\w.]*", compiled_ptx(s, tmp_path / name, monkeypatch)))
                for name, s in (("views", views), ("flat", dataclasses.replace(views, row_form="flat")))]
    assert accesses[0] == accesses[1] and any(".v4." in a for a in accesses[0])
