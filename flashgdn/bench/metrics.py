"""FLOP and byte counts of one GDN decode call, for the benchmark's TFLOPS and TB/s columns.

Counting unit: one (sequence, value head, token) triple does, on its K x V state S,

    decay          S <- g * S                   K*V multiplies         1 * K*V
    prediction     S^T k                        K*V multiply-adds      2 * K*V
    rank-1 update  S <- S + k (beta*(v-S^T k))^T  K*V multiply-adds    2 * K*V
    output         o = S^T q                    K*V multiply-adds      2 * K*V
                                                                      --------
                                                                       7 * K*V

so `gdn_flops = 7 * B * T * HV * K * V`. Vector work (q/k norms, gates, beta*(v - S^T k)) is
O(K + V) per head and left out. FLOPs do not depend on H (q and k heads are shared by HV/H value
heads); H only enters the byte count.

Bytes are the compulsory DRAM traffic of one call (every tensor touched once):

    state read        B * HV * K * V * state_bytes       (once per sequence, not per token)
    state writes      W * B * HV * K * V * state_bytes   W = state_writes: 1 (the final state),
                                                         0 (state update disabled), T (a pool slot
                                                         per token: mtp's ssm_state_indices)
    intermediates     B * T * HV * K * V * state_bytes   when per-token states are cached
    q, k              2 * B * T * H * K * io_bytes
    v, o              2 * B * T * HV * V * io_bytes
    a, b              2 * B * T * HV * gate_bytes
    A_log, dt_bias    HV * 4 + HV * dt_bias_bytes
    indices           B * index_bytes                    pools only (0 for a dense state)
    token slots       B * T * token_index_bytes          ssm_state_indices [B, T] (0 without)

A call on precomputed gates (vLLM's fused_recurrent_gated_delta_rule) reads g and beta in the
place of a and b (`beta_bytes` when beta's dtype differs from g's) and no A_log or dt_bias
(`gate_params=False`).

The fused decode step (`fused_step_flops`, `fused_step_bytes`) adds to one decode token the b/a
projection (a GEMV, 2 * hidden * 2HV FLOPs per row) and the causal conv1d update (2 * width FLOPs
per channel and row); its compulsory traffic is the decode's (mixed_qkv read as q, k, v; no a, b
in memory: the GEMV makes them) plus hidden_states, w_ba (read once), conv_weight, conv_bias and
the conv state's width - 1 values per channel, read and written. The workspace between its two
launches is not compulsory and not counted.
"""
from __future__ import annotations

from typing import Optional

FLOPS_PER_STATE_ELEMENT = 7  # decay 1 + prediction 2 + rank-1 update 2 + output 2


def gdn_flops(*, B: int, T: int, H: int, HV: int, K: int, V: int) -> int:
    """Floating-point operations of one call: 7 * B * T * HV * K * V (see the module docstring)."""
    del H  # q/k heads are shared: no extra state work
    return FLOPS_PER_STATE_ELEMENT * B * T * HV * K * V


def gdn_bytes(
    *, B: int, T: int, H: int, HV: int, K: int, V: int, io_bytes: int = 2, state_bytes: int = 4,
    gate_bytes: int = 2, dt_bias_bytes: int = 4, index_bytes: int = 0, state_writes: int = 1,
    intermediate: bool = False, token_index_bytes: int = 0, beta_bytes: Optional[int] = None,
    gate_params: bool = True,
) -> int:
    """Bytes one call must move to and from DRAM (see the module docstring).

    `index_bytes` is the size of one state-pool index (4 for int32, 8 for int64; 0 for a dense
    state); `state_writes` the full states written per sequence (1; 0 with disable_state_update;
    T with ssm_state_indices); `intermediate` is intermediate_states_buffer; `token_index_bytes`
    the size of one ssm_state_indices entry (4; 0 without); `beta_bytes` the size of one b (beta)
    when it differs from `gate_bytes`; `gate_params` False for precomputed gates (no A_log, dt_bias).
    """
    state = B * HV * K * V * state_bytes
    total = state * (1 + state_writes)
    if intermediate:
        total += T * state
    total += 2 * B * T * H * K * io_bytes  # q, k
    total += 2 * B * T * HV * V * io_bytes  # v, o
    total += B * T * HV * (gate_bytes + (gate_bytes if beta_bytes is None else beta_bytes))  # a, b
    if gate_params:
        total += HV * 4 + HV * dt_bias_bytes  # A_log (fp32), dt_bias
    total += B * index_bytes + B * T * token_index_bytes
    return total


def fused_step_flops(*, B: int, H: int, HV: int, D: int, hidden: int, width: int) -> int:
    """One fused decode step (module docstring): the decode token, the b/a GEMV and the conv."""
    qkv_dim = (2 * H + HV) * D
    return gdn_flops(B=B, T=1, H=H, HV=HV, K=D, V=D) + 2 * B * hidden * 2 * HV + 2 * B * qkv_dim * width


def fused_step_bytes(*, B: int, H: int, HV: int, D: int, hidden: int, width: int, state_bytes: int,
                     dt_bias_bytes: int, index_bytes: int = 4, conv_bias: bool = True) -> int:
    """Compulsory bytes of one fused decode step (bf16 activations, weights and conv state)."""
    qkv_dim = (2 * H + HV) * D
    decode = gdn_bytes(B=B, T=1, H=H, HV=HV, K=D, V=D, io_bytes=2, state_bytes=state_bytes, gate_bytes=0,
                       dt_bias_bytes=dt_bias_bytes, index_bytes=index_bytes)
    weights = hidden * 2 * HV * 2 + qkv_dim * width * 2 + (qkv_dim * 2 if conv_bias else 0)
    return decode + B * hidden * 2 + weights + 2 * B * qkv_dim * (width - 1) * 2
