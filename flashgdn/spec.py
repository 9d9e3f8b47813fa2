"""Static description of one compiled kernel variant (the compile-cache key) and the kernel's
argument list.

Plain Python (no torch, no CuTe) so that both the API layer and the kernel layer can use it.
Everything in a KernelSpec changes the generated code; nothing in it depends on the batch size or
on the pool size, which stay dynamic in the compiled kernel.

Vocabulary: the state layout is "klast" (state [.., HV, V, K], K contiguous; the API calls it
"pretranspose") or "kmajor" ([.., HV, K, V], V contiguous; the API's "nontranspose"). Dtypes are
named as torch prints them without the module ("bfloat16").
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_TOKENS = 16  # tokens per sequence (MTP): the most the GPU tests cover
IO_DTYPES = ("bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")
GATE_DTYPES = ("bfloat16", "float16", "float32")
DT_BIAS_DTYPES = ("float32", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
OUT_DTYPES = ("bfloat16", "float16", "float32")
ARCHS = ("sm_90a", "sm_100a", "sm_103a")
LAYOUTS = ("klast", "kmajor")
REGIMES = ("small", "large")
# The conv/gate kernel's regimes (kernels.policy.conv_gate_regime): "split" splits the b/a projection
# over the hidden dimension (partial sums the decode adds up); "gemm" leaves it to a cuBLAS GEMM
# before it (its CTAs run the conv only).
CONV_GATE_REGIMES = ("small", "split", "large", "gemm")
ROW_FORMS = ("batch", "packed", "flat")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8}
VEC_BYTES = 16  # one 128-bit global access per lane and chunk


def vec_elems(dtype_name: str) -> int:
    """Elements of `dtype_name` in one 16-byte access."""
    return VEC_BYTES // DTYPE_BYTES[dtype_name]


class KernelArgs(NamedTuple):
    """The tensors a compiled kernel takes, in order (None where a variant has no such tensor).
    Shapes: q, k [B, T, H, K]; v [B, T, HV, V]; a, b [B, T, HV]; A_log, dt_bias [HV]; state
    [P, HV, V, K] ("klast") or [P, HV, K, V] ("kmajor"), P = B for a dense state; state_indices,
    output_state_indices, accepted_tokens [B]; intermediate_states [>= B, >= T, HV, V, K];
    output [B, T, HV, V]; token_state_indices [B, T] (the pool slot of the state after each token);
    intermediate_indices [>= B] (KernelSpec.intermediate_rows: batch row b writes its states to
    intermediate_states[intermediate_indices[b]] instead of row b; negative: none); parent_tokens
    [>= B, T] (KernelSpec.tree_parents: an EAGLE tree, token t >= 1 of row b starts from the state
    after its parent token parent_tokens[b, t], read back from that row's intermediate states).
    Precomputed gates (KernelSpec.precomputed_gates): a holds the log decay g, b holds beta, A_log
    and dt_bias are None. Varlen (KernelSpec.varlen): q, k, v, a, b and output hold the tokens of
    all sequences in dim 1 ([1, total, ...]), cu_seqlens [B + 1] their boundaries, and B is
    token_state_indices.shape[0]. The ReplaySSM windows of a verify, indexed by the read slot:
    replay_v [P, HV, T, V] and replay_k [P, H, T, K] (bf16, k before its norm), replay_g (log
    decay) and replay_beta [P, HV, T] (fp32). KernelSpec.row_form "packed": q holds mixed_qkv
    [B, 2*H*K + HV*V], k and v are None, a and b [B, HV], token_state_indices [B]; "flat": q, k, v and
    output [1, B*T, ...], a and b [B*T, HV]. KernelSpec.gate_rows: a and b [rows >= B·T, HV];
    KernelSpec.slot_column: token_state_indices [B]."""

    q: Any
    k: Any
    v: Any
    a: Any
    b: Any
    A_log: Any
    dt_bias: Any
    state: Any
    state_indices: Any = None
    output_state_indices: Any = None
    accepted_tokens: Any = None
    intermediate_states: Any = None
    output: Any = None
    token_state_indices: Any = None
    cu_seqlens: Any = None
    replay_v: Any = None
    replay_k: Any = None
    replay_g: Any = None
    replay_beta: Any = None
    intermediate_indices: Any = None
    parent_tokens: Any = None


def _unset_from(field: str) -> tuple:
    """None for each KernelArgs field from `field` on."""
    return (None,) * (len(KernelArgs._fields) - KernelArgs._fields.index(field))


# The None tails of launches that pass their tensors positionally in KernelArgs' order
# (flashgdn.fastpath), without building a KernelArgs: the fields after the one named.
AFTER_OUTPUT = _unset_from("token_state_indices")
AFTER_TOKEN_SLOTS = _unset_from("cu_seqlens")
AFTER_CU_SEQLENS = _unset_from("replay_v")
AFTER_REPLAY = _unset_from("intermediate_indices")


class CommitArgs(NamedTuple):
    """The tensors of the ReplaySSM commit kernel, in order (None where a variant has no such
    tensor). state [L, P, HV, V, K] (the checkpoints of L layers); the windows replay_v
    [L, P, HV, T, V], replay_k [L, P, H, T, K] (bf16), replay_g, replay_beta [L, P, HV, T] (fp32);
    state_indices, accept_lens, track_state_indices, track_steps [B] (int32)."""

    state: Any
    replay_v: Any
    replay_k: Any
    replay_g: Any
    replay_beta: Any
    state_indices: Any
    accept_lens: Any
    track_state_indices: Any = None
    track_steps: Any = None


def _head_checks(spec) -> tuple:
    """(condition, message) of the head geometry and token count a decode or commit spec holds."""
    return (
        (spec.K in SUPPORTED_HEAD_DIMS, f"K must be one of {SUPPORTED_HEAD_DIMS}"),
        (spec.V in SUPPORTED_HEAD_DIMS, f"V must be one of {SUPPORTED_HEAD_DIMS}"),
        (spec.H >= 1 and spec.HV >= 1 and spec.HV % spec.H == 0, "HV must be a multiple of H"),
        (1 <= spec.T <= MAX_TOKENS, f"T must be in [1, {MAX_TOKENS}]"),
    )


def _refuse_invalid(spec, checks) -> None:
    """ValueError naming the spec's class and the first failed (condition, message) of `checks`."""
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"invalid {type(spec).__name__}: {msg} (got {spec})")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Compile-time facts of one GDN decode kernel variant (hashable: the cache key)."""

    layout: str  # "klast" or "kmajor"
    H: int
    HV: int
    K: int
    V: int
    T: int
    io_dtype: str  # q, k and v (and the output unless out_dtype says otherwise)
    state_dtype: str
    gate_dtype: str  # a and b
    dt_bias_dtype: str
    scale: float
    use_l2norm: bool
    arch: str
    regime: str
    softplus_beta: float = 1.0
    softplus_threshold: float = 20.0
    index_dtype: Optional[str] = None  # None: dense state indexed by batch row
    has_out_indices: bool = False
    has_intermediate: bool = False
    update_state: bool = True
    has_accepted: bool = False
    tile: Optional[Tuple[int, ...]] = None  # explicit CTA shape (tuning runs); None: the policy's
    # Name of the tuning table (kernels.policy.DEVICE_TABLES) the build takes its choices from;
    # None: the reference table of `arch`.
    device_class: Optional[str] = None
    out_dtype: Optional[str] = None  # None: io_dtype
    has_token_slots: bool = False  # the state after token t goes to pool slot token_state_indices[b, t]
    strided_state: bool = False  # the state's head and row strides are dynamic (a padded pool)
    zero_padding_output: bool = True  # a padding row's output is zero (False: left as it is)
    # a holds the log decay g and b holds beta (computed by the caller): the kernel takes no A_log
    # nor dt_bias and skips the gate arithmetic (decay = exp(g)).
    precomputed_gates: bool = False
    beta_dtype: Optional[str] = None  # b's dtype where it differs from gate_dtype (precomputed beta)
    # vLLM's continuous batching: no state_indices; row b reads pool slot
    # token_state_indices[b, accepted_tokens[b] - 1] (column 0 without accepted counts) and writes
    # the state after token t to token_state_indices[b, t]; a slot <= 0 (vLLM's null block and
    # padding) is a padding row where read, not written where written.
    vllm_slots: bool = False
    accepted_dtype: str = "int32"
    # Varlen: the cu_seqlens dtype; sequence b's tokens are the flat rows cu_seqlens[b] + t,
    # t < its length <= T (None: dense [B, T, ...]).
    varlen: Optional[str] = None
    replay_cache: bool = False  # writes the ReplaySSM windows (replay_v/k/g/beta) of every live row
    # Launched as a programmatic dependent (PDL) of the kernel before it in the stream, whose
    # outputs are its q/k/v and gates (the fused step's conv/gate kernel): its slot indices and
    # state load while that kernel finishes; it reads q/k/v and the gates after griddepcontrol.wait.
    pdl_wait: bool = False
    # How the per-row tensors arrive (ROW_FORMS). The launch views them as KernelArgs' [B, T, ...]
    # shapes, so an engine's call hands its tensors over as they are, without a torch view per tensor
    # and call. "batch": KernelArgs' shapes. "packed" (flashgdn.engines' packed decodes, T = 1): q
    # holds mixed_qkv [B, 2·H·K + HV·V] (q | k | v of a token side by side; k and v are None), a and
    # b are [B, HV], vLLM's token slots [B]. "flat" (SGLang's varlen layout: its decode and its
    # target verify): q, k, v and the output are [1, B·T, ...] (B sequences of T tokens each in dim
    # 1), a and b [B·T, HV]. Both take slot indices of any stride (a column of a block table).
    row_form: str = "batch"
    # vLLM's raw-gate op (flashgdn.recurrent) on row_form "batch": a and b arrive as vLLM passes them,
    # [rows, HV] views of its projection (any row stride), whose first B·T rows are the tokens' gates
    # in order (rows >= B·T, which the caller's checks and fast key hold); the launch views them as
    # [B, T, HV] on q's first two dims.
    gate_rows: bool = False
    # vLLM's one-token slots on row_form "batch": token_state_indices arrives as [B] (any stride), not
    # [B, 1]; the launch views it.
    slot_column: bool = False
    # SGLang's target verify: the dtype of KernelArgs.intermediate_indices, the intermediate
    # buffer's row of each batch row (None: row b writes buffer row b).
    intermediate_rows: Optional[str] = None
    # SGLang's EAGLE-tree verify: the dtype of KernelArgs.parent_tokens. Where a row writes its
    # intermediates, token t >= 1 starts from the state stored for its parent token (SGLang's kernel
    # reads it back from the buffer, in the buffer's dtype); a parent outside [0, t) makes the row
    # INVALID. None: each token follows the one before it.
    tree_parents: Optional[str] = None
    # The fused step's split b/a projection (kernels.policy.ConvGateConfig.partial_sums): a and b
    # are [gate_parts, B, T, HV] fp32 partial sums, the gate their sum rounded to bf16 as the
    # projection's bf16 output is. 0: a and b are the gates themselves.
    gate_parts: int = 0

    def __post_init__(self) -> None:
        _refuse_invalid(self, (
            (self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}"),
            *_head_checks(self),
            (self.io_dtype in IO_DTYPES, f"io_dtype must be one of {IO_DTYPES}"),
            (self.state_dtype in STATE_DTYPES, f"state_dtype must be one of {STATE_DTYPES}"),
            (self.gate_dtype in GATE_DTYPES, f"gate_dtype must be one of {GATE_DTYPES}"),
            (self.dt_bias_dtype in DT_BIAS_DTYPES, f"dt_bias_dtype must be one of {DT_BIAS_DTYPES}"),
            (self.index_dtype in (None,) + INDEX_DTYPES, f"index_dtype must be None or one of {INDEX_DTYPES}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}"),
            (self.regime in REGIMES, f"regime must be one of {REGIMES}"),
            (self.index_dtype is not None or not self.has_out_indices, "out indices need a pool"),
            (self.layout == "klast" or (self.T == 1 and self.index_dtype is None), "kmajor is dense T=1 only"),
            (self.out_dtype in (None,) + OUT_DTYPES, f"out_dtype must be None or one of {OUT_DTYPES}"),
            (not self.has_token_slots or (self.pool and (self.T >= 2 or self.vllm_slots) and self.update_state
                                          and not self.has_intermediate and (self.vllm_slots or not self.has_accepted)
                                          and not self.has_out_indices),
             "token slots need a pool, T >= 2 and state updates, without intermediates, accepted counts or out indices"),
            (not self.vllm_slots or (self.has_token_slots and self.layout == "klast"), "vLLM slots are token slots"),
            (self.varlen in (None,) + INDEX_DTYPES, f"varlen must be None or one of {INDEX_DTYPES}"),
            (self.varlen is None or self.vllm_slots, "varlen needs vLLM slots (they give the batch size)"),
            (self.beta_dtype in (None,) + GATE_DTYPES, f"beta_dtype must be None or one of {GATE_DTYPES}"),
            (self.accepted_dtype in INDEX_DTYPES, f"accepted_dtype must be one of {INDEX_DTYPES}"),
            (not self.replay_cache or (self.pool and self.T >= 2 and not self.update_state and not self.writes_states
                                       and not self.has_accepted),
             "replay windows need a pool, T >= 2 and a frozen state, without per-token state writes or accepted counts"),
            (not self.pdl_wait or (self.layout == "klast" and not self.multi_token), "pdl_wait is for the K-last T = 1 decode"),
            (self.row_form in ROW_FORMS, f"row_form must be one of {ROW_FORMS}"),
            (self.row_form == "batch" or (self.layout == "klast" and self.varlen is None
                                          and (self.row_form == "flat" or not self.multi_token)),
             "packed rows are for the K-last T = 1 decode, flat rows for the K-last decode without varlen"),
            (not (self.gate_rows or self.slot_column) or (self.row_form == "batch" and self.vllm_slots),
             "gate rows and a slot column are vLLM's tensors on batch rows"),
            (not self.slot_column or self.T == 1, "a slot column is one token's slots (T = 1)"),
            (self.intermediate_rows in (None,) + INDEX_DTYPES,
             f"intermediate_rows must be None or one of {INDEX_DTYPES}"),
            (self.intermediate_rows is None or self.has_intermediate, "intermediate rows need intermediates"),
            (self.tree_parents in (None,) + INDEX_DTYPES, f"tree_parents must be None or one of {INDEX_DTYPES}"),
            (self.tree_parents is None or (self.intermediate_rows is not None and self.layout == "klast"),
             "tree parents need intermediates at a row table"),
            (self.gate_parts >= 0 and (not self.gate_parts or (
                self.gate_dtype == "float32" and self.beta_dtype is None and not self.precomputed_gates
                and self.row_form == "batch" and self.varlen is None)),
             "gate parts are fp32 raw gates of batch rows"),
        ))

    @property
    def pool(self) -> bool:
        return self.index_dtype is not None

    @property
    def multi_token(self) -> bool:
        """Served by an MTP kernel: K-last with T > 1, intermediates or accepted counts to commit."""
        return self.layout == "klast" and (self.T > 1 or self.has_intermediate or self.commits_accepted)

    @property
    def commits_accepted(self) -> bool:
        """accepted_tokens[b] says after how many tokens the state is written (vLLM's slots read
        the accepted counts instead: they pick the slot to read)."""
        return self.has_accepted and not self.vllm_slots

    @property
    def output_dtype(self) -> str:
        return self.out_dtype or self.io_dtype

    @property
    def writes_states(self) -> bool:
        """Writes a state per token (intermediates or token slots, of more than one token): the
        writes bound the kernel."""
        return self.has_intermediate or (self.has_token_slots and self.T > 1)

    def short_name(self) -> str:
        """A compact, human-readable label for logs and benchmark tables."""
        parts = [
            self.layout, f"T{self.T}", f"H{self.H}", f"HV{self.HV}", f"K{self.K}", f"V{self.V}",
            self.io_dtype, f"state-{self.state_dtype}", self.regime, self.arch,
        ]
        flags = (
            (self.pool, "pool"), (self.has_intermediate, "inter"), (not self.update_state, "noupdate"),
            (self.has_accepted, "accepted"), (not self.use_l2norm, "nol2"), (self.has_token_slots, "tokslots"),
            (self.strided_state, "strided"), (not self.zero_padding_output, "keeppad"),
            (self.out_dtype is not None, f"out-{self.out_dtype}"), (self.precomputed_gates, "gates"),
            (self.vllm_slots, "vllm"), (self.varlen is not None, "varlen"), (self.replay_cache, "replay"),
            (self.pdl_wait, "pdl"), (self.row_form != "batch", self.row_form),
            (self.intermediate_rows is not None, "interrows"), (self.tree_parents is not None, "tree"),
            (self.gate_parts > 0, f"parts{self.gate_parts}"), (self.gate_rows, "gaterows"),
            (self.slot_column, "slotcol"),
        )
        return "/".join(parts + [name for on, name in flags if on])


# ----------------------------------------------------------------------------- fused decode step
# The fused step (flashgdn.gdn_fused_decode_step) runs two launches from one compiled function
# (StepSpec): the conv/gate kernel (kernels/conv_gate.py: the causal conv1d update with SiLU over the
# q/k/v channels and the b/a projection GEMV, into a workspace) and then the K-last decode kernel of a
# KernelSpec on views of that workspace. The conv/gate kernel has its own spec and argument list.

CONV_WIDTHS = (2, 3, 4)


def conv_gate_vec(HV: int) -> int:
    """Columns of w_ba [hidden, 2 HV] in one vector load of the conv/gate kernel: 8 (16 bytes)
    where 2 HV allows, else fewer."""
    n = 8
    while (2 * HV) % n:
        n //= 2
    return n


def conv_gate_blocks(HV: int) -> Tuple[int, int]:
    """(column blocks of a w_ba row, gate_vec columns each; that count padded to a power of two, the
    lanes a split gate CTA gives one row)."""
    blocks = 2 * HV // conv_gate_vec(HV)
    return blocks, 1 << (blocks - 1).bit_length()


class ConvGateArgs(NamedTuple):
    """The tensors of the conv/gate kernel, in order. hidden_states [B, hidden]; w_ba
    [hidden, 2 HV]; mixed_qkv [B, qkv_dim] (pre-conv); conv_weight [qkv_dim, width]; conv_bias
    [qkv_dim] (None: no bias); conv_state [P, qkv_dim, width - 1] (any strides: the "SD" and
    "DS" pools); state_indices [B] int32; qkv_out [B, qkv_dim] and ba_out [B, 2 HV], the
    workspace rows the decode kernel reads (post-conv q | k | v, and b | a); with the split
    projection (policy.ConvGateConfig.partial_sums = S) ba_out is [S, B, 2 HV] fp32, its partial
    sums."""

    hidden_states: Any
    w_ba: Any
    mixed_qkv: Any
    conv_weight: Any
    conv_bias: Any
    conv_state: Any
    state_indices: Any
    qkv_out: Any
    ba_out: Any


@dataclasses.dataclass(frozen=True)
class ConvGateSpec:
    """Compile-time facts of one conv/gate kernel variant (hashable: the cache key). All of its
    tensors are bf16 (FlashInfer's contract) and its indices int32; batch, pool size and the
    conv-state strides stay dynamic, so both conv-state layouts share one build."""

    H: int
    HV: int
    D: int  # K = V
    hidden: int
    width: int
    has_bias: bool
    arch: str
    device_class: Optional[str] = None  # the tuning table (kernels.policy); None: the arch's
    regime: str = "large"  # kernels.policy.conv_gate_regime: the CTA size, batch rows per gate CTA, gate CTAs

    def __post_init__(self) -> None:
        _refuse_invalid(self, (
            (self.D in SUPPORTED_HEAD_DIMS, f"D must be one of {SUPPORTED_HEAD_DIMS}"),
            (self.regime in CONV_GATE_REGIMES, f"regime must be one of {CONV_GATE_REGIMES}"),
            (self.H >= 1 and self.HV >= 1 and self.HV % self.H == 0, "HV must be a multiple of H"),
            (self.hidden >= 64 and self.hidden % 64 == 0, "hidden must be a positive multiple of 64"),
            (self.width in CONV_WIDTHS, f"width must be one of {CONV_WIDTHS}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}"),
        ))

    @property
    def qkv_dim(self) -> int:
        return (2 * self.H + self.HV) * self.D

    @property
    def gate_vec(self) -> int:
        return conv_gate_vec(self.HV)

    def short_name(self) -> str:
        parts = ["convgate", f"H{self.H}", f"HV{self.HV}", f"D{self.D}", f"hidden{self.hidden}",
                 f"w{self.width}", self.regime, self.arch]
        return "/".join(parts + ([] if self.has_bias else ["nobias"]))


# The tensors of the fused step's one compiled function (StepSpec), in order: ConvGateArgs', then the
# decode's tensors that are not the workspace's views (its q, k, v, a and b are views of qkv_out and
# ba_out; its slot indices are state_indices): A_log [HV], dt_bias [HV], ssm_state [P, HV, V, K] and
# the output [B, 1, HV, V]; and sync [SYNC_WORDS] int32: the counters of a one-launch step (StepSpec.one_launch;
# kernels/step.py), zero between launches (its last CTA sets them back to zero); other steps never read it.
StepArgs = NamedTuple("StepArgs", [(name, Any) for name in (*ConvGateArgs._fields, "A_log", "dt_bias", "ssm_state",
                                                            "output", "sync")])
SYNC_WORDS = 4


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The fused step's conv/gate kernel and the K-last decode behind it, launched by one compiled
    function (hashable: the cache key): the decode reads q, k, v, a and b as views of the conv/gate
    kernel's workspace rows (its KernelSpec as a separate build would take them: [B, 1, ...] views,
    gate_parts partial sums where the conv/gate build splits the projection)."""

    conv: ConvGateSpec
    decode: KernelSpec
    # One launch (policy.fused_step_one_launch): the decode's CTAs in the conv/gate kernel's grid,
    # waiting on a counter of finished conv/gate CTAs; the decode loads its state first (pdl_wait).
    one_launch: bool = False

    def __post_init__(self) -> None:
        c, d = self.conv, self.decode
        _refuse_invalid(self, (
            (d.layout == "klast" and d.T == 1 and d.pool and d.row_form == "batch" and d.varlen is None,
             "the decode must be the K-last T = 1 pool decode on batch rows"),
            (not self.one_launch or (d.pdl_wait and c.regime != "gemm"),
             "one launch needs a decode that waits for its inputs (pdl_wait) and conv/gate CTAs that project"),
            ((d.H, d.HV, d.K, d.V) == (c.H, c.HV, c.D, c.D), "the two kernels' geometries differ"),
            (d.arch == c.arch and d.device_class == c.device_class, "the two kernels' targets differ"),
            (d.io_dtype == "bfloat16" and d.index_dtype == "int32", "the workspace is bf16, the slots int32"),
        ))

    @property
    def arch(self) -> str:
        return self.conv.arch

    def short_name(self) -> str:
        return f"step[{self.conv.short_name()}+{self.decode.short_name()}{'/1launch' if self.one_launch else ''}]"


@dataclasses.dataclass(frozen=True)
class CommitSpec:
    """Compile-time facts of one ReplaySSM commit variant (hashable: the cache key). The layer,
    slot and batch counts stay dynamic, and so do the layer and slot strides of every tensor."""

    H: int
    HV: int
    K: int
    V: int
    T: int  # tokens of a window (the verify's T)
    state_dtype: str
    use_l2norm: bool
    arch: str
    regime: str
    null_block_id: int = -1  # slots <= this are not live
    has_track: bool = False  # track_state_indices / track_steps given
    tile: Optional[Tuple[int, ...]] = None  # explicit CTA shape (tuning runs); None: the policy's
    device_class: Optional[str] = None  # as KernelSpec.device_class

    # What the decode kernels' L2 prefetch (decode_kernel.DecodeKernel) reads of a spec: the checkpoint is
    # K-last, and a head's rows are one range (its strides past the slot are static).
    layout = "klast"
    strided_state = False

    def __post_init__(self) -> None:
        _refuse_invalid(self, (
            *_head_checks(self),
            (self.state_dtype in STATE_DTYPES, f"state_dtype must be one of {STATE_DTYPES}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}"),
            (self.regime in REGIMES, f"regime must be one of {REGIMES}"),
            (self.null_block_id >= -1, "null_block_id must be >= -1"),
        ))

    def short_name(self) -> str:
        """A compact, human-readable label for logs and benchmark tables."""
        parts = ["commit", f"T{self.T}", f"H{self.H}", f"HV{self.HV}", f"K{self.K}", f"V{self.V}",
                 f"state-{self.state_dtype}", self.regime, self.arch]
        flags = ((not self.use_l2norm, "nol2"), (self.has_track, "track"),
                 (self.null_block_id != -1, f"null{self.null_block_id}"))
        return "/".join(parts + [name for on, name in flags if on])
