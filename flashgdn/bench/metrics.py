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
"""
from __future__ import annotations

FLOPS_PER_STATE_ELEMENT = 7  # decay 1 + prediction 2 + rank-1 update 2 + output 2


def gdn_flops(*, B: int, T: int, H: int, HV: int, K: int, V: int) -> int:
    """Floating-point operations of one call: 7 * B * T * HV * K * V (see the module docstring)."""
    del H  # q/k heads are shared: no extra state work
    return FLOPS_PER_STATE_ELEMENT * B * T * HV * K * V


def gdn_bytes(
    *, B: int, T: int, H: int, HV: int, K: int, V: int, io_bytes: int = 2, state_bytes: int = 4,
    gate_bytes: int = 2, dt_bias_bytes: int = 4, index_bytes: int = 0, state_writes: int = 1,
    intermediate: bool = False, token_index_bytes: int = 0,
) -> int:
    """Bytes one call must move to and from DRAM (see the module docstring).

    `index_bytes` is the size of one state-pool index (4 for int32, 8 for int64; 0 for a dense
    state); `state_writes` the full states written per sequence (1; 0 with disable_state_update;
    T with ssm_state_indices); `intermediate` is intermediate_states_buffer; `token_index_bytes`
    the size of one ssm_state_indices entry (4; 0 without).
    """
    state = B * HV * K * V * state_bytes
    total = state * (1 + state_writes)
    if intermediate:
        total += T * state
    total += 2 * B * T * H * K * io_bytes  # q, k
    total += 2 * B * T * HV * V * io_bytes  # v, o
    total += 2 * B * T * HV * gate_bytes  # a, b
    total += HV * 4 + HV * dt_bias_bytes  # A_log (fp32), dt_bias
    total += B * index_bytes + B * T * token_index_bytes
    return total
