"""Argument checks run before any kernel touches memory.

Each failure raises TypeError (wrong type or dtype) or ValueError (shape, stride, alignment,
device, value) naming the argument, what was expected and what came. Nothing here reads tensor
values on the GPU (no host sync), except `check_index_values` and `check_distinct_slots`, which
the API runs only when FLASHGDN_CHECK_INDICES=1 (debugging); without it the kernels themselves
turn an out-of-range slot or accepted count into a NaN output row and leave the state untouched,
and two rows writing one slot race.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import spec
from .spec import SUPPORTED_HEAD_DIMS


def _torch_dtypes(names):
    return tuple(getattr(torch, n) for n in names)


# The dtypes of spec.py as torch dtypes.
IO_DTYPES = _torch_dtypes(spec.IO_DTYPES)
STATE_DTYPES = _torch_dtypes(spec.STATE_DTYPES)
DT_BIAS_DTYPES = _torch_dtypes(spec.DT_BIAS_DTYPES)
INDEX_DTYPES = _torch_dtypes(spec.INDEX_DTYPES)
OUT_DTYPES = _torch_dtypes(spec.OUT_DTYPES)
# `backend` values the API takes: "auto", flashgdn's own name, and FlashInfer's name for its
# generic kernels (code written for FlashInfer may pass it); all run flashgdn's kernels.
BACKENDS = ("auto", "flashgdn", "flashinfer")
ALIGN = spec.VEC_BYTES  # kernels use 16-byte vector accesses


@dataclasses.dataclass(frozen=True)
class Problem:
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int


def dtype_name(dt: Optional[torch.dtype]) -> Optional[str]:
    """"bfloat16" for torch.bfloat16 (None stays None): messages and KernelSpec use these names."""
    return None if dt is None else str(dt).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(dtype_name(d) for d in dtypes)


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype], shape: Sequence[Optional[int]]) -> None:
    """Type, dtype and shape (None entries are free) of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {dtype_name(t.dtype)}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def _unpacked_dim(t, inner: int):
    """(dim, expected stride) of the innermost of the last `inner` dims that is not packed
    row-major, or None."""
    expect = 1
    for d in range(t.dim() - 1, t.dim() - 1 - inner, -1):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return d, expect
        expect *= t.shape[d]
    return None


def has_address(t: torch.Tensor) -> bool:
    """Whether `t`'s data pointer can be read. A fake tensor (an op's fake implementation) and a
    tensor Dynamo traces have none: the address checks run on the real tensors when the compiled
    graph runs."""
    return not (isinstance(t, FakeTensor) or torch.compiler.is_dynamo_compiling())


def check_inner_contiguous(name: str, t: torch.Tensor, inner: int, align_leading: bool) -> None:
    """The last `inner` dims are packed row-major; with `align_leading`, every other stride keeps
    16-byte alignment and the data pointer is 16-byte aligned (strided views are fine)."""
    bad = _unpacked_dim(t, inner)
    if bad is not None:
        dims = "last dim" if inner == 1 else f"last {inner} dims"
        raise ValueError(
            f"{name} must have its {dims} contiguous (expected stride {bad[1]} at dim {bad[0]}), "
            f"got strides {list(t.stride())}"
        )
    if align_leading:
        elems = ALIGN // t.element_size()
        for d in range(t.dim() - inner):
            if t.shape[d] != 1 and t.stride(d) % elems:
                raise ValueError(
                    f"{name} stride {t.stride(d)} at dim {d} must be a multiple of {elems} elements "
                    f"({ALIGN} bytes), got strides {list(t.stride())}"
                )
        if has_address(t) and t.data_ptr() % ALIGN:
            raise ValueError(f"{name} data pointer must be {ALIGN}-byte aligned (got address % {ALIGN} = {t.data_ptr() % ALIGN})")


def check_devices(named: dict) -> torch.device:
    """All given tensors on one CUDA device."""
    device = None
    for name, t in named.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other arguments are on {device}")
    return device


def check_heads(H: int, HV: int, K: int, V: int) -> None:
    """The heads and head sizes that q [.., H, K] and v [.., HV, V] carry."""
    if H < 1 or HV < 1 or HV % H:
        raise ValueError(f"v.shape[2] (HV={HV}) must be a positive multiple of q.shape[2] (H={H})")
    for nm, d in (("q.shape[3] (K)", K), ("v.shape[3] (V)", V)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{nm} must be one of {SUPPORTED_HEAD_DIMS}, got {d}")


def check_inputs(q, k, v, a, b, A_log, dt_bias, max_tokens: int) -> Problem:
    """q, k [B, T, H, K]; v [B, T, HV, V]; a, b [B, T, HV]; A_log, dt_bias [HV]."""
    check_tensor("q", q, IO_DTYPES, (None,) * 4)
    B, T, H, K = q.shape
    check_tensor("k", k, (q.dtype,), (B, T, H, K))
    check_tensor("v", v, (q.dtype,), (B, T, None, None))
    HV, V = v.shape[2], v.shape[3]
    if not 1 <= T <= max_tokens:
        raise ValueError(f"q.shape[1] (tokens per sequence T) must be in [1, {max_tokens}] here, got {T}")
    check_heads(H, HV, K, V)
    check_tensor("a", a, (q.dtype, torch.float32), (B, T, HV))
    check_tensor("b", b, (a.dtype,), (B, T, HV))
    check_tensor("A_log", A_log, (torch.float32,), (HV,))
    check_tensor("dt_bias", dt_bias, DT_BIAS_DTYPES, (HV,))
    for nm, t in (("q", q), ("k", k), ("v", v)):
        check_inner_contiguous(nm, t, 1, align_leading=True)
    for nm, t, n in (("a", a, 1), ("b", b, 1), ("A_log", A_log, 1), ("dt_bias", dt_bias, 1)):
        check_inner_contiguous(nm, t, n, align_leading=False)
    return Problem(B, T, H, HV, K, V)


def unit_dims_packed(shape: Sequence[int], stride: Sequence[int]) -> tuple:
    """`stride` with each size-1 dim given the packed stride of the dims inside it. A size-1 dim's
    stride is never stepped (validation skips it) and the caller's can be anything, but the
    compiled kernels declare q/k/v strides multiples of 16 bytes: the packed one is such a multiple."""
    stride, inner = list(stride), 1
    for d in range(len(shape) - 1, -1, -1):
        if shape[d] == 1:
            stride[d] = inner
        inner *= shape[d]
    return tuple(stride)


def packed(t, inner: int) -> bool:
    """Whether the last `inner` dims of `t` are packed row-major (size-1 dims aside)."""
    return _unpacked_dim(t, inner) is None


def check_state(name: str, t, leading: Sequence[Optional[int]], p: Problem, layout: str, dtype=None,
                written: bool = True, inner: int = 1) -> None:
    """A state tensor [*leading, HV, V, K] ("klast") or [*leading, HV, K, V] ("kmajor"): the last
    `inner` dims packed (1: any padded head and row strides, multiples of 16 bytes); one the kernel
    writes must not overlap itself."""
    rows, cols = (p.V, p.K) if layout == "klast" else (p.K, p.V)
    check_tensor(name, t, (dtype,) if dtype is not None else STATE_DTYPES, (*leading, p.HV, rows, cols))
    check_inner_contiguous(name, t, inner, align_leading=True)
    if t.shape[0] == 0 and p.B > 0:
        raise ValueError(f"{name} has no slots (shape {tuple(t.shape)}); a pool needs at least one slot")
    if written:
        check_no_overlap(name, t)


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two indices of `t` share an address. torch decides packed layouts and zero strides;
    for the strided views it finds too hard, one rule that never errs: merge adjacent dims packed
    into each other (a packed block becomes one dim of stride 1); if one dim's stride is m times
    another's, 0 <= m < that other dim's size, then one step along the first lands where m steps
    along the other do. This decides a packed block under one strided dim (a pool with any slot
    stride) exactly; a layout the rule does not settle is accepted."""
    verdict = torch._debug_has_internal_overlap(t)  # 0: no overlap, 1: overlap, 2: too hard
    if verdict != 2:
        return verdict == 1
    dims = []  # (size, stride), outermost first, size-1 dims dropped, adjacent packed dims merged
    for size, stride in zip(t.shape, t.stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return any(
        sd == 0 or (e != d and se % sd == 0 and se // sd < nd)
        for e, (_, se) in enumerate(dims) for d, (nd, sd) in enumerate(dims)
    )


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """A tensor the kernel writes must not overlap itself (e.g. an expand() view, or a stride
    smaller than the block it steps over): two CTAs would write one address."""
    if t.numel() and _overlaps_itself(t):
        raise ValueError(
            f"{name} must not overlap itself (it is written: no expand() views, zero strides or strides "
            f"smaller than the block they step over), got shape {list(t.shape)} strides {list(t.stride())}"
        )


def check_indices(name: str, t, p: Problem) -> None:
    check_tensor(name, t, INDEX_DTYPES, (p.B,))
    check_inner_contiguous(name, t, 1, align_leading=False)


def check_output_indices(t, initial_state_indices: torch.Tensor, p: Problem) -> None:
    """Optional output_state_indices [B], of the dtype of initial_state_indices (the kernel is
    compiled for one index type)."""
    if t is None:
        return
    check_indices("output_state_indices", t, p)
    if t.dtype != initial_state_indices.dtype:
        raise TypeError(
            f"output_state_indices must have the dtype of initial_state_indices "
            f"({dtype_name(initial_state_indices.dtype)}), got {dtype_name(t.dtype)}"
        )


def check_output(output, p: Problem) -> None:
    """output [B, T, HV, V], any of OUT_DTYPES (the kernels convert in their store)."""
    if output is not None:
        check_tensor("output", output, OUT_DTYPES, (p.B, p.T, p.HV, p.V))
        check_inner_contiguous("output", output, 1, align_leading=False)
        check_no_overlap("output", output)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_token_slots(t, p: Problem) -> None:
    """ssm_state_indices [B, T] int32: the pool slot of the state after each token."""
    check_tensor("ssm_state_indices", t, (torch.int32,), (p.B, p.T))
    check_inner_contiguous("ssm_state_indices", t, 1, align_leading=False)
    if p.T < 2:
        raise ValueError(f"ssm_state_indices needs T >= 2 tokens per sequence, got T={p.T}")


# Bound of a memo of remembered: programs may cycle through many shapes; clearing all on overflow
# is cheap (one re-check per signature) and rare (serving uses a handful of signatures).
MEMO_MAX = 1024


def remembered(memo: dict, check, args: tuple, options: tuple = (), make=None):
    """check(*args) (or make(check(*args))), remembered in `memo` per call signature. The key is
    what a check reads of an argument: a tensor's shape, strides (self-overlap too is a function of
    these two), dtype, device and 16-byte alignment; any other value with its type (True and 1
    are different arguments). `options` join the key but are not passed to the check. A result
    is never None. Inline, not a helper per argument: this runs on every call."""
    key = (check, *[
        (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16) if isinstance(x, torch.Tensor) else (type(x), x)
        for x in (*args, *options)
    ])
    try:
        hit = memo.get(key)
    except TypeError:  # an unhashable argument: check every time (and report it, if invalid)
        hit = None
        key = None
    if hit is None:
        hit = check(*args)
        if make is not None:
            hit = make(hit)
        if key is not None:
            if len(memo) >= MEMO_MAX:
                memo.clear()
            memo[key] = hit
    return hit


_CHECKED: dict = {}  # (check, call signature) -> what the check returned (checked)


def checked(check, *args):
    """check(*args), remembered per call signature (remembered): the engine entry points' own
    checks. While torch.compile traces, tensors have no address: the check runs every time."""
    if torch.compiler.is_compiling():
        return check(*args)
    return remembered(_CHECKED, check, args)


def stride1_indices(slots: torch.Tensor) -> torch.Tensor:
    """An engine's slot indices [N] with stride 1, as flashgdn's pretranspose checks (and the
    kernels of flashgdn's own functions) take them. The engines' kernels take a strided index
    vector (vLLM's eager path passes a column of its block table): N > 1 integers are copied (one
    small kernel); one index is viewed with stride 1 (never stepped)."""
    if slots.stride(0) == 1:
        return slots
    if slots.shape[0] <= 1:
        return slots.as_strided(slots.shape, (1,), slots.storage_offset())
    return slots.contiguous()


def packed_heads(width: int, HV: int, V: int, K: int) -> int:
    """H of a packed q | k | v row of `width` channels (2 H K + HV V), or 0 where the width does
    not split into H >= 1 heads that divide HV."""
    qk = width - HV * V
    H = qk // (2 * K) if qk > 0 and qk % (2 * K) == 0 else 0
    return H if H >= 1 and HV % H == 0 else 0


def _check_finite(name: str, x, expected: str) -> None:
    """A finite int or float (bool excluded: True is no number here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__}")
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")


def check_flags(**flags) -> None:
    """Each flag a bool (or an int, taken by its truth, as Python's `if` would): a tensor would
    decide the compiled variant by its value (a host sync), and the call signature memo and the
    fast keys see a tensor by its layout or identity, not its value."""
    for name, value in flags.items():
        if not isinstance(value, int):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_scale(scale) -> None:
    if scale is not None:
        _check_finite("scale", scale, "a float or None")


def check_softplus(softplus_beta, softplus_threshold, names=("softplus_beta", "softplus_threshold")) -> None:
    """softplus(x) = log(1 + exp(beta x)) / beta, linear where beta x > threshold (torch's
    definition): beta divides and sets the slope, so it must be positive; torch takes any
    finite threshold. `names`: the two arguments' names in the caller's signature."""
    _check_finite(names[0], softplus_beta, "a float")
    if softplus_beta <= 0:
        raise ValueError(f"{names[0]} must be > 0, got {softplus_beta}")
    _check_finite(names[1], softplus_threshold, "a float")


def check_index_values(name: str, idx: torch.Tensor, upper: int, allow_negative: bool) -> None:
    """Value range of an index tensor (syncs with the GPU: debugging only)."""
    vals = idx[idx >= 0] if allow_negative else idx
    if vals.numel() and (int(vals.max()) >= upper or int(vals.min()) < 0):
        raise ValueError(
            f"{name} values must be in [0, {upper}){' or negative (padding)' if allow_negative else ''}, "
            f"got min {int(vals.min())}, max {int(vals.max())}"
        )


def check_distinct_slots(name: str, slots: torch.Tensor, read: torch.Tensor) -> None:
    """No pool slot written by two rows (syncs with the GPU: debugging only). Row i writes
    slots[i] unless it is padding (slots[i] or its read index read[i] negative)."""
    written = slots[(slots >= 0) & (read >= 0)]
    values, counts = torch.unique(written, return_counts=True)
    repeated = counts > 1
    if repeated.any():
        raise ValueError(
            f"{name} must not repeat a written slot (rows writing one slot race), "
            f"got slot {int(values[repeated][0])} in {int(counts[repeated][0])} rows"
        )


def check_launch_indices(p: Problem, args: spec.KernelArgs, update_state: bool) -> None:
    """FLASHGDN_CHECK_INDICES=1 (flashgdn.api.CHECK_INDICES): the index values of a launch's tensors in
    range and no slot written twice (a host sync)."""
    pool_size = args.state.shape[0]
    # The write index is used only where the state is stored (resolve_slots)
    for name, t in (("initial_state_indices", args.state_indices),
                    ("output_state_indices", args.output_state_indices if update_state else None),
                    ("ssm_state_indices", args.token_state_indices)):
        if t is not None:
            check_index_values(name, t, pool_size, allow_negative=True)
    if args.intermediate_indices is not None:  # SGLang's row table: each running row writes its own buffer row
        read = args.state_indices
        rows = torch.where(read >= 0, args.intermediate_indices[:p.B], -1)
        check_index_values("intermediate_state_indices", rows, args.intermediate_states.shape[0], allow_negative=True)
        check_distinct_slots("intermediate_state_indices", rows, read)
        if args.parent_tokens is not None:  # token t >= 1 from an earlier token's state
            parents = args.parent_tokens[:p.B, 1:].long()
            earlier = torch.arange(1, p.T, device=parents.device)
            wrong = ((parents < 0) | (parents >= earlier)) & (rows >= 0)[:, None] & (read >= 0)[:, None]
            if wrong.any():
                i, t = (int(x) for x in wrong.nonzero()[0])
                raise ValueError(f"retrieve_parent_token[{i}, {t + 1}] must be an earlier token of its sequence "
                                 f"(in [0, {t + 1})), got {int(args.parent_tokens[i, t + 1])}")
    vllm_slots = args.state_indices is None and args.token_state_indices is not None  # flashgdn.recurrent
    if args.accepted_tokens is not None:
        if vllm_slots:  # the count picks the slot read: 1..T
            check_index_values("num_accepted_tokens - 1", args.accepted_tokens - 1, p.T, allow_negative=False)
        else:
            check_index_values("accepted_tokens", args.accepted_tokens, p.T + 1, allow_negative=False)
    if vllm_slots:  # the engine's slot layout: padding rows (slot <= 0) may share slots
        slots = args.token_state_indices
        if slots.dim() == 1:  # packed rows' [B]: one token
            slots = slots[:, None]
        if update_state and slots.shape[1] == 1:  # one token: a row writes the slot it reads
            live = torch.where(slots[:, 0] > 0, slots[:, 0], -1)
            check_distinct_slots("ssm_state_indices", live, live)
        return
    if args.token_state_indices is not None:  # every (row, token) writes its own slot
        rows = args.state_indices[:, None].expand_as(args.token_state_indices)
        check_distinct_slots("ssm_state_indices", args.token_state_indices.flatten(), rows.flatten())
    elif args.replay_v is not None:  # the windows of a slot are written by one row
        check_distinct_slots("initial_state_indices", args.state_indices, args.state_indices)
    elif update_state and args.state_indices is not None:  # a pool: rows must not write one slot
        if args.output_state_indices is None:
            check_distinct_slots("initial_state_indices", args.state_indices, args.state_indices)
        else:
            check_distinct_slots("output_state_indices", args.output_state_indices, args.state_indices)


# ----------------------------------------------------------------------------- ReplaySSM
WINDOW_DTYPES = {"rawv": torch.bfloat16, "rawk": torch.bfloat16, "g": torch.float32, "beta": torch.float32}


def check_window(name: str, t, leading: Sequence[int], inner: Sequence[int], dtype: torch.dtype,
                 written: bool) -> None:
    """A ReplaySSM window [*leading, *inner] of `dtype`: the inner dims packed, the leading dims'
    strides free (multiples of 16 bytes and a 16-byte aligned start for the bf16 windows, which
    the kernels access in vectors); one the kernel writes must not overlap itself."""
    check_tensor(name, t, (dtype,), (*leading, *inner))
    check_inner_contiguous(name, t, len(inner), align_leading=dtype == torch.bfloat16)
    if written:
        check_no_overlap(name, t)


def check_replay_verify(p: Problem, pool_size: int, buffers: dict, disable_state_update: bool,
                        intermediate_states_buffer, ssm_state_indices) -> None:
    """gated_delta_rule_mtp(cache_replayssm=True): FlashInfer's rules (a frozen checkpoint, no
    intermediate buffer or per-token slots, all four windows) and the windows' shapes
    (`buffers`: replayssm_rawv [P, HV, T, V], replayssm_rawk [P, H, T, K] bf16, replayssm_g and
    replayssm_beta [P, HV, T] fp32, P the pool size)."""
    if not disable_state_update:
        raise ValueError("cache_replayssm=True verifies against a frozen checkpoint: it needs "
                         "disable_state_update=True (gated_delta_rule_replayssm_commit commits the accepted tokens)")
    if intermediate_states_buffer is not None:
        raise ValueError("cache_replayssm=True replaces the intermediate states: it cannot go with "
                         "intermediate_states_buffer")
    if ssm_state_indices is not None:
        raise ValueError("cache_replayssm=True cannot go with ssm_state_indices (per-token state slots)")
    missing = [name for name, t in buffers.items() if t is None]
    if missing:
        raise ValueError(f"cache_replayssm=True needs replayssm_rawv, replayssm_rawk, replayssm_g and "
                         f"replayssm_beta; missing {', '.join(missing)}")
    if p.T < 2:
        raise ValueError(f"cache_replayssm=True needs T >= 2 tokens per sequence, got T={p.T}")
    shapes = {"replayssm_rawv": ((p.HV, p.T, p.V), "rawv"), "replayssm_rawk": ((p.H, p.T, p.K), "rawk"),
              "replayssm_g": ((p.HV, p.T), "g"), "replayssm_beta": ((p.HV, p.T), "beta")}
    for name, (inner, kind) in shapes.items():
        check_window(name, buffers[name], (pool_size,), inner, WINDOW_DTYPES[kind], written=True)


@dataclasses.dataclass(frozen=True)
class CommitProblem:
    L: int  # layers
    P: int  # slots per layer
    B: int
    H: int
    HV: int
    K: int
    V: int
    T: int  # tokens of a window


def check_commit(checkpoint_state, rawv_cache, rawk_cache, g_cache, beta_cache, state_indices, accept_lens,
                 track_state_indices, track_steps, null_block_id) -> CommitProblem:
    """gated_delta_rule_replayssm_commit's tensors: checkpoint_state [L, P, HV, V, K] (fp32 or
    bf16, its last three dims packed), the windows [L, P, ...] of check_window, state_indices,
    accept_lens and the optional pair track_state_indices, track_steps [B] (int32)."""
    check_tensor("checkpoint_state", checkpoint_state, STATE_DTYPES, (None,) * 5)
    L, P, HV, V, K = checkpoint_state.shape
    for nm, d in (("checkpoint_state.shape[4] (K)", K), ("checkpoint_state.shape[3] (V)", V)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{nm} must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if L < 1 or P < 1 or HV < 1:
        raise ValueError(f"checkpoint_state must have at least one layer, slot and value head, got shape "
                         f"{list(checkpoint_state.shape)}")
    check_inner_contiguous("checkpoint_state", checkpoint_state, 3, align_leading=True)
    check_no_overlap("checkpoint_state", checkpoint_state)
    check_tensor("rawk_cache", rawk_cache, (torch.bfloat16,), (L, P, None, None, K))
    H, T = rawk_cache.shape[2], rawk_cache.shape[3]
    if H < 1 or HV % H:
        raise ValueError(f"checkpoint_state.shape[2] (HV={HV}) must be a positive multiple of rawk_cache.shape[2] "
                         f"(H={H})")
    if not 1 <= T <= spec.MAX_TOKENS:
        raise ValueError(f"rawk_cache.shape[3] (tokens of a window T) must be in [1, {spec.MAX_TOKENS}], got {T}")
    for name, t, inner, kind in (("rawv_cache", rawv_cache, (HV, T, V), "rawv"),
                                 ("rawk_cache", rawk_cache, (H, T, K), "rawk"),
                                 ("g_cache", g_cache, (HV, T), "g"), ("beta_cache", beta_cache, (HV, T), "beta")):
        check_window(name, t, (L, P), inner, WINDOW_DTYPES[kind], written=False)
    check_tensor("state_indices", state_indices, (torch.int32,), (None,))
    B = state_indices.shape[0]
    pairs = [("state_indices", state_indices), ("accept_lens", accept_lens)]
    if (track_state_indices is None) != (track_steps is None):
        raise ValueError("track_state_indices and track_steps go together: pass both or neither")
    if track_state_indices is not None:
        pairs += [("track_state_indices", track_state_indices), ("track_steps", track_steps)]
    for name, t in pairs:
        check_tensor(name, t, (torch.int32,), (B,))
        check_inner_contiguous(name, t, 1, align_leading=False)
    if isinstance(null_block_id, bool) or not isinstance(null_block_id, int):
        raise TypeError(f"null_block_id must be an int, got {type(null_block_id).__name__}")
    if null_block_id < -1:
        raise ValueError(f"null_block_id must be >= -1, got {null_block_id}")
    return CommitProblem(L, P, B, H, HV, K, V, T)
