"""Benchmark rows of the serving engines' entry points and of the fused decode step: their inputs,
FLOPs and bytes, compiled variants, and how flashgdn, the reference and the baselines run them.
flashgdn.bench.rows dispatches its rows of these versions here.

- "packed": flashgdn.engines.fused_recurrent_gated_delta_rule_packed_decode (vLLM's and SGLang's
  one-token decode): mixed_qkv [B, 2HK + HV*V], a, b [B, HV], pool [P, HV, V, K] read and written
  at ssm_state_indices [B]. Its inputs are those of the pretranspose pool row of the same shape
  (`decode_twin`), q | k | v packed side by side into mixed_qkv; FLA and FlashInfer have no packed
  decode and run as on that pretranspose row, on the unpacked inputs (rows.py).
- "recurrent": flashgdn.engines.fused_recurrent_gated_delta_rule (vLLM's op on precomputed gates:
  g the log decay in fp32 and beta in q's dtype, as vLLM's fused_gdn_gating makes them), varlen
  q [1, B*T, ...] with cu_seqlens, as vLLM calls it. T = 1 (its decode): ssm_state_indices [B].
  T > 1 (speculative-decode verify): ssm_state_indices [B, T] and num_accepted_tokens (random in
  1..T). Slots are >= 1: vLLM's slot 0 is its null block (padding).
- "sigmoid_vllm": flashgdn.engines.fused_sigmoid_gating_delta_rule_update_vllm (vLLM's
  fused_sigmoid_gating_delta_rule_update: the same op on the raw gates, computed in the kernel):
  the recurrent row's inputs and slots, with a and b [B*T, HV] in the io dtype, column views of one
  [B*T, 2HV] projection (b, a = ba.chunk(2, -1), as vLLM splits it), A_log and dt_bias fp32. The
  reference and FLA run the recurrent row's calls on g and beta computed from them (fp32, untimed).
- "sglang": flashgdn.engines.fused_sigmoid_gating_delta_rule_update (SGLang's op of that name) in
  SGLang's varlen layout: q, k [1, B*T, H, K], v [1, B*T, HV, V], cu_seqlens, a and b as the
  sigmoid_vllm row's, the pool read at initial_state_indices [B] (row.pool_slots; SGLang's slot 0 is
  a slot). T = 1 (its decode): the state written back to the slot. T > 1 (its target verify of T
  draft tokens): disable_state_update=True, the state after token t of sequence i into
  intermediate_states_buffer [B, T, HV, V, K] at [intermediate_state_indices[i], t], the row table
  arange(B) as SGLang passes it; the pool is not written.
- "fused_step": flashgdn.gdn_fused_decode_step: hidden_states [B, hidden], w_ba, mixed_qkv
  [B, qkv_dim], conv width 4 with a bias, vLLM's SD conv pool (passed as its transposed view),
  dt_bias bf16 (FlashInfer's contract), the ssm pool; one slot index addresses both pools.

Baselines: FLA (fla-core >= 0.6, fused_recurrent_gated_delta_rule) has no state pool and no
per-token state output: a varlen row's read states are gathered into a dense initial state
(untimed) and FLA writes only the final state, to a new fp32 tensor. FlashInfer 0.7.2 has no
decode on precomputed gates, no varlen decode (vLLM's slots and accepted counts, SGLang's layout),
and its gdn_fused_decode_step takes an fp32 ssm_state only. "composed" is the fused step as an engine
runs it today: torch `hidden @ w_ba`, a conv update kernel
(causal-conv1d's causal_conv1d_update when importable, else FLA's Triton one, else torch ops:
CONV_KERNELS) and flashgdn's packed decode.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import engine_specs, reference
from ..device import DeviceFacts
from ..validation import Problem
from .impl import Collected, Impl, Unavailable
from .metrics import fused_step_bytes, fused_step_flops, gdn_bytes, gdn_flops

ENGINE_VERSIONS = ("packed", "recurrent", "sigmoid_vllm", "sglang", "fused_step")
# vLLM's two recurrent ops: varlen, [B] or [B, T] slots and accepted counts; precomputed or raw gates
RECURRENT_VERSIONS = ("recurrent", "sigmoid_vllm")
# The varlen rows (q, k, v [1, B*T, ...] with cu_seqlens): vLLM's two ops and SGLang's
VARLEN_VERSIONS = RECURRENT_VERSIONS + ("sglang",)
# ssm_state_indices, num_accepted_tokens, cu_seqlens, state_indices, initial_state_indices,
# intermediate_state_indices
SLOT_DTYPE = torch.int32
CONV_WIDTH = 4  # Qwen3-Next's and Qwen3.5's conv
FLA_FUNCTION = "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule"
FLA_RECURRENT_NEEDS = ("state_v_first", "use_qk_l2norm_in_kernel", "output_final_state", "initial_state",
                       "cu_seqlens")
_FLA_GATHERED = ("timed on the read states gathered into a dense initial_state (untimed), writing only the final "
                 "state, to a new fp32 tensor")
_FLA_RAW_GATES = "; no raw gates: its recurrent row's call, on g and beta computed from the raw gates (fp32, untimed)"
FLA_RECURRENT_NOTE = "FLA has no ssm_state_indices: " + _FLA_GATHERED
FLA_SIGMOID_NOTE = FLA_RECURRENT_NOTE + _FLA_RAW_GATES
FLA_SGLANG_NOTE = ("FLA has no slot pool (initial_state_indices) and no per-token state output "
                   "(intermediate_states_buffer): " + _FLA_GATHERED + _FLA_RAW_GATES)
PACKED_BASELINE_NOTE = "no packed decode: timed on the unpacked q, k, v, a, b (the pretranspose pool call)"


def check_row(row) -> None:
    """ValueError for a combination an engine row cannot have (called by Row.__post_init__)."""
    if not row.pool or row.intermediate or row.token_slots:
        raise ValueError(f"{row.version} rows read a pool (pool=True) and write no intermediate states or token "
                         f"slots of the mtp API")
    if row.version in ("packed", "fused_step") and row.T != 1:
        raise ValueError(f"{row.version} rows decode one token (T = 1), got T={row.T}")
    if row.version == "fused_step":
        if row.dtype != "bf16" or row.K != row.V:
            raise ValueError("fused_step rows are bf16 with K = V (gdn_fused_decode_step's contract)")
        if row.hidden < 64 or row.hidden % 64:
            raise ValueError(f"fused_step rows need hidden, a positive multiple of 64, got {row.hidden}")
    elif row.hidden:
        raise ValueError("hidden applies to fused_step rows only")


def collected_names(row) -> Tuple[str, str, str]:
    """What the three collected tensors of a row are (the names --verify reports)."""
    if row.version == "fused_step":
        return "output", "ssm state", "conv state"
    if row.version in VARLEN_VERSIONS:
        return "output", "final state", "per-token states"
    return "output", "state", "intermediate states"


# ----------------------------------------------------------------------------- FLOPs, bytes, variants


def row_flops(row) -> int:
    if row.version == "fused_step":
        return fused_step_flops(B=row.B, H=row.H, HV=row.HV, D=row.K, hidden=row.hidden, width=CONV_WIDTH)
    return gdn_flops(B=row.B, T=row.T, H=row.H, HV=row.HV, K=row.K, V=row.V)


def row_bytes(row) -> int:
    """Compulsory bytes (flashgdn.bench.metrics) of the row's call."""
    state, io = row.state_torch.itemsize, row.io_torch.itemsize
    if row.version == "fused_step":
        return fused_step_bytes(B=row.B, H=row.H, HV=row.HV, D=row.K, hidden=row.hidden, width=CONV_WIDTH,
                                state_bytes=state, dt_bias_bytes=2, index_bytes=SLOT_DTYPE.itemsize)
    geometry = dict(B=row.B, T=row.T, H=row.H, HV=row.HV, K=row.K, V=row.V, io_bytes=io, state_bytes=state)
    if row.version == "packed":
        return gdn_bytes(**geometry, gate_bytes=io, dt_bias_bytes=4, index_bytes=SLOT_DTYPE.itemsize)
    # The varlen rows: the state read once; cu_seqlens [B + 1], and with T > 1 one more int32 per
    # sequence (vLLM's accepted counts, SGLang's buffer row table). recurrent: g fp32 and beta, no
    # A_log or dt_bias; sigmoid_vllm and sglang: raw a and b in the io dtype, A_log and dt_bias fp32.
    gates = (dict(gate_bytes=4, beta_bytes=io, gate_params=False) if row.version == "recurrent"
             else dict(gate_bytes=io, dt_bias_bytes=4))
    varlen = ((2 if row.T > 1 else 1) * row.B + 1) * SLOT_DTYPE.itemsize
    if row.version == "sglang":  # a slot per sequence; T = 1 writes it back, T > 1 each token's state to the buffer
        writes = dict(index_bytes=SLOT_DTYPE.itemsize, state_writes=1 if row.T == 1 else 0, intermediate=row.T > 1)
    else:  # vLLM's: a slot per token, each written
        writes = dict(state_writes=row.T, token_index_bytes=SLOT_DTYPE.itemsize)
    return gdn_bytes(**geometry, **gates, **writes) + varlen


def kernel_specs(row, facts: DeviceFacts) -> tuple:
    """The compiled variants an engine row's flashgdn call launches, in launch order
    (flashgdn.engine_specs, on the row's shapes and dtypes: the bench's slot indices are int32, a
    fused_step row's dt_bias bf16)."""
    entry = {"packed": "packed", "recurrent": "recurrent", "sigmoid_vllm": "sigmoid-vllm", "sglang": "sglang",
             "fused_step": "fused-step"}[row.version]
    return engine_specs.kernel_specs(
        entry, Problem(row.B, row.T, row.H, row.HV, row.K, row.V), facts, io=row.io_torch, state=row.state_torch,
        index=SLOT_DTYPE, dt_bias=torch.bfloat16 if row.version == "fused_step" else torch.float32,
        use_l2norm=row.l2norm, state_padding=row.pool_padding, hidden=row.hidden, conv_width=CONV_WIDTH)


# ----------------------------------------------------------------------------- inputs


def _random(row, device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    def slots(n, offset=0):  # n distinct slots from `offset` on, as row.pool_slots lays them out
        if row.pool_slots == "scattered":  # a random n of 2n slots, in a random order
            return torch.randperm(2 * n, generator=gen, device=device)[:n] + offset
        return torch.arange(n, device=device) + offset

    def pool(P):  # [P, HV, V, K]; a padded pool is the [..., :K] view of [P, HV, V, K + pool_padding]
        return randn(P, row.HV, row.V, row.K + row.pool_padding, dtype=row.state_torch)[..., :row.K]

    A_log = torch.log(torch.rand(row.HV, generator=gen, device=device) * 15 + 1)
    return gen, randn, slots, pool, A_log


def packed_inputs(twin_inputs: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """A packed row's inputs: its pretranspose twin's (rows.make_inputs), with mixed_qkv [B, 2HK +
    HV*V] holding q | k | v of each row side by side (q, k and v stay, for the baselines)."""
    q, k, v = (twin_inputs[n] for n in "qkv")
    return dict(twin_inputs, mixed_qkv=torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1).contiguous())


def recurrent_inputs(row, device, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh random inputs of a varlen row (VARLEN_VERSIONS, module docstring): q k v, the gates
    (recurrent: g beta; sigmoid_vllm, sglang: a b A_log dt_bias), state slots accepted cu_seqlens
    inter rows. The rows draw the same q, k, v and gates (the raw a and b are the recurrent row's,
    rounded to the io dtype). vLLM's rows: B*T slots from slot 1 on (its slot 0 is the null block),
    [B] for T = 1, [B, T] and the accepted counts for T > 1. sglang rows: initial_state_indices [B]
    (slot 0 a slot), accepted None, and for T > 1 the buffer inter [B, T, HV, V, K] (NaN until
    written) and its row table rows = arange(B). Slots are laid out as row.pool_slots says; what a
    row does not use is None."""
    _, randn, slots, pool, A_log = _random(row, device, seed)
    B, T = row.B, row.T
    io = row.io_torch
    f32 = torch.float32
    q, k = randn(B, T, row.H, row.K, dtype=io), randn(B, T, row.H, row.K, dtype=io)
    v = randn(B, T, row.HV, row.V, dtype=io)
    a, b, dt_bias = randn(B, T, row.HV, dtype=f32), randn(B, T, row.HV, dtype=f32), randn(row.HV, dtype=f32)
    if row.version == "recurrent":  # the log decay and beta, as vLLM's fused_gdn_gating computes them
        gates = dict(g=-A_log.exp() * F.softplus(a + dt_bias), beta=b.sigmoid().to(io))
    else:  # raw, as vLLM's GDN layer passes them (sglang rows too): b, a = ba.chunk(2, -1) of its [tokens, 2HV]
        raw_b, raw_a = torch.cat([b, a], -1).flatten(0, 1).to(io).chunk(2, -1)
        gates = dict(a=raw_a, b=raw_b, A_log=A_log, dt_bias=dt_bias)
    sglang = row.version == "sglang"
    count, first = (B, 0) if sglang else (B * T, 1)  # the slots, from slot `first` on
    used = count * (2 if row.pool_slots == "scattered" else 1)
    inp = dict(q=q, k=k, v=v, **gates, state=pool(first + used),
               slots=slots(count, offset=first).view(B, -1).to(SLOT_DTYPE), accepted=None, cu_seqlens=None, inter=None,
               rows=None)
    # varlen, as vLLM and SGLang call them
    inp.update({n: inp[n].flatten(0, 1).unsqueeze(0) for n in ("q", "k", "v", "g", "beta") if n in inp})
    inp["cu_seqlens"] = torch.arange(0, B * T + 1, T, device=device).to(SLOT_DTYPE)
    if T > 1 and not sglang:  # vLLM's speculative-decode verify
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + 1)
        inp["accepted"] = torch.randint(1, T + 1, (B,), generator=gen, device=device).to(SLOT_DTYPE)
    else:  # 1-D: vLLM's decode's ssm_state_indices, SGLang's initial_state_indices
        inp["slots"] = inp["slots"][:, 0]
    if sglang and T > 1:  # SGLang's target verify
        inp["inter"] = torch.full((B, T, row.HV, row.V, row.K), float("nan"), dtype=row.state_torch, device=device)
        inp["rows"] = torch.arange(B, device=device).to(SLOT_DTYPE)
    return inp


def fused_step_inputs(row, device, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh random keyword arguments of gdn_fused_decode_step for a fused_step row, plus `out`
    [B, 1, HV, D]. Small projection weights keep b and a in the range of the models' gates."""
    _, randn, slots, pool, A_log = _random(row, device, seed)
    B, H, HV, D, hidden, W = row.B, row.H, row.HV, row.K, row.hidden, CONV_WIDTH
    C, P = (2 * H + HV) * D, 2 * B if row.pool_slots == "scattered" else B
    bf16 = torch.bfloat16
    return dict(
        hidden_states=randn(B, hidden, dtype=bf16) * 0.5,
        w_ba=randn(hidden, 2 * HV, dtype=bf16) * (2.0 / hidden ** 0.5), mixed_qkv=randn(B, C, dtype=bf16),
        conv_weight=randn(C, W, dtype=bf16) * 0.5, conv_bias=randn(C, dtype=bf16) * 0.1,
        conv_state=randn(P, W - 1, C, dtype=bf16).transpose(1, 2),  # vLLM's SD pool, as its [P, C, W - 1] view
        A_log=A_log, dt_bias=randn(HV, dtype=bf16), scale=None, ssm_state=pool(P),
        state_indices=slots(B).to(SLOT_DTYPE), use_qk_l2norm=row.l2norm,
        out=torch.empty(B, 1, HV, D, dtype=bf16, device=device),
    )


def fused_step_decode_call(row, inp: Dict[str, Optional[torch.Tensor]]):
    """The fused step's decode alone on a fused_step row's inputs (fused_step_inputs): the packed
    decode, the kernel of the step's second launch, on the same pool and slots (random gates; the
    pre-conv row stands in for the post-conv one). What the step's first launch adds to."""
    from ..engines import fused_recurrent_gated_delta_rule_packed_decode

    gates = torch.randn(row.B, row.HV, device=inp["mixed_qkv"].device, dtype=torch.bfloat16)
    return lambda: fused_recurrent_gated_delta_rule_packed_decode(
        inp["mixed_qkv"], gates, gates, inp["A_log"], inp["dt_bias"], None, inp["ssm_state"], inp["out"],
        inp["state_indices"])


# ----------------------------------------------------------------------------- flashgdn and the reference


def _packed_views(row, mixed: torch.Tensor):
    B, HK = mixed.shape[0], row.H * row.K
    return (mixed[:, :HK].view(B, 1, row.H, row.K), mixed[:, HK:2 * HK].view(B, 1, row.H, row.K),
            mixed[:, 2 * HK:].view(B, 1, row.HV, row.V))


def precomputed_gates(row, inp) -> Tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) [1, B*T, HV] of a varlen row: the recurrent row's inputs; a sigmoid_vllm or sglang
    row's computed from its raw gates in fp32 (reference.log_gates), for the reference and the
    baselines."""
    if row.version == "recurrent":
        return inp["g"], inp["beta"]
    g, beta = reference.log_gates(inp["A_log"], inp["a"], inp["dt_bias"], inp["b"])
    return g.unsqueeze(0), beta.unsqueeze(0)


def _varlen_collect(row, inp):
    """A varlen row's (output [B, T, HV, V], final state, per-token states [B, T, ...]; None for
    T = 1) from its call's output: the pool's slots (vLLM's per-token slots; SGLang's decode slot),
    or SGLang's verify buffer at its row table."""
    def collect(out) -> Collected:
        o = out.view(row.B, row.T, row.HV, row.V)
        slots = inp["slots"].long()
        if row.T == 1:
            return o, inp["state"][slots], None
        states = inp["inter"][inp["rows"].long()] if row.version == "sglang" else inp["state"][slots]
        return o, states[:, -1], states

    return collect


def _fused_collect(inp):
    idx = inp["state_indices"].long()
    return lambda ret: (ret[0], inp["ssm_state"][idx], inp["conv_state"][idx])


def flashgdn_prepare(row, inp):
    """flashgdn's engine entry point (or fused step) for the row."""
    from .. import engines, fused_step

    if row.version == "packed":
        def call():
            return engines.fused_recurrent_gated_delta_rule_packed_decode(
                inp["mixed_qkv"], inp["a"][:, 0], inp["b"][:, 0], inp["A_log"], inp["dt_bias"], None, inp["state"],
                inp["output"], inp["indices"], row.l2norm)

        return call, lambda ret: (ret[0], ret[1][inp["indices"].long()], None)
    if row.version == "recurrent":
        def call():
            return engines.fused_recurrent_gated_delta_rule(
                inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], None, inp["state"], True, inp["cu_seqlens"],
                inp["slots"], inp["accepted"], row.l2norm)[0]

        return call, _varlen_collect(row, inp)
    if row.version == "sigmoid_vllm":
        def call():
            return engines.fused_sigmoid_gating_delta_rule_update_vllm(
                inp["A_log"], inp["a"], inp["b"], inp["dt_bias"], inp["q"], inp["k"], inp["v"], 1.0, 20.0, None,
                inp["state"], True, inp["cu_seqlens"], inp["slots"], inp["accepted"], row.l2norm)[0]

        return call, _varlen_collect(row, inp)
    if row.version == "sglang":  # as SGLang's decode (T = 1) and target verify (T > 1) call it
        def call():
            return engines.fused_sigmoid_gating_delta_rule_update(
                inp["A_log"], inp["a"], inp["dt_bias"], 1.0, 20.0, inp["q"], inp["k"], inp["v"], inp["b"],
                inp["state"], inp["slots"], scale=None, use_qk_l2norm_in_kernel=row.l2norm,
                cu_seqlens=inp["cu_seqlens"], disable_state_update=row.T > 1,
                intermediate_states_buffer=inp["inter"], intermediate_state_indices=inp["rows"])

        return call, _varlen_collect(row, inp)
    return (lambda: fused_step.gdn_fused_decode_step(**inp)), _fused_collect(inp)


def reference_prepare(row, inp):
    """flashgdn.reference on the row's inputs (the --verify oracle)."""
    if row.version == "packed":
        q, k, v = _packed_views(row, inp["mixed_qkv"])

        def call():
            return reference.gated_delta_rule_decode_pretranspose(
                q, k, v, None, inp["A_log"], inp["a"], inp["dt_bias"], inp["b"], output=inp["output"],
                use_qk_l2norm=row.l2norm, initial_state=inp["state"], initial_state_indices=inp["indices"])

        return call, lambda ret: (ret[0], ret[1][inp["indices"].long()], None)
    if row.version == "sglang":  # on the rows [B, T, ...]; the buffer's rows are its row table's arange(B)
        q, k, v, a, b = (t.unflatten(0, (row.B, row.T)) for t in (inp["q"][0], inp["k"][0], inp["v"][0], inp["a"],
                                                                   inp["b"]))

        def call():
            return reference.gated_delta_rule_decode_pretranspose(
                q, k, v, None, inp["A_log"], a, inp["dt_bias"], b, use_qk_l2norm=row.l2norm, initial_state=inp["state"],
                initial_state_indices=inp["slots"], intermediate_states_buffer=inp["inter"],
                disable_state_update=row.T > 1)[0]

        return call, _varlen_collect(row, inp)
    if row.version in RECURRENT_VERSIONS:
        g, beta = precomputed_gates(row, inp)

        def call():
            return reference.fused_recurrent_gated_delta_rule_vllm(
                inp["q"], inp["k"], inp["v"], g, beta, None, inp["state"], inp["cu_seqlens"], inp["slots"],
                inp["accepted"], row.l2norm)

        return call, _varlen_collect(row, inp)
    return (lambda: reference.gdn_fused_decode_step(**inp)), _fused_collect(inp)


# ----------------------------------------------------------------------------- baselines


def fla_recurrent_prepare(row, inp):
    """FLA's fused_recurrent_gated_delta_rule on a varlen row's precomputed g and beta (a
    sigmoid_vllm or sglang row's: precomputed_gates), from the read states gathered into a dense
    [B, HV, V, K] initial state (state_v_first)."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fn
    except Exception as exc:
        raise Unavailable(f"cannot import {FLA_FUNCTION}: {exc}") from exc
    missing = [p for p in FLA_RECURRENT_NEEDS if p not in inspect.signature(fla_fn).parameters]
    if missing:
        raise Unavailable(f"{FLA_FUNCTION} has no argument(s) {', '.join(missing)} (needs fla-core >= 0.6)")
    slots = inp["slots"].long()
    read = slots if inp["accepted"] is None else slots.gather(1, inp["accepted"].long()[:, None] - 1)[:, 0]
    h0 = inp["state"][read].contiguous()
    g, beta = precomputed_gates(row, inp)
    cu_seqlens = None if inp["cu_seqlens"] is None else inp["cu_seqlens"].long()  # FLA takes a LongTensor

    def call():
        return fla_fn(inp["q"], inp["k"], inp["v"], g=g, beta=beta, scale=None, initial_state=h0,
                      output_final_state=True, use_qk_l2norm_in_kernel=row.l2norm, state_v_first=True,
                      cu_seqlens=cu_seqlens)

    return call, lambda ret: (ret[0].view(row.B, row.T, row.HV, row.V), ret[1], None)


FLASHINFER_FUSED_MODULES = ("flashinfer", "flashinfer.gdn_kernels.experimental.gdn_fused_decode")


def flashinfer_fused_step_prepare(row, inp):
    """flashinfer.gdn_fused_decode_step (FlashInfer >= 0.7.2) on the same arguments: the top-level
    export, else its module (an install that trims flashinfer's __init__ keeps the function there).
    On Hopper it runs FlashInfer's composable torch path (its kernels serve SM120 only)."""
    if row.state_dtype != "fp32":
        raise Unavailable("FlashInfer's gdn_fused_decode_step takes an fp32 ssm_state only")
    errors = []
    for module in FLASHINFER_FUSED_MODULES:
        try:
            fn = importlib.import_module(module).gdn_fused_decode_step
            break
        except Exception as exc:  # ImportError, a broken install, or a FlashInfer before 0.7.2
            errors.append(f"{module}: {exc}")
    else:
        raise Unavailable(f"cannot import flashinfer.gdn_fused_decode_step ({'; '.join(errors)})")
    return (lambda: fn(**inp)), _fused_collect(inp)


def _torch_conv_update(inp) -> torch.Tensor:
    """The causal conv1d update (SiLU) in torch ops, every row a real slot: reference.conv_update
    without its search for padding rows (a host sync, which an engine's step has not)."""
    idx = inp["state_indices"].long()
    window = torch.cat([inp["conv_state"].index_select(0, idx), inp["mixed_qkv"].unsqueeze(-1)], -1)
    acc = (window.float() * inp["conv_weight"].float()).sum(-1) + inp["conv_bias"].float()
    inp["conv_state"].index_copy_(0, idx, window[..., 1:])
    return F.silu(acc).to(torch.bfloat16)


def _pool_conv_rows(inp) -> torch.Tensor:
    """The conv states of the step's rows, [B, qkv_dim, width - 1], from the paged pool."""
    return inp["conv_state"][inp["state_indices"].long()]


CONV_KERNELS = {  # the composed path's conv update, in order of preference
    "causal-conv1d": "causal-conv1d's causal_conv1d_update",
    "fla": "FLA's Triton causal_conv1d_update (dense per-row cache)",
    "torch": "torch ops (causal-conv1d and FLA not importable)",
}


def conv_kernel() -> str:
    """The first importable of CONV_KERNELS."""
    for kind, module in (("causal-conv1d", "causal_conv1d"), ("fla", "fla.modules.causal_conv1d")):
        try:
            importlib.import_module(module)
            return kind
        except Exception:  # not installed, or a broken install
            pass
    return "torch"


def fla_conv_autotuner():
    """The autotuner (a triton Autotuner) under FLA's Triton conv update kernel and its heuristics
    wrapper, or None where FLA has no such kernel."""
    try:
        from fla.modules.causal_conv1d import ops
    except ImportError:
        return None
    kernel = getattr(ops, "causal_conv1d_update_kernel", None)
    while kernel is not None and not hasattr(kernel, "configs"):
        kernel = getattr(kernel, "fn", None)
    return kernel


# FLA's conv update autotunes its block on (D, W) and its tensors' dtypes, not on the batch: the
# first batch size a process ran (and, through Triton's disk cache of autotuning results, the first
# on the machine) would pick the config of every later row. Each batch size gets its own tuning,
# kept here for the process: the composed path's best case.
_FLA_CONV_TUNED: dict = {}


def tune_fla_conv_for_batch(batch: int) -> None:
    """Point FLA's conv autotuner at the configs tuned for `batch` rows (tuned on its next call if
    none are), with Triton's disk cache of autotuning results off."""
    tuner = fla_conv_autotuner()
    if tuner is not None:
        tuner.cache = _FLA_CONV_TUNED.setdefault(batch, {})
        tuner.cache_results = False


def conv_update(inp):
    """(conv update of a step's arguments -> y, its rows' conv states after the update ->
    [B, qkv_dim, width - 1]) by conv_kernel(): causal-conv1d's update on the paged pool (as vLLM
    calls it), FLA's Triton update or torch ops.

    FLA's update keeps one dense cache row [qkv_dim, width] per sequence (its last width - 1
    columns are the window; the update shifts them and writes the whole row) and takes no slot
    indices: the step's rows start as a dense copy of their pool rows (untimed), which spares the
    composed path the gather and scatter a paged pool would cost it: its best case. Its block is
    tuned for the row's batch size (tune_fla_conv_for_batch)."""
    kind = conv_kernel()
    if kind == "causal-conv1d":
        from causal_conv1d import causal_conv1d_update

        def update(inp):
            return causal_conv1d_update(inp["mixed_qkv"], inp["conv_state"], inp["conv_weight"], inp["conv_bias"],
                                        "silu", conv_state_indices=inp["state_indices"])

        return update, _pool_conv_rows
    if kind == "torch":
        return _torch_conv_update, _pool_conv_rows
    from fla.modules.causal_conv1d import causal_conv1d_update as fla_update

    tune_fla_conv_for_batch(inp["mixed_qkv"].shape[0])
    rows = _pool_conv_rows(inp)
    cache = torch.zeros(*rows.shape[:2], rows.shape[2] + 1, dtype=rows.dtype, device=rows.device)
    cache[..., 1:] = rows

    def fla_conv(inp):
        return fla_update(inp["mixed_qkv"], cache, weight=inp["conv_weight"], bias=inp["conv_bias"],
                          activation="silu")[0]

    return fla_conv, lambda inp: cache[..., 1:]


def composed_prepare(row, inp):
    """The fused step as separate launches: torch `hidden @ w_ba`, a conv update (conv_update),
    flashgdn's packed decode (b = ba[:, :HV], a = ba[:, HV:], as gdn_fused_decode_step splits them)."""
    if row.version != "fused_step":
        raise Unavailable("the composed path is the fused step's baseline")
    from ..engines import fused_recurrent_gated_delta_rule_packed_decode

    conv, conv_rows = conv_update(inp)
    HV = row.HV

    def call():
        ba = inp["hidden_states"] @ inp["w_ba"]
        y = conv(inp)
        fused_recurrent_gated_delta_rule_packed_decode(
            y, ba[:, HV:], ba[:, :HV], inp["A_log"], inp["dt_bias"], None, inp["ssm_state"], inp["out"],
            inp["state_indices"], row.l2norm)
        return inp["out"], inp["conv_state"], inp["ssm_state"]

    idx = inp["state_indices"].long()
    return call, lambda ret: (ret[0], inp["ssm_state"][idx], conv_rows(inp))


def composed_note(row) -> Optional[str]:
    if row.version != "fused_step":
        return None
    return f"torch hidden @ w_ba + conv update by {CONV_KERNELS[conv_kernel()]} + flashgdn's packed decode"


COMPOSED = Impl("composed", composed_prepare, composed_note, applies=lambda row: row.version == "fused_step")
