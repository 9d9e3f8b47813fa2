"""What one benchmark row runs: its configuration, its inputs, and the implementations that run it.

A `Row` is one (version, batch, tokens, dtypes, pool) point of the sweep. `make_inputs` builds its
random tensors (used both for timing and for `--verify`). An `Impl` runs a row: flashgdn, the
torch reference (the verification oracle) and the baselines (FLA's Triton kernel, FlashInfer, and
for the fused step the composed path) all go through the same two steps, `prepare` (untimed
set-up, returns the call) and `collect` (turns the call's return value into (output, state rows,
intermediate states) for comparison).

The versions: the FlashInfer API functions (VERSIONS: pretranspose, nontranspose, mtp) here, and
the serving engines' entry points and the fused decode step (ENGINE_VERSIONS: packed, recurrent,
sigmoid_vllm, sglang, fused_step) in flashgdn.bench.engine_rows, to which this module hands their rows.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Dict, Optional, Sequence

import torch

from .. import api
from ..device import DeviceFacts
from ..spec import KernelArgs, KernelSpec, StepSpec
from ..validation import Problem
from . import engine_rows
from .engine_rows import ENGINE_VERSIONS, FLA_FUNCTION, PACKED_BASELINE_NOTE, VARLEN_VERSIONS
from .impl import Collected, Impl, Unavailable  # noqa: F401  (part of this module's interface)
from .metrics import gdn_bytes, gdn_flops

VERSIONS = ("pretranspose", "nontranspose", "mtp")  # the FlashInfer API functions; ENGINE_VERSIONS too
IO_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a pool row lays out its slots: "scattered", 2B slots of which B are read at a random
# permutation (a serving engine's slots); "contiguous", B slots read in order, indices 0..B-1
# (FlashInfer's MTP benchmark). Scattered slots cost DRAM locality: a plain copy of the bf16 state
# at B = 64 takes 2 % longer with its 1 MiB slots permuted (benchmarks/RESULTS.md "Pool slot order").
POOL_SLOTS = ("scattered", "contiguous")
INDEX_DTYPE = torch.int32
TOKEN_INDEX_DTYPE = torch.int32  # ssm_state_indices: int32 only (FlashInfer's rule)
# --pool-padding must be a multiple of this many elements: 16 bytes of a bf16 row, 32 of an fp32
# one, so every padded stride keeps the 16-byte alignment the kernels' vector accesses need.
POOL_PADDING_MULTIPLE = 8
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
    # mtp: the state after token t goes to its own fresh pool slot (ssm_state_indices [B, T]), no
    # final write-back.
    token_slots: bool = False
    # Pool rows: elements past K in each state row of the allocation ([P, HV, V, K + pool_padding],
    # the calls get the [..., :K] view), so the head and row strides are padded.
    pool_padding: int = 0
    hidden: int = 0  # fused_step rows: the model's hidden size (hidden_states [B, hidden])

    def __post_init__(self) -> None:
        if self.version in ENGINE_VERSIONS:
            engine_rows.check_row(self)
        elif self.hidden:
            raise ValueError("hidden applies to fused_step rows only")
        if self.pool_padding and not self.pool:
            raise ValueError("pool_padding applies to pool rows only")
        if self.token_slots and not (self.version == "mtp" and self.pool and self.T >= 2 and not self.intermediate):
            raise ValueError("token_slots needs an mtp row with T >= 2 and no intermediate states")

    @property
    def layout(self) -> str:
        return "kmajor" if self.version == "nontranspose" else "klast"

    @property
    def zero_padding_output(self) -> bool:
        """The API's rule for a padding row's output: zero through gated_delta_rule_decode and for
        one token through pretranspose; left as it is (FlashInfer's) through gated_delta_rule_mtp
        and for T > 1 through pretranspose."""
        return self.version == "nontranspose" or (self.version == "pretranspose" and self.T == 1)

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
        t = f" T={self.T}" if self.version == "mtp" or self.T > 1 else ""
        pool = f" pool={self.pool_slots}" if self.pool else ""
        pool += f" padding={self.pool_padding}" if self.pool_padding else ""
        slots = " token-slots" if self.token_slots else ""
        return f"{self.version} B={self.B}{t} state={self.state_dtype}{pool}{slots}"

    def flops(self) -> int:
        if self.version in ENGINE_VERSIONS:
            return engine_rows.row_flops(self)
        return gdn_flops(B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V)

    def bytes(self) -> int:
        if self.version in ENGINE_VERSIONS:
            return engine_rows.row_bytes(self)
        io = self.io_torch.itemsize
        return gdn_bytes(
            B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V, io_bytes=io,
            state_bytes=self.state_torch.itemsize, gate_bytes=io, dt_bias_bytes=4,
            index_bytes=INDEX_DTYPE.itemsize if self.pool else 0, state_writes=self.T if self.token_slots else 1,
            intermediate=self.intermediate, token_index_bytes=TOKEN_INDEX_DTYPE.itemsize if self.token_slots else 0,
        )


def decode_twin(row: Row) -> Row:
    """The pretranspose pool row of a packed row's shape: the kernel the packed decode runs (with
    packed rows: KernelSpec.row_form), and the call the baselines without a packed decode make
    on views of mixed_qkv."""
    return dataclasses.replace(row, version="pretranspose")


def row_specs(row: Row, arch: str, sm_count: int, device_class: Optional[str] = None) -> tuple:
    """Every compiled variant (KernelSpec, or the fused step's StepSpec) flashgdn's call of `row` launches, in
    launch order, on `arch` with `sm_count` SMs (device_class None: the arch's reference tuning
    table). tests/test_bench_cli.py checks them against the API's own lookups."""
    if row.version in ENGINE_VERSIONS:
        return engine_rows.kernel_specs(row, DeviceFacts(arch, sm_count, device_class))
    return (_decode_spec(row, arch, sm_count, device_class),)


def row_spec(row: Row, arch: str, sm_count: int, device_class: Optional[str] = None) -> KernelSpec:
    """The decode kernel's KernelSpec among row_specs: the last launch (a fused step's decode)."""
    last = row_specs(row, arch, sm_count, device_class)[-1]
    return last.decode if isinstance(last, StepSpec) else last


def _decode_spec(row: Row, arch: str, sm_count: int, device_class: Optional[str]) -> KernelSpec:
    """api.kernel_spec of the tensors and options an API row's call passes."""
    def meta(dtype, *shape):  # kernel_spec reads dtypes, presence and the state's strides
        return torch.empty(shape, dtype=dtype, device="meta")

    io = meta(row.io_torch, 0)
    rows, cols = (row.V, row.K) if row.layout == "klast" else (row.K, row.V)
    state = meta(row.state_torch, 1, row.HV, rows, cols + row.pool_padding)[..., :cols]
    args = KernelArgs(
        q=io, k=io, v=io, a=io, b=io, A_log=meta(torch.float32, 0), dt_bias=meta(torch.float32, 0), state=state,
        state_indices=meta(INDEX_DTYPE, 0) if row.pool else None,
        intermediate_states=meta(row.state_torch, 0) if row.intermediate else None,
        token_state_indices=meta(TOKEN_INDEX_DTYPE, 0) if row.token_slots else None,
    )
    # Every call updates the state (the bench passes disable_state_update=False).
    options = api.CallOptions(scale=None, use_l2norm=row.l2norm, update_state=True,
                              zero_padding_output=row.zero_padding_output)
    return api.kernel_spec(row.layout, row.problem, args, options, DeviceFacts(arch, sm_count, device_class))


def make_inputs(row: Row, device, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh random inputs for `row`: normal q, k, v, a, b, dt_bias and state (never zeros),
    A_log = log(uniform(1, 16)). A pool's read slots are laid out as row.pool_slots says
    (POOL_SLOTS); token slots are B*T more slots after them, fresh and distinct (in a random order
    for "scattered", in (row, token) order for "contiguous"). A padded pool is the [..., :K] view
    of [P, HV, V, K + row.pool_padding]. Keys: q k v a b A_log dt_bias state indices slots inter
    output (indices/slots/inter None when unused). Engine rows: engine_rows' inputs (a packed row's
    are its decode_twin's, with mixed_qkv)."""
    if row.version == "packed":
        return engine_rows.packed_inputs(make_inputs(decode_twin(row), device, seed))
    if row.version in VARLEN_VERSIONS:
        return engine_rows.recurrent_inputs(row, device, seed)
    if row.version == "fused_step":
        return engine_rows.fused_step_inputs(row, device, seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    B, T, H, HV, K, V = row.B, row.T, row.H, row.HV, row.K, row.V

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    def order(n, offset=0):  # n distinct slots from `offset` on, as row.pool_slots lays them out
        idx = torch.randperm(n, generator=gen, device=device) if scattered else torch.arange(n, device=device)
        return idx + offset

    io, st = row.io_torch, row.state_torch
    rows, cols = (V, K) if row.layout == "klast" else (K, V)
    scattered = row.pool and row.pool_slots == "scattered"
    read_slots = 2 * B if scattered else B
    written = B * T if row.token_slots else 0
    return {
        "q": randn(B, T, H, K, dtype=io),
        "k": randn(B, T, H, K, dtype=io),
        "v": randn(B, T, HV, V, dtype=io),
        "a": randn(B, T, HV, dtype=io),
        "b": randn(B, T, HV, dtype=io),
        "A_log": torch.log(torch.rand(HV, generator=gen, device=device) * 15 + 1),
        "dt_bias": randn(HV, dtype=torch.float32),
        "state": randn(read_slots + written, HV, rows, cols + row.pool_padding, dtype=st)[..., :cols],
        "indices": order(read_slots)[:B].to(INDEX_DTYPE) if row.pool else None,
        "slots": order(written, offset=read_slots).view(B, T).to(TOKEN_INDEX_DTYPE) if row.token_slots else None,
        "inter": torch.empty(B, T, HV, rows, cols, dtype=st, device=device) if row.intermediate else None,
        "output": torch.empty(B, T, HV, V, dtype=io, device=device),
    }


def clone_inputs(inp: dict) -> dict:
    return {k: t.clone() if isinstance(t, torch.Tensor) else t for k, t in inp.items()}


def state_rows(row: Row, state: torch.Tensor, inp) -> torch.Tensor:
    """The state slots a row reads and writes, in batch order: [B, HV, ...], or with token slots
    [B, 1 + T, HV, ...], the slot read (left as it is) then the slot of each token's state."""
    if not row.pool:
        return state
    read = state[inp["indices"].long()]
    if not row.token_slots:
        return read
    return torch.cat([read[:, None], state[inp["slots"].long()]], 1)


def sweep_title(records: Sequence[dict]) -> str:
    """One line of what a sweep's result rows share, the title of its table and plot: the shape,
    the q/k/v dtype, and the pool padding and token slots where rows have them."""
    first = records[0] if records else {}
    shape = " ".join(f"{k}={first[k]}" for k in ("H", "HV", "K", "V") if k in first)
    parts = [f"{shape} {first.get('dtype', '')} q/k/v"]
    padding = sorted({r["pool_padding"] for r in records if r.get("pool_padding")})
    if padding:
        parts.append(f"pool padded by {'/'.join(map(str, padding))} elements per state row (head and row strides)")
    if any(r.get("token_slots") for r in records):
        parts.append("mtp+slots: the state after each token to its own pool slot (ssm_state_indices)")
    hidden = sorted({r["hidden"] for r in records if r.get("hidden")})
    if hidden:
        parts.append(f"fused_step: hidden={'/'.join(map(str, hidden))}, conv width {engine_rows.CONV_WIDTH} with bias")
    return "; ".join(p.strip() for p in parts)


def call_api(module, row: Row, inp: dict, bf16_mtp_via_pretranspose: bool = False):
    """Call `module`'s function for row.version with the flashinfer/flashgdn argument names.
    `module` is flashgdn.api, flashgdn.reference or flashinfer.gdn_decode. A pool goes as it is
    (a padded pool as its strided view). With `bf16_mtp_via_pretranspose`, a bf16-state MTP row
    goes to gated_delta_rule_decode_pretranspose with the pool as initial_state (FlashInfer: its
    gated_delta_rule_mtp takes an fp32 state only). gated_delta_rule_mtp always gets
    disable_state_update=False: an omitted one means True in FlashInfer 0.7.2 and flashgdn."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    gates = dict(A_log=inp["A_log"], a=inp["a"], dt_bias=inp["dt_bias"], b=inp["b"])
    common = dict(output=inp["output"], use_qk_l2norm=row.l2norm)
    if row.version == "nontranspose":
        return module.gated_delta_rule_decode(q, k, v, inp["state"], **gates, **common)
    if row.version == "mtp" and not (bf16_mtp_via_pretranspose and row.state_dtype == "bf16"):
        # Only when used: a FlashInfer before ssm_state_indices still runs the other MTP rows.
        slots = dict(ssm_state_indices=inp["slots"]) if row.token_slots else {}
        return module.gated_delta_rule_mtp(
            q, k, v, inp["state"], inp["indices"], **gates, **common,
            intermediate_states_buffer=inp["inter"], disable_state_update=False, **slots,
        )
    if row.pool:  # every MTP row and every pretranspose row with T > 1 has a pool
        inter = dict(intermediate_states_buffer=inp["inter"]) if row.intermediate else {}
        return module.gated_delta_rule_decode_pretranspose(
            q, k, v, None, **gates, **common, initial_state=inp["state"], initial_state_indices=inp["indices"],
            **inter,
        )
    return module.gated_delta_rule_decode_pretranspose(q, k, v, inp["state"], **gates, **common)


def module_impl(name: str, module_name: str, bf16_mtp_via_pretranspose: bool = False,
                packed_token_slot_pool: bool = False,
                skips_final_state: Callable[[Row], bool] = lambda row: False) -> Impl:
    """An implementation with flashgdn's API (flashgdn itself, the reference, FlashInfer);
    `bf16_mtp_via_pretranspose` as in call_api (then a bf16-state token-slot row is unavailable:
    the pretranspose function has no ssm_state_indices). With `packed_token_slot_pool`, a
    token-slot row's padded pool is replaced by a packed copy (untimed). Rows where
    `skips_final_state(row)` (the implementation writes no final state there) have their state
    left out of the verification."""

    def prepare(row: Row, inp: dict):
        if bf16_mtp_via_pretranspose and row.token_slots and row.state_dtype == "bf16":
            raise Unavailable("ssm_state_indices (token slots) is in gated_delta_rule_mtp only, which takes an "
                              "fp32 state; the bf16-state path (gated_delta_rule_decode_pretranspose) has none")
        if packed_token_slot_pool and row.token_slots and row.pool_padding:
            inp = dict(inp, state=inp["state"].contiguous())
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or a broken install
            raise Unavailable(f"cannot import {module_name}: {exc}") from exc

        def collect(ret) -> Collected:
            return ret[0], None if skips_final_state(row) else state_rows(row, ret[1], inp), inp["inter"]

        return (lambda: call_api(module, row, inp, bf16_mtp_via_pretranspose)), collect

    return Impl(name, prepare)


FLA_NEEDS = ("use_gate_in_kernel", "A_log", "dt_bias", "use_beta_sigmoid_in_kernel", "state_v_first",
             "use_qk_l2norm_in_kernel", "output_final_state", "initial_state")


def _fla_prepare(row: Row, inp: dict):
    """FLA (fla-core >= 0.6) fused_recurrent_gated_delta_rule with the gates fused in the kernel:
    g = a (raw), beta = b (logits), state [B, HV, V, K] via state_v_first for K-last rows. FLA has
    no state pool and writes a new fp32 final state: a pool row's B slots (of a padded pool too)
    are gathered into a packed dense state here, untimed. It has no per-token state output, so
    rows that write one (--cache-intermediate, --token-slots) report it unavailable."""
    if row.intermediate or row.token_slots:
        what = "intermediate_states_buffer" if row.intermediate else "ssm_state_indices"
        raise Unavailable(f"FLA has no per-token state output (this row's {what})")
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fn
    except Exception as exc:
        raise Unavailable(f"cannot import {FLA_FUNCTION}: {exc}") from exc
    params = inspect.signature(fla_fn).parameters
    missing = [p for p in FLA_NEEDS if p not in params]
    if missing:
        raise Unavailable(f"{FLA_FUNCTION} has no argument(s) {', '.join(missing)} (needs fla-core >= 0.6)")
    h0 = state_rows(row, inp["state"], inp).contiguous()

    def call():
        return fla_fn(
            inp["q"], inp["k"], inp["v"], g=inp["a"], beta=inp["b"], scale=None, initial_state=h0,
            output_final_state=True, use_qk_l2norm_in_kernel=row.l2norm, use_gate_in_kernel=True,
            A_log=inp["A_log"], dt_bias=inp["dt_bias"], use_beta_sigmoid_in_kernel=True,
            state_v_first=row.layout == "klast",
        )

    return call, lambda ret: (ret[0], ret[1], None)


def _for_engine_rows(api_impl: Impl, engine_prepare, note=None, applies=None) -> Impl:
    """`api_impl` on the API rows; `engine_prepare(row, inp)` on the engine rows; `note` and
    `applies` (default: api_impl's) for both."""
    def prepare(row: Row, inp: dict):
        return (engine_prepare if row.version in ENGINE_VERSIONS else api_impl.prepare)(row, inp)

    return Impl(api_impl.name, prepare, note or api_impl.note, applies or api_impl.applies)


def _fla_engine_prepare(row: Row, inp: dict):
    if row.version == "packed":  # FLA has no packed decode: the unpacked inputs (engine_rows)
        return _fla_prepare(decode_twin(row), inp)
    if row.version in VARLEN_VERSIONS:
        return engine_rows.fla_recurrent_prepare(row, inp)
    raise Unavailable("FLA has no fused decode step")


def _flashinfer_engine_prepare(row: Row, inp: dict):
    if row.version == "packed":  # no packed decode either: its pretranspose call on the unpacked inputs
        return _FLASHINFER_API.prepare(decode_twin(row), inp)
    if row.version == "recurrent":
        raise Unavailable("FlashInfer 0.7.2 has no decode on precomputed gates (g, beta)")
    if row.version == "sigmoid_vllm":
        raise Unavailable("FlashInfer 0.7.2 has no varlen decode (cu_seqlens) with vLLM's slots and accepted counts")
    if row.version == "sglang":
        raise Unavailable("FlashInfer 0.7.2 has no varlen decode (cu_seqlens, gates [tokens, HV]) in SGLang's layout")
    return engine_rows.flashinfer_fused_step_prepare(row, inp)


def _fla_note(row: Row) -> Optional[str]:
    return {"packed": PACKED_BASELINE_NOTE, "recurrent": engine_rows.FLA_RECURRENT_NOTE,
            "sigmoid_vllm": engine_rows.FLA_SIGMOID_NOTE, "sglang": engine_rows.FLA_SGLANG_NOTE}.get(row.version)


def _flashinfer_skips_final_state(row: Row) -> bool:
    """FlashInfer 0.7.2's bf16-state T > 1 path (through gated_delta_rule_decode_pretranspose) with an
    intermediate_states_buffer writes no final state from B * HV >= 128 on (README "Differences")."""
    return (row.version in VERSIONS and row.state_dtype == "bf16" and row.T > 1 and row.intermediate
            and row.B * row.HV >= 128)


def _flashinfer_note(row: Row) -> Optional[str]:
    if _flashinfer_skips_final_state(row):
        return ("with intermediate_states_buffer its bf16-state T > 1 path writes no final state from B * HV "
                ">= 128 on: its time omits one of the T + 1 state writes, its state is not verified")
    return PACKED_BASELINE_NOTE if row.version == "packed" else None


FLASHGDN = _for_engine_rows(module_impl("flashgdn", "flashgdn.api"), engine_rows.flashgdn_prepare)
REFERENCE = _for_engine_rows(module_impl("reference", "flashgdn.reference"), engine_rows.reference_prepare)
# FlashInfer (0.7.2) gets a padded pool's view as it is where it takes the pool's strides: its
# bf16-state kernels and its fp32 MTP kernel index the 4-D pool with them, its fp32 one-token kernel
# compiles them in. Its fp32 MTP kernel writes token slots (ssm_state_indices) through a flat
# [P * HV, V, K] view of the pool instead, which a padded pool is not: those rows get a packed copy.
_FLASHINFER_API = module_impl("flashinfer", "flashinfer.gdn_decode", bf16_mtp_via_pretranspose=True,
                              packed_token_slot_pool=True, skips_final_state=_flashinfer_skips_final_state)
BASELINES = (
    _for_engine_rows(Impl("fla", _fla_prepare), _fla_engine_prepare, _fla_note,
                     applies=lambda row: row.version != "fused_step"),
    _for_engine_rows(_FLASHINFER_API, _flashinfer_engine_prepare, _flashinfer_note),
    engine_rows.COMPOSED,
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
    VERIFY_TOL[row.state_dtype] (output, the state slots of state_rows, intermediate states), else
    what differs. Unavailable and other exceptions from the implementation propagate."""
    inp = make_inputs(row, device, seed)
    ref_inp = clone_inputs(inp)
    ref_call, ref_collect = REFERENCE.prepare(row, ref_inp)
    expected = ref_collect(ref_call())
    call, collect = impl.prepare(row, inp)
    actual = collect(call())
    tol = VERIFY_TOL[row.state_dtype]
    problems = [
        _mismatch(what, a, e, tol)
        for what, a, e in zip(engine_rows.collected_names(row), actual, expected)
        if a is not None and e is not None
    ]
    problems = [p for p in problems if p]
    return "; ".join(problems) or None
