"""Serving engines' own GDN decode entry points, run on flashgdn's kernels.

vLLM and SGLang call the Gated Delta Net decode through their in-tree FLA Triton ops, by name.
Each function here has the exact signature of one of those ops (names, order, defaults, return
value, in-place updates), so that an engine swaps the function it calls and nothing else
(docs/engines.md: which replaces which, and how to plug them in):

- `fused_recurrent_gated_delta_rule_packed_decode`: the packed one-token decode of vLLM and
  SGLang, with SGLang's padding rule (a negative slot index is padding).
- `fused_recurrent_gated_delta_rule_packed_decode_vllm`: the same with vLLM's padding rule (slot
  0, vLLM's null block, is padding too).
- `fused_sigmoid_gating_delta_rule_update`: SGLang's decode with the gates computed in the kernel;
  one token per sequence.
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

Every function but the last two runs the kernel of `flashgdn.api.gated_delta_rule_decode_pretranspose`
(K-last, one token) on the engine's K-last state pool [P, HV, V, K]. The engine's tensors go to the
kernel as the engine passes them, no copy: the packed row `mixed_qkv` with 2-D gates and slot
indices of any stride (KernelSpec.row_form "packed"), SGLang's varlen q, k, v [1, N, ...] with 2-D
gates ("flat"); the kernel's launch views them as the [N, 1, ...] tensors it reads, so a call builds
no torch view. SGLang's other layouts go as row views [N, 1, ...]. Each function checks first what
only it knows (the split of the packed row, the shapes of a, b, out and the slot indices, the layout
of q/k/v), raising TypeError/ValueError that name its own arguments; flashgdn's pretranspose checks
follow on the [N, 1, ...] views, naming q, k, v (views of `mixed_qkv`), output (`out`) and
initial_state_indices (the slot indices) where they differ, and the device check comes last.
Nothing is written by a call that fails.

Eager calls run the eager bodies (`_packed_decode`, `_sigmoid_update`); while torch.compile or
torch.export traces, each call is one flashgdn custom op instead (flashgdn.ops), whose fake
implementation runs these checks on fake tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import api, fastpath
from . import validation as val
from .logging_utils import logged
from .recurrent import fused_recurrent_gated_delta_rule, fused_sigmoid_gating_delta_rule_update_vllm
from .spec import SUPPORTED_HEAD_DIMS, KernelArgs

__all__ = [
    "fused_recurrent_gated_delta_rule_packed_decode",
    "fused_recurrent_gated_delta_rule_packed_decode_vllm",
    "fused_sigmoid_gating_delta_rule_update",
    "fused_recurrent_gated_delta_rule",
    "fused_sigmoid_gating_delta_rule_update_vllm",
]


# ----------------------------------------------------------------------------- checks, memoised


_CHECKED: dict = {}  # (check, call signature) -> what the check returned


def _checked(check, *args):
    """check(*args), remembered per call signature (validation.remembered). While torch.compile
    traces, tensors have no address: the check runs every time."""
    if torch.compiler.is_compiling():
        return check(*args)
    return val.remembered(_CHECKED, check, args)


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


def _packed_indices(slots: torch.Tensor) -> torch.Tensor:
    """The slot indices with stride 1, as flashgdn's pretranspose checks (and the kernels of
    flashgdn's own functions) take them. Both engines' kernels take a strided index vector (vLLM's
    eager path passes a column of its block table): N > 1 integers are copied (one small kernel);
    one index is viewed with stride 1 (never stepped)."""
    if slots.stride(0) == 1:
        return slots
    if slots.shape[0] <= 1:
        return slots.as_strided(slots.shape, (1,), slots.storage_offset())
    return slots.contiguous()


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
            _packed_indices(ssm_state_indices), None, None, False, 1.0, 20.0)


def _check_packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                         vllm_padding: bool) -> None:
    """Every check of a packed decode, in the eager order (the entry point's, then flashgdn's on the
    views the kernel takes), reading no address and no index value: the op's fake implementation."""
    H = _check_packed(mixed_qkv, a, b, initial_state, out, ssm_state_indices)
    api._check_pretranspose(*_pretranspose_check_args(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out,
                                                      ssm_state_indices, H))


def _packed_args(mixed_qkv, a, b, A_log, dt_bias, initial_state, out, ssm_state_indices,
                 vllm_padding: bool) -> KernelArgs:
    """The compiled function's arguments: the engine's tensors as they are (KernelSpec.row_form "packed":
    the kernel views them). vLLM's padding rule is the kernel's: its indices go in as token slots
    (KernelSpec.vllm_slots: a slot <= 0 is padding), no kernel turns it into flashgdn's."""
    if vllm_padding:
        return KernelArgs(mixed_qkv, None, None, a, b, A_log, dt_bias, initial_state, output=out,
                          token_state_indices=ssm_state_indices)
    return KernelArgs(mixed_qkv, None, None, a, b, A_log, dt_bias, initial_state, ssm_state_indices, output=out)


def _packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                   use_qk_l2norm_in_kernel, vllm_padding: bool):
    """The eager body of both packed decodes (and their op's implementation): the checks (the
    entry point's, then flashgdn's on views of the packed rows), then the kernel on the engine's
    tensors (_packed_args). A repeated call (flashgdn.fastpath) skips the checks: its key holds
    what the compiled function does not check (the batch size, the device, the shapes and strides
    of mixed_qkv, the pool and out, the scalars)."""
    def launch(fast):
        fast.fn(*_packed_args(mixed_qkv, a, b, A_log, dt_bias, initial_state, out, ssm_state_indices, vllm_padding))
        return out

    key, done = fastpath.run(api.CHECK_INDICES or api._is_compiling(), lambda: (
        _packed_decode, vllm_padding, mixed_qkv.shape, mixed_qkv.stride(), mixed_qkv.get_device(),
        initial_state.shape, initial_state.stride(), out.stride(), type(scale), scale, use_qk_l2norm_in_kernel),
        launch)
    if done is not fastpath.MISS:
        return out, initial_state
    H = _checked(_check_packed, mixed_qkv, a, b, initial_state, out, ssm_state_indices)
    plan = api._validated(api._check_pretranspose, *_pretranspose_check_args(
        mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices, H),
        options=(use_qk_l2norm_in_kernel, "packed rows", vllm_padding))
    args = _packed_args(mixed_qkv, a, b, A_log, dt_bias, initial_state, out, ssm_state_indices, vllm_padding)
    api._launch(plan, "klast", args, api.CallOptions(scale, use_qk_l2norm_in_kernel))
    api._remember_fast(key, plan)
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


# ----------------------------------------------------------------------------- SGLang's fused decode


def _refuse_sigmoid_features(initial_state_source, is_kda, lower_bound, disable_state_update,
                             intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token,
                             cache_ring, replayssm) -> None:
    """NotImplementedError for each of SGLang's modes that flashgdn does not serve yet."""
    name = "fused_sigmoid_gating_delta_rule_update"
    if initial_state_source is None:
        raise NotImplementedError(f"{name}: initial_state_source=None (no state pool) is not supported")
    if is_kda:
        raise NotImplementedError(f"{name}: is_kda=True (per-K gates, Kimi Delta Attention) is not supported")
    if lower_bound is not None:
        raise NotImplementedError(f"{name}: lower_bound (the KDA gate) is not supported")
    if disable_state_update:
        raise NotImplementedError(f"{name}: disable_state_update=True (target verify) is not supported")
    if intermediate_states_buffer is not None or intermediate_state_indices is not None:
        raise NotImplementedError(
            f"{name}: intermediate_states_buffer / intermediate_state_indices (target verify) are not supported"
        )
    if retrieve_parent_token is not None:
        raise NotImplementedError(f"{name}: retrieve_parent_token (EAGLE tree verify) is not supported")
    if cache_ring or any(t is not None for t in replayssm):
        raise NotImplementedError(f"{name}: cache_ring / replayssm_* (ReplaySSM ring writes) are not supported")


def _check_sigmoid(q, k, v, a, b, A_log, dt_bias, initial_state_source, scale, cu_seqlens):
    """The layout rules of SGLang's decode call; returns whether it is varlen (q [1, N, H, K]) and
    the (shape, strides) of the row views [N, 1, ...] of q, k, v, a, b and the output."""
    val.check_tensor("q", q, val.IO_DTYPES, (None,) * 4)
    val.check_tensor("k", k, (q.dtype,), tuple(q.shape))
    val.check_tensor("v", v, (q.dtype,), (q.shape[0], q.shape[1], None, None))
    varlen = cu_seqlens is not None
    if varlen:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
        val.check_tensor("cu_seqlens", cu_seqlens, val.INDEX_DTYPES, (None,))
        if q.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, q must have shape [1, N, H, K] (the tokens of all sequences "
                             f"in dim 1), got {list(q.shape)}")
        tokens, seqs = q.shape[1], cu_seqlens.shape[0] - 1
        if seqs < 0:
            raise ValueError("cu_seqlens must have shape [sequences + 1], got an empty tensor")
        if seqs != tokens:
            raise NotImplementedError(
                f"fused_sigmoid_gating_delta_rule_update: varlen batch of {tokens} tokens in {seqs} sequences "
                f"(cu_seqlens {list(cu_seqlens.shape)}): flashgdn serves exactly one token per sequence here "
                f"(cu_seqlens = arange(N + 1)); other sequence lengths are not supported yet"
            )
    elif q.shape[1] != 1:
        raise NotImplementedError(
            f"fused_sigmoid_gating_delta_rule_update: q.shape[1] = {q.shape[1]} tokens per sequence without "
            f"cu_seqlens: flashgdn serves one token per sequence here (decode); use "
            f"flashgdn.gated_delta_rule_mtp for several"
        )
    N, HV = (q.shape[1] if varlen else q.shape[0]), v.shape[2]
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) not in ((N, HV), (q.shape[0], q.shape[1], HV)):
            raise ValueError(f"{name} must have shape [{N}, {HV}] or [{q.shape[0]}, {q.shape[1]}, {HV}] "
                             f"(per token and value head), got {list(t.shape)}")
    geometry = [_row_geometry(t, varlen) for t in (q, k, v, a, b)]
    q4, k4, v4, a3, b3 = _row_views((q, k, v, a, b), geometry)
    # q, k, v, a, b, A_log and dt_bias keep their names in flashgdn's messages; only the state's
    # differs: check it here, against the heads and head sizes that q and v hold.
    p = val.check_inputs(q4, k4, v4, a3, b3, A_log, dt_bias, max_tokens=1)
    val.check_state("initial_state_source", initial_state_source, (None,), p, layout="klast")
    val.check_scale(scale)
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    o = torch.empty((q.shape[0], q.shape[1], p.HV, p.V), device="meta")  # the output's layout
    return varlen, (*geometry, _row_geometry(o, varlen))


def _row_geometry(t: torch.Tensor, varlen: bool):
    """(shape, strides) of the view [N, 1, ...] of a decode tensor in SGLang's layout ([1, N, ...]
    with cu_seqlens, [N, 1, ...] without; a 2-D gate [N, HV] gets the token dim). Each size-1 dim
    gets the packed stride of the dims inside it (validation.unit_dims_packed)."""
    if t.dim() == 2:
        shape, stride = (t.shape[0], 1, t.shape[1]), (t.stride(0), 0, t.stride(1))
    else:
        d = 1 if varlen else 0
        shape, stride = (t.shape[d], 1, *t.shape[2:]), (t.stride(d), 0, *t.stride()[2:])
    return shape, val.unit_dims_packed(shape, stride)


def _row_views(tensors, geometry) -> list:
    """The row views [N, 1, ...] of SGLang's tensors (_row_geometry's shapes and strides), no copy."""
    return [t.as_strided(*g, t.storage_offset()) for t, g in zip(tensors, geometry)]


def _check_sigmoid_output(o, v) -> None:
    """The op's `o`: the output as the function allocates it (v's shape and dtype, packed), whose
    row views _check_sigmoid's geometry describes."""
    val.check_tensor("o", o, (v.dtype,), tuple(v.shape))
    if not o.is_contiguous():
        raise ValueError(f"o must be contiguous (the output the function allocates), got strides {list(o.stride())}")


def _check_sigmoid_update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                          initial_state_indices, scale, cu_seqlens, o) -> None:
    """Every check of SGLang's decode call, in the eager order (the entry point's, then flashgdn's on
    the views it hands on), reading no address and no value: the op's fake implementation."""
    _check_sigmoid_output(o, v)
    _, geometry = _check_sigmoid(q, k, v, a, b, A_log, dt_bias, initial_state_source, scale, cu_seqlens)
    q4, k4, v4, a3, b3, o4 = _row_views((q, k, v, a, b, o), geometry)
    api._check_pretranspose(q4, k4, v4, None, A_log, a3, dt_bias, b3, scale, o4, initial_state_source,
                            _sigmoid_indices(initial_state_indices), None, None, False, softplus_beta,
                            softplus_threshold)


@logged
def fused_sigmoid_gating_delta_rule_update(
    A_log: torch.Tensor,
    a: torch.Tensor,
    dt_bias: torch.Tensor,
    softplus_beta: float,
    softplus_threshold: float,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor,
    initial_state_source: torch.Tensor,
    initial_state_indices: torch.Tensor,
    scale: Optional[float] = None,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    is_kda: bool = False,
    lower_bound: Optional[float] = None,
    disable_state_update: bool = False,
    intermediate_states_buffer: Optional[torch.Tensor] = None,
    intermediate_state_indices: Optional[torch.Tensor] = None,
    cache_steps: Optional[int] = None,
    retrieve_parent_token: Optional[torch.Tensor] = None,
    cache_ring: bool = False,
    replayssm_rawv: Optional[torch.Tensor] = None,
    replayssm_rawk: Optional[torch.Tensor] = None,
    replayssm_g: Optional[torch.Tensor] = None,
    replayssm_beta: Optional[torch.Tensor] = None,
    num_warps: int = 1,
):
    """SGLang's decode with the gates in the kernel, for one token per sequence.

    The two layouts SGLang passes: q, k [1, N, H, K], v [1, N, HV, V] with cu_seqlens =
    arange(N + 1) (varlen, one token per sequence), or q, k [N, 1, H, K], v [N, 1, HV, V] with
    cu_seqlens None. a, b [N, HV] (or [1, N, HV] / [N, 1, HV], q's first two dims). q, k, v may be
    views of the packed projection (last dim contiguous, other strides multiples of 16 bytes).
    initial_state_source [P, HV, V, K] fp32 or bf16 (K-last), slot initial_state_indices[i] read
    and written in place; a negative index is padding: zero output row, no state read or written.
    softplus_beta / softplus_threshold shape the gate g = -exp(A_log) * softplus(a + dt_bias).

    cu_seqlens' values are not read (no host sync): it must be arange(N + 1), which its shape
    [N + 1] alone cannot tell (FLASHGDN_CHECK_INDICES=1 checks the values, with a host sync).
    cache_steps and num_warps (a Triton launch setting) are accepted and not used. Anything else
    beyond that decode raises NotImplementedError naming it: more than one token per sequence,
    is_kda, lower_bound, disable_state_update, intermediate states, EAGLE trees, ReplaySSM rings,
    initial_state_source=None.

    Returns the output in q's layout: [1, N, HV, V] or [N, 1, HV, V], q's dtype.

    While torch.compile or torch.export traces, the call is the custom op
    flashgdn::fused_sigmoid_gating_delta_rule_update (flashgdn.ops), with the output allocated here.
    """
    _refuse_sigmoid_features(initial_state_source, is_kda, lower_bound, disable_state_update,
                             intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token,
                             cache_ring, (replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta))
    if api._is_compiling():  # traced: one custom op, which may not return a tensor: it writes `o`
        o = fastpath.new_output(v, False)  # v is [q0, q1, HV, V] of q's dtype (the op's fake implementation checks)
        torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update(
            A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
            initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, o)
        return o
    return _sigmoid_update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                           initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, None)


def _sigmoid_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, out,
                  geometry) -> KernelArgs:
    """The compiled function's arguments. SGLang's own layout (varlen [1, N, ...] q, k, v with 2-D
    gates; geometry None) goes as it is (KernelSpec.row_form "flat": the kernel views it); any other,
    as the row views [N, 1, ...] that `geometry` (_check_sigmoid's) describes."""
    if geometry is None:
        return KernelArgs(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, output=out)
    q4, k4, v4, a3, b3, o4 = _row_views((q, k, v, a, b, out), geometry)
    return KernelArgs(q4, k4, v4, a3, b3, A_log, dt_bias, initial_state_source,
                      _sigmoid_indices(initial_state_indices), output=o4)


def _sigmoid_update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                    initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, o):
    """The eager body of fused_sigmoid_gating_delta_rule_update (and its op's implementation, which
    passes the output `o` its caller allocated; None: allocated here); returns the output."""
    def launch(fast):
        out = fastpath.new_output(v, False) if o is None else o
        fast.fn(*_sigmoid_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, out,
                               fast.extra))
        return out

    # The fast key (flashgdn.fastpath): what decides the form and the views' geometry (the shapes
    # and strides of q, k, v, a, b; cu_seqlens, which the compiled function does not get) and what
    # the API call's key holds; the entry keeps the geometry.
    key, out = fastpath.run(api.CHECK_INDICES or api._is_compiling(), lambda: (
        fused_sigmoid_gating_delta_rule_update, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), a.shape,
        a.stride(), b.shape, b.stride(), q.get_device(), cu_seqlens is None or (cu_seqlens.shape, cu_seqlens.dtype),
        initial_state_source.shape, initial_state_source.stride(), initial_state_indices.stride(), type(scale), scale,
        type(softplus_beta), softplus_beta, type(softplus_threshold), softplus_threshold, use_qk_l2norm_in_kernel),
        launch)
    if out is not fastpath.MISS:
        return out
    varlen, geometry = _checked(_check_sigmoid, q, k, v, a, b, A_log, dt_bias, initial_state_source, scale,
                                cu_seqlens)
    if varlen and api.CHECK_INDICES:
        expected = torch.arange(cu_seqlens.shape[0], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        if not torch.equal(cu_seqlens, expected):
            raise ValueError(f"cu_seqlens must be arange(N + 1) (one token per sequence), got {cu_seqlens.tolist()}")
    if o is None:
        o = fastpath.new_output(v, False)  # [q0, q1, HV, V] of q's dtype (v's, as checked)
    q4, k4, v4, a3, b3, o4 = _row_views((q, k, v, a, b, o), geometry)
    flat = varlen and a.dim() == 2 and b.dim() == 2
    plan = api._validated(api._check_pretranspose, q4, k4, v4, None, A_log, a3, dt_bias, b3, scale, o4,
                          initial_state_source, _sigmoid_indices(initial_state_indices), None, None, False,
                          softplus_beta, softplus_threshold, options=(use_qk_l2norm_in_kernel, "sglang", flat))
    extra = None if flat else geometry
    args = _sigmoid_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, o, extra)
    api._launch(plan, "klast", args, api.CallOptions(scale, use_qk_l2norm_in_kernel, True, softplus_beta,
                                                     softplus_threshold))
    api._remember_fast(key, plan, extra=extra)
    return o


def _sigmoid_indices(indices):
    """SGLang's slot indices as the kernel takes them: one index is viewed with stride 1 (never
    stepped); anything else goes as it is (flashgdn's checks name it)."""
    if isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.shape[0] <= 1:
        return _packed_indices(indices)
    return indices
