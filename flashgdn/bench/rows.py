"""What one benchmark row runs: its configuration, its inputs, and the implementations that run it.

A `Row` is one (version, batch, tokens, dtypes, pool) point of the sweep. `make_inputs` builds its
random tensors (used both for timing and for `--verify`). An `Impl` runs a row: flashgdn, the
torch reference (the verification oracle) and the baselines (FLA's Triton kernel and FlashInfer)
all go through the same two steps, `prepare` (untimed set-up, returns the call) and `collect`
(turns the call's return value into (output, state rows, intermediate states) for comparison).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import api
from ..device import DeviceFacts
from ..spec import KernelArgs, KernelSpec
from ..validation import Problem
from .metrics import gdn_bytes, gdn_flops

VERSIONS = ("pretranspose", "nontranspose", "mtp")
IO_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a pool row lays out its slots: "scattered", 2B slots of which B are read at a random
# permutation (a serving engine's slots); "contiguous", B slots read in order, indices 0..B-1
# (FlashInfer's MTP benchmark). Scattered slots cost DRAM locality: a plain copy of the bf16 state
# at B = 64 takes 2 % longer with its 1 MiB slots permuted (benchmarks/RESULTS.md "Pool slot order").
POOL_SLOTS = ("scattered", "contiguous")
INDEX_DTYPE = torch.int32
# --verify tolerance (atol = rtol) by state dtype.
VERIFY_TOL = {"fp32": 1e-2, "bf16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Row:
    """One point of the sweep (dtypes by their CLI names: bf16, fp16, fp32)."""

    version: str
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    dtype: str
    state_dtype: str
    pool: bool
    intermediate: bool = False
    l2norm: bool = True
    pool_slots: str = "scattered"  # POOL_SLOTS, for pool rows

    @property
    def layout(self) -> str:
        return "kmajor" if self.version == "nontranspose" else "klast"

    @property
    def problem(self) -> Problem:
        return Problem(self.B, self.T, self.H, self.HV, self.K, self.V)

    @property
    def io_torch(self) -> torch.dtype:
        return IO_DTYPES[self.dtype]

    @property
    def state_torch(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def label(self) -> str:
        t = f" T={self.T}" if self.version == "mtp" else ""
        pool = f" pool={self.pool_slots}" if self.pool else ""
        return f"{self.version} B={self.B}{t} state={self.state_dtype}{pool}"

    def flops(self) -> int:
        return gdn_flops(B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V)

    def bytes(self) -> int:
        io = self.io_torch.itemsize
        return gdn_bytes(
            B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V, io_bytes=io,
            state_bytes=self.state_torch.itemsize, gate_bytes=io, dt_bias_bytes=4,
            index_bytes=INDEX_DTYPE.itemsize if self.pool else 0, update_state=True,
            intermediate=self.intermediate,
        )


def row_spec(row: Row, arch: str, sm_count: int, device_class: Optional[str] = None) -> KernelSpec:
    """The KernelSpec (compile-cache key) flashgdn uses for `row` on `arch` with `sm_count` SMs
    (device_class None: the arch's reference tuning table)."""
    def like(dtype):  # kernel_spec reads only the dtypes and presence of the tensors
        return None if dtype is None else torch.empty(0, dtype=dtype, device="meta")

    io, state = like(row.io_torch), like(row.state_torch)
    args = KernelArgs(
        q=io, k=io, v=io, a=io, b=io, A_log=like(torch.float32), dt_bias=like(torch.float32), state=state,
        state_indices=like(INDEX_DTYPE) if row.pool else None, intermediate_states=state if row.intermediate else None,
    )
    options = api.CallOptions(scale=None, use_l2norm=row.l2norm)
    return api.kernel_spec(row.layout, row.problem, args, options, DeviceFacts(arch, sm_count, device_class))


def make_inputs(row: Row, device, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh random inputs for `row`: normal q, k, v, a, b, dt_bias and state (never zeros),
    A_log = log(uniform(1, 16)). A pool's slots are laid out as row.pool_slots says (POOL_SLOTS).
    Keys: q k v a b A_log dt_bias state indices inter output (indices/inter None when unused)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    B, T, H, HV, K, V = row.B, row.T, row.H, row.HV, row.K, row.V

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    io, st = row.io_torch, row.state_torch
    rows, cols = (V, K) if row.layout == "klast" else (K, V)
    scattered = row.pool and row.pool_slots == "scattered"
    slots = 2 * B if scattered else B
    return {
        "q": randn(B, T, H, K, dtype=io),
        "k": randn(B, T, H, K, dtype=io),
        "v": randn(B, T, HV, V, dtype=io),
        "a": randn(B, T, HV, dtype=io),
        "b": randn(B, T, HV, dtype=io),
        "A_log": torch.log(torch.rand(HV, generator=gen, device=device) * 15 + 1),
        "dt_bias": randn(HV, dtype=torch.float32),
        "state": randn(slots, HV, rows, cols, dtype=st),
        "indices": (
            None if not row.pool
            else torch.randperm(slots, generator=gen, device=device)[:B].to(INDEX_DTYPE) if scattered
            else torch.arange(B, device=device, dtype=INDEX_DTYPE)
        ),
        "inter": torch.empty(B, T, HV, rows, cols, dtype=st, device=device) if row.intermediate else None,
        "output": torch.empty(B, T, HV, V, dtype=io, device=device),
    }


def clone_inputs(inp: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    return {k: None if t is None else t.clone() for k, t in inp.items()}


def state_rows(row: Row, state: torch.Tensor, inp) -> torch.Tensor:
    """The B state slots a row reads and writes, in batch order ([B, HV, ...])."""
    return state[inp["indices"].long()] if row.pool else state


class Unavailable(Exception):
    """An implementation that cannot run this row here (missing package, other signature)."""


Collected = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # output, state rows, inter


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation. `prepare(row, inp)` does the untimed set-up and returns
    (call, collect): `call()` is what is timed; `collect(call())` gives what --verify compares."""

    name: str
    prepare: Callable[[Row, dict], Tuple[Callable[[], Any], Callable[[Any], Collected]]]


def call_api(module, row: Row, inp: dict, bf16_mtp_via_pretranspose: bool = False):
    """Call `module`'s function for row.version with the flashinfer/flashgdn argument names.
    `module` is flashgdn.api, flashgdn.reference or flashinfer.gdn_decode. With
    `bf16_mtp_via_pretranspose`, a bf16-state MTP row goes to gated_delta_rule_decode_pretranspose
    with the pool as initial_state (FlashInfer: its gated_delta_rule_mtp takes an fp32 state only)."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    gates = dict(A_log=inp["A_log"], a=inp["a"], dt_bias=inp["dt_bias"], b=inp["b"])
    common = dict(output=inp["output"], use_qk_l2norm=row.l2norm)
    if row.version == "nontranspose":
        return module.gated_delta_rule_decode(q, k, v, inp["state"], **gates, **common)
    if row.version == "mtp" and not (bf16_mtp_via_pretranspose and row.state_dtype == "bf16"):
        return module.gated_delta_rule_mtp(
            q, k, v, inp["state"], inp["indices"], **gates, **common,
            intermediate_states_buffer=inp["inter"], disable_state_update=False,
        )
    if row.pool:  # every MTP row has a pool
        inter = dict(intermediate_states_buffer=inp["inter"]) if row.intermediate else {}
        return module.gated_delta_rule_decode_pretranspose(
            q, k, v, None, **gates, **common, initial_state=inp["state"], initial_state_indices=inp["indices"],
            **inter,
        )
    return module.gated_delta_rule_decode_pretranspose(q, k, v, inp["state"], **gates, **common)


def module_impl(name: str, module_name: str, bf16_mtp_via_pretranspose: bool = False) -> Impl:
    """An implementation with flashgdn's API (flashgdn itself, the reference, FlashInfer);
    `bf16_mtp_via_pretranspose` as in call_api."""

    def prepare(row: Row, inp: dict):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or a broken install
            raise Unavailable(f"cannot import {module_name}: {exc}") from exc

        def collect(ret) -> Collected:
            return ret[0], state_rows(row, ret[1], inp), inp["inter"]

        return (lambda: call_api(module, row, inp, bf16_mtp_via_pretranspose)), collect

    return Impl(name, prepare)


FLA_FUNCTION = "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule"
FLA_NEEDS = ("use_gate_in_kernel", "A_log", "dt_bias", "use_beta_sigmoid_in_kernel", "state_v_first",
             "use_qk_l2norm_in_kernel", "output_final_state", "initial_state")


def _fla_prepare(row: Row, inp: dict):
    """FLA (fla-core >= 0.6) fused_recurrent_gated_delta_rule with the gates fused in the kernel:
    g = a (raw), beta = b (logits), state [B, HV, V, K] via state_v_first for K-last rows. FLA has
    no state pool and writes a new fp32 final state: a pool row's B slots are gathered into a dense
    state here, untimed. It has no per-token state output, so --cache-intermediate rows skip it."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fn
    except Exception as exc:
        raise Unavailable(f"cannot import {FLA_FUNCTION}: {exc}") from exc
    params = inspect.signature(fla_fn).parameters
    missing = [p for p in FLA_NEEDS if p not in params]
    if missing:
        raise Unavailable(f"{FLA_FUNCTION} has no argument(s) {', '.join(missing)} (needs fla-core >= 0.6)")
    if row.intermediate:
        raise Unavailable("FLA has no per-token (intermediate) state output")
    h0 = state_rows(row, inp["state"], inp).contiguous()

    def call():
        return fla_fn(
            inp["q"], inp["k"], inp["v"], g=inp["a"], beta=inp["b"], scale=None, initial_state=h0,
            output_final_state=True, use_qk_l2norm_in_kernel=row.l2norm, use_gate_in_kernel=True,
            A_log=inp["A_log"], dt_bias=inp["dt_bias"], use_beta_sigmoid_in_kernel=True,
            state_v_first=row.layout == "klast",
        )

    return call, lambda ret: (ret[0], ret[1], None)


FLASHGDN = module_impl("flashgdn", "flashgdn.api")
REFERENCE = module_impl("reference", "flashgdn.reference")
BASELINES = (
    Impl("fla", _fla_prepare),
    module_impl("flashinfer", "flashinfer.gdn_decode", bf16_mtp_via_pretranspose=True),
)


def _mismatch(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> Optional[str]:
    a, e = actual.float(), expected.float()
    if a.shape != e.shape:
        return f"{what}: shape {list(a.shape)} != reference {list(e.shape)}"
    close = torch.isclose(a, e, atol=tol, rtol=tol)
    if bool(close.all()):
        return None
    err = (a - e).abs().nan_to_num(float("inf"))
    return f"{what}: {int((~close).sum())}/{close.numel()} elements off (max abs err {float(err.max()):.3g})"


def verify(impl: Impl, row: Row, device, seed: int) -> Optional[str]:
    """Run `impl` and the reference on the same fresh inputs; None if they agree within
    VERIFY_TOL[row.state_dtype] (output, updated state slots, intermediate states), else what differs.
    Unavailable and other exceptions from the implementation propagate."""
    inp = make_inputs(row, device, seed)
    ref_inp = clone_inputs(inp)
    ref_call, ref_collect = REFERENCE.prepare(row, ref_inp)
    expected = ref_collect(ref_call())
    call, collect = impl.prepare(row, inp)
    actual = collect(call())
    tol = VERIFY_TOL[row.state_dtype]
    problems = [
        _mismatch(what, a, e, tol)
        for what, a, e in zip(("output", "state", "intermediate states"), actual, expected)
        if a is not None and e is not None
    ]
    problems = [p for p in problems if p]
    return "; ".join(problems) or None
