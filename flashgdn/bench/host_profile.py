"""`flashgdn-bench --host --profile`: one warm flashgdn call broken into the steps of its repeated-call
path (flashgdn.fastpath), each timed alone, and the cost of the full way that a first or refused
call adds (flashgdn.bench.host's `profile` runs it on the rows it builds)."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import api, fastpath
from .cli import _one_line, progress
from .host_timing import HOST_FIELDS


Part = Tuple[str, Optional[Callable[[], Any]], bool]  # label, call (None: by difference), launches GPU work


# The functions --profile breaks down, each with the check of its full way.
PROFILED_CHECKS = {"gated_delta_rule_decode_pretranspose": api._check_pretranspose,
                   "gated_delta_rule_mtp": api._check_mtp}


def _profiled_arguments(name: str, args: tuple, kwargs: dict) -> Tuple[dict, list]:
    """The bound arguments of a call of `name` (disable_state_update resolved as the MTP function
    resolves it) and its check's arguments as the call passes them (the SGLang-only ones omitted)."""
    bound = inspect.signature(getattr(api, name)).bind(*args, **kwargs)
    bound.apply_defaults()
    A = dict(bound.arguments)
    if name == "gated_delta_rule_mtp":
        A["disable_state_update"] = api._mtp_disable_state_update(A["disable_state_update"])
        A["cache_replayssm"] = bool(A["cache_replayssm"])
    return A, [A[n] for n in inspect.signature(PROFILED_CHECKS[name]).parameters if n in A]


def _fast_arguments(whole: Callable[[], Any], fn: Callable) -> tuple:
    """The arguments a warm call `whole` passes its compiled function `fn` on its fast path, recorded
    from one call (the output it allocates included), so the profile times `fn` on exactly those."""
    seen = []

    def record(*args):
        seen.append(args)
        return fn(*args)

    kept = dict(fastpath.FAST)
    fastpath.FAST.update({key: entry._replace(fn=record) for key, entry in kept.items() if entry.fn is fn})
    try:
        whole()
    finally:
        fastpath.FAST.update(kept)
    if not seen:
        raise RuntimeError("profile: the call did not take its fast path")
    return seen[0]


def profile_parts(name: str, args: tuple, kwargs: dict) -> List[Part]:
    """The steps of one warm flashgdn call `name(*args, **kwargs)` (a PROFILED_CHECKS function, its
    fast key remembered: flashgdn.fastpath), in the order its fast path runs them, then the steps of
    the full way, off a repeated call's path, for scale; a call None is the remainder of the
    enclosing step, by difference. Labels are indented by two spaces per level."""
    whole = functools.partial(getattr(api, name), *args, **kwargs)
    A, checked = _profiled_arguments(name, args, kwargs)
    check = PROFILED_CHECKS[name]
    options = (A["use_qk_l2norm"],)
    plan = api._validated(check, *checked, options=options)
    if plan.fn is None or not fastpath.FAST:
        raise RuntimeError("profile: the call has not run yet (call it first)")
    return [
        (f"{name} (the whole call)", whole, True),
        ("  fastpath.output (torch.empty_like of the output when none is given)",
         functools.partial(fastpath.output, A["output"], A["v"]), False),
        ("  the compiled function (the TVM-FFI call: its argument checks + launch)",
         functools.partial(plan.fn, *_fast_arguments(whole, plan.fn)), True),
        ("  rest: the fast key + lookup, Python calls (by difference)", None, False),
        ("torch.cuda.current_stream() (a stream lookup from Python)", torch.cuda.current_stream, False),
        ("api._validated, warm memo (the full way's signature key + lookup: a refused fast call)",
         functools.partial(api._validated, check, *checked, options=options), False),
        (f"api.{check.__name__} (full validation: what a memo miss costs)", functools.partial(check, *checked), False),
    ]


def profile_records(parts: Sequence[Part], measure_call: Callable[..., Dict[str, Any]], variant: str, iters: int,
                    repeats: int, baseline_us: Optional[float]) -> List[dict]:
    """One record per part: measured (`measure_call(call, gpu=launches)`: GPU time only where
    the part launches GPU work), or (call None) the enclosing step's time minus its measured
    children; share_of_call is the part's median over the whole call's (the first part)."""
    records = []
    for label, call, launches in parts:
        progress(f"  profile: {label.strip()} ...")
        rec = dict.fromkeys(HOST_FIELDS)
        rec.update(impl="profile", function=label, variant=variant, iters=iters, repeats=repeats, error="")
        if call is not None:
            try:
                rec.update(measure_call(call, gpu=launches))
            except Exception as exc:
                rec["error"] = _one_line(exc)
        records.append(rec)
    depth = [(len(r["function"]) - len(r["function"].lstrip())) // 2 for r in records]
    for i, (rec, (_, call, _)) in enumerate(zip(records, parts)):
        if call is not None:
            continue
        parent = max(j for j in range(i) if depth[j] < depth[i])
        children = [records[j] for j in range(parent + 1, i) if depth[j] == depth[i]]
        times = [records[parent]["host_median_us"]] + [c["host_median_us"] for c in children]
        if None not in times:
            rec["host_median_us"] = times[0] - sum(times[1:])
    whole = records[0]["host_median_us"] if records else None
    for rec in records:
        us = rec["host_median_us"]
        rec["share_of_call"] = us / whole if us is not None and whole else None
        rec["ratio"] = us / baseline_us if us is not None and baseline_us else None
    return records
