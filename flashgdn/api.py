"""Public torch API: FlashInfer 0.7.2's `flashinfer.gdn_decode` functions (names, argument order,
defaults, in-place behaviour; README "Differences from FlashInfer" lists what differs on purpose).

This layer validates, picks the kernel variant (layout, batch regime, flags), fetches it from the
compile cache and calls it; it never imports CuTe. Tensors go to the compiled TVM-FFI function
as they are (strided views included), on the current torch stream.

Each public function runs its eager body (`_decode_pretranspose`, `_decode`, `_mtp`; the ReplaySSM
commit's is in flashgdn.replay) directly (a repeated call signature goes straight to the compiled function:
flashgdn.fastpath); only while torch.compile or torch.export traces does it call the
flashgdn custom op instead (flashgdn.ops registers them: their real implementations are these eager
bodies), so that the graph holds one op per call with its mutated arguments declared, and eager
calls pay no op dispatch.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from . import fastpath, host
from . import validation as val
from .cache import kernel_cache
from .device import DeviceFacts, facts_of
from .kernels import policy
from .logging_utils import logged
from .spec import AFTER_OUTPUT, AFTER_REPLAY, MAX_TOKENS, KernelArgs, KernelSpec

CHECK_INDICES = os.environ.get("FLASHGDN_CHECK_INDICES", "0") not in ("", "0")
# Bound once, as every public call checks it; Dynamo recognises the function object, so this name
# folds to True while it traces just as torch.compiler.is_compiling does.
_is_compiling = torch.compiler.is_compiling


class CallOptions(NamedTuple):
    """The non-tensor arguments of a call that select the compiled variant."""

    scale: Optional[float]
    use_l2norm: bool
    update_state: bool = True
    softplus_beta: float = 1.0
    softplus_threshold: float = 20.0
    # False: a padding row's output is left as it is (FlashInfer's T > 1 rule for an output the caller
    # passes). An output allocated here is all written by the kernel, zeros in padding rows: no fill launch.
    zero_padding_output: bool = True


def kernel_spec(layout: str, p: val.Problem, args: KernelArgs, options: CallOptions, facts: DeviceFacts,
                regime: Optional[str] = None) -> KernelSpec:
    """The compiled variant a call uses: from its problem sizes, the dtypes, presence and (the
    state's) strides of its tensors (`args`: meta tensors do), its options and the device."""
    name = val.dtype_name
    # vLLM's slot rule: the read slots come from the token slots (flashgdn.recurrent)
    vllm_slots = args.state_indices is None and args.token_state_indices is not None
    index = args.token_state_indices if vllm_slots else args.state_indices
    form = row_form(args)
    # vLLM's tensors as it passes them, on batch rows: 2-D gates, one-token slots [B]
    vllm_rows = form == "batch" and vllm_slots
    return KernelSpec(
        layout=layout, H=p.H, HV=p.HV, K=p.K, V=p.V, T=p.T, io_dtype=name(args.q.dtype),
        state_dtype=name(args.state.dtype), gate_dtype=name(args.a.dtype),
        dt_bias_dtype="float32" if args.dt_bias is None else name(args.dt_bias.dtype),
        scale=float(p.K ** -0.5 if options.scale is None else options.scale), use_l2norm=bool(options.use_l2norm),
        arch=facts.arch, regime=regime or policy.regime(p.B, p.HV, facts.sm_count, facts.device_class),
        softplus_beta=float(options.softplus_beta), softplus_threshold=float(options.softplus_threshold),
        index_dtype=None if index is None else name(index.dtype),
        has_out_indices=args.output_state_indices is not None,
        has_intermediate=args.intermediate_states is not None, update_state=bool(options.update_state),
        has_accepted=args.accepted_tokens is not None, device_class=facts.device_class,
        out_dtype=None if args.output is None or args.output.dtype == args.q.dtype else name(args.output.dtype),
        has_token_slots=args.token_state_indices is not None, strided_state=not val.packed(args.state, 3),
        zero_padding_output=options.zero_padding_output, precomputed_gates=args.A_log is None,
        beta_dtype=None if args.b.dtype == args.a.dtype else name(args.b.dtype), vllm_slots=vllm_slots,
        accepted_dtype="int32" if args.accepted_tokens is None else name(args.accepted_tokens.dtype),
        varlen=None if args.cu_seqlens is None else name(args.cu_seqlens.dtype),
        replay_cache=args.replay_v is not None, row_form=form,
        gate_rows=vllm_rows and args.a.dim() == 2, slot_column=vllm_rows and args.token_state_indices.dim() == 1,
        intermediate_rows=None if args.intermediate_indices is None else name(args.intermediate_indices.dtype),
        tree_parents=None if args.parent_tokens is None else name(args.parent_tokens.dtype),
        gate_parts=args.a.shape[0] if args.a.dim() == 4 else 0,  # the fused step's split projection
    )


def row_form(args: KernelArgs) -> str:
    """KernelSpec.row_form of a call's tensors: "packed" (no k: q holds the packed rows), "flat" (2-D
    gates beside [1, B, ...] q/k/v, SGLang's state indices), else "batch" (vLLM's 2-D gates with its
    token slots included: KernelSpec.gate_rows)."""
    if args.k is None:
        return "packed"
    return "flat" if args.a.dim() == 2 and args.state_indices is not None else "batch"


def _launch(plan, layout: str, args: KernelArgs, options: CallOptions) -> torch.Tensor:
    """Run the variant of a validated call (its _Plan) on `args`; returns the output."""
    p = plan.problem
    fn = plan.fn
    if fn is None:  # first call of this signature: look the compiled variant up once
        fn = plan.fn = kernel_cache.get(kernel_spec(layout, p, args, options, facts_of(plan.device)))
    if CHECK_INDICES:
        val.check_launch_indices(p, args, options.update_state)
    if args.output is None:  # CallOptions.zero_padding_output
        args = args._replace(output=fastpath.output(None, args.v) if options.zero_padding_output
                             else fastpath.new_output(args.v, True))
    if p.B:
        fn(*args)
    return args.output


def _remember_fast(key, plan, extra=None) -> None:
    """After a full call: its fast key (flashgdn.fastpath) now takes the plan's compiled function
    (and `extra`: fastpath.Fast), unless nothing ran (no rows, or a stubbed launch)."""
    if plan.fn is not None and plan.problem.B:
        fastpath.remember(key, fastpath.Fast(plan.fn, extra))


def _check_common(p, output, scale, softplus_beta, softplus_threshold, q, **tensors) -> torch.device:
    val.check_output(output, p)
    val.check_scale(scale)
    val.check_softplus(softplus_beta, softplus_threshold)
    return val.check_devices(dict(q=q, output=output, **tensors))


class _Plan:
    """A call signature that passed validation: its Problem, device and (after the first launch)
    compiled function."""

    __slots__ = ("problem", "device", "fn")

    def __init__(self, problem, device):
        self.problem, self.device, self.fn = problem, device, None


_VALIDATED: dict = {}  # call signature -> _Plan


def _plan(result) -> _Plan:
    return _Plan(*result)


def _validated(check, *args, options=()) -> _Plan:
    """The _Plan of check(*args) -> (Problem, device), remembered per signature
    (validation.remembered): the full way of a call, which a repeated call skips (flashgdn.fastpath);
    a signature the compiled function refuses, or one whose fast key is new, still costs only the
    signature key (about 5 us) here, not the 20-30 us of the checks. The plan also keeps the compiled
    function. `options` (the other arguments that select the kernel) are part of the signature
    but not checked. Index values are not validated on the host (the kernel handles them), so no
    check depends on data."""
    return val.remembered(_VALIDATED, check, args, options, _plan)


def _check_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale, output, initial_state,
                        initial_state_indices, output_state_indices, intermediate_states_buffer,
                        disable_state_update, softplus_beta, softplus_threshold, intermediate_rows=None,
                        parent_tokens=None):
    """`intermediate_rows` and `parent_tokens` (flashgdn.sglang: SGLang's intermediate_state_indices
    and retrieve_parent_token) the buffer row of each batch row and its EAGLE tree (_check_intermediate)."""
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=MAX_TOKENS)
    if p.T == 1:
        if intermediate_states_buffer is not None:
            raise ValueError("intermediate_states_buffer is supported only for T > 1 (q.shape[1] is 1)")
        if disable_state_update:
            raise ValueError("disable_state_update=True is supported only for T > 1 (q.shape[1] is 1)")
    written = not disable_state_update
    if initial_state is not None:  # a pool: `state` is not used (as in FlashInfer)
        if initial_state_indices is None:
            raise ValueError("initial_state (a state pool) needs initial_state_indices [B]")
        pool = initial_state
        val.check_state("initial_state", pool, (None,), p, layout="klast", written=written)
        val.check_indices("initial_state_indices", initial_state_indices, p)
        val.check_output_indices(output_state_indices, initial_state_indices, p)
    else:
        if initial_state_indices is not None or output_state_indices is not None:
            raise ValueError("initial_state_indices / output_state_indices need the pool initial_state")
        if state is None:
            raise ValueError("state [B, HV, V, K] is required when no initial_state pool is given")
        pool = state
        val.check_state("state", pool, (p.B,), p, layout="klast", written=written)
    _check_intermediate(intermediate_states_buffer, pool, p, intermediate_rows, parent_tokens)
    return p, _check_common(
        p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b, A_log=A_log,
        dt_bias=dt_bias, state=pool, initial_state_indices=initial_state_indices,
        output_state_indices=output_state_indices, intermediate_states_buffer=intermediate_states_buffer,
        intermediate_state_indices=intermediate_rows, retrieve_parent_token=parent_tokens,
    )


def _check_intermediate(buffer, pool, p: val.Problem, rows=None, parents=None) -> None:
    """intermediate_states_buffer [>= B, >= T, HV, V, K] of the state's dtype: batch row i writes
    buffer[i, t] (engines pass their whole buffer); with `rows` (SGLang's intermediate_state_indices
    [>= B], any stride) buffer[rows[i], t], and the buffer may have any number of rows; `parents`
    (SGLang's retrieve_parent_token [>= B, T], any strides) an EAGLE tree over those rows."""
    if buffer is None:
        return
    if parents is not None:  # flashgdn.sglang passes a tree with its row table only
        val.check_tensor("retrieve_parent_token", parents, val.INDEX_DTYPES, (None, p.T))
        if parents.shape[0] < p.B:
            raise ValueError(f"retrieve_parent_token must have at least B={p.B} rows (one per sequence), "
                             f"got {list(parents.shape)}")
    val.check_state("intermediate_states_buffer", buffer, (None, None), p, layout="klast", dtype=pool.dtype, inner=3)
    if rows is not None:
        val.check_tensor("intermediate_state_indices", rows, val.INDEX_DTYPES, (None,))
        if rows.shape[0] < p.B:
            raise ValueError(f"intermediate_state_indices must have at least B={p.B} entries (one per "
                             f"sequence), got {list(rows.shape)}")
    # check_state has refused a buffer without rows; without a row table batch row i needs row i
    if (rows is None and buffer.shape[0] < p.B) or buffer.shape[1] < p.T:
        least = "1" if rows is not None else f"B={p.B}"
        raise ValueError(
            f"intermediate_states_buffer must have shape [>= {least}, >= T={p.T}, ...], got {list(buffer.shape)}"
        )


def _check_decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, softplus_beta, softplus_threshold):
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=1)
    val.check_state("state", state, (p.B,), p, layout="kmajor")
    return p, _check_common(p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b,
                            A_log=A_log, dt_bias=dt_bias, state=state)


def _check_mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
               intermediate_states_buffer, ssm_state_indices, disable_state_update, output_state_indices,
               accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm=False, replayssm_rawv=None,
               replayssm_rawk=None, replayssm_g=None, replayssm_beta=None):
    windows = dict(replayssm_rawv=replayssm_rawv, replayssm_rawk=replayssm_rawk, replayssm_g=replayssm_g,
                   replayssm_beta=replayssm_beta)
    if not cache_replayssm and any(t is not None for t in windows.values()):
        raise ValueError("replayssm_rawv/rawk/g/beta buffers require cache_replayssm=True")
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=MAX_TOKENS)
    # With disable_state_update the pool is only read (it may overlap itself).
    val.check_state("initial_state", initial_state, (None,), p, layout="klast", written=not disable_state_update)
    val.check_indices("initial_state_indices", initial_state_indices, p)
    val.check_output_indices(output_state_indices, initial_state_indices, p)
    _check_intermediate(intermediate_states_buffer, initial_state, p)
    if ssm_state_indices is not None:
        val.check_token_slots(ssm_state_indices, p)
        for name, other in (("intermediate_states_buffer", intermediate_states_buffer),
                            ("output_state_indices", output_state_indices), ("accepted_tokens", accepted_tokens)):
            if other is not None:
                raise ValueError(f"ssm_state_indices (the state after every token to its own slot) cannot go "
                                 f"with {name}")
        if disable_state_update:
            raise ValueError("ssm_state_indices writes the states: it needs disable_state_update=False")
    if accepted_tokens is not None:
        val.check_tensor("accepted_tokens", accepted_tokens, (torch.int32,), (p.B,))
        val.check_inner_contiguous("accepted_tokens", accepted_tokens, 1, align_leading=False)
        if disable_state_update:
            raise ValueError("accepted_tokens selects the state to commit; it cannot go with disable_state_update=True")
    if cache_replayssm:
        val.check_replay_verify(p, initial_state.shape[0], windows, disable_state_update, intermediate_states_buffer,
                                ssm_state_indices)
    return p, _check_common(
        p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b, A_log=A_log,
        dt_bias=dt_bias, initial_state=initial_state,
        initial_state_indices=initial_state_indices, output_state_indices=output_state_indices,
        intermediate_states_buffer=intermediate_states_buffer, accepted_tokens=accepted_tokens,
        ssm_state_indices=ssm_state_indices, **(windows if cache_replayssm else {}),
    )


def _mtp_disable_state_update(disable_state_update: Optional[bool]) -> bool:
    """FlashInfer 0.7.2's rule: an omitted disable_state_update means True (the state is not
    written), with a warning once per process that 0.8.0 changes it to False."""
    global _WARNED_DISABLE_DEFAULT
    if disable_state_update is not None:
        return disable_state_update
    if not _WARNED_DISABLE_DEFAULT:
        _WARNED_DISABLE_DEFAULT = True
        warnings.warn(
            "gated_delta_rule_mtp(): the 'disable_state_update' parameter currently defaults to True (as in "
            "FlashInfer 0.7.2), but this default will change to False with FlashInfer 0.8.0. Please pass "
            "disable_state_update=True or disable_state_update=False explicitly to suppress this warning.",
            FutureWarning, stacklevel=3,
        )
    return True


_WARNED_DISABLE_DEFAULT = False


@logged
def gated_delta_rule_decode_pretranspose(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[torch.Tensor],
    A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor, b: torch.Tensor,
    scale: Optional[float] = None, output: Optional[torch.Tensor] = None, use_qk_l2norm: bool = True,
    initial_state: Optional[torch.Tensor] = None, initial_state_indices: Optional[torch.Tensor] = None,
    output_state_indices: Optional[torch.Tensor] = None,
    intermediate_states_buffer: Optional[torch.Tensor] = None, disable_state_update: bool = False,
    backend: str = "auto", *, softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode, state K-last: `state` [B, HV, V, K], or a pool `initial_state` [P, HV, V, K] (then
    `state` is not used) read at `initial_state_indices` [B] and written at `output_state_indices`
    [B] (default: the same slots). A negative read index marks padding: no state is touched, and
    its output row is zero for T = 1 and left as it is for T > 1 (zero when `output` is None). A
    negative write index runs the row and stores its state nowhere (FlashInfer's MTP rule).

    q, k [B, T, H, K]; v [B, T, HV, V]; a, b [B, T, HV]; A_log [HV] fp32; dt_bias [HV]. T > 1 runs the
    MTP kernels: `intermediate_states_buffer` [>= B, >= T, HV, V, K] receives the state after every
    token, `disable_state_update` leaves the state untouched. `output` may be bf16, fp16 or fp32.
    Returns (output [B, T, HV, V], the updated state or pool).
    """
    if _is_compiling():  # traced: one custom op (module docstring)
        pool = state if initial_state is None else initial_state
        if output is None:  # v is [B, T, HV, V] in a valid call (the op's fake implementation checks)
            output = fastpath.new_output(v, zero=q.shape[1] != 1)
        # With a pool, `state` is not used: the op does not get it, so no two of its mutated
        # arguments alias when a caller passes the pool as both.
        torch.ops.flashgdn.gated_delta_rule_decode_pretranspose(
            q, k, v, None if initial_state is not None else state, A_log, a, dt_bias, b, scale, output,
            use_qk_l2norm, initial_state, initial_state_indices, output_state_indices, intermediate_states_buffer,
            disable_state_update, backend, softplus_beta, softplus_threshold,
        )
        return output, pool
    if host.EXT is not None and not CHECK_INDICES and (hosted := host.EXT.call(  # the C++ path (flashgdn.host)
            host.PRETRANSPOSE, q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state,
            initial_state_indices, output_state_indices, intermediate_states_buffer, disable_state_update, backend,
            softplus_beta, softplus_threshold)) is not None:
        return hosted
    return _decode_pretranspose(
        q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state, initial_state_indices,
        output_state_indices, intermediate_states_buffer, disable_state_update, backend, softplus_beta,
        softplus_threshold,
    )


def _pretranspose_key(q, pool, initial_state, output, initial_state_indices, output_state_indices, inter,
                      disable_state_update, use_qk_l2norm, backend, scale, softplus_beta, softplus_threshold) -> tuple:
    """The fast key of a pretranspose call (flashgdn.fastpath): what its compiled function does not
    check itself."""
    return (_decode_pretranspose, q.shape[0], q.get_device(), pool.shape, pool.stride(), initial_state is None,
            output is None or output.stride(), initial_state_indices is None, output_state_indices is None,
            inter is None or (inter.shape, inter.stride()), disable_state_update, use_qk_l2norm, backend, type(scale),
            scale, type(softplus_beta), softplus_beta, type(softplus_threshold), softplus_threshold)


def _decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state,
                         initial_state_indices, output_state_indices, intermediate_states_buffer,
                         disable_state_update, backend, softplus_beta, softplus_threshold):
    pool = state if initial_state is None else initial_state
    key, fast = fastpath.find(CHECK_INDICES, _pretranspose_key, q, pool, initial_state, output, initial_state_indices,
                              output_state_indices, intermediate_states_buffer, disable_state_update, use_qk_l2norm,
                              backend, scale, softplus_beta, softplus_threshold)
    out = None
    if fast is not None:
        try:
            out = fastpath.output(output, v)
            fast.fn(q, k, v, a, b, A_log, dt_bias, pool, initial_state_indices, output_state_indices, None,
                    intermediate_states_buffer, out, *AFTER_OUTPUT)
        except fastpath.REFUSED:
            out = None
    if out is None:
        out = _full_pretranspose(key, q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state,
                                 initial_state_indices, output_state_indices, intermediate_states_buffer,
                                 disable_state_update, backend, softplus_beta, softplus_threshold)
    if host.ENABLED:
        fastpath.host_remember(key, host.PRETRANSPOSE, host.PRETRANSPOSE_LAUNCH[initial_state is None], 9, 2, q, k, v,
                               state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state,
                               initial_state_indices, output_state_indices, intermediate_states_buffer,
                               disable_state_update, backend, softplus_beta, softplus_threshold)
    return out, pool


def _full_pretranspose(key, q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state,
                       initial_state_indices, output_state_indices, intermediate_states_buffer, disable_state_update,
                       backend, softplus_beta, softplus_threshold) -> torch.Tensor:
    """The full way of a pretranspose call: its checks (memoised), the kernel lookup and the launch;
    its compiled function is kept for `key`. Returns the output."""
    pool = state if initial_state is None else initial_state
    val.check_backend(backend)
    val.check_flags(use_qk_l2norm=use_qk_l2norm, disable_state_update=disable_state_update)
    plan = _validated(
        _check_pretranspose, q, k, v, state, A_log, a, dt_bias, b, scale, output, initial_state,
        initial_state_indices, output_state_indices, intermediate_states_buffer, disable_state_update,
        softplus_beta, softplus_threshold, options=(use_qk_l2norm,),
    )
    args = KernelArgs(q, k, v, a, b, A_log, dt_bias, pool, state_indices=initial_state_indices,
                      output_state_indices=output_state_indices, intermediate_states=intermediate_states_buffer,
                      output=output)
    # T > 1 leaves a padding row's output as the caller wrote it (CallOptions.zero_padding_output)
    options = CallOptions(scale, use_qk_l2norm, not disable_state_update, softplus_beta, softplus_threshold,
                          zero_padding_output=plan.problem.T == 1 or output is None)
    out = _launch(plan, "klast", args, options)
    _remember_fast(key, plan)
    return out


@logged
def gated_delta_rule_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
    A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor, b: torch.Tensor,
    scale: Optional[float] = None, output: Optional[torch.Tensor] = None, use_qk_l2norm: bool = True,
    backend: str = "auto", *, softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step, state K-major: `state` [B, HV, K, V] (V contiguous), updated in place.

    q, k [B, 1, H, K]; v [B, 1, HV, V]; a, b [B, 1, HV]. Returns (output [B, 1, HV, V], state).
    """
    if _is_compiling():  # traced: one custom op (module docstring)
        if output is None:
            output = fastpath.new_output(v, zero=False)
        torch.ops.flashgdn.gated_delta_rule_decode(
            q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
            softplus_threshold,
        )
        return output, state
    if host.EXT is not None and not CHECK_INDICES and (hosted := host.EXT.call(  # the C++ path (flashgdn.host)
            host.DECODE, q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
            softplus_threshold)) is not None:
        return hosted
    return _decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
                   softplus_threshold)


def _decode_key(q, state, output, use_qk_l2norm, backend, scale, softplus_beta, softplus_threshold) -> tuple:
    """The fast key of a K-major decode (flashgdn.fastpath); the state's shape is the batch's and
    the compiled function's."""
    return (_decode, q.shape[0], q.get_device(), state.stride(), output is None or output.stride(), use_qk_l2norm,
            backend, type(scale), scale, type(softplus_beta), softplus_beta, type(softplus_threshold),
            softplus_threshold)


def _decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
            softplus_threshold):
    key, fast = fastpath.find(CHECK_INDICES, _decode_key, q, state, output, use_qk_l2norm, backend, scale,
                              softplus_beta, softplus_threshold)
    out = None
    if fast is not None:
        try:
            out = fastpath.output(output, v)
            fast.fn(q, k, v, a, b, A_log, dt_bias, state, None, None, None, None, out, *AFTER_OUTPUT)
        except fastpath.REFUSED:
            out = None
    if out is None:
        val.check_backend(backend)
        val.check_flags(use_qk_l2norm=use_qk_l2norm)
        plan = _validated(_check_decode, q, k, v, state, A_log, a, dt_bias, b, scale, output, softplus_beta,
                          softplus_threshold, options=(use_qk_l2norm,))
        args = KernelArgs(q, k, v, a, b, A_log, dt_bias, state, output=output)
        out = _launch(plan, "kmajor", args, CallOptions(scale, use_qk_l2norm, True, softplus_beta, softplus_threshold))
        _remember_fast(key, plan)
    if host.ENABLED:
        fastpath.host_remember(key, host.DECODE, host.DECODE_LAUNCH, 9, 2, q, k, v, state, A_log, a, dt_bias, b, scale,
                               output, use_qk_l2norm, backend, softplus_beta, softplus_threshold)
    return out, state


@logged
def gated_delta_rule_mtp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor,
    initial_state_indices: torch.Tensor, A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor,
    b: torch.Tensor, scale: Optional[float] = None, output: Optional[torch.Tensor] = None,
    intermediate_states_buffer: Optional[torch.Tensor] = None, ssm_state_indices: Optional[torch.Tensor] = None,
    disable_state_update: Optional[bool] = None, use_qk_l2norm: bool = True,
    output_state_indices: Optional[torch.Tensor] = None, cache_replayssm: bool = False,
    replayssm_rawv: Optional[torch.Tensor] = None, replayssm_rawk: Optional[torch.Tensor] = None,
    replayssm_g: Optional[torch.Tensor] = None, replayssm_beta: Optional[torch.Tensor] = None, *,
    accepted_tokens: Optional[torch.Tensor] = None, softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """T tokens per sequence (speculative-decode verify) in one launch; pool [P, HV, V, K].

    q, k [B, T, H, K]; v [B, T, HV, V]; a, b [B, T, HV]. `intermediate_states_buffer`
    [>= B, >= T, HV, V, K] (state dtype) receives the state after every token; `ssm_state_indices`
    [B, T] int32 instead writes it to pool slot ssm_state_indices[i, t] (negative: not written; no
    final write-back). `disable_state_update` None means True, as in FlashInfer 0.7.2 (with a
    FutureWarning once). `accepted_tokens` [B] int32 (beyond FlashInfer) commits the state after
    that many tokens (0..T) instead of after T. A padding row (negative read index) leaves its
    output row as it is (zero when `output` is None); a negative write index (output_state_indices)
    runs the row and stores its final state nowhere. Returns (output [B, T, HV, V], pool).

    `cache_replayssm` (ReplaySSM verify; needs disable_state_update=True, T >= 2, no intermediate
    buffer or ssm_state_indices): besides the outputs, each running row writes this step's raw
    inputs to the windows of its slot initial_state_indices[i]: `replayssm_rawv` [P, HV, T, V] and
    `replayssm_rawk` [P, H, T, K] (bf16; k before its norm), `replayssm_g` (the log decay
    -exp(A_log) * softplus(a + dt_bias)) and `replayssm_beta` [P, HV, T] (fp32).
    gated_delta_rule_replayssm_commit then replays the accepted tokens into the checkpoint. Live
    slots must be unique; padding rows leave their windows untouched.
    """
    if _is_compiling():  # traced: one custom op (module docstring)
        # disable_state_update=None resolves in the op: tracers cannot trace the warning it may raise.
        if output is None:
            output = fastpath.new_output(v, zero=True)
        torch.ops.flashgdn.gated_delta_rule_mtp(
            q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
            intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm,
            output_state_indices, accepted_tokens, softplus_beta, softplus_threshold, bool(cache_replayssm),
            replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta,
        )
        return output, initial_state
    # disable_state_update None warns: the Python way
    if host.EXT is not None and not CHECK_INDICES and disable_state_update is not None and (hosted := host.EXT.call(
            host.MTP, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
            intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
            accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm, replayssm_rawv, replayssm_rawk,
            replayssm_g, replayssm_beta)) is not None:
        return hosted
    return _mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
                intermediate_states_buffer, ssm_state_indices, _mtp_disable_state_update(disable_state_update),
                use_qk_l2norm, output_state_indices, accepted_tokens, softplus_beta, softplus_threshold,
                cache_replayssm, replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta)


def _mtp_key(q, initial_state, output, inter, ssm_state_indices, output_state_indices, accepted_tokens, rv, rk, rg,
             rb, cache_replayssm, disable_state_update, use_qk_l2norm, scale, softplus_beta,
             softplus_threshold) -> tuple:
    """The fast key of an MTP call (flashgdn.fastpath): what its compiled function does not check."""
    return (_mtp, q.shape[0], q.get_device(), initial_state.shape, initial_state.stride(),
            output is None or output.stride(), inter is None or (inter.shape, inter.stride()),
            ssm_state_indices is None, output_state_indices is None, accepted_tokens is None,
            rv is None or (rv.shape, rv.stride()), rk is None or (rk.shape, rk.stride()),
            rg is None or (rg.shape, rg.stride()), rb is None or (rb.shape, rb.stride()), cache_replayssm,
            disable_state_update, use_qk_l2norm, type(scale), scale, type(softplus_beta), softplus_beta,
            type(softplus_threshold), softplus_threshold)


def _mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
         intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
         accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm=False, replayssm_rawv=None,
         replayssm_rawk=None, replayssm_g=None, replayssm_beta=None):
    rv, rk, rg, rb = replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta
    key, fast = fastpath.find(CHECK_INDICES, _mtp_key, q, initial_state, output, intermediate_states_buffer,
                              ssm_state_indices, output_state_indices, accepted_tokens, rv, rk, rg, rb, cache_replayssm,
                              disable_state_update, use_qk_l2norm, scale, softplus_beta, softplus_threshold)
    out = None
    if fast is not None:
        try:  # windows without cache_replayssm fail the full checks: no entry has them
            out = fastpath.output(output, v)
            fast.fn(q, k, v, a, b, A_log, dt_bias, initial_state, initial_state_indices, output_state_indices,
                    accepted_tokens, intermediate_states_buffer, out, ssm_state_indices, None, rv, rk, rg, rb,
                    *AFTER_REPLAY)
        except fastpath.REFUSED:
            out = None
    if out is None:
        out = _full_mtp(key, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
                        intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm,
                        output_state_indices, accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm,
                        rv, rk, rg, rb)
    if host.ENABLED:
        fastpath.host_remember(key, host.MTP, host.MTP_LAUNCH, 10, 2, q, k, v, initial_state, initial_state_indices,
                               A_log, a, dt_bias, b, scale, output, intermediate_states_buffer, ssm_state_indices,
                               disable_state_update, use_qk_l2norm, output_state_indices, accepted_tokens,
                               softplus_beta, softplus_threshold, cache_replayssm, rv, rk, rg, rb)
    return out, initial_state


def _full_mtp(key, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
              intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
              accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm, replayssm_rawv, replayssm_rawk,
              replayssm_g, replayssm_beta) -> torch.Tensor:
    """The full way of an MTP call: its checks (memoised), the kernel lookup and the launch; its
    compiled function is kept for `key`. Returns the output."""
    val.check_flags(use_qk_l2norm=use_qk_l2norm, disable_state_update=disable_state_update,
                    cache_replayssm=cache_replayssm)
    plan = _validated(
        _check_mtp, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
        intermediate_states_buffer, ssm_state_indices, disable_state_update, output_state_indices,
        accepted_tokens, softplus_beta, softplus_threshold, bool(cache_replayssm), replayssm_rawv, replayssm_rawk,
        replayssm_g, replayssm_beta, options=(use_qk_l2norm,),
    )
    replay = dict(replay_v=replayssm_rawv, replay_k=replayssm_rawk, replay_g=replayssm_g,
                  replay_beta=replayssm_beta) if cache_replayssm else {}
    args = KernelArgs(q, k, v, a, b, A_log, dt_bias, initial_state, state_indices=initial_state_indices,
                      output_state_indices=output_state_indices, accepted_tokens=accepted_tokens,
                      intermediate_states=intermediate_states_buffer, output=output,
                      token_state_indices=ssm_state_indices, **replay)
    options = CallOptions(scale, use_qk_l2norm, not disable_state_update, softplus_beta, softplus_threshold,
                          zero_padding_output=output is None)  # CallOptions.zero_padding_output
    out = _launch(plan, "klast", args, options)
    _remember_fast(key, plan)
    return out

