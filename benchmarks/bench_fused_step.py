"""Benchmark flashgdn.gdn_fused_decode_step against the composed path an engine runs today and
against FlashInfer's gdn_fused_decode_step (when `import flashinfer` works).

    python benchmarks/bench_fused_step.py                      # H200: all shapes, B = 1..256
    python benchmarks/bench_fused_step.py --shapes qwen3next --tp 1 --batch 1 8 64
    python benchmarks/bench_fused_step.py --compile-only       # no GPU: builds every variant

Paths, all on one SD conv pool (vLLM's layout) and a pool of P = 2 B slots, B of them in a
shuffled order:
- fused:            flashgdn.gdn_fused_decode_step (conv/gate launch + K-last decode launch)
- composed-conv1d:  torch `hidden @ w_ba` + causal_conv1d_update (the causal-conv1d package, when
                    importable) + flashgdn's packed decode (flashgdn.engines)
- composed-torch:   the same with the conv update in torch ops (gather, window, SiLU, scatter)
- flashinfer:       flashinfer.gdn_fused_decode_step (its composable torch path on Hopper)

Timers (flashgdn.bench.timing, cold L2 before every iteration): "events" (default) times the
replay of a CUDA graph holding one step, launch gaps between a path's kernels included, as an
engine's graph-captured decode sees them; "cupti" sums the kernels' own GPU time.

Shapes: Qwen3-Next (hidden 2048, 16 q/k heads, 32 v heads, D 128, conv width 4) and Qwen3.5 /
Qwen3.6-27B (hidden 5120, 16 q/k heads, 48 v heads, D 128, width 4: the geometry FlashInfer's
gdn_fused_decode_registry.json lists), sharded over --tp ranks (heads / tp).
"""
from __future__ import annotations

import argparse
import sys

SHAPES = {"qwen3next": dict(hidden=2048, H=16, HV=32, D=128, width=4),
          "qwen35": dict(hidden=5120, H=16, HV=48, D=128, width=4)}
STATES = ("fp32", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--tp", nargs="+", type=int, default=[1, 4])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--state", nargs="+", choices=STATES, default=["fp32"])
    p.add_argument("--timer", choices=("events", "cupti"), default="events")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--compile-only", action="store_true", help="build every variant for --arch, no GPU")
    p.add_argument("--arch", default="sm_90a", help="target of --compile-only")
    return p.parse_args(argv)


def geometry(shape: str, tp: int) -> dict:
    g = dict(SHAPES[shape])
    if g["H"] % tp or g["HV"] % tp:
        raise SystemExit(f"{shape}: {g['H']} q/k and {g['HV']} v heads do not split over tp={tp}")
    g["H"] //= tp
    g["HV"] //= tp
    return g


def compile_only(args) -> int:
    from flashgdn.kernels.build import timed_compile
    from flashgdn.spec import ConvGateSpec, KernelSpec

    for shape in args.shapes:
        for tp in args.tp:
            g = geometry(shape, tp)
            specs = [ConvGateSpec(g["H"], g["HV"], g["D"], g["hidden"], g["width"], True, args.arch)]
            for state in args.state:
                for regime in ("small", "large"):
                    specs.append(KernelSpec("klast", g["H"], g["HV"], g["D"], g["D"], 1, "bfloat16",
                                            {"fp32": "float32", "bf16": "bfloat16"}[state], "bfloat16", "float32",
                                            g["D"] ** -0.5, True, args.arch, regime, index_dtype="int32"))
            for s in specs:
                _, seconds = timed_compile(s)
                print(f"{shape} tp{tp} {s.short_name()}: compiled in {seconds:.1f} s")
    return 0


def inputs(g: dict, B: int, state: str, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(B)
    rnd = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=gen).to(dt).to(device)  # noqa: E731
    H, HV, D, hidden, W = g["H"], g["HV"], g["D"], g["hidden"], g["width"]
    C, P = (2 * H + HV) * D, 2 * B
    sdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[state]
    return dict(
        hidden_states=rnd(B, hidden) * 0.5, w_ba=rnd(hidden, 2 * HV) * (2.0 / hidden ** 0.5), mixed_qkv=rnd(B, C),
        conv_weight=rnd(C, W) * 0.5, conv_bias=rnd(C) * 0.1,
        conv_state=rnd(P, W - 1, C).transpose(1, 2),  # SD pool, vLLM's transposed view
        A_log=torch.log(torch.rand(HV, generator=gen) * 15 + 1).to(device), dt_bias=rnd(HV, dt=torch.float32),
        scale=None, ssm_state=rnd(P, HV, D, D, dt=sdt),
        state_indices=torch.randperm(P, generator=gen)[:B].to(torch.int32).to(device),
    )


def composed(kw: dict, conv_update):
    """torch GEMV + a conv update + flashgdn's packed decode; returns a callable of one step."""
    import torch

    from flashgdn.engines import fused_recurrent_gated_delta_rule_packed_decode

    B, HV, D = kw["hidden_states"].shape[0], kw["A_log"].shape[0], kw["ssm_state"].shape[-1]
    out = torch.empty(B, 1, HV, D, dtype=torch.bfloat16, device=kw["hidden_states"].device)

    def step():
        ba = kw["hidden_states"] @ kw["w_ba"]
        y = conv_update(kw)
        fused_recurrent_gated_delta_rule_packed_decode(
            y, ba[:, HV:], ba[:, :HV], kw["A_log"], kw["dt_bias"], D ** -0.5, kw["ssm_state"], out,
            kw["state_indices"], True)

    return step


def torch_conv_update(kw):
    import torch
    import torch.nn.functional as F

    idx = kw["state_indices"].long()
    window = torch.cat([kw["conv_state"].index_select(0, idx), kw["mixed_qkv"].unsqueeze(-1)], -1)
    y = F.silu((window.float() * kw["conv_weight"].float()).sum(-1) + kw["conv_bias"].float()).to(torch.bfloat16)
    kw["conv_state"].index_copy_(0, idx, window[..., 1:])
    return y


def conv1d_package_update():
    """causal_conv1d_update of the causal-conv1d package, or None when it is not importable."""
    try:
        from causal_conv1d import causal_conv1d_update
    except Exception:
        return None

    def update(kw):
        return causal_conv1d_update(kw["mixed_qkv"], kw["conv_state"], kw["conv_weight"], kw["conv_bias"], "silu",
                                    conv_state_indices=kw["state_indices"])

    return update


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    import torch

    import flashgdn
    from flashgdn.bench.timing import L2Flusher, summarize, time_fn

    try:
        import flashinfer
        fi_step = getattr(flashinfer, "gdn_fused_decode_step", None)
    except Exception:
        fi_step = None
    conv1d = conv1d_package_update()
    device = torch.device("cuda")
    flusher = L2Flusher(device)
    paths = ["fused", "composed-torch"] + (["composed-conv1d"] if conv1d else []) + (["flashinfer"] if fi_step else [])
    print(f"timer {args.timer}, cold L2; us per step (median); speedup = best composed / fused")
    print("| shape | tp | state | B | " + " | ".join(paths) + " | speedup |")
    print("|" + "---|" * (len(paths) + 5))
    for shape in args.shapes:
        for tp in args.tp:
            g = geometry(shape, tp)
            for state in args.state:
                for B in args.batch:
                    kw = inputs(g, B, state, device)
                    calls = {
                        "fused": lambda kw=kw: flashgdn.gdn_fused_decode_step(**kw),
                        "composed-torch": composed(kw, torch_conv_update),
                        "composed-conv1d": composed(kw, conv1d) if conv1d else None,
                        "flashinfer": (lambda kw=kw: fi_step(**kw)) if fi_step else None,
                    }
                    us = {}
                    for name in paths:
                        try:
                            times, _ = time_fn(calls[name], iters=args.iters, timer=args.timer, flusher=flusher)
                            us[name] = summarize(times)["median_us"]
                        except Exception as e:  # a path that cannot run this shape: say why, go on
                            print(f"  {name} {shape} tp{tp} B={B}: {type(e).__name__}: {e}", file=sys.stderr)
                            us[name] = float("nan")
                    best = min((v for k, v in us.items() if k.startswith("composed")), default=float("nan"))
                    cells = " | ".join(f"{us[p]:.2f}" for p in paths)
                    print(f"| {shape} | {tp} | {state} | {B} | {cells} | {best / us['fused']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
