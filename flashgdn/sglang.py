"""SGLang's `fused_sigmoid_gating_delta_rule_update` (the decode and the target verify of its GDN
backend) on flashgdn's kernels; flashgdn.engines exports it.

Upstream: sgl-project/sglang, python/sglang/kernels/ops/attention/fla/fused_sigmoid_gating_recurrent.py
(tests/test_engines.py pins the signature). SGLang's Triton GDN kernel class calls it in `decode`
(one token per sequence, the state written back) and in `target_verify` (the draft tokens of each
sequence, `disable_state_update=True`, the state after every token into the speculative buffer
`intermediate_states_buffer[intermediate_state_indices[i], t]`, with `retrieve_parent_token` for an
EAGLE tree). Both run the kernels of flashgdn.api.gated_delta_rule_decode_pretranspose: one token
on the K-last decode kernel, several on the MTP kernels, whose intermediate writes take SGLang's
row table (KernelSpec.intermediate_rows) and its tree (KernelSpec.tree_parents).

SGLang's varlen layout (q, k, v [1, N * T, ...] with 2-D gates: its decode and its target verify)
goes to the kernel as it is (KernelSpec.row_form "flat": its launch views the rows); every other
layout goes as row views [N, T, ...] (one torch view per tensor). The checks of this module come
first and name SGLang's arguments; flashgdn's pretranspose checks follow on the views, naming q, k,
v, a, b, initial_state_source's slots (initial_state_indices) and the output as flashgdn does.
Nothing is written by a call that fails. While torch.compile traces, a call is the custom op
flashgdn::fused_sigmoid_gating_delta_rule_update (flashgdn.ops).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import api, fastpath, host
from . import validation as val
from .logging_utils import logged
from .spec import AFTER_OUTPUT, AFTER_REPLAY, MAX_TOKENS, KernelArgs

NAME = "fused_sigmoid_gating_delta_rule_update"
# The KernelArgs fields between the output and the row table (intermediate_indices), all None here
BEFORE_ROWS = AFTER_OUTPUT[:len(AFTER_OUTPUT) - len(AFTER_REPLAY)]


def _refuse(initial_state_source, is_kda, lower_bound, cache_ring, rawv, rawk, g, beta) -> None:
    """NotImplementedError for each of SGLang's modes that flashgdn does not serve yet (rawv, rawk,
    g, beta: the replayssm_* rings)."""
    if initial_state_source is None:
        raise NotImplementedError(f"{NAME}: initial_state_source=None (no state pool) is not supported")
    if is_kda:
        raise NotImplementedError(f"{NAME}: is_kda=True (per-K gates, Kimi Delta Attention) is not supported")
    if lower_bound is not None:
        raise NotImplementedError(f"{NAME}: lower_bound (the KDA gate) is not supported")
    if cache_ring or rawv is not None or rawk is not None or g is not None or beta is not None:
        raise NotImplementedError(f"{NAME}: cache_ring / replayssm_* (ReplaySSM ring writes) are not supported")


def _tokens(q, cu_seqlens) -> tuple:
    """(varlen, N sequences, T tokens each) of SGLang's q: [1, N * T, H, K] with cu_seqlens [N + 1]
    (its values are not read: every sequence must have T tokens, as SGLang's decode and target
    verify pass them), or [N, T, H, K] without."""
    if cu_seqlens is None:
        if q.shape[1] > MAX_TOKENS:
            raise NotImplementedError(f"{NAME}: {q.shape[1]} tokens per sequence (q {list(q.shape)}): flashgdn "
                                      f"serves up to {MAX_TOKENS}")
        return False, q.shape[0], q.shape[1]
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    val.check_tensor("cu_seqlens", cu_seqlens, val.INDEX_DTYPES, (None,))
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must have shape [1, tokens, H, K] (the tokens of all sequences "
                         f"in dim 1), got {list(q.shape)}")
    tokens, N = q.shape[1], cu_seqlens.shape[0] - 1
    if N < 0:
        raise ValueError("cu_seqlens must have shape [sequences + 1], got an empty tensor")
    if (tokens % N if N else tokens) or (N and not 1 <= tokens // N <= MAX_TOKENS):
        raise NotImplementedError(
            f"{NAME}: varlen batch of {tokens} tokens in {N} sequences (cu_seqlens {list(cu_seqlens.shape)}): "
            f"flashgdn serves sequences of one common length T in [1, {MAX_TOKENS}] (cu_seqlens = "
            f"arange(0, N * T + 1, T), as SGLang's decode and target verify pass it)")
    return True, N, tokens // N if N else 1


def _row_geometry(t: torch.Tensor, varlen: bool, T: int):
    """(shape, strides) of the view [N, T, ...] of a tensor in SGLang's layout: [1, N * T, ...]
    with cu_seqlens, [N, T, ...] without; a 2-D gate [N * T, HV] gets its token dim. Each size-1
    dim gets the packed stride of the dims inside it (validation.unit_dims_packed)."""
    if t.dim() == 2:
        shape, stride = (t.shape[0] // T, T, t.shape[1]), (T * t.stride(0), t.stride(0), t.stride(1))
    elif varlen:
        shape, stride = (t.shape[1] // T, T, *t.shape[2:]), (T * t.stride(1), t.stride(1), *t.stride()[2:])
    else:
        shape, stride = tuple(t.shape), t.stride()
    return shape, val.unit_dims_packed(shape, stride)


def _row_views(tensors, geometry) -> list:
    """The row views [N, T, ...] of SGLang's tensors (_row_geometry's shapes and strides), no copy."""
    return [t.as_strided(*g, t.storage_offset()) for t, g in zip(tensors, geometry)]


def _check_layout(q, k, v, a, b, cu_seqlens):
    """The layout rules of SGLang's call; returns (varlen, T, the (shape, strides) of the row views
    [N, T, ...] of q, k, v, a, b and the output)."""
    val.check_tensor("q", q, val.IO_DTYPES, (None,) * 4)
    val.check_tensor("k", k, (q.dtype,), tuple(q.shape))
    val.check_tensor("v", v, (q.dtype,), (q.shape[0], q.shape[1], None, None))
    varlen, N, T = _tokens(q, cu_seqlens)
    HV = v.shape[2]
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) not in ((N * T, HV), (q.shape[0], q.shape[1], HV)):
            raise ValueError(f"{name} must have shape [{N * T}, {HV}] or [{q.shape[0]}, {q.shape[1]}, {HV}] "
                             f"(per token and value head), got {list(t.shape)}")
    o = torch.empty((q.shape[0], q.shape[1], HV, v.shape[3]), device="meta")  # the output's layout
    return varlen, T, [_row_geometry(t, varlen, T) for t in (q, k, v, a, b, o)]


def _verify(intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token) -> tuple:
    """The target verify's tensors as the kernel takes them: SGLang's kernel reads the row table and
    the tree only with a buffer, so without one they are dropped."""
    if intermediate_states_buffer is None:
        return None, None, None
    return intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token


def _check_verify(q, disable_state_update, intermediate_states_buffer, intermediate_state_indices, T: int) -> None:
    """The target verify's own rules: a buffer needs its row table; one token per sequence (also an
    empty varlen batch, whose T nothing tells) takes neither a buffer nor a frozen state (flashgdn's
    one-token decode writes its state)."""
    if not isinstance(disable_state_update, bool):
        raise TypeError(f"disable_state_update must be a bool, got {type(disable_state_update).__name__}")
    if intermediate_states_buffer is not None and intermediate_state_indices is None:
        raise ValueError("intermediate_states_buffer needs intermediate_state_indices [N] (the buffer row of "
                         "each sequence), as SGLang's kernel reads them")
    if T == 1 and (disable_state_update or intermediate_states_buffer is not None):
        raise NotImplementedError(
            f"{NAME}: disable_state_update / intermediate_states_buffer with one token per sequence (q "
            f"{list(q.shape)}) is not supported: the target verify of two or more draft tokens is")


def _check(q, k, v, a, b, A_log, dt_bias, initial_state_source, scale, cu_seqlens, disable_state_update,
           intermediate_states_buffer, intermediate_state_indices):
    """Every rule of this module (no address, no value read; the tree's rules are flashgdn's
    pretranspose checks'); returns _check_layout's."""
    varlen, T, geometry = _check_layout(q, k, v, a, b, cu_seqlens)
    _check_verify(q, disable_state_update, intermediate_states_buffer, intermediate_state_indices, T)
    # q, k, v, a, b, A_log and dt_bias keep their names in flashgdn's messages; only the state's
    # differs: check it here, against the heads and head sizes that q and v hold.
    p = val.check_inputs(*_row_views((q, k, v, a, b), geometry), A_log, dt_bias, max_tokens=MAX_TOKENS)
    val.check_state("initial_state_source", initial_state_source, (None,), p, layout="klast",
                    written=not disable_state_update)
    val.check_scale(scale)
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return varlen, T, geometry


def _pretranspose_args(q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, initial_state_source,
                       initial_state_indices, scale, disable_state_update, intermediate_states_buffer,
                       intermediate_state_indices, retrieve_parent_token, o, geometry) -> tuple:
    """The arguments of flashgdn's pretranspose checks (api._check_pretranspose) on the row views
    (the verify's tensors as _verify leaves them)."""
    q4, k4, v4, a3, b3, o4 = _row_views((q, k, v, a, b, o), geometry)
    return (q4, k4, v4, None, A_log, a3, dt_bias, b3, scale, o4, initial_state_source,
            _indices(initial_state_indices), None, intermediate_states_buffer, disable_state_update, softplus_beta,
            softplus_threshold, intermediate_state_indices, retrieve_parent_token)


def _check_call(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                initial_state_indices, scale, cu_seqlens, disable_state_update, intermediate_states_buffer,
                intermediate_state_indices, retrieve_parent_token, o) -> None:
    """Every check of a call, in the eager order (this module's, then flashgdn's on the views),
    reading no address and no value: the op's fake implementation."""
    check_output(o, v)
    verify = _verify(intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token)
    _, _, geometry = _check(q, k, v, a, b, A_log, dt_bias, initial_state_source, scale, cu_seqlens,
                            disable_state_update, *verify[:2])
    api._check_pretranspose(*_pretranspose_args(
        q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, initial_state_source, initial_state_indices,
        scale, disable_state_update, *verify, o, geometry))


def check_output(o, v) -> None:
    """The op's `o`: the output as the function allocates it (v's shape and dtype, packed), whose
    row views _check_layout's geometry describes."""
    val.check_tensor("o", o, (v.dtype,), tuple(v.shape))
    if not o.is_contiguous():
        raise ValueError(f"o must be contiguous (the output the function allocates), got strides {list(o.stride())}")


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
    """SGLang's GDN decode and target verify with the gates computed in the kernel.

    q, k [1, N * T, H, K], v [1, N * T, HV, V] with cu_seqlens = arange(0, N * T + 1, T) (varlen,
    T tokens per sequence: 1 in decode, the draft tokens in target verify), or q, k [N, T, H, K],
    v [N, T, HV, V] with cu_seqlens None; T <= 16. a, b [N * T, HV] (or q's first two dims and
    HV). q, k, v may be views of the packed projection (last dim contiguous, other strides
    multiples of 16 bytes). initial_state_source [P, HV, V, K] fp32 or bf16 (K-last): sequence i
    reads slot initial_state_indices[i] and, unless disable_state_update, writes the state after
    its last token back there; a negative index is padding: zero output rows, nothing read or
    written. softplus_beta / softplus_threshold shape the gate g = -exp(A_log) * softplus(a + dt_bias).

    Target verify (T >= 2): intermediate_states_buffer [R, >= T, HV, V, K] (the pool's dtype)
    receives the state after token t of sequence i at [intermediate_state_indices[i], t]; a
    negative row is not written, one >= R makes a running sequence's output NaN (nothing written).
    retrieve_parent_token [N, T] (an EAGLE tree): token t >= 1 of a sequence whose row is written
    starts from the state stored there after its parent token retrieve_parent_token[i, t] (read
    back in the buffer's dtype, as SGLang's kernel does); a parent that is not an earlier token
    makes the sequence's output NaN (nothing written). The row table and the tree are ignored
    without a buffer, as SGLang's kernel does.

    cu_seqlens' values are not read (no host sync): every sequence must have T tokens, which its
    shape [N + 1] alone cannot tell (FLASHGDN_CHECK_INDICES=1 checks the values, with a host sync).
    cache_steps (SGLang derives the buffer's stride from its shape too) and num_warps (a Triton
    launch setting) are accepted and not used. What raises NotImplementedError, naming it: is_kda,
    lower_bound, ReplaySSM rings, initial_state_source=None, sequences of unequal or more than 16
    tokens, a verify of one token per sequence.

    Returns the output in q's layout: [1, N * T, HV, V] or [N, T, HV, V], q's dtype.

    While torch.compile or torch.export traces, the call is the custom op
    flashgdn::fused_sigmoid_gating_delta_rule_update (flashgdn.ops), with the output allocated here.
    """
    if host.EXT is not None and not api.CHECK_INDICES and not api._is_compiling() and (hosted := host.EXT.call(
            host.SGLANG, A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
            initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, is_kda, lower_bound,
            disable_state_update, intermediate_states_buffer, intermediate_state_indices, cache_steps,
            retrieve_parent_token, cache_ring, replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta,
            num_warps)) is not None:  # the C++ path (flashgdn.host)
        return hosted
    _refuse(initial_state_source, is_kda, lower_bound, cache_ring, replayssm_rawv, replayssm_rawk, replayssm_g,
            replayssm_beta)
    if api._is_compiling():  # traced: one custom op, which may not return a tensor: it writes `o`
        o = fastpath.new_output(v, False)  # v is [q0, q1, HV, V] of q's dtype (the op's fake implementation checks)
        torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update(
            A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
            initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, disable_state_update,
            intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token, o)
        return o
    return update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                  initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, disable_state_update,
                  intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token, None,
                  (A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                   initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, is_kda, lower_bound,
                   disable_state_update, intermediate_states_buffer, intermediate_state_indices, cache_steps,
                   retrieve_parent_token, cache_ring, replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta,
                   num_warps) if host.ENABLED else None)


def _launch_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices,
                 intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token, out,
                 geometry) -> tuple:
    """The compiled function's arguments in KernelArgs' order: SGLang's own varlen layout (q, k, v
    [1, N * T, ...] of N sequences of T tokens with 2-D gates: _flat; geometry None) as it is, a plain
    tuple (KernelSpec.row_form "flat": the kernel views it); any other as the row views
    [N, T, ...] that `geometry` (_check_layout's) describes."""
    if geometry is not None:
        q, k, v, a, b, out = _row_views((q, k, v, a, b, out), geometry)
        initial_state_indices = _indices(initial_state_indices)
    return (q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, None, None,
            intermediate_states_buffer, out, *BEFORE_ROWS, intermediate_state_indices, retrieve_parent_token)


def kernel_args(*args) -> KernelArgs:
    """_launch_args as a KernelArgs (the full way's kernel lookup reads its fields by name)."""
    return KernelArgs(*_launch_args(*args))


def _flat(tokens: int, lengths, a, b, inter, disable_state_update) -> int:
    """Whether a call is in SGLang's own varlen layout, which goes to the kernel as it is (_launch_args):
    varlen (`tokens`, q.shape[1], beside cu_seqlens' shape `lengths` [N + 1]; None without
    cu_seqlens) with 2-D gates, and either 1: its decode, one token per sequence (tokens = N), no
    buffer, the state written; or 2: N sequences of T >= 2 tokens (tokens a multiple of N: its
    target verify). 0: neither (row views). On a call that passed the checks, and in the fast key
    (_update_key), which it splits."""
    if lengths is None or a.dim() != 2 or b.dim() != 2:
        return 0
    N = lengths[0] - 1
    if tokens == N:
        return 1 if inter is None and disable_state_update is False else 0
    return 2 if N > 0 and tokens % N == 0 else 0


def _update_key(q, k, v, a, b, cu_seqlens, initial_state_source, initial_state_indices, scale, softplus_beta,
                softplus_threshold, use_qk_l2norm_in_kernel, disable_state_update, inter, rows, parents) -> tuple:
    """The fast key of an update (flashgdn.fastpath): what the API call's key holds (the pool's
    layout, the batch and the device, the options) and what decides the form (_flat). SGLang's own
    varlen layout (_flat) goes as it is: the compiled function checks q, k, v, a, b and the output against
    each other, and the key adds cu_seqlens' shape and dtype (the compiled function does not get it)
    and the slot indices' stride (flashgdn's checks take more than one slot with stride 1 only); with
    T >= 2 tokens per sequence the slot indices' length too (the tokens' dim is not the batch's) and
    what a verify adds (below). Any other layout goes as row views, whose geometry the entry keeps:
    the key holds the shapes and strides of q, k, v, a, b and what a verify adds: the flag, the
    buffer the kernel writes and the lengths of the row table and the tree (the compiled function
    takes any: they must cover the batch)."""
    shape, lengths = q.shape, None if cu_seqlens is None else cu_seqlens.shape
    common = (shape, lengths, lengths is None or cu_seqlens.dtype, initial_state_source.shape,
              initial_state_source.stride(), initial_state_indices.stride(), q.get_device(), type(scale), scale,
              type(softplus_beta), softplus_beta, type(softplus_threshold), softplus_threshold, use_qk_l2norm_in_kernel)
    form = _flat(shape[1], lengths, a, b, inter, disable_state_update)
    if form == 1:
        return _flat, common
    verify = (type(disable_state_update), disable_state_update, inter is None or (inter.shape, inter.stride()),
              rows is None or rows.shape, parents is None or parents.shape)
    if form == 2:
        return (_flat, common, initial_state_indices.shape, *verify)
    return (update, common, q.stride(), k.shape, k.stride(), v.shape, v.stride(), a.shape, a.stride(), b.shape,
            b.stride(), *verify)


def update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
           initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, disable_state_update,
           intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token, o, call=None):
    """The eager body of fused_sigmoid_gating_delta_rule_update (and its op's implementation, which
    passes the output `o` its caller allocated; None: allocated here); returns the output. The row
    table and the tree go only with a buffer (_verify). `call`: the public function's arguments, in its
    order, under whose signature the C++ path (flashgdn.host) learns a call in SGLang's own layout."""
    verify = _verify(intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token)
    inter, rows, parents = verify

    key, fast = fastpath.find(api.CHECK_INDICES, _update_key, q, k, v, a, b, cu_seqlens, initial_state_source,
                              initial_state_indices, scale, softplus_beta, softplus_threshold, use_qk_l2norm_in_kernel,
                              disable_state_update, inter, rows, parents)
    if fast is not None:
        try:
            out = fastpath.output(o, v)
            fast.fn(*_launch_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, *verify,
                                  out, fast.extra))
            _host_remember(key, fast.extra, inter, call)
            return out
        except fastpath.REFUSED:
            pass
    val.check_flags(use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    varlen, T, geometry = val.checked(_check, q, k, v, a, b, A_log, dt_bias, initial_state_source, scale, cu_seqlens,
                                      disable_state_update, inter, rows)
    if varlen and api.CHECK_INDICES:
        expected = torch.arange(cu_seqlens.shape[0], device=cu_seqlens.device, dtype=cu_seqlens.dtype) * T
        if not torch.equal(cu_seqlens, expected):
            raise ValueError(f"cu_seqlens must be arange(0, N * T + 1, T) with T = {T} (every sequence of T "
                             f"tokens), got {cu_seqlens.tolist()}")
    if o is None:
        o = fastpath.output(None, v)  # [q0, q1, HV, V] of q's dtype (v's, as checked)
    flat = _flat(q.shape[1], None if cu_seqlens is None else cu_seqlens.shape, a, b, inter, disable_state_update)
    plan = api._validated(api._check_pretranspose, *_pretranspose_args(
        q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, initial_state_source, initial_state_indices,
        scale, disable_state_update, *verify, o, geometry), options=(use_qk_l2norm_in_kernel, "sglang", flat))
    extra = None if flat else geometry
    args = kernel_args(q, k, v, a, b, A_log, dt_bias, initial_state_source, initial_state_indices, *verify, o, extra)
    api._launch(plan, "klast", args, api.CallOptions(scale, use_qk_l2norm_in_kernel, not disable_state_update,
                                                     softplus_beta, softplus_threshold))
    api._remember_fast(key, plan, extra=extra)
    _host_remember(key, extra, inter, call)
    return o


def _host_remember(key, geometry, inter, call) -> None:
    """The C++ path learns a call of the public function's arguments `call` (None: none) in SGLang's own
    layout (no row views: `geometry` None); it allocates the output like v and returns it alone."""
    if call is not None and geometry is None:
        fastpath.host_remember(key, host.SGLANG, host.SGLANG_LAUNCH[inter is None], host.NONE, 7, *call,
                               ret=(host.OUTPUT,))


def _indices(indices):
    """SGLang's slot indices as the kernel takes them: one index is viewed with stride 1 (never
    stepped); anything else goes as it is (flashgdn's checks name it)."""
    if isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.shape[0] <= 1:
        return val.stride1_indices(indices)
    return indices
