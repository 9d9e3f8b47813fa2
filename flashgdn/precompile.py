"""`flashgdn-precompile`: fill the on-disk kernel cache for a model configuration, without a GPU.

    flashgdn-precompile --arch sm_90a -H 16 -HV 32 --head-k 128 --head-v 128 \\
        --state-dtype fp32 bf16 --io-dtype bf16 --seq-len 1 2 4 8 --pool

builds every kernel variant that the given model shapes and options need on the given GPU
architecture(s), in both batch regimes, and stores each in the disk cache (flashgdn.disk_cache;
FLASHGDN_CACHE_DIR or --cache-dir), so that a serving engine's processes load them instead of
compiling. T = 1 builds the one-token decode kernel of each --layout ("klast", the API's
pretranspose; "kmajor", its nontranspose, dense state only); T > 1 builds the multi-token (MTP)
kernel, which always reads a state pool. One line per variant says whether it was compiled or
was already on disk, and how long it took; the exit status is non-zero when any variant failed.

--entry picks the functions whose variants are built (flashgdn.engine_specs derives the engines'
from meta tensors of their calls, through each entry point's own argument list):

    flashinfer    gated_delta_rule_decode_pretranspose / _decode / _mtp (the default): --layout,
                  --pool, --out-indices, --intermediate, --no-state-update, --accepted-tokens apply
    packed        flashgdn.engines.fused_recurrent_gated_delta_rule_packed_decode (SGLang's rule)
    packed-vllm   fused_recurrent_gated_delta_rule_packed_decode_vllm (vLLM's rule)
    sglang        fused_sigmoid_gating_delta_rule_update in SGLang's own layout (varlen q/k/v
                  [1, N * T, ...] with cu_seqlens, a and b [N * T, HV]): T = 1 its decode, T > 1
                  its target verify (the state after every token into its speculative buffer),
                  for each --seq-len
    sglang-tree   the same with an EAGLE tree (retrieve_parent_token, in --index-dtype) in its
                  target verify (--speculative-eagle-topk > 1)
    recurrent     fused_recurrent_gated_delta_rule (vLLM's op on precomputed gates: g fp32, beta in
                  --io-dtype), varlen as vLLM calls it: T = 1 its decode, T > 1 its verify with
                  accepted counts, for each --seq-len; --index-dtype is that of the slots,
                  cu_seqlens and the counts
    sigmoid-vllm  vLLM's fused_sigmoid_gating_delta_rule_update (engines'
                  fused_sigmoid_gating_delta_rule_update_vllm): recurrent's calls on raw gates a and
                  b (--gate-dtype), A_log and dt_bias, the gates computed in the kernel
    fused-step    gdn_fused_decode_step: its compiled function of the conv/gate kernel (--hidden,
                  --conv-width, --conv-bias / --no-conv-bias) and the decode, one per conv/gate
                  build the regime can meet; bf16 with K = V, int32 indices

The one-token entries (packed, packed-vllm, fused-step) build their T = 1 variant whatever
--seq-len says. --gate-dtype is that of a and b (packed, sglang, sigmoid-vllm), --dt-bias-dtype that
of dt_bias (all but recurrent). A vLLM deployment with speculative decoding (3 draft tokens), whose
GDN layer runs the packed decode and, for the verify, its sigmoid-gating op, say:

    flashgdn-precompile -H 4 -HV 8 --dt-bias-dtype bf16 --state-dtype bf16 --entry packed-vllm sigmoid-vllm \
        --seq-len 1 4
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import sys
import time
from typing import Optional, Sequence, Tuple

from . import engine_specs
from .cli_args import positive_int
from .spec import ARCHS, CONV_WIDTHS, LAYOUTS, MAX_TOKENS, REGIMES, SUPPORTED_HEAD_DIMS, KernelSpec

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int32": "int32", "int64": "int64"}
ENTRIES = ("flashinfer", *engine_specs.ENTRIES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashgdn-precompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--arch", nargs="+", choices=ARCHS, default=["sm_90a"], help="GPU architecture(s) (default: sm_90a)")
    add("-H", "--num-q-heads", type=positive_int, default=16, help="q and k heads (default: 16)")
    add("-HV", "--num-v-heads", type=positive_int, default=32, help="value heads, a multiple of H (default: 32)")
    add("--head-k", type=int, choices=SUPPORTED_HEAD_DIMS, default=128, help="K (default: 128)")
    add("--head-v", type=int, choices=SUPPORTED_HEAD_DIMS, default=128, help="V (default: 128)")
    add("--io-dtype", choices=("bf16", "fp16"), default="bf16", help="q, k, v and output (default: bf16)")
    add("--state-dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32"], help="state dtype(s) (default: fp32)")
    add("--gate-dtype", choices=("bf16", "fp16", "fp32"), help="a and b (default: the --io-dtype)")
    add("--dt-bias-dtype", choices=("fp32", "bf16"), default="fp32", help="dt_bias (default: fp32)")
    add("--seq-len", nargs="+", type=positive_int, default=[1],
        help=f"tokens per sequence T: 1 = decode, 2..{MAX_TOKENS} = MTP (default: 1)")
    add("--layout", nargs="+", choices=LAYOUTS, default=["klast"],
        help="state layout(s) of the T = 1 kernels: klast (pretranspose), kmajor (nontranspose) (default: klast)")
    add("--pool", action=argparse.BooleanOptionalAction, default=True,
        help="T = 1 klast: state pool + indices (default) or a dense state; MTP always uses a pool")
    add("--index-dtype", nargs="+", choices=("int32", "int64"), default=["int32"],
        help="dtype(s) of the pool indices (default: int32)")
    add("--out-indices", action="store_true", help="pool kernels also take output_state_indices")
    add("--intermediate", action="store_true", help="MTP kernels write intermediate_states_buffer")
    add("--no-state-update", action="store_true", help="MTP kernels with disable_state_update=True")
    add("--accepted-tokens", action="store_true", help="MTP kernels take accepted_tokens")
    add("--output-allocated", action="store_true",
        help="T > 1 calls pass output=None (flashgdn allocates it: the variant that writes padding rows' output)")
    add("--no-l2norm", action="store_true", help="use_qk_l2norm=False")
    add("--scale", type=float, help="q scale (default: head_k ** -0.5)")
    add("--device-class", help="tuning table (kernels.policy.DEVICE_TABLES) the GPU uses "
        "(default: that of the arch's first known device, as the API picks for it)")
    add("--entry", nargs="+", choices=ENTRIES, default=["flashinfer"],
        help="the functions whose variants to build (the list above) (default: flashinfer)")
    add("--hidden", type=positive_int, default=2048, help="fused-step: hidden size, a multiple of 64 (default: 2048)")
    add("--conv-width", type=int, choices=CONV_WIDTHS, default=4, help="fused-step: conv width (default: 4)")
    add("--conv-bias", action=argparse.BooleanOptionalAction, default=True,
        help="fused-step: the conv has a bias (default) or none (conv_bias=None)")
    add("--regime", nargs="+", choices=REGIMES, default=list(REGIMES), help="batch regime(s) (default: both)")
    add("--cache-dir", help="cache directory (default: FLASHGDN_CACHE_DIR, else $XDG_CACHE_HOME/flashgdn)")
    add("--jobs", "-j", type=positive_int, default=1, help="variants built at once, one process each (default: 1)")
    add("--list", action="store_true", help="print the variants and exit")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_v_heads % args.num_q_heads:
        parser.error(f"--num-v-heads ({args.num_v_heads}) must be a multiple of --num-q-heads ({args.num_q_heads})")
    if max(args.seq_len) > MAX_TOKENS:
        parser.error(f"--seq-len values must be at most {MAX_TOKENS}, got {max(args.seq_len)}")
    from .kernels import policy

    if args.device_class is not None and args.device_class not in policy.DEVICE_TABLES:
        parser.error(f"--device-class must be one of {sorted(policy.DEVICE_TABLES)}, got {args.device_class!r}")
    if args.accepted_tokens and args.no_state_update:
        parser.error("--accepted-tokens selects the state to commit: it cannot go with --no-state-update")
    if args.hidden % 64:
        parser.error(f"--hidden must be a multiple of 64, got {args.hidden}")
    gate = args.gate_dtype or args.io_dtype
    gated = [e for e in args.entry if e in ("flashinfer", "packed", "packed-vllm", "sglang", "sglang-tree",
                                            "sigmoid-vllm")]
    if gated and gate not in (args.io_dtype, "fp32"):
        parser.error(f"--gate-dtype must be the --io-dtype ({args.io_dtype}) or fp32 (a and b of the {gated[0]} "
                     f"entry), got {gate}")
    if "fused-step" in args.entry and (args.io_dtype != "bf16" or args.head_k != args.head_v):
        parser.error(f"the fused-step entry is bf16 with K = V (gdn_fused_decode_step's contract), got "
                     f"--io-dtype {args.io_dtype}, --head-k {args.head_k}, --head-v {args.head_v}")
    return args


def model_specs(args: argparse.Namespace) -> list:
    """Every variant (KernelSpec, or the fused step's StepSpec) the flags ask for, made by the
    API's own api.kernel_spec from meta tensors of the call's shapes (B = 1: the batch only picks
    the regime, given here), so that each is the variant that a call with those shapes and options
    looks up: arch, then state dtype, then entry, then T, then layout (T = 1) and pool index dtype,
    then regime. Duplicates are dropped."""
    from .device import DeviceFacts
    from .kernels import policy

    specs: dict = {}
    for arch in args.arch:
        known = next(d for d in policy.KNOWN_DEVICES if d.arch == arch)
        facts = DeviceFacts(arch, known.sm_count, args.device_class or known.table)
        for state in args.state_dtype:
            for entry in args.entry:
                found = _flashinfer_specs(args, state, facts) if entry == "flashinfer" else \
                    _engine_specs(args, entry, state, facts)
                specs.update(dict.fromkeys(found))
    return list(specs)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _engine_specs(args: argparse.Namespace, entry: str, state: str, facts) -> list:
    """The variants of a serving engine's entry point (flashgdn.engine_specs): its T = 1 decode; the
    recurrent ops' and SGLang's, for each --seq-len T (T > 1: the engine's verify); per index dtype (the
    fused step's indices are int32) and regime."""
    from .validation import Problem

    found = []
    tokens = (1,) if entry in engine_specs.ONE_TOKEN else args.seq_len
    indices = ("int32",) if entry == "fused-step" else args.index_dtype
    for T in tokens:
        problem = Problem(1, T, args.num_q_heads, args.num_v_heads, args.head_k, args.head_v)
        for index in indices:
            for regime in args.regime:
                found += engine_specs.kernel_specs(
                    entry, problem, facts, io=_torch_dtype(args.io_dtype), state=_torch_dtype(state),
                    index=_torch_dtype(index), gate=_torch_dtype(args.gate_dtype or args.io_dtype),
                    dt_bias=_torch_dtype(args.dt_bias_dtype), scale=args.scale, use_l2norm=not args.no_l2norm,
                    hidden=args.hidden, conv_width=args.conv_width, conv_bias=args.conv_bias, regime=regime)
    return found


def _flashinfer_specs(args: argparse.Namespace, state: str, facts) -> list:
    """The variants of the FlashInfer-style functions: per T, layout (T = 1) and pool index dtype,
    then regime."""
    from . import api
    from .spec import KernelArgs
    from .validation import Problem

    def meta(dtype, *shape):
        return None if dtype is None else engine_specs.meta(_torch_dtype(dtype), *shape)

    H, HV, K, V = args.num_q_heads, args.num_v_heads, args.head_k, args.head_v
    io, gate = args.io_dtype, args.gate_dtype or args.io_dtype
    found = []
    for T in args.seq_len:
        mtp = T > 1
        if mtp:
            builds = [("klast", d) for d in args.index_dtype]
        else:
            builds = [(layout, None) for layout in args.layout if layout == "kmajor" or not args.pool]
            if "klast" in args.layout and args.pool:
                builds += [("klast", d) for d in args.index_dtype]
        # T > 1 (gated_delta_rule_mtp, or pretranspose with T > 1) leaves a passed output's padding rows as
        # they are (api.CallOptions.zero_padding_output).
        options = api.CallOptions(scale=args.scale, use_l2norm=not args.no_l2norm,
                                  update_state=not (mtp and args.no_state_update),
                                  zero_padding_output=not mtp or args.output_allocated)
        for layout, index in builds:
            rows, cols = (V, K) if layout == "klast" else (K, V)
            tensors = KernelArgs(
                q=meta(io, 1, T, H, K), k=meta(io, 1, T, H, K), v=meta(io, 1, T, HV, V),
                a=meta(gate, 1, T, HV), b=meta(gate, 1, T, HV), A_log=meta("fp32", HV),
                dt_bias=meta(args.dt_bias_dtype, HV), state=meta(state, 1, HV, rows, cols),
                state_indices=meta(index, 1),
                output_state_indices=meta(index, 1) if index and args.out_indices else None,
                accepted_tokens=meta("int32", 1) if mtp and args.accepted_tokens else None,
                intermediate_states=meta(state, 1, T, HV, rows, cols) if mtp and args.intermediate else None,
                output=meta(io, 1, T, HV, V),
            )
            problem = Problem(1, T, H, HV, K, V)
            for regime in args.regime:
                found.append(api.kernel_spec(layout, problem, tensors, options, facts, regime))
    return found


# ----------------------------------------------------------------------------- building

_CACHES: dict = {}  # cache directory -> this process's CompileCache for it


def _cache(directory: Optional[str]):
    if directory not in _CACHES:
        from .cache import CompileCache, compile_variant
        from .disk_cache import DiskCache

        _CACHES[directory] = CompileCache(compile_variant, disk=DiskCache(directory, enabled=True))
    return _CACHES[directory]


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def build_one(spec: KernelSpec, directory: Optional[str]) -> Tuple[str, float]:
    """("compiled" | "loaded from disk" | "FAILED: why", seconds) for `spec`."""
    cache = _cache(directory)
    compiles, start = cache.compiles, time.perf_counter()
    try:
        cache.get(spec)
    except Exception as exc:  # report every variant, fail at the end
        return f"FAILED: {_one_line(exc)}", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if not cache.disk.valid(spec):
        return "FAILED: compiled but not stored in the disk cache (see the warning above)", seconds
    return ("compiled" if cache.compiles > compiles else "loaded from disk"), seconds


def _show_warnings() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `flashgdn-precompile`; returns the exit status."""
    from .disk_cache import DiskCache, disk_cache_enabled

    args = parse_args(argv)
    specs = model_specs(args)
    if args.list:
        print("\n".join(s.short_name() for s in specs))
        return 0
    if not disk_cache_enabled():
        print("flashgdn-precompile: the disk cache is off (FLASHGDN_DISK_CACHE=0): nothing would be stored",
              file=sys.stderr)
        return 2
    _show_warnings()
    directory = str(DiskCache(args.cache_dir).directory)
    print(f"{len(specs)} variant{'' if len(specs) == 1 else 's'} -> {directory}", flush=True)
    start, counts = time.perf_counter(), {"compiled": 0, "loaded from disk": 0, "failed": 0}

    def report(i: int, spec: KernelSpec, result: Tuple[str, float]) -> None:
        status, seconds = result
        counts["failed" if status.startswith("FAILED") else status] += 1
        print(f"[{i}/{len(specs)}] {spec.short_name()}: {status} ({seconds:.2f} s)", flush=True)

    if args.jobs == 1 or len(specs) == 1:
        for i, spec in enumerate(specs, 1):
            report(i, spec, build_one(spec, directory))
    else:
        # Fresh processes (spawn): forking a process that has loaded torch and threads is unsafe.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_show_warnings) as pool:
            futures = [pool.submit(build_one, spec, directory) for spec in specs]
            for i, (spec, future) in enumerate(zip(specs, futures), 1):
                try:
                    result = future.result()
                except Exception as exc:  # a worker that died
                    result = (f"FAILED: {_one_line(exc)}", 0.0)
                report(i, spec, result)
    print(f"done in {time.perf_counter() - start:.1f} s: {counts['compiled']} compiled, "
          f"{counts['loaded from disk']} loaded from disk, {counts['failed']} failed")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
