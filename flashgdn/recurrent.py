"""vLLM's `fused_recurrent_gated_delta_rule` (its in-tree FLA copy) on flashgdn's kernels: the
recurrent GDN op on precomputed gates, for decode and speculative-decode verify; and vLLM's
`fused_sigmoid_gating_delta_rule_update`, the same op on the raw gates (the kernel computes them),
which vLLM's GDN layer calls for speculative decoding and for decode without its packed decode
(vllm/model_executor/layers/fla/ops/fused_sigmoid_gating.py: `fused_sigmoid_gating_delta_rule_update
(A_log, a, b, dt_bias, q, k, v, beta=1.0, threshold=20.0, scale=None, initial_state=None,
inplace_final_state=True, cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None,
use_qk_l2norm_in_kernel=False, is_kda=False)`; its `beta` and `threshold` shape the softplus).

vLLM's contract (vllm/third_party/flash_linear_attention/ops/fused_recurrent.py, vllm-project/vllm
5c7cb312): g is the log decay and beta the update weight of every token, both computed by the
caller; sequence i reads the state in pool slot ssm_state_indices[i, num_accepted_tokens[i] - 1]
(column 0 without accepted counts) and writes the state after its token t to slot
ssm_state_indices[i, t]; a slot index <= 0 (vLLM's null block) is padding where read and not
written where written, and so is a sequence without an accepted token (newer vLLM masks it so:
vllm-project/vllm#50021). The kernels take g and beta in the places of a and b (KernelSpec
.precomputed_gates) and apply this slot rule themselves (KernelSpec.vllm_slots), with the tokens
of all sequences in one dim when cu_seqlens is given (KernelSpec.varlen). docs/engines.md lists
what differs from vLLM and what raises.

flashgdn.engines exports `fused_recurrent_gated_delta_rule` and (under the name
`fused_sigmoid_gating_delta_rule_update_vllm`: SGLang's op of that name has another signature) the
raw-gate op; this module holds both, their checks and their one eager body.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import api, fastpath, host
from . import validation as val
from .logging_utils import logged
from .spec import AFTER_CU_SEQLENS, MAX_TOKENS, KernelArgs

GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAME = "fused_recurrent_gated_delta_rule"
SIGMOID_NAME = "fused_sigmoid_gating_delta_rule_update"
# (A_log, dt_bias, softplus beta, softplus threshold) of a call on precomputed gates: no raw-gate
# parameters (KernelSpec.precomputed_gates), the softplus at its defaults (unused)
PRECOMPUTED = (None, None, 1.0, 20.0)


def kernel_args(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens, ssm_state_indices, num_accepted_tokens,
                o) -> KernelArgs:
    """The compiled function's arguments of a call, the engine's tensors as they are: the slots [N, T]
    or [N] (one token: KernelSpec.slot_column) and the accepted counts, of N rows or more (vLLM pads
    them to its CUDA-graph batch; the kernel reads the rows of the N sequences only). Precomputed
    gates (A_log None): a is g and b is beta (KernelSpec.precomputed_gates); raw gates go as they are,
    [B, T, HV] or vLLM's [rows, HV] (KernelSpec.gate_rows)."""
    return KernelArgs(q, k, v, a, b, A_log, dt_bias, initial_state, None, None, num_accepted_tokens, None, o,
                      ssm_state_indices, cu_seqlens)


def _check_refused(name: str, initial_state, inplace_final_state, ssm_state_indices) -> None:
    """NotImplementedError / ValueError for what vLLM's op `name` does that flashgdn does not serve."""
    if not inplace_final_state:
        raise NotImplementedError(
            f"{name}(inplace_final_state=False) (the state after every token into a new [tokens, HV, V, K] "
            f"tensor: vLLM's prefill and test path) is not supported; flashgdn writes the pool in place")
    if initial_state is None:
        raise ValueError(f"{name}: initial_state (the state pool [P, HV, V, K]) is required "
                         f"(vLLM's op reads its strides too)")
    if ssm_state_indices is None:
        raise ValueError(f"{name}: inplace_final_state=True writes the states at ssm_state_indices; "
                         f"pass ssm_state_indices [N] or [N, T]")


def _check_gates(q, a, b, A_log, dt_bias, HV: int) -> dict:
    """The gates of a call, [B, T, HV] each, q's first two dims (B, T); returns them by name.
    Precomputed (A_log None): g and beta, fp32, bf16 or fp16 each. Raw: a (q's dtype or fp32) and b
    (a's dtype) with A_log [HV] fp32 and dt_bias [HV] fp32 or bf16; a and b may also be [rows, HV]
    as vLLM passes them (rows >= B·T, the tokens' gates in their first B·T rows: KernelSpec.gate_rows)."""
    lead = (q.shape[0], q.shape[1], HV)
    if A_log is None:
        if isinstance(b, torch.Tensor) and b.dim() == 4:  # the compiled function refuses it: checked here only
            raise NotImplementedError(f"{NAME}: a headwise beta [B, T, HV, V] is not supported (beta [B, T, HV])")
        gates = dict(g=a, beta=b)
        for name, t in gates.items():
            val.check_tensor(name, t, GATE_DTYPES, lead)
    else:
        gates = dict(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
        rows = isinstance(a, torch.Tensor) and a.dim() == 2  # vLLM's [rows, HV]
        val.check_tensor("a", a, (q.dtype, torch.float32), (None, HV) if rows else lead)
        if rows and a.shape[0] < lead[0] * lead[1]:
            raise ValueError(f"a as [rows, HV] must have a row per token, at least {lead[0] * lead[1]} "
                             f"(q.shape[0] * q.shape[1]), got {list(a.shape)}")
        val.check_tensor("b", b, (a.dtype,), tuple(a.shape) if rows else lead)
        val.check_tensor("A_log", A_log, (torch.float32,), (HV,))
        val.check_tensor("dt_bias", dt_bias, val.DT_BIAS_DTYPES, (HV,))
    for name, t in gates.items():
        val.check_inner_contiguous(name, t, 1, align_leading=False)
    return gates


def _check(q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, scale, initial_state, cu_seqlens,
           ssm_state_indices, num_accepted_tokens):
    """vLLM's layout rules; returns (Problem, device): B the sequences, T the slot columns (the
    most tokens of one sequence). Gates: _check_gates; the softplus shape of raw gates carries the
    names of vLLM's sigmoid op (beta, threshold)."""
    val.check_tensor("q", q, val.IO_DTYPES, (None,) * 4)
    val.check_tensor("k", k, (q.dtype,), tuple(q.shape))
    val.check_tensor("v", v, (q.dtype,), (q.shape[0], q.shape[1], None, None))
    rows, H, K = q.shape[1], q.shape[2], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    val.check_heads(H, HV, K, V)
    gates = _check_gates(q, a, b, A_log, dt_bias, HV)
    if A_log is not None:
        val.check_softplus(softplus_beta, softplus_threshold, names=("beta", "threshold"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        val.check_inner_contiguous(name, t, 1, align_leading=True)
    two_d = isinstance(ssm_state_indices, torch.Tensor) and ssm_state_indices.dim() == 2
    val.check_tensor("ssm_state_indices", ssm_state_indices, val.INDEX_DTYPES, (None, None) if two_d else (None,))
    if two_d:  # [N] may be strided (a column of a block table): its one column is never stepped
        val.check_inner_contiguous("ssm_state_indices", ssm_state_indices, 1, align_leading=False)
    T = ssm_state_indices.shape[1] if two_d else 1
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"ssm_state_indices.shape[1] (slots per sequence, its most tokens) must be in "
                         f"[1, {MAX_TOKENS}], got {T}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
        val.check_tensor("cu_seqlens", cu_seqlens, val.INDEX_DTYPES, (None,))
        val.check_inner_contiguous("cu_seqlens", cu_seqlens, 1, align_leading=False)
        if q.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, q must have shape [1, tokens, H, K] (vLLM's rule), got {list(q.shape)}")
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have shape [N + 1], got an empty tensor")
        N = cu_seqlens.shape[0] - 1
    else:
        N = q.shape[0]
        if rows != T:
            raise ValueError(
                f"without cu_seqlens every sequence has q.shape[1] = {rows} tokens: ssm_state_indices must have "
                f"shape [{N}, {rows}] (a slot per token){' or [N] for one token' if rows == 1 else ''}, "
                f"got {list(ssm_state_indices.shape)}")
    # vLLM pads the slot table and the accepted counts to its CUDA-graph batch: rows past N are not read
    if ssm_state_indices.shape[0] < N:
        raise ValueError(f"ssm_state_indices must have at least {N} rows (one per sequence), "
                         f"got {list(ssm_state_indices.shape)}")
    if num_accepted_tokens is not None:
        val.check_tensor("num_accepted_tokens", num_accepted_tokens, val.INDEX_DTYPES, (None,))
        val.check_inner_contiguous("num_accepted_tokens", num_accepted_tokens, 1, align_leading=False)
        if num_accepted_tokens.shape[0] < N:
            raise ValueError(f"num_accepted_tokens must have at least {N} entries (one per sequence), "
                             f"got {list(num_accepted_tokens.shape)}")
    p = val.Problem(N, T, H, HV, K, V)
    val.check_state("initial_state", initial_state, (None,), p, layout="klast")
    val.check_scale(scale)
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return p, val.check_devices(dict(q=q, k=k, v=v, **gates, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                     ssm_state_indices=ssm_state_indices, num_accepted_tokens=num_accepted_tokens))


def _check_index_values(cu_seqlens, T: int, total: int) -> None:
    """FLASHGDN_CHECK_INDICES=1 (a host sync): each sequence's span inside the tokens and at most
    T tokens long (the kernels give a longer one NaN output and write no state)."""
    if cu_seqlens is None or cu_seqlens.numel() == 0:
        return
    c = cu_seqlens.long()
    lengths = c[1:] - c[:-1]
    if int(c[0]) < 0 or int(c[-1]) > total or (lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T)):
        raise ValueError(f"cu_seqlens must rise by 0..{T} tokens per sequence (ssm_state_indices.shape[1]) "
                         f"within [0, {total}], got {cu_seqlens.tolist()}")


@logged
def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    inplace_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    ssm_state_indices: Optional[torch.Tensor] = None,
    num_accepted_tokens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's recurrent GDN op on precomputed gates, for decode and speculative-decode verify.

    q, k [B, T, H, K] and v [B, T, HV, V] (bf16 or fp16), g (log decay) and beta [B, T, HV] (fp32,
    bf16 or fp16 each); with cu_seqlens [N + 1] (int32 or int64) B is 1 and dim 1 holds the tokens
    of all N sequences, sequence i those from cu_seqlens[i] to cu_seqlens[i + 1]. q, k, v, g and
    beta may be strided views (last dim contiguous). initial_state [P, HV, V, K] fp32 or bf16
    (K-last; padded slot stride allowed) is read and written in place. ssm_state_indices [N, T_max]
    (int32 or int64; [N] means [N, 1]): sequence i reads slot ssm_state_indices[i,
    num_accepted_tokens[i] - 1] (column 0 without num_accepted_tokens) and writes the state after
    its token t to slot ssm_state_indices[i, t]. A read slot <= 0 or an accepted count of 0 is
    padding: the sequence's output rows are zero and no slot is touched; a write slot <= 0 is not
    written (an accepted count outside [0, T_max]: NaN rows, nothing written). Without cu_seqlens T
    must equal T_max; with it each sequence has at most T_max <= 16 tokens (cu_seqlens' values are
    not read on the host: a longer sequence gets NaN output rows and writes no state).
    scale None means K ** -0.5; beta None means ones.

    Returns (o [B, T, HV, V] of q's dtype, initial_state).

    While torch.compile or torch.export traces, the call is the custom op
    flashgdn::fused_recurrent_gated_delta_rule (flashgdn.ops), with `o` allocated here.
    """
    if host.EXT is not None and not api.CHECK_INDICES and not api._is_compiling() and (hosted := host.EXT.call(
            host.RECURRENT, q, k, v, g, beta, scale, initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
            num_accepted_tokens, use_qk_l2norm_in_kernel)) is not None:  # the C++ path (flashgdn.host)
        return hosted
    _check_refused(NAME, initial_state, inplace_final_state, ssm_state_indices)
    if beta is None:  # vLLM's default; not its serving path (an allocation per call)
        beta = torch.ones(g.shape, dtype=q.dtype, device=q.device)
    # `o`: v's layout packed: q's dtype on any call that runs (the checks, or the compiled function's, refuse
    # another), and empty_like costs less host time than torch.empty
    if api._is_compiling():  # traced: one custom op (flashgdn.api's module docstring)
        o = fastpath.new_output(v, False)
        torch.ops.flashgdn.fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, cu_seqlens, ssm_state_indices, num_accepted_tokens,
            use_qk_l2norm_in_kernel, o)
    else:
        o = fastpath.output(None, v)
        key = _recurrent(q, k, v, g, beta, *PRECOMPUTED, scale, initial_state, cu_seqlens, ssm_state_indices,
                         num_accepted_tokens, use_qk_l2norm_in_kernel, o)
        if host.ENABLED:  # beta as it went to the kernel: a later call of beta None (ones) misses
            fastpath.host_remember(key, host.RECURRENT, host.RECURRENT_LAUNCH, host.NONE, 2, q, k, v, g, beta, scale,
                                   initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
                                   num_accepted_tokens, use_qk_l2norm_in_kernel)
    return o, initial_state


@logged
def fused_sigmoid_gating_delta_rule_update_vllm(
    A_log: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: float = 1.0,
    threshold: float = 20.0,
    scale: float = None,
    initial_state: torch.Tensor = None,
    inplace_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    ssm_state_indices: Optional[torch.Tensor] = None,
    num_accepted_tokens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
    is_kda: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `fused_sigmoid_gating_delta_rule_update`: fused_recurrent_gated_delta_rule with the
    gates computed in the kernel, g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b).

    Everything but the gates is fused_recurrent_gated_delta_rule's (layouts, varlen, slots, accepted
    counts, vLLM's padding rule, what raises). a and b: [rows, HV] as vLLM passes them (views of its
    projection, any row stride; rows >= the B * T tokens of q, of which the first B * T are read, as
    vLLM's kernel does) or q's [B, T] then HV; a of q's dtype or fp32, b of a's dtype.
    A_log [HV] fp32, dt_bias [HV] fp32 or bf16. `beta` and `threshold` (floats, not tensors) shape
    the softplus: log(1 + exp(beta x)) / beta, x where beta x > threshold. is_kda=True (per-K gates)
    raises NotImplementedError.

    Returns (o [B, T, HV, V] of q's dtype, initial_state).

    While torch.compile or torch.export traces, the call is the custom op
    flashgdn::fused_sigmoid_gating_delta_rule_update_vllm (flashgdn.ops), with `o` allocated here.
    """
    if host.EXT is not None and not api.CHECK_INDICES and not api._is_compiling() and (hosted := host.EXT.call(
            host.SIGMOID_VLLM, A_log, a, b, dt_bias, q, k, v, beta, threshold, scale, initial_state,
            inplace_final_state, cu_seqlens, ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel,
            is_kda)) is not None:  # the C++ path (flashgdn.host)
        return hosted
    if is_kda:
        raise NotImplementedError(f"{SIGMOID_NAME}: is_kda=True (per-K gates, Kimi Delta Attention) is not supported")
    _check_refused(SIGMOID_NAME, initial_state, inplace_final_state, ssm_state_indices)
    if not (isinstance(A_log, torch.Tensor) and isinstance(dt_bias, torch.Tensor)):  # None: precomputed gates
        name, t = ("dt_bias", dt_bias) if isinstance(A_log, torch.Tensor) else ("A_log", A_log)
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if api._is_compiling():  # `o` as fused_recurrent_gated_delta_rule's
        o = fastpath.new_output(v, False)
        torch.ops.flashgdn.fused_sigmoid_gating_delta_rule_update_vllm(
            A_log, a, b, dt_bias, q, k, v, beta, threshold, scale, initial_state, cu_seqlens, ssm_state_indices,
            num_accepted_tokens, use_qk_l2norm_in_kernel, o)
    else:
        o = fastpath.output(None, v)
        key = _recurrent(q, k, v, a, b, A_log, dt_bias, beta, threshold, scale, initial_state, cu_seqlens,
                         ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, o)
        if host.ENABLED:
            fastpath.host_remember(key, host.SIGMOID_VLLM, host.SIGMOID_VLLM_LAUNCH, host.NONE, 6, A_log, a, b, dt_bias,
                                   q, k, v, beta, threshold, scale, initial_state, inplace_final_state, cu_seqlens,
                                   ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, is_kda)
    return o, initial_state


def _recurrent_key(q, a, initial_state, cu_seqlens, ssm_state_indices, num_accepted_tokens, A_log, softplus_beta,
                   softplus_threshold, scale, use_qk_l2norm_in_kernel, o) -> tuple:
    """The fast key of both ops (flashgdn.fastpath): what the compiled function does not check. q's
    shape (the sequences without cu_seqlens; a call without tokens launches nothing), a's rows (vLLM's
    [rows, HV] gates must cover q's tokens: their rows are a symbol of their own), cu_seqlens' length
    and the shapes of the slots and the accepted counts (the sequences and the slot columns; their
    rows, a symbol each, must cover the sequences); the written pool's and o's layout; the None
    pattern, the options. The layouts of q, k, v, the gates, the slots and the counts are the
    compiled function's to check: k, v, the gates and the output share q's symbolic dims (or b a's
    rows), the slot columns are static."""
    return (_recurrent, q.shape, a.shape[0], q.get_device(), initial_state.shape, initial_state.stride(), o.stride(),
            cu_seqlens is None or cu_seqlens.shape, ssm_state_indices.shape,
            num_accepted_tokens is None or num_accepted_tokens.shape, A_log is None, type(softplus_beta),
            softplus_beta, type(softplus_threshold), softplus_threshold, type(scale), scale, use_qk_l2norm_in_kernel)


def _recurrent(q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, scale, initial_state, cu_seqlens,
               ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, o):
    """The eager body of both ops (and their ops' implementation): checks, then one launch writing
    `o` and the pool; returns the call's fast key (None: nothing ran), which the C++ path learns.
    Precomputed gates: a is g, b is beta, A_log and dt_bias None. A repeated call (flashgdn.fastpath)
    skips the checks (_recurrent_key). Every tensor goes as it is (kernel_args), q, k and v too: a
    size-1 dim's stride is never stepped, and neither flashgdn's checks nor the compiled function's
    check it (vLLM's [1, tokens, ...] views of its projection carry an unpacked one)."""
    key, fast = fastpath.find(api.CHECK_INDICES, _recurrent_key, q, a, initial_state, cu_seqlens, ssm_state_indices,
                              num_accepted_tokens, A_log, softplus_beta, softplus_threshold, scale,
                              use_qk_l2norm_in_kernel, o)
    if fast is not None:
        try:  # KernelArgs' order
            fast.fn(q, k, v, a, b, A_log, dt_bias, initial_state, None, None, num_accepted_tokens, None, o,
                    ssm_state_indices, cu_seqlens, *AFTER_CU_SEQLENS)
            return key
        except fastpath.REFUSED:
            pass
    val.check_flags(use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    plan = api._validated(_check, q, k, v, a, b, A_log, dt_bias, softplus_beta, softplus_threshold, scale,
                          initial_state, cu_seqlens, ssm_state_indices, num_accepted_tokens,
                          options=(use_qk_l2norm_in_kernel,))
    if q.shape[1] == 0 or plan.problem.B == 0:  # no tokens or no sequences: nothing to run (nothing kept)
        return None
    if api.CHECK_INDICES:
        _check_index_values(cu_seqlens, plan.problem.T, q.shape[1])
    args = kernel_args(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens, ssm_state_indices,
                       num_accepted_tokens, o)
    api._launch(plan, "klast", args, api.CallOptions(scale, use_qk_l2norm_in_kernel, True, softplus_beta,
                                                     softplus_threshold))
    api._remember_fast(key, plan)
    return key
