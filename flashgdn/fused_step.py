"""`flashgdn.gdn_fused_decode_step`: FlashInfer 0.7.2's fused GDN decode step (the b/a projection
GEMV, the causal conv1d update with SiLU, the q/k/v split and the gated delta-rule decode), at its
exact signature, for any geometry flashgdn's decode serves, on Hopper and Blackwell.

One compiled function (spec.StepSpec, kernels/step.py) makes two launches on the current stream (or one:
below): the conv/gate kernel (kernels/conv_gate.py; spec.ConvGateSpec) writes the post-conv q | k | v row
and the b | a projection of every batch row into a workspace, and flashgdn's K-last decode kernel (the one
gated_delta_rule_decode_pretranspose runs, with the pool) reads q, k, v, a and b as views of it, built
in the compiled code; one host call checks the tensors of both launches before either runs. Where the
table splits the projection over the hidden dimension (policy.ConvGateConfig.partial_sums) the workspace
holds fp32 partial sums of b | a, which the decode adds up (KernelSpec.gate_parts). Where the policy
says so (policy.fused_step_pdl) the decode is a programmatic dependent launch (PDL) of the kernel before
it: it starts while that kernel ends, loads its slot indices and state, and waits for that grid before
it reads the workspace. Where the policy's "gemm" conv/gate regime holds (policy.conv_gate_regime: a
large batch on a table that names it), the b/a projection is one cuBLAS GEMM (torch.mm into the
workspace) before that function, whose conv/gate kernel then runs the conv only: three launches, as the
composed path runs them, the decode a programmatic dependent of the conv. Where the table names the
conv/gate regime (policy.fused_step_one_launch) the two kernels are one launch (StepSpec.one_launch,
kernels/step.py): the decode's CTAs wait in the same grid on a counter of finished conv/gate CTAs, which
the workspace holds. The workspace (_Workspace) is cached per (device, stream, qkv_dim, HV, partial
sums, one launch or not): a call allocates only when its batch exceeds every earlier one on that stream (the
capacity then doubles), so steady-state calls and CUDA-graph replays allocate nothing beyond the output;
calls on one stream run in order, so they can share it. An outgrown workspace is kept, not freed: a CUDA
graph captured with it still reads and writes its address. While torch.compile or torch.export traces, a
call is the custom op flashgdn::gdn_fused_decode_step (flashgdn.ops; its real implementation is the
eager body `_fused_step`); eager calls run that body directly. Like the rest of the API layer, this
module never imports CuTe.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch

from . import api, fastpath, host
from . import validation as val
from .cache import kernel_cache
from .device import facts_of
from .kernels import policy
from .logging_utils import logged
from .spec import CONV_WIDTHS, SUPPORTED_HEAD_DIMS, SYNC_WORDS, ConvGateSpec, KernelArgs, StepSpec, conv_gate_vec

BF16 = (torch.bfloat16,)
MIN_WORKSPACE_ROWS = 16


def _check(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
           ssm_state, state_indices, out):
    """Every structural rule of a call; returns (Problem, width, device). Each failure names the
    argument; nothing has been written."""
    val.check_tensor("A_log", A_log, (torch.float32,), (None,))
    HV = A_log.shape[0]
    if HV < 1:
        raise ValueError("A_log must have shape [HV] with HV >= 1, got an empty tensor")
    val.check_tensor("ssm_state", ssm_state, val.STATE_DTYPES, (None, HV, None, None))
    D = ssm_state.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or ssm_state.shape[2] != D:
        raise ValueError(f"ssm_state must have shape [P, HV={HV}, D, D] with D one of {SUPPORTED_HEAD_DIMS} "
                         f"(K = V), got {list(ssm_state.shape)}")
    val.check_tensor("hidden_states", hidden_states, BF16, (None, None))
    B, hidden = hidden_states.shape
    if hidden < 64 or hidden % 64:
        raise ValueError(f"hidden_states.shape[1] (hidden) must be a positive multiple of 64, got {hidden}")
    val.check_tensor("mixed_qkv", mixed_qkv, BF16, (B, None))
    qkv_dim = mixed_qkv.shape[1]
    H = val.packed_heads(qkv_dim, HV, D, D)
    if not H:
        raise ValueError(
            f"mixed_qkv must have shape [B, (2*H + HV)*D] (q | k | v channels) with HV={HV} (A_log), D={D} "
            f"(ssm_state) and HV a multiple of H >= 1; its width {qkv_dim} does not split so"
        )
    p = val.Problem(B=B, T=1, H=H, HV=HV, K=D, V=D)
    val.check_tensor("w_ba", w_ba, BF16, (hidden, 2 * HV))
    val.check_tensor("conv_weight", conv_weight, BF16, (qkv_dim, None))
    width = conv_weight.shape[1]
    if width not in CONV_WIDTHS:
        raise ValueError(f"conv_weight.shape[1] (conv width) must be one of {CONV_WIDTHS}, got {width}")
    if conv_bias is not None:
        val.check_tensor("conv_bias", conv_bias, BF16, (qkv_dim,))
    val.check_tensor("conv_state", conv_state, BF16, (None, qkv_dim, width - 1))
    if conv_state.shape[0] != ssm_state.shape[0]:
        raise ValueError(
            f"conv_state and ssm_state must have the same number of slots (one index addresses both), got "
            f"{conv_state.shape[0]} and {ssm_state.shape[0]}"
        )
    val.check_state("ssm_state", ssm_state, (None,), p, layout="klast")
    val.check_no_overlap("conv_state", conv_state)
    val.check_tensor("dt_bias", dt_bias, val.DT_BIAS_DTYPES, (HV,))
    val.check_tensor("state_indices", state_indices, (torch.int32,), (B,))
    for name, t in (("hidden_states", hidden_states), ("mixed_qkv", mixed_qkv), ("A_log", A_log),
                    ("dt_bias", dt_bias), ("state_indices", state_indices)):
        val.check_inner_contiguous(name, t, 1, align_leading=False)
    # w_ba's rows are read in blocks of gate_vec columns (16 bytes where 2 HV allows).
    _check_rows_aligned("w_ba", w_ba, conv_gate_vec(HV))
    if out is not None:
        val.check_tensor("out", out, BF16, (B, 1, HV, D))
        val.check_inner_contiguous("out", out, 1, align_leading=False)
        val.check_no_overlap("out", out)
    val.check_scale(scale)
    device = val.check_devices(dict(
        hidden_states=hidden_states, w_ba=w_ba, mixed_qkv=mixed_qkv, conv_weight=conv_weight, conv_bias=conv_bias,
        conv_state=conv_state, A_log=A_log, dt_bias=dt_bias, ssm_state=ssm_state, state_indices=state_indices,
        out=out,
    ))
    return p, width, device


def _check_rows_aligned(name: str, t: torch.Tensor, elems: int) -> None:
    """Last dim contiguous; row stride a multiple of `elems` elements and the data pointer aligned
    to `elems` elements (the kernel loads `elems` columns at once)."""
    val.check_inner_contiguous(name, t, 1, align_leading=False)
    if t.shape[0] > 1 and t.stride(0) % elems:
        raise ValueError(f"{name} row stride must be a multiple of {elems} elements, got strides {list(t.stride())}")
    align = elems * t.element_size()
    if val.has_address(t) and t.data_ptr() % align:
        raise ValueError(f"{name} data pointer must be {align}-byte aligned (got address % {align} = "
                         f"{t.data_ptr() % align})")


class _Plan:
    """A validated call signature: its Problem, conv width, device, and (after the first call)
    its compiled function (a StepSpec build), whether the b/a projection is a GEMM before it (the
    "gemm" conv/gate regime), how many partial sums of it the workspace holds and whether the step is
    one launch, which reads the workspace's counters (_Workspace)."""

    __slots__ = ("problem", "width", "device", "fn", "gemm", "parts", "counters")

    def __init__(self, problem, width, device):
        self.problem, self.width, self.device, self.fn = problem, width, device, None
        self.gemm, self.parts, self.counters = False, 0, False


_VALIDATED: dict = {}
_WORKSPACES: dict = {}  # (device, stream, qkv_dim, HV, parts, counters) -> _Workspace
_RETIRED: list = []  # outgrown workspaces, kept alive for the CUDA graphs that captured them


def _current_stream(device: torch.device) -> int:
    """The raw handle of `device`'s current CUDA stream (torch.cuda.current_stream(device)
    .cuda_stream without building a Stream object); under CUDA-graph capture, the capture stream."""
    return torch._C._cuda_getCurrentRawStream(device.index)


class _Workspace:
    """One stream's workspace: qkv [rows, qkv_dim] (bf16) and the b | a projection, ba [rows, 2 HV]
    (bf16) or, from the split projection, its `parts` fp32 partial sums [parts, rows, 2 HV]
    (policy.ConvGateConfig.partial_sums); sync [SYNC_WORDS] int32, the one-launch step's counters,
    zero (each launch leaves them zero) where `counters`, else never read and left unset: no fill
    kernel, which a CUDA graph captured on a stream new to the step would replay with every call;
    and per batch size B the rows a call of B rows takes of them (with sync), sliced once."""

    __slots__ = ("qkv", "ba", "sync", "rows")

    def __init__(self, rows: int, qkv_dim: int, HV: int, parts: int, counters: bool, device: torch.device):
        self.qkv = torch.empty((rows, qkv_dim), dtype=torch.bfloat16, device=device)
        self.ba = (torch.empty((parts, rows, 2 * HV), dtype=torch.float32, device=device) if parts
                   else torch.empty((rows, 2 * HV), dtype=torch.bfloat16, device=device))
        self.sync = (torch.zeros if counters else torch.empty)(SYNC_WORDS, dtype=torch.int32, device=device)
        self.rows = {}


def _workspace(device: torch.device, B: int, H: int, HV: int, D: int, parts: int, counters: bool = False):
    """(qkv [B, qkv_dim], ba [B, 2 HV] or [parts, B, 2 HV], sync): this stream's workspace rows and
    counters (module docstring; `counters`: a one-launch step's workspace, whose counters are zero)."""
    qkv_dim = (2 * H + HV) * D
    key = (device, _current_stream(device), qkv_dim, HV, parts, counters)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.qkv.shape[0] < B:
        if ws is not None:
            # A CUDA graph captured on the smaller workspace keeps using its address: never free it.
            _RETIRED.append(ws)
        ws = _WORKSPACES[key] = _Workspace(max(MIN_WORKSPACE_ROWS, 1 << math.ceil(math.log2(max(B, 1)))), qkv_dim, HV,
                                           parts, counters, device)
    rows = ws.rows.get(B)
    if rows is None:
        rows = ws.rows[B] = (ws.qkv[:B], ws.ba[..., :B, :], ws.sync)
    return rows


def _decode_views(B: int, H: int, HV: int, D: int, qkv: torch.Tensor, ba: torch.Tensor):
    """q, k, v, a and b of the decode kernel as views of the workspace rows, b = ba[..., :HV],
    a = ba[..., HV:]: [B, 1, HV], or [parts, B, 1, HV] on partial sums (KernelSpec.gate_parts): the
    arguments from which the decode's KernelSpec is derived (kernels/step.py builds the same views in
    the compiled code)."""
    row = qkv.stride(0)
    q = qkv.as_strided((B, 1, H, D), (row, H * D, D, 1), qkv.storage_offset())
    k = qkv.as_strided((B, 1, H, D), (row, H * D, D, 1), qkv.storage_offset() + H * D)
    v = qkv.as_strided((B, 1, HV, D), (row, HV * D, D, 1), qkv.storage_offset() + 2 * H * D)
    lead = ba.shape[:-2]
    shape, stride = (*lead, B, 1, HV), (*ba.stride()[:-2], ba.stride(-2), HV, 1)
    gate = lambda off: ba.as_strided(shape, stride, ba.storage_offset() + off)  # noqa: E731
    return q, k, v, gate(HV), gate(0)


@logged
def gdn_fused_decode_step(
    hidden_states: torch.Tensor,
    w_ba: torch.Tensor,
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    conv_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    scale: Optional[float],
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode token per row of a GDN layer: b/a projection, causal conv1d update (SiLU), q/k/v
    split and gated delta-rule decode; both pools updated in place (flashgdn.reference
    .gdn_fused_decode_step is the step-by-step definition).

    hidden_states [B, hidden] bf16 (hidden a multiple of 64); w_ba [hidden, 2 HV] bf16, last dim
    contiguous (columns [:HV] feed the beta gate b, [HV:] the decay gate a); mixed_qkv [B, qkv_dim]
    bf16, the pre-conv q | k | v channels, qkv_dim = (2 H + HV) D; conv_weight [qkv_dim, width]
    bf16, width 2..4; conv_bias [qkv_dim] bf16 or None (no bias, as Qwen3-Next's conv); conv_state
    [P, qkv_dim, width - 1] bf16, any strides: vLLM's "SD" pool as its transposed view or a dense
    "DS" pool, padded page strides too; A_log [HV] fp32; dt_bias [HV] fp32 or bf16; scale None or
    0.0 for D ** -0.5; ssm_state [P, HV, V, K] fp32 or bf16 (K-last, K = V = D in {64, 128, 256},
    padded slot stride allowed); state_indices [B] int32: row i reads and writes slot
    state_indices[i] of both pools. A negative index is padding: neither pool is read or written,
    the output row is zero. An index >= P touches neither pool and gives a NaN output row.
    out [B, 1, HV, D] bf16 (allocated when None).

    Returns (out, conv_state, ssm_state).
    """
    if host.EXT is not None and not api.CHECK_INDICES and not api._is_compiling() and (hosted := host.EXT.call(
            host.FUSED_STEP, hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
            ssm_state, state_indices, use_qk_l2norm, out)) is not None:  # the C++ path (flashgdn.host)
        return hosted
    call = ((hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale, ssm_state,
             state_indices, use_qk_l2norm, out) if host.ENABLED else None)  # the signature the C++ path learns
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 0.0:
        scale = None  # FlashInfer's rule: 0.0 means "unset"
    if api._is_compiling():  # traced: one custom op (flashgdn.ops), which may not return its inputs
        if out is None:  # the op's fake implementation checks every shape this reads
            out = torch.empty((hidden_states.shape[0], 1, A_log.shape[0], ssm_state.shape[-1]),
                              dtype=torch.bfloat16, device=hidden_states.device)
        torch.ops.flashgdn.gdn_fused_decode_step(
            hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale, ssm_state,
            state_indices, use_qk_l2norm, out,
        )
        return out, conv_state, ssm_state
    return _fused_step(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
                       ssm_state, state_indices, use_qk_l2norm, out, call), conv_state, ssm_state


def _step_key(hidden_states, mixed_qkv, conv_bias, conv_state, ssm_state, out, scale, use_qk_l2norm) -> tuple:
    """The fast key of a step (flashgdn.fastpath; _fused_step says what it holds)."""
    return (_fused_step, hidden_states.shape[0], hidden_states.get_device(), mixed_qkv.shape[1], conv_bias is None,
            conv_state.shape, conv_state.stride(), ssm_state.shape, ssm_state.stride(), out is None or out.stride(),
            type(scale), scale, use_qk_l2norm)


def _fused_step(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
                ssm_state, state_indices, use_qk_l2norm, out, call=None) -> torch.Tensor:
    """The eager body (also the custom op's real implementation): validate, then launch; returns
    the output. `call`: the public function's arguments, under whose signature the C++ path
    (flashgdn.host) learns the call (_host_remember).

    A repeated call (flashgdn.fastpath) skips the checks. Its key holds what the compiled
    function does not check (the batch, the device, both pools' and the output's layouts, the
    options): the step's compiled function checks every tensor of both its launches before either
    runs. In the "gemm" regime the GEMM runs before that function, on hidden_states and w_ba: that
    entry also keeps their dtypes, shapes and devices (_gemm_facts), and a call whose facts differ
    takes the full way, which raises before anything runs."""
    key, fast = fastpath.find(api.CHECK_INDICES, _step_key, hidden_states, mixed_qkv, conv_bias, conv_state,
                              ssm_state, out, scale, use_qk_l2norm)
    if fast is not None:
        device, p, gemm_guard, parts, counters = fast.extra
        try:
            if gemm_guard is None or gemm_guard == _gemm_facts(hidden_states, w_ba):
                o = _output(out, p, device)
                rows = _workspace(device, p.B, p.H, p.HV, p.K, parts, counters)
                _launches(fast.fn, gemm_guard is not None, rows, hidden_states, w_ba, mixed_qkv, conv_weight,
                          conv_bias, conv_state, state_indices, A_log, dt_bias, ssm_state, o)
                _host_remember(key, call, rows, p, gemm_guard is not None)
                return o
        except fastpath.REFUSED:
            pass
    val.check_flags(use_qk_l2norm=use_qk_l2norm)
    plan = val.remembered(
        _VALIDATED, _check,
        (hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale, ssm_state,
         state_indices, out),
        (use_qk_l2norm,), lambda result: _Plan(*result),
    )
    p = plan.problem
    if api.CHECK_INDICES:  # FLASHGDN_CHECK_INDICES=1: slots in range, none written by two rows (a host sync)
        val.check_index_values("state_indices", state_indices, ssm_state.shape[0], allow_negative=True)
        val.check_distinct_slots("state_indices", state_indices, state_indices)
    o = _output(out, p, hidden_states.device)
    if p.B:
        _launch(plan, hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
                ssm_state, state_indices, use_qk_l2norm, o)
        if key is not None and plan.fn is not None:  # not when the launch is stubbed
            # the gemm regime's guard (_fused_step), None in the other regimes
            gemm_guard = _gemm_facts(hidden_states, w_ba) if plan.gemm else None
            fastpath.remember(key, fastpath.Fast(plan.fn, extra=(plan.device, p, gemm_guard, plan.parts,
                                                                 plan.counters)))
            if call is not None:
                _host_remember(key, call, _workspace(plan.device, p.B, p.H, p.HV, p.K, plan.parts, plan.counters), p,
                               plan.gemm)
    return o


def _host_remember(key, call, rows, p, gemm: bool) -> None:
    """The C++ path learns a call of the public function's arguments `call` (None: none) that ran its
    compiled function on the workspace rows `rows` of the current stream, which it keeps; not in the
    "gemm" regime, whose GEMM runs before that function. It allocates a missing output like a tensor of
    the output's shape (its one element is all it holds)."""
    if call is not None and not gemm:
        qkv, ba, sync = rows
        like = torch.empty(1, dtype=torch.bfloat16, device=qkv.device).expand(p.B, 1, p.HV, p.V)
        fastpath.host_remember(key, host.FUSED_STEP, host.FUSED_STEP_LAUNCH, 12, host.const(2), *call,
                               ret=(host.OUTPUT, 5, 9), consts=(qkv, ba, like, sync), stream_of=9)


def kernel_specs(p, hidden: int, width: int, has_bias: bool, state_dtype: torch.dtype,
                 decode_args: Callable[[int], KernelArgs], options, facts, regime: Optional[str] = None) -> tuple:
    """The compiled variants of a step (Problem `p`, its ssm_state of `state_dtype`): per conv/gate
    build, one StepSpec of it and the decode that reads its workspace (`decode_args(parts)`: the
    decode's KernelArgs on a workspace of that many partial sums of the projection, 0 for the bf16
    projection; meta tensors do), a programmatic dependent where the policy says so
    (policy.fused_step_pdl). `regime` None: the one of the conv/gate regime p.B falls in (each kernel
    has its own thresholds); given (a precompile): those of every conv/gate build a call in that
    regime can meet (policy.conv_gate_regimes) with the decodes of that regime, so that precompiling
    both regimes builds every pair."""
    split = policy.split_serves(facts.device_class, facts.arch, hidden, p.HV, val.dtype_name(state_dtype))
    if regime is None:
        conv_regimes = (policy.conv_gate_regime(p.B, p.HV, facts.sm_count, facts.device_class, facts.arch, None,
                                                split),)
    else:
        conv_regimes = policy.conv_gate_regimes(facts.device_class, facts.arch, regime, split)
    pdl = policy.fused_step_pdl(facts.device_class, facts.arch)
    steps = []
    for r in conv_regimes:
        conv = ConvGateSpec(p.H, p.HV, p.K, hidden, width, has_bias, facts.arch, facts.device_class, r)
        decode = api.kernel_spec("klast", p, decode_args(policy.ConvGateConfig.for_spec(conv).partial_sums), options,
                                 facts, regime)
        one = policy.fused_step_one_launch(conv, decode)
        steps.append(StepSpec(conv, dataclasses.replace(decode, pdl_wait=pdl or one), one))
    return tuple(steps)


def _output(out, p, device) -> torch.Tensor:
    """`out`, or when None a new [B, 1, HV, V] bf16 output (Problem `p`)."""
    return torch.empty((p.B, 1, p.HV, p.V), dtype=torch.bfloat16, device=device) if out is None else out


def _gemm_facts(hidden_states, w_ba) -> tuple:
    """What the "gemm" regime's GEMM, which runs before the compiled function's checks, takes of its
    operands beyond the fast key (_fused_step): their dtypes, shapes and devices."""
    return (hidden_states.dtype, hidden_states.shape, hidden_states.get_device(), w_ba.dtype, w_ba.shape,
            w_ba.get_device())


def _launch(plan, hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
            ssm_state, state_indices, use_qk_l2norm, out) -> None:
    """The launches of a validated call (its _Plan: _launches); the first call of a plan looks its
    compiled function up."""
    p = plan.problem
    if plan.fn is None:
        def decode_args(parts):
            qkv, ba, _ = _workspace(plan.device, p.B, p.H, p.HV, p.K, parts)
            views = _decode_views(p.B, p.H, p.HV, p.K, qkv, ba)
            return KernelArgs(*views, A_log, dt_bias, ssm_state, state_indices=state_indices, output=out)

        [spec] = kernel_specs(p, hidden_states.shape[1], plan.width, conv_bias is not None, ssm_state.dtype,
                              decode_args, api.CallOptions(scale, use_qk_l2norm), facts_of(plan.device))
        plan.gemm, plan.parts, plan.counters = spec.conv.regime == "gemm", spec.decode.gate_parts, spec.one_launch
        plan.fn = kernel_cache.get(spec)
    _launches(plan.fn, plan.gemm, _workspace(plan.device, p.B, p.H, p.HV, p.K, plan.parts, plan.counters),
              hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, A_log, dt_bias,
              ssm_state, out)


def _launches(fn, gemm: bool, ws, hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, state_indices,
              A_log, dt_bias, ssm_state, out) -> None:
    """The step's compiled function `fn` (spec.StepArgs' order) on the workspace `ws` (_workspace's
    rows; the decode's views of them are built in the compiled code), after the b/a GEMM into the
    workspace in the "gemm" regime."""
    qkv, ba, sync = ws
    if gemm:
        # cuBLAS, as the engines' own projection; inference only: a weight that requires grad (an
        # nn.Parameter) goes detached, as the kernels take it
        if hidden_states.requires_grad or w_ba.requires_grad:
            hidden_states, w_ba = hidden_states.detach(), w_ba.detach()
        torch.mm(hidden_states, w_ba, out=ba)
    fn(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, qkv, ba, A_log, dt_bias,
       ssm_state, out, sync)
