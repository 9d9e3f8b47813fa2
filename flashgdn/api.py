"""Public torch API, flashinfer-compatible (`flashinfer.gdn_decode` names, argument names and order).

This layer validates, picks the kernel variant (layout, batch regime, flags), fetches it from the
compile cache and calls it; it never imports CuTe. Tensors go to the compiled TVM-FFI function
as they are (strided views included), on the current torch stream.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch

from . import validation as val
from .cache import kernel_cache
from .device import DeviceFacts, facts_of
from .kernels import policy
from .logging_utils import logged
from .spec import MAX_TOKENS, KernelArgs, KernelSpec

CHECK_INDICES = os.environ.get("FLASHGDN_CHECK_INDICES", "0") not in ("", "0")


class CallOptions(NamedTuple):
    """The non-tensor arguments of a call that select the compiled variant."""

    scale: Optional[float]
    use_l2norm: bool
    update_state: bool = True
    softplus_beta: float = 1.0
    softplus_threshold: float = 20.0


def kernel_spec(layout: str, p: val.Problem, args: KernelArgs, options: CallOptions, facts: DeviceFacts,
                regime: Optional[str] = None) -> KernelSpec:
    """The compiled variant a call uses: from its problem sizes, the dtypes and presence of its
    tensors (`args`), its options and the device (tensors need only `.dtype`: fake ones do)."""
    name = val.dtype_name
    return KernelSpec(
        layout=layout, H=p.H, HV=p.HV, K=p.K, V=p.V, T=p.T, io_dtype=name(args.q.dtype),
        state_dtype=name(args.state.dtype), gate_dtype=name(args.a.dtype), dt_bias_dtype=name(args.dt_bias.dtype),
        scale=float(p.K ** -0.5 if options.scale is None else options.scale), use_l2norm=bool(options.use_l2norm),
        arch=facts.arch, regime=regime or policy.regime(p.B, p.HV, facts.sm_count, facts.device_class),
        softplus_beta=float(options.softplus_beta), softplus_threshold=float(options.softplus_threshold),
        index_dtype=None if args.state_indices is None else name(args.state_indices.dtype),
        has_out_indices=args.output_state_indices is not None,
        has_intermediate=args.intermediate_states is not None, update_state=bool(options.update_state),
        has_accepted=args.accepted_tokens is not None, device_class=facts.device_class,
    )


def _check_index_values(p: val.Problem, args: KernelArgs, update_state: bool) -> None:
    """FLASHGDN_CHECK_INDICES=1: index values in range and no slot written twice (a host sync)."""
    pool_size = args.state.shape[0]
    for name, t in (("initial_state_indices", args.state_indices),
                    ("output_state_indices", args.output_state_indices)):
        if t is not None:
            val.check_index_values(name, t, pool_size, allow_negative=True)
    if args.accepted_tokens is not None:
        val.check_index_values("accepted_tokens", args.accepted_tokens, p.T + 1, allow_negative=False)
    if update_state and args.state_indices is not None:  # a pool: rows must not write one slot
        if args.output_state_indices is None:
            val.check_distinct_slots("initial_state_indices", args.state_indices, args.state_indices)
        else:
            val.check_distinct_slots("output_state_indices", args.output_state_indices, args.state_indices)


def _launch(plan, layout: str, args: KernelArgs, options: CallOptions) -> torch.Tensor:
    """Run the variant of a validated call (its _Plan) on `args`; returns the output."""
    p = plan.problem
    fn = plan.fn
    if fn is None:  # first call of this signature: look the compiled variant up once
        fn = plan.fn = kernel_cache.get(kernel_spec(layout, p, args, options, facts_of(plan.device)))
    if CHECK_INDICES:
        _check_index_values(p, args, options.update_state)
    if args.output is None:
        args = args._replace(output=torch.empty(p.B, p.T, p.HV, p.V, dtype=args.q.dtype, device=plan.device))
    if p.B:
        fn(*args)
    return args.output


def _check_common(p, output, scale, softplus_beta, softplus_threshold, q, **tensors) -> torch.device:
    val.check_output(output, p, q.dtype)
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
# Bounded, for programs that cycle through many shapes; clearing all on overflow is cheap (a
# re-validation per signature) and rare (serving uses a handful of signatures).
_VALIDATED_MAX = 1024


def _validated(check, *args, options=()) -> _Plan:
    """The _Plan of check(*args) -> (Problem, device), remembered per signature: the full checks
    cost 20-30 us of Python per call, the signature about 5 us; the plan also keeps the compiled
    function, so a repeated call skips the kernel lookup too. `options` (the other arguments that
    select the kernel) are part of the signature but not checked. Index values are not validated
    on the host (the kernel handles them), so no check depends on data."""
    # What validation reads of an argument: a tensor's shape, strides (internal overlap too is a
    # function of these two), dtype, device and 16-byte alignment; any other value with its type
    # (True and 1 are different arguments). Inline, not a helper per argument: this runs on every call.
    key = (check, *[
        (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16) if isinstance(x, torch.Tensor) else (type(x), x)
        for x in (*args, *options)
    ])
    try:
        plan = _VALIDATED.get(key)
    except TypeError:  # an unhashable argument: validate every time (and report it, if invalid)
        return _Plan(*check(*args))
    if plan is None:
        plan = _Plan(*check(*args))
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = plan
    return plan


def _check_pretranspose(q, k, v, state, A_log, a, dt_bias, b, scale, output, initial_state,
                        initial_state_indices, output_state_indices, state_is_pool, softplus_beta,
                        softplus_threshold):
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=1)
    if initial_state is not None:
        if initial_state_indices is None:
            raise ValueError("initial_state (a state pool) needs initial_state_indices [B]")
        if state is not None and not state_is_pool:
            raise ValueError("pass the state either as state [B, HV, V, K] or as the pool initial_state, not both")
        pool = initial_state
        val.check_state("initial_state", pool, (None,), p, layout="klast")
        val.check_indices("initial_state_indices", initial_state_indices, p)
        val.check_output_indices(output_state_indices, initial_state_indices, p)
    else:
        if initial_state_indices is not None or output_state_indices is not None:
            raise ValueError("initial_state_indices / output_state_indices need the pool initial_state")
        if state is None:
            raise ValueError("state [B, HV, V, K] is required when no initial_state pool is given")
        pool = state
        val.check_state("state", pool, (p.B,), p, layout="klast")
    return p, _check_common(
        p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b, A_log=A_log,
        dt_bias=dt_bias, state=pool,
        initial_state_indices=initial_state_indices, output_state_indices=output_state_indices,
    )


def _check_decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, softplus_beta, softplus_threshold):
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=1)
    val.check_state("state", state, (p.B,), p, layout="kmajor")
    return p, _check_common(p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b,
                            A_log=A_log, dt_bias=dt_bias, state=state)


def _check_mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
               intermediate_states_buffer, disable_state_update, accepted_tokens, output_state_indices,
               softplus_beta, softplus_threshold):
    p = val.check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens=MAX_TOKENS)
    # With disable_state_update the pool is only read (it may overlap itself).
    val.check_state("initial_state", initial_state, (None,), p, layout="klast", written=not disable_state_update)
    val.check_indices("initial_state_indices", initial_state_indices, p)
    val.check_output_indices(output_state_indices, initial_state_indices, p)
    if intermediate_states_buffer is not None:
        val.check_state("intermediate_states_buffer", intermediate_states_buffer, (p.B, None), p,
                        layout="klast", dtype=initial_state.dtype)
        if intermediate_states_buffer.shape[1] < p.T:
            raise ValueError(
                f"intermediate_states_buffer.shape[1] must be >= T={p.T}, got {intermediate_states_buffer.shape[1]}"
            )
    if accepted_tokens is not None:
        val.check_tensor("accepted_tokens", accepted_tokens, (torch.int32,), (p.B,))
        val.check_inner_contiguous("accepted_tokens", accepted_tokens, 1, align_leading=False)
        if disable_state_update:
            raise ValueError("accepted_tokens selects the state to commit; it cannot go with disable_state_update=True")
    return p, _check_common(
        p, output, scale, softplus_beta, softplus_threshold, q, k=k, v=v, a=a, b=b, A_log=A_log,
        dt_bias=dt_bias, initial_state=initial_state,
        initial_state_indices=initial_state_indices, output_state_indices=output_state_indices,
        intermediate_states_buffer=intermediate_states_buffer, accepted_tokens=accepted_tokens,
    )


@logged
def gated_delta_rule_decode_pretranspose(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[torch.Tensor],
    A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor, b: torch.Tensor,
    scale: Optional[float] = None, output: Optional[torch.Tensor] = None, use_qk_l2norm: bool = True,
    initial_state: Optional[torch.Tensor] = None, initial_state_indices: Optional[torch.Tensor] = None,
    output_state_indices: Optional[torch.Tensor] = None, *,
    softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step, state K-last: `state` [B, HV, V, K], or a pool `initial_state` [P, HV, V, K]
    read at `initial_state_indices` [B] and written at `output_state_indices` [B] (default: the
    same slots). A negative index marks padding: its output row is zero and no state is touched.

    q, k [B, 1, H, K]; v [B, 1, HV, V]; a, b [B, 1, HV]; A_log [HV] fp32; dt_bias [HV].
    Returns (output [B, 1, HV, V] in q's dtype, the updated state or pool).
    """
    plan = _validated(
        _check_pretranspose, q, k, v, state, A_log, a, dt_bias, b, scale, output, initial_state,
        initial_state_indices, output_state_indices, state is initial_state, softplus_beta, softplus_threshold,
        options=(use_qk_l2norm,),
    )
    pool = state if initial_state is None else initial_state
    args = KernelArgs(q, k, v, a, b, A_log, dt_bias, pool, state_indices=initial_state_indices,
                      output_state_indices=output_state_indices, output=output)
    out = _launch(plan, "klast", args, CallOptions(scale, use_qk_l2norm, True, softplus_beta, softplus_threshold))
    return out, pool


@logged
def gated_delta_rule_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
    A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor, b: torch.Tensor,
    scale: Optional[float] = None, output: Optional[torch.Tensor] = None, use_qk_l2norm: bool = True, *,
    softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step, state K-major: `state` [B, HV, K, V] (V contiguous), updated in place.

    q, k [B, 1, H, K]; v [B, 1, HV, V]; a, b [B, 1, HV]. Returns (output [B, 1, HV, V], state).
    """
    plan = _validated(_check_decode, q, k, v, state, A_log, a, dt_bias, b, scale, output, softplus_beta,
                      softplus_threshold, options=(use_qk_l2norm,))
    args = KernelArgs(q, k, v, a, b, A_log, dt_bias, state, output=output)
    out = _launch(plan, "kmajor", args, CallOptions(scale, use_qk_l2norm, True, softplus_beta, softplus_threshold))
    return out, state


@logged
def gated_delta_rule_mtp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor,
    initial_state_indices: torch.Tensor, A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor,
    b: torch.Tensor, scale: Optional[float] = None, output: Optional[torch.Tensor] = None,
    intermediate_states_buffer: Optional[torch.Tensor] = None, disable_state_update: bool = False,
    use_qk_l2norm: bool = True, *, accepted_tokens: Optional[torch.Tensor] = None,
    output_state_indices: Optional[torch.Tensor] = None,
    softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """T tokens per sequence (speculative-decode verify) in one launch; pool [P, HV, V, K].

    q, k [B, T, H, K]; v [B, T, HV, V]; a, b [B, T, HV]. `intermediate_states_buffer`
    [B, >=T, HV, V, K] (state dtype) receives the state after every token. With
    `disable_state_update` the pool is left untouched. `accepted_tokens` [B] int32 (beyond
    flashinfer) commits the state after that many tokens (0..T) instead of after T.
    Returns (output [B, T, HV, V], pool).
    """
    plan = _validated(
        _check_mtp, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
        intermediate_states_buffer, disable_state_update, accepted_tokens, output_state_indices,
        softplus_beta, softplus_threshold, options=(use_qk_l2norm,),
    )
    args = KernelArgs(q, k, v, a, b, A_log, dt_bias, initial_state, state_indices=initial_state_indices,
                      output_state_indices=output_state_indices, accepted_tokens=accepted_tokens,
                      intermediate_states=intermediate_states_buffer, output=output)
    options = CallOptions(scale, use_qk_l2norm, not disable_state_update, softplus_beta, softplus_threshold)
    out = _launch(plan, "klast", args, options)
    return out, initial_state
