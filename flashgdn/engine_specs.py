"""The compiled variants that the serving engines' entry points (flashgdn.engines) and the fused
decode step (flashgdn.fused_step) look up, without a GPU: what `flashgdn-precompile --entry`
builds and what the benchmark's engine rows compile (flashgdn.bench.engine_rows).

Each entry's variants come from api.kernel_spec on meta tensors of the call's shapes, handed
through the entry point's own argument list (engines._packed_args, sglang.kernel_args,
recurrent.kernel_args, the fused step's workspace views), so that they are the variants a call
with those shapes, dtypes and options looks up (tests/test_precompile_entries.py runs the calls).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import api, engines, fused_step, recurrent, sglang
from .device import DeviceFacts
from .spec import KernelArgs
from .validation import Problem

# The entry points: the packed decodes with SGLang's and vLLM's padding rules, SGLang's decode in its
# own layout, vLLM's recurrent op on precomputed gates and its sigmoid-gating op on raw ones, the fused
# decode step (docs/engines.md).
ENTRIES = ("packed", "packed-vllm", "sglang", "sglang-tree", "recurrent", "sigmoid-vllm", "fused-step")
ONE_TOKEN = ("packed", "packed-vllm", "fused-step")  # decode one token per sequence only


def meta(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A meta tensor: kernel_spec reads dtypes, presence, a's rank and the state's strides."""
    return torch.empty(shape, dtype=dtype, device="meta")


def kernel_specs(entry: str, p: Problem, facts: DeviceFacts, *, io: torch.dtype, state: torch.dtype,
                 index: torch.dtype = torch.int32, gate: Optional[torch.dtype] = None,
                 dt_bias: torch.dtype = torch.float32, scale: Optional[float] = None, use_l2norm: bool = False,
                 state_padding: int = 0, hidden: int = 2048, conv_width: int = 4, conv_bias: bool = True,
                 regime: Optional[str] = None) -> tuple:
    """The variants (KernelSpec, or the fused step's StepSpec) a call of `entry` (ENTRIES) with the problem `p`
    looks up, in launch order. p.B sequences of p.T tokens (T > 1: vLLM's two recurrent ops, and
    SGLang's target verify: the pool frozen, the state after every token into its buffer);
    io: q, k, v (mixed_qkv) and the output; state: the K-last pool [P, HV, V, K], its rows padded
    by `state_padding` elements (a strided state); index: the slot indices (vLLM's recurrent ops:
    also cu_seqlens and num_accepted_tokens; "fused-step" takes int32 only); gate: a and b of the
    packed, SGLang and "sigmoid-vllm" decodes (None: io; "recurrent" takes g in fp32 and beta in
    io, as vLLM passes them; the fused step's are its bf16 workspace); dt_bias: its dtype (not
    "recurrent");
    hidden, conv_width, conv_bias: the fused step's projection and conv. `regime` None: the one
    p.B falls in on `facts`' device."""
    B, T, H, HV, K, V = p.B, p.T, p.H, p.HV, p.K, p.V
    if T > 1 and entry in ONE_TOKEN:
        raise ValueError(f"the {entry} entry decodes one token per sequence (T = 1), got T={T}")
    gate = io if gate is None else gate
    pool = meta(state, 1, HV, V, K + state_padding)[..., :K]
    A_log, dt = meta(torch.float32, HV), meta(dt_bias, HV)
    options = api.CallOptions(scale, use_l2norm)  # SGLang's softplus_beta 1.0 and threshold 20.0: the defaults
    if entry in ("packed", "packed-vllm"):
        args = engines._packed_args(meta(io, B, 2 * H * K + HV * V), meta(gate, B, HV), meta(gate, B, HV), A_log, dt,
                                    pool, meta(io, B, 1, HV, V), meta(index, B), vllm_padding=entry == "packed-vllm")
    elif entry in ("sglang", "sglang-tree"):
        # SGLang's varlen layout, as it is: its decode (T = 1) or its target verify (the speculative
        # buffer with its int32 row table; "sglang-tree": and an EAGLE tree, parents in the index dtype)
        q, v, ab = meta(io, 1, B * T, H, K), meta(io, 1, B * T, HV, V), meta(gate, B * T, HV)
        verify = T > 1
        inter, rows = (meta(state, B + 1, T, HV, V, K), meta(torch.int32, B + 1)) if verify else (None, None)
        parents = meta(index, B, T) if verify and entry == "sglang-tree" else None
        args = sglang.kernel_args(q, q, v, ab, ab, A_log, dt, pool, meta(index, B), inter, rows, parents, v, None)
        options = options._replace(update_state=not verify)
    elif entry in ("recurrent", "sigmoid-vllm"):
        # As vLLM calls them: the tokens of all sequences in dim 1 with cu_seqlens; its decode (T = 1)
        # with slots [B], its verify (T > 1) with slots [B, T] and accepted counts; precomputed gates
        # (g fp32, beta in io) or raw ones (a and b [tokens, HV] in `gate`, A_log, dt_bias)
        lead = (1, B * T)
        q, v = meta(io, *lead, H, K), meta(io, *lead, HV, V)
        gates = ((meta(torch.float32, *lead, HV), meta(io, *lead, HV), None, None) if entry == "recurrent"
                 else (meta(gate, B * T, HV), meta(gate, B * T, HV), A_log, dt))
        args = recurrent.kernel_args(q, q, v, *gates, pool, meta(index, B + 1),
                                     meta(index, B, T) if T > 1 else meta(index, B),
                                     meta(index, B) if T > 1 else None, meta(io, *lead, HV, V))
    elif entry == "fused-step":
        bf16 = torch.bfloat16

        def decode(parts):  # the decode's arguments on a workspace of `parts` partial sums (0: bf16 b | a)
            ba = meta(torch.float32, parts, B, 2 * HV) if parts else meta(bf16, B, 2 * HV)
            views = fused_step._decode_views(B, H, HV, K, meta(bf16, B, (2 * H + HV) * K), ba)
            return KernelArgs(*views, A_log, dt, pool, state_indices=meta(torch.int32, B),
                              output=meta(bf16, B, 1, HV, V))

        return fused_step.kernel_specs(p, hidden, conv_width, conv_bias, state, decode, options, facts, regime)
    else:
        raise ValueError(f"entry must be one of {ENTRIES}, got {entry!r}")
    return (api.kernel_spec("klast", p, args, options, facts, regime),)
