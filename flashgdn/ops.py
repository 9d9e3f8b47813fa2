"""The public functions as torch.library custom ops (namespace "flashgdn"), for torch.compile and
torch.export: a traced call becomes one op in the graph, with the tensors it writes declared, so
the compiler neither breaks the graph nor reorders reads of the state around the write.

Each op takes its function's arguments (mtp's ReplaySSM ones last, cache_replayssm as a bool),
with `output` required: an op may not return a tensor that aliases an input, so it writes the
caller-visible output buffer and returns nothing; while tracing, the public function allocates
that buffer when the caller passes none (as the eager path does) and returns (output, state). A
pretranspose op with a pool gets `state=None`. mtp's `disable_state_update` stays optional: None
(FlashInfer 0.7.2's default) resolves in both implementations, because the one-time warning it
may raise cannot be traced (Dynamo breaks the graph at `warnings.warn`); the fake implementation
runs while tracing, so the warning comes then.

Mutated (`Tensor(x!)`): the state or pool (ssm_state_indices writes go to the pool too), the
output, intermediate_states_buffer and mtp's ReplaySSM windows; the commit's checkpoint_state (it
returns nothing, as FlashInfer's does); the index tensors, accepted_tokens, the commit's windows
and the inputs are only read.
gdn_fused_decode_step's op mutates conv_state, ssm_state and out (its `out` required, as `output`
above); the bf16 workspace it writes between its two launches is flashgdn's own, never an input.
flashgdn.engines' entry points have ops too, each mutating the pool and the output: vLLM's
fused_recurrent_gated_delta_rule and fused_sigmoid_gating_delta_rule_update (initial_state, `o`;
the latter's op named ..._vllm, as its function) and SGLang's
fused_sigmoid_gating_delta_rule_update (initial_state_source, its target verify's
intermediate_states_buffer, `o`; its row table and EAGLE tree only read), whose functions allocate `o`
(as their eager paths do) and return it; both packed decodes share
fused_recurrent_gated_delta_rule_packed_decode (initial_state, `out`), their one difference, the
padding rule, its argument vllm_padding. The arguments that only select modes flashgdn refuses
(is_kda, SGLang's ReplaySSM rings, ...) or that it ignores (cache_steps, num_warps) stay out of the
op: the function refuses them before the op, while tracing too.

The real implementations are the eager bodies, so launching happens in one place; the fake
implementations run the eager structure checks on fake tensors (shapes, strides, dtypes, devices,
self-overlap; not the data pointer's alignment (validation.has_address) or index values, which
need real tensors and run when the compiled graph does), so bad input raises its eager error while
tracing. Eager calls do
not go through these ops (api: only while compiling). Imported by flashgdn; no CuTe import.
"""
from typing import Optional

import torch
from torch import Tensor

from . import api, engines, fused_step, recurrent, replay, sglang
from . import validation as val


@torch.library.custom_op(
    "flashgdn::gated_delta_rule_decode_pretranspose",
    mutates_args=("state", "output", "initial_state", "intermediate_states_buffer"),
)
def decode_pretranspose_op(
    q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor], A_log: Tensor, a: Tensor, dt_bias: Tensor,
    b: Tensor, scale: Optional[float], output: Tensor, use_qk_l2norm: bool, initial_state: Optional[Tensor],
    initial_state_indices: Optional[Tensor], output_state_indices: Optional[Tensor],
    intermediate_states_buffer: Optional[Tensor], disable_state_update: bool, backend: str,
    softplus_beta: float, softplus_threshold: float,
) -> None:
    api._decode_pretranspose(
        q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state, initial_state_indices,
        output_state_indices, intermediate_states_buffer, disable_state_update, backend, softplus_beta,
        softplus_threshold,
    )


@decode_pretranspose_op.register_fake
def _(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, initial_state, initial_state_indices,
      output_state_indices, intermediate_states_buffer, disable_state_update, backend, softplus_beta,
      softplus_threshold):
    val.check_backend(backend)
    api._check_pretranspose(
        q, k, v, state, A_log, a, dt_bias, b, scale, output, initial_state, initial_state_indices,
        output_state_indices, intermediate_states_buffer, disable_state_update, softplus_beta, softplus_threshold,
    )


@torch.library.custom_op("flashgdn::gated_delta_rule_decode", mutates_args=("state", "output"))
def decode_op(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, A_log: Tensor, a: Tensor, dt_bias: Tensor, b: Tensor,
    scale: Optional[float], output: Tensor, use_qk_l2norm: bool, backend: str, softplus_beta: float,
    softplus_threshold: float,
) -> None:
    api._decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
                softplus_threshold)


@decode_op.register_fake
def _(q, k, v, state, A_log, a, dt_bias, b, scale, output, use_qk_l2norm, backend, softplus_beta,
      softplus_threshold):
    val.check_backend(backend)
    api._check_decode(q, k, v, state, A_log, a, dt_bias, b, scale, output, softplus_beta, softplus_threshold)


@torch.library.custom_op(
    "flashgdn::gated_delta_rule_mtp",
    mutates_args=("initial_state", "output", "intermediate_states_buffer", "replayssm_rawv", "replayssm_rawk",
                  "replayssm_g", "replayssm_beta"),
)
def mtp_op(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor, initial_state_indices: Tensor, A_log: Tensor,
    a: Tensor, dt_bias: Tensor, b: Tensor, scale: Optional[float], output: Tensor,
    intermediate_states_buffer: Optional[Tensor], ssm_state_indices: Optional[Tensor],
    disable_state_update: Optional[bool], use_qk_l2norm: bool, output_state_indices: Optional[Tensor],
    accepted_tokens: Optional[Tensor], softplus_beta: float, softplus_threshold: float, cache_replayssm: bool,
    replayssm_rawv: Optional[Tensor], replayssm_rawk: Optional[Tensor], replayssm_g: Optional[Tensor],
    replayssm_beta: Optional[Tensor],
) -> None:
    api._mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
             intermediate_states_buffer, ssm_state_indices, api._mtp_disable_state_update(disable_state_update),
             use_qk_l2norm, output_state_indices, accepted_tokens, softplus_beta, softplus_threshold,
             cache_replayssm, replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta)


@mtp_op.register_fake
def _(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
      intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
      accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm, replayssm_rawv, replayssm_rawk,
      replayssm_g, replayssm_beta):
    api._check_mtp(q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
                   intermediate_states_buffer, ssm_state_indices, api._mtp_disable_state_update(disable_state_update),
                   output_state_indices, accepted_tokens, softplus_beta, softplus_threshold, cache_replayssm,
                   replayssm_rawv, replayssm_rawk, replayssm_g, replayssm_beta)


@torch.library.custom_op("flashgdn::gated_delta_rule_replayssm_commit", mutates_args=("checkpoint_state",))
def replayssm_commit_op(
    checkpoint_state: Tensor, rawv_cache: Tensor, rawk_cache: Tensor, g_cache: Tensor, beta_cache: Tensor,
    state_indices: Tensor, accept_lens: Tensor, track_state_indices: Optional[Tensor], track_steps: Optional[Tensor],
    use_qk_l2norm: bool, null_block_id: int, backend: str,
) -> None:
    replay._replayssm_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices,
                             accept_lens, track_state_indices, track_steps, use_qk_l2norm, null_block_id, backend)


@replayssm_commit_op.register_fake
def _(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
      track_state_indices, track_steps, use_qk_l2norm, null_block_id, backend):
    replay._check_commit_backend(backend)
    replay._check_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                         track_state_indices, track_steps, null_block_id)


@torch.library.custom_op("flashgdn::gdn_fused_decode_step", mutates_args=("conv_state", "ssm_state", "out"))
def fused_decode_step_op(
    hidden_states: Tensor, w_ba: Tensor, mixed_qkv: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
    conv_state: Tensor, A_log: Tensor, dt_bias: Tensor, scale: Optional[float], ssm_state: Tensor,
    state_indices: Tensor, use_qk_l2norm: bool, out: Tensor,
) -> None:
    fused_step._fused_step(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias,
                           scale, ssm_state, state_indices, use_qk_l2norm, out)


@fused_decode_step_op.register_fake
def _(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale, ssm_state,
      state_indices, use_qk_l2norm, out):
    fused_step._check(hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
                      ssm_state, state_indices, out)


@torch.library.custom_op("flashgdn::fused_recurrent_gated_delta_rule", mutates_args=("initial_state", "o"))
def fused_recurrent_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: Optional[float], initial_state: Tensor,
    cu_seqlens: Optional[Tensor], ssm_state_indices: Tensor, num_accepted_tokens: Optional[Tensor],
    use_qk_l2norm_in_kernel: bool, o: Tensor,
) -> None:
    recurrent._recurrent(q, k, v, g, beta, *recurrent.PRECOMPUTED, scale, initial_state, cu_seqlens,
                         ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, o)


@fused_recurrent_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, ssm_state_indices, num_accepted_tokens,
      use_qk_l2norm_in_kernel, o):
    recurrent._check(q, k, v, g, beta, *recurrent.PRECOMPUTED, scale, initial_state, cu_seqlens, ssm_state_indices,
                     num_accepted_tokens)


@torch.library.custom_op("flashgdn::fused_sigmoid_gating_delta_rule_update_vllm", mutates_args=("initial_state", "o"))
def sigmoid_update_vllm_op(
    A_log: Tensor, a: Tensor, b: Tensor, dt_bias: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: float,
    threshold: float, scale: Optional[float], initial_state: Tensor, cu_seqlens: Optional[Tensor],
    ssm_state_indices: Tensor, num_accepted_tokens: Optional[Tensor], use_qk_l2norm_in_kernel: bool, o: Tensor,
) -> None:
    recurrent._recurrent(q, k, v, a, b, A_log, dt_bias, beta, threshold, scale, initial_state, cu_seqlens,
                         ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, o)


@sigmoid_update_vllm_op.register_fake
def _(A_log, a, b, dt_bias, q, k, v, beta, threshold, scale, initial_state, cu_seqlens, ssm_state_indices,
      num_accepted_tokens, use_qk_l2norm_in_kernel, o):
    recurrent._check(q, k, v, a, b, A_log, dt_bias, beta, threshold, scale, initial_state, cu_seqlens,
                     ssm_state_indices, num_accepted_tokens)


@torch.library.custom_op(
    "flashgdn::fused_recurrent_gated_delta_rule_packed_decode", mutates_args=("initial_state", "out"),
)
def packed_decode_op(
    mixed_qkv: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, scale: Optional[float],
    initial_state: Tensor, out: Tensor, ssm_state_indices: Tensor, use_qk_l2norm_in_kernel: bool, vllm_padding: bool,
) -> None:
    engines._packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                           use_qk_l2norm_in_kernel, vllm_padding)


@packed_decode_op.register_fake
def _(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices, use_qk_l2norm_in_kernel,
      vllm_padding):
    engines._check_packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                                 vllm_padding)


@torch.library.custom_op(
    "flashgdn::fused_sigmoid_gating_delta_rule_update",
    mutates_args=("initial_state_source", "intermediate_states_buffer", "o"),
)
def sigmoid_update_op(
    A_log: Tensor, a: Tensor, dt_bias: Tensor, softplus_beta: float, softplus_threshold: float, q: Tensor,
    k: Tensor, v: Tensor, b: Tensor, initial_state_source: Tensor, initial_state_indices: Tensor,
    scale: Optional[float], use_qk_l2norm_in_kernel: bool, cu_seqlens: Optional[Tensor], disable_state_update: bool,
    intermediate_states_buffer: Optional[Tensor], intermediate_state_indices: Optional[Tensor],
    retrieve_parent_token: Optional[Tensor], o: Tensor,
) -> None:
    sglang.check_output(o, v)
    sglang.update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                  initial_state_indices, scale, use_qk_l2norm_in_kernel, cu_seqlens, disable_state_update,
                  intermediate_states_buffer, intermediate_state_indices, retrieve_parent_token, o)


@sigmoid_update_op.register_fake
def _(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source, initial_state_indices,
      scale, use_qk_l2norm_in_kernel, cu_seqlens, disable_state_update, intermediate_states_buffer,
      intermediate_state_indices, retrieve_parent_token, o):
    sglang._check_call(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source,
                       initial_state_indices, scale, cu_seqlens, disable_state_update, intermediate_states_buffer,
                       intermediate_state_indices, retrieve_parent_token, o)
