"""Serving engines' own GDN decode entry points, run on flashgdn's kernels.

vLLM and SGLang call the Gated Delta Net decode through their in-tree FLA Triton ops, by name.
Each function here has the exact signature of one of those ops (names, order, defaults, return
value, in-place updates), so that an engine swaps the function it calls and nothing else
(docs/engines.md: which replaces which, and how to plug them in):

- `fused_recurrent_gated_delta_rule_packed_decode`: the packed one-token decode of vLLM and
  SGLang, with SGLang's padding rule (a negative slot index is padding).
- `fused_recurrent_gated_delta_rule_packed_decode_vllm`: the same with vLLM's padding rule (slot
  0, vLLM's null block, is padding too).
- `fused_sigmoid_gating_delta_rule_update`: SGLang's decode and target verify with the gates
  computed in the kernel; defined in flashgdn.sglang.
- `fused_recurrent_gated_delta_rule`: vLLM's recurrent op on precomputed gates g and beta, for
  decode and speculative-decode verify (varlen, per-token state slots, accepted counts); defined
  in flashgdn.recurrent.
- `fused_sigmoid_gating_delta_rule_update_vllm`: vLLM's `fused_sigmoid_gating_delta_rule_update`
  (another signature than SGLang's op of that name): the same op with the gates computed in the
  kernel, which vLLM's GDN layer runs for speculative decoding; defined in flashgdn.recurrent.

The upstream definitions these match (tests/test_engines.py pins them):
  vllm-project/vllm, vllm/third_party/flash_linear_attention/ops/fused_recurrent.py
      (commit 5c7cb312eddf585d3c47864c7485cbb6c9b4e262): fused_recurrent_gated_delta_rule_packed_decode,
      fused_recurrent_gated_delta_rule
  sgl-project/sglang, python/sglang/kernels/ops/attention/fla/fused_recurrent.py:
      fused_recurrent_gated_delta_rule_packed_decode (the same signature as vLLM's)
  sgl-project/sglang, python/sglang/kernels/ops/attention/fla/fused_sigmoid_gating_recurrent.py:
      fused_sigmoid_gating_delta_rule_update
  vllm-project/vllm, vllm/model_executor/layers/fla/ops/fused_sigmoid_gating.py
      (commit 95a3d5a40244d55ae2761d61e6c744dccac7ba3a): fused_sigmoid_gating_delta_rule_update (the _vllm one)

The packed decodes (defined here) run the kernel of `flashgdn.api.gated_delta_rule_decode_pretranspose`
(K-last, one token) on the engine's K-last state pool [P, HV, V, K]. The engine's tensors go to the
kernel as the engine passes them, no copy: the packed row `mixed_qkv` with 2-D gates and slot
indices of any stride (KernelSpec.row_form "packed"); the kernel's launch views them as the
[N, 1, ...] tensors it reads, so a call builds no torch view. Each function checks first what only
it knows (the split of the packed row, the shapes of a, b, out and the slot indices), raising
TypeError/ValueError that name its own arguments; flashgdn's pretranspose checks follow on the
[N, 1, ...] views, naming q, k, v (views of `mixed_qkv`), output (`out`) and initial_state_indices
(the slot indices) where they differ, and the device check comes last. Nothing is written by a
call that fails.

Eager calls run the eager body (`_packed_decode`); while torch.compile or torch.export traces, each
call is one flashgdn custom op instead (flashgdn.ops), whose fake implementation runs these checks
on fake tensors.
"""
from __future__ import annotations


import torch

from . import api, fastpath, host
from . import validation as val
from .logging_utils import logged
from .recurrent import fused_recurrent_gated_delta_rule, fused_sigmoid_gating_delta_rule_update_vllm
from .sglang import fused_sigmoid_gating_delta_rule_update
from .spec import AFTER_TOKEN_SLOTS, SUPPORTED_HEAD_DIMS, KernelArgs

__all__ = [
    "fused_recurrent_gated_delta_rule_packed_decode",
    "fused_recurrent_gated_delta_rule_packed_decode_vllm",
    "fused_sigmoid_gating_delta_rule_update",
    "fused_recurrent_gated_delta_rule",
    "fused_sigmoid_gating_delta_rule_update_vllm",
]


# ----------------------------------------------------------------------------- checks, memoised


def _check_head_dims(name: str, state: torch.Tensor) -> None:
    for what, d in (("shape[2] (V)", state.shape[2]), ("shape[3] (K)", state.shape[3])):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{name}.{what} must be one of {SUPPORTED_HEAD_DIMS}, got {d}")


def _check_packed(mixed_qkv, a, b, initial_state, out, ssm_state_indices) -> int:
    """The packed decode's own rules; returns H, the q/k heads that the row width implies."""
    val.check_tensor("mixed_qkv", mixed_qkv, val.IO_DTYPES, (None, None))
    N, width = mixed_qkv.shape
    val.check_tensor("initial_state", initial_state, val.STATE_DTYPES, (None, None, None, None))
    HV, V, K = initial_state.shape[1:]
    if HV < 1:
        raise ValueError(f"initial_state.shape[1] (HV) must be >= 1, got shape {list(initial_state.shape)}")
    _check_head_dims("initial_state", initial_state)
    H = val.packed_heads(width, HV, V, K)
    if not H:
        raise ValueError(
            f"mixed_qkv must have shape [N, 2*H*K + HV*V] (q, k, v of one token side by side) with "
            f"HV={HV}, V={V}, K={K} from initial_state {list(initial_state.shape)} and HV a multiple of "
            f"H >= 1; its width {width} does not split so"
        )
    # q, k and v are views at column offsets 0, H*K and 2*H*K (multiples of 16 bytes, K being one
    # of SUPPORTED_HEAD_DIMS): mixed_qkv's row stride and address carry flashgdn's rules for them.
    val.check_inner_contiguous("mixed_qkv", mixed_qkv, 1, align_leading=True)
    val.check_tensor("a", a, (mixed_qkv.dtype, torch.float32), (N, HV))
    val.check_tensor("b", b, (a.dtype,), (N, HV))
    for name, t in (("a", a), ("b", b)):
        val.check_inner_contiguous(name, t, 1, align_leading=False)
    val.check_tensor("out", out, val.OUT_DTYPES, (N, 1, HV, V))
    val.check_inner_contiguous("out", out, 1, align_leading=False)
    val.check_no_overlap("out", out)
    val.check_tensor("ssm_state_indices", ssm_state_indices, val.INDEX_DTYPES, (N,))
    return H


def _packed_geometry(mixed_qkv: torch.Tensor, H: int, HV: int, K: int, V: int) -> tuple:
    """(shape, strides, column offset) of the views q, k [N, 1, H, K] and v [N, 1, HV, V] of
    mixed_qkv's rows. The compiled kernel declares every q/k/v stride but the last a multiple of
    16 bytes; a size-1 dim's stride is never stepped (validation skips it), so it gets a packed
    one, which is such a multiple."""
    N, row = mixed_qkv.shape[0], mixed_qkv.stride(0)
    qk_row, v_row = (row, row) if N > 1 else (H * K, HV * V)
    qk = ((N, 1, H, K), (qk_row, H * K, K, 1))
    return (*qk, 0), (*qk, H * K), ((N, 1, HV, V), (v_row, HV * V, V, 1), 2 * H * K)


def _views(t: torch.Tensor, geometry) -> list:
    """The views (shape, strides, offset from t's own) of `t`, no copy."""
    base = t.storage_offset()
    return [t.as_strided(shape, stride, base + offset) for shape, stride, offset in geometry]


def _packed_views(mixed_qkv: torch.Tensor, H: int, HV: int, K: int, V: int):
    """q, k [N, 1, H, K] and v [N, 1, HV, V]: views of mixed_qkv's rows (_packed_geometry)."""
    return _views(mixed_qkv, _packed_geometry(mixed_qkv, H, HV, K, V))


def _packed_call(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                 use_qk_l2norm_in_kernel, vllm_padding: bool):
    """Both packed decodes: the eager body, or while torch.compile / torch.export traces the custom
    op flashgdn::fused_recurrent_gated_delta_rule_packed_decode (flashgdn.ops), which writes `out`
    and the pool and returns nothing (an op may not return its inputs)."""
    if api._is_compiling():
        torch.ops.flashgdn.fused_recurrent_gated_delta_rule_packed_decode(
            mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices, use_qk_l2norm_in_kernel,
            vllm_padding)
        return out, initial_state
    if host.EXT is not None and not api.CHECK_INDICES and (hosted := host.EXT.call(  # the C++ path (flashgdn.host)
            host.PACKED_VLLM if vllm_padding else host.PACKED, mixed_qkv, a, b, A_log, dt_bias, scale, initial_state,
            out, ssm_state_indices, use_qk_l2norm_in_kernel)) is not None:
        return hosted
    return _packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                          use_qk_l2norm_in_kernel, vllm_padding)


def _pretranspose_check_args(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                             H: int) -> tuple:
    """The arguments of flashgdn's pretranspose checks (api._check_pretranspose) of a packed call
    that passed its own (H: _check_packed's): q, k, v as views of mixed_qkv's rows, a and b with
    their token dim, the slot indices with stride 1."""
    HV, V, K = initial_state.shape[1:]
    q, k, v = _packed_views(mixed_qkv, H, HV, K, V)
    return (q, k, v, None, A_log, a.unsqueeze(1), dt_bias, b.unsqueeze(1), scale, out, initial_state,
            val.stride1_indices(ssm_state_indices), None, None, False, 1.0, 20.0)


def _check_packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                         vllm_padding: bool) -> None:
    """Every check of a packed decode, in the eager order (the entry point's, then flashgdn's on the
    views the kernel takes), reading no address and no index value: the op's fake implementation."""
    H = _check_packed(mixed_qkv, a, b, initial_state, out, ssm_state_indices)
    api._check_pretranspose(*_pretranspose_check_args(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out,
                                                      ssm_state_indices, H))


def _slot_args(ssm_state_indices, vllm_padding: bool) -> tuple:
    """(state_indices, token_state_indices) of the compiled function: vLLM's padding rule is the
    kernel's, its indices go in as token slots (KernelSpec.vllm_slots: a slot <= 0 is padding), no
    kernel turns it into flashgdn's."""
    return (None, ssm_state_indices) if vllm_padding else (ssm_state_indices, None)


def _packed_args(mixed_qkv, a, b, A_log, dt_bias, initial_state, out, ssm_state_indices,
                 vllm_padding: bool) -> KernelArgs:
    """The compiled function's arguments: the engine's tensors as they are (KernelSpec.row_form "packed":
    the kernel views them), the slots where _slot_args puts them."""
    slots, token_slots = _slot_args(ssm_state_indices, vllm_padding)
    return KernelArgs(mixed_qkv, None, None, a, b, A_log, dt_bias, initial_state, slots, output=out,
                      token_state_indices=token_slots)


def _packed_key(mixed_qkv, initial_state, out, scale, use_qk_l2norm_in_kernel, vllm_padding) -> tuple:
    """The fast key of a packed decode (flashgdn.fastpath): the batch size, the device, the shapes
    and strides of mixed_qkv, the pool and out, the scalars."""
    return (_packed_decode, vllm_padding, mixed_qkv.shape, mixed_qkv.stride(), mixed_qkv.get_device(),
            initial_state.shape, initial_state.stride(), out.stride(), type(scale), scale, use_qk_l2norm_in_kernel)


def _packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                   use_qk_l2norm_in_kernel, vllm_padding: bool):
    """The eager body of both packed decodes (and their op's implementation): the checks (the
    entry point's, then flashgdn's on views of the packed rows), then the kernel on the engine's
    tensors (_packed_args). A repeated call (flashgdn.fastpath) skips the checks (_packed_key)."""
    key, fast = fastpath.find(api.CHECK_INDICES, _packed_key, mixed_qkv, initial_state, out, scale,
                              use_qk_l2norm_in_kernel, vllm_padding)
    if fast is not None:
        try:  # KernelArgs' order
            slots, token_slots = _slot_args(ssm_state_indices, vllm_padding)
            fast.fn(mixed_qkv, None, None, a, b, A_log, dt_bias, initial_state, slots, None, None, None, out,
                    token_slots, *AFTER_TOKEN_SLOTS)
        except fastpath.REFUSED:
            fast = None
    if fast is None:
        H = val.checked(_check_packed, mixed_qkv, a, b, initial_state, out, ssm_state_indices)
        val.check_flags(use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        plan = api._validated(api._check_pretranspose, *_pretranspose_check_args(
            mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices, H),
            options=(use_qk_l2norm_in_kernel, "packed rows", vllm_padding))
        args = _packed_args(mixed_qkv, a, b, A_log, dt_bias, initial_state, out, ssm_state_indices, vllm_padding)
        api._launch(plan, "klast", args, api.CallOptions(scale, use_qk_l2norm_in_kernel))
        api._remember_fast(key, plan)
    if host.ENABLED:  # the output is given (`out`)
        fastpath.host_remember(key, host.PACKED_VLLM if vllm_padding else host.PACKED, host.PACKED_LAUNCH[vllm_padding],
                               7, 7, mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                               use_qk_l2norm_in_kernel)
    return out, initial_state


# ----------------------------------------------------------------------------- packed decode


@logged
def fused_recurrent_gated_delta_rule_packed_decode(
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor,
    out: torch.Tensor,
    ssm_state_indices: torch.Tensor,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per row from the packed projection, SGLang's padding rule.

    mixed_qkv [N, 2*H*K + HV*V] (bf16 or fp16): row i holds q [H*K], k [H*K] and v [HV*V] of token
    i side by side (the output of the causal conv); its row stride may exceed its width (a view of
    a wider projection), a multiple of 16 bytes. HV, V and K come from the state, H from the
    width. a, b [N, HV] (strided rows allowed), mixed_qkv's dtype or fp32; A_log [HV] fp32;
    dt_bias [HV] fp32 or bf16; scale a float (None: K ** -0.5). initial_state [P, HV, V, K] fp32
    or bf16, K-last ("pretranspose"), its slot stride may be padded: slot ssm_state_indices[i]
    (int32 or int64) is read and written in place. A negative slot index is padding: its output
    row is zero and no state is read or written. out [N, 1, HV, V] receives the output.

    Returns (out, initial_state).

    While torch.compile or torch.export traces, the call is the custom op
    flashgdn::fused_recurrent_gated_delta_rule_packed_decode (flashgdn.ops; both packed decodes).
    """
    return _packed_call(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                        use_qk_l2norm_in_kernel, vllm_padding=False)


@logged
def fused_recurrent_gated_delta_rule_packed_decode_vllm(
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor,
    out: torch.Tensor,
    ssm_state_indices: torch.Tensor,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_recurrent_gated_delta_rule_packed_decode` with vLLM's padding rule: a slot index
    <= 0 is padding (vLLM's block 0 is its null block, and it pads CUDA-graph batches with it):
    zero output row, slot 0 never read nor written. The decode kernel applies the rule itself
    (the indices go in as a view: no extra kernel, no copy), so it captures in a CUDA graph like
    the rest.

    Returns (out, initial_state).
    """
    return _packed_call(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                        use_qk_l2norm_in_kernel, vllm_padding=True)
