"""The repeated-call path in C++ (FLASHGDN_HOST=1): csrc/host.cpp, built on first use.

Python's fast path (flashgdn.fastpath) still costs about 2 µs per call of key building, lookup and
calls on top of the compiled function (RESULTS.md "Host time per call"). With FLASHGDN_HOST=1 a call
site first hands all of its arguments to csrc/host.cpp, which looks their whole signature up (every
fact of the fast key and more: per tensor its dtype, device, sizes and strides), allocates the output
and calls the compiled function that a call of that signature ran; a miss returns None and the call
goes the Python way, which then remembers its function here (`remember`). The extension is built
with torch.utils.cpp_extension (a C++ compiler and ninja; its build directory is torch's extension
cache) the first time a call needs it; where the build fails, the Python way serves every call.

Served: flashgdn.api's FlashInfer functions (pretranspose, K-major decode, MTP) and the engines' entry
points (flashgdn.engines) in the forms whose tensors go to the kernel as the engine passes them: both
packed decodes, vLLM's two recurrent ops, SGLang's update in its own varlen layout (its row views go
the Python way) and the fused step outside its "gemm" regime (an entry keeps the workspace rows of the
stream it was learnt on: another stream misses, and the Python way learns it anew). Off by default:
the first build takes 15-60 s. Each public function calls EXT.call itself, right after its tracing
check (or with it): a Python helper in between cost about 0.2 µs per call on the CPU, a fifth of the
whole path. A refusal by the compiled
function's own checks (fastpath.REFUSED) is a miss, so the call site needs no try.

An entry keeps up to two outputs it allocated (SPARE_BYTES over all entries) and hands one out again
when nothing but the entry holds it any more (no other reference, weak reference, view or change of
its shape, strides, dtype or autograd state), on the CPU or on the device's default stream only: no
CUDA graph is captured there, and stream order puts the reuse after every earlier use of the memory,
as the caching allocator's reuse of a freed block does. An allocation and its free cost about 2 µs of
a call's host time on an H100 host (RESULTS.md "Host time per call").
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

from .spec import KernelArgs, StepArgs
from .validation import MEMO_MAX

ENABLED = os.environ.get("FLASHGDN_HOST", "0") not in ("", "0")

# The call sites: one table each.
PRETRANSPOSE, DECODE, MTP, PACKED, PACKED_VLLM, RECURRENT, SIGMOID_VLLM, SGLANG, FUSED_STEP = range(9)
OUTPUT, NONE = -2, -1  # in a launch or return template: the output, None
SPARE_BYTES = 64 << 20  # bytes of spare outputs the C++ path keeps over all entries


def const(j: int) -> int:
    """In a launch template or as `like`: the entry's constant j (remember's `consts`)."""
    return -3 - j


def launch(fields: Sequence[str] = KernelArgs._fields, **where: int) -> tuple:
    """A launch template: per field of the compiled function's arguments (KernelArgs' by default), in
    their order, the index of the call argument that `where` names for it (into the arguments the
    public function hands to EXT.call, in its own parameter order), OUTPUT, a const(j), or NONE for a
    field it does not name."""
    unknown = set(where) - set(fields)
    if unknown:
        raise ValueError(f"not fields of the launch: {sorted(unknown)}")
    return tuple(where.get(field, NONE) for field in fields)


# Each site's launch templates (the Python fast path's launch, argument for argument). A pretranspose
# call's pool is `state` (3) or `initial_state` (11): keyed by `initial_state is None`.
PRETRANSPOSE_LAUNCH = {dense: launch(q=0, k=1, v=2, a=5, b=7, A_log=4, dt_bias=6, state=3 if dense else 11,
                                     state_indices=12, output_state_indices=13, intermediate_states=14, output=OUTPUT)
                       for dense in (True, False)}
DECODE_LAUNCH = launch(q=0, k=1, v=2, a=5, b=7, A_log=4, dt_bias=6, state=3, output=OUTPUT)
MTP_LAUNCH = launch(q=0, k=1, v=2, a=6, b=8, A_log=5, dt_bias=7, state=3, state_indices=4, output_state_indices=15,
                    accepted_tokens=16, intermediate_states=11, output=OUTPUT, token_state_indices=12, replay_v=20,
                    replay_k=21, replay_g=22, replay_beta=23)
# The packed decodes (mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices, ...):
# mixed_qkv goes as q (KernelSpec.row_form "packed"), vLLM's slots as token slots (engines._slot_args).
PACKED_LAUNCH = {vllm: launch(q=0, a=1, b=2, A_log=3, dt_bias=4, state=6, output=OUTPUT,
                              **{"token_state_indices" if vllm else "state_indices": 8}) for vllm in (False, True)}
# vLLM's recurrent op (q, k, v, g, beta, scale, initial_state, inplace_final_state, cu_seqlens,
# ssm_state_indices, num_accepted_tokens, ...): g and beta go as a and b (KernelSpec.precomputed_gates).
RECURRENT_LAUNCH = launch(q=0, k=1, v=2, a=3, b=4, state=6, accepted_tokens=10, output=OUTPUT, token_state_indices=9,
                          cu_seqlens=8)
# vLLM's sigmoid-gating op (A_log, a, b, dt_bias, q, k, v, beta, threshold, scale, initial_state,
# inplace_final_state, cu_seqlens, ssm_state_indices, num_accepted_tokens, ...).
SIGMOID_VLLM_LAUNCH = launch(q=4, k=5, v=6, a=1, b=2, A_log=0, dt_bias=3, state=10, accepted_tokens=14,
                             output=OUTPUT, token_state_indices=13, cu_seqlens=12)
# SGLang's update in its own varlen layout (sglang._flat; its row views go the Python way): (A_log, a,
# dt_bias, softplus_beta, softplus_threshold, q, k, v, b, initial_state_source, initial_state_indices,
# scale, use_qk_l2norm_in_kernel, cu_seqlens, is_kda, lower_bound, disable_state_update,
# intermediate_states_buffer, intermediate_state_indices, cache_steps, retrieve_parent_token, ...); the
# row table and the tree go only with a buffer (sglang._verify), keyed by `buffer is None`.
SGLANG_LAUNCH = {bare: launch(q=5, k=6, v=7, a=1, b=8, A_log=0, dt_bias=2, state=9, state_indices=10,
                              intermediate_states=17, output=OUTPUT,
                              **({} if bare else dict(intermediate_indices=18, parent_tokens=20)))
                 for bare in (True, False)}
# The fused step (hidden_states, w_ba, mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, scale,
# ssm_state, state_indices, use_qk_l2norm, out): its one compiled function (StepArgs) on the workspace rows of
# the stream current when it was learnt (constants 0 and 1: qkv and ba; 2: a tensor of the output's shape);
# another stream misses (fused_step._workspace is per stream).
FUSED_STEP_LAUNCH = launch(StepArgs._fields, hidden_states=0, w_ba=1, mixed_qkv=2, conv_weight=3, conv_bias=4,
                           conv_state=5, state_indices=10, qkv_out=const(0), ba_out=const(1), A_log=6, dt_bias=7,
                           ssm_state=9, output=OUTPUT, sync=const(3))

# The built extension: set by the first `remember` (a call that ran the Python way); the call sites
# try it first while it is set.
EXT: Any = None
_built: Any = None  # the extension once built, whether or not EXT is set
_failed = False


def extension() -> Optional[Any]:
    """The built extension, or None while FLASHGDN_HOST is off or where it does not build (warned once)."""
    global EXT, _built, _failed
    if EXT is None and ENABLED and not _failed:
        try:
            from torch.utils.cpp_extension import load

            source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "host.cpp")
            if _built is None:
                _built = load("flashgdn_host", [source], extra_cflags=["-O2"], verbose=False)
                _built.set_max_entries(MEMO_MAX)  # each site's table bounded as fastpath.FAST is
                _built.set_max_spare_bytes(SPARE_BYTES)
                from .fastpath import REFUSED  # fastpath imports this module

                _built.set_refused(REFUSED)
            EXT = _built
        except Exception as exc:  # no compiler or ninja: the Python way serves every call
            _failed = True
            warnings.warn(f"flashgdn: FLASHGDN_HOST=1 but its extension does not build ({exc}); "
                          "the Python fast path serves every call", RuntimeWarning, stacklevel=2)
    return EXT


def remember(site: int, fn, launch: Sequence[int], ret: Sequence[int], output: int, like: int, *args,
             consts: Sequence[Any] = (), stream_of: int = NONE) -> None:
    """Later calls at `site` with the signature of `args` run `fn` with the launch arguments `launch`
    (indices into `args`, NONE, OUTPUT, const(j) for consts[j]) and return `ret` (a tuple, or its one
    element), where `stream_of` is NONE or the stream current on the device of args[stream_of] is the
    one current now (an entry that keeps a stream's workspace); the output is
    args[output], or when that is None (or `output` is NONE) a new contiguous tensor of args[like]'s
    shape, dtype and device: fastpath.output's tensor, but for the stride of a size-1 dim (which
    empty_like may take from `like`, and no kernel steps)."""
    ext = extension()
    if ext is not None:
        ext.remember(site, fn, launch, ret, output, like, consts, stream_of, *args)


def forget() -> None:
    """Drop every entry (with fastpath.FAST: a table switch, the memo's bound), also of an extension
    built but not in use (EXT None)."""
    if _built is not None:
        _built.forget()
