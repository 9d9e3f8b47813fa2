"""ReplaySSM step cost (issue #27): per layer, the verify (gated_delta_rule_mtp with
cache_replayssm=True) plus its share of the all-layer commit, against the two ways engines keep the
draft states today: MTP with intermediate_states_buffer plus a copy of the accepted state into the
pool, and MTP with one pool slot per token (ssm_state_indices). Also the verify's overhead over
MTP with a frozen state and no buffer (target: within 5 %), and the commit's state traffic as a
share of the device copy bandwidth (target: >= 90 % at B >= 64).

    python benchmarks/replay_step.py --state-dtype float32 bfloat16 --tokens 2 4 8 \\
        --batch-size 1 4 16 64 128 256 --layers 48 --csv replay.csv
    python benchmarks/replay_step.py --compile-only --arch sm_90a   # no GPU: builds the variants
    python benchmarks/replay_step.py --tokens 4 8 --batch-size 16 64 256 \\
        --settings table "commit_mma_min_tokens={'float32': 2, 'bfloat16': 2}"   # the commit's two kernels
    python benchmarks/replay_step.py --calls commit commit_all_T --settings table \
        "prefetch_bytes+={'commit': 4194304, 'commit_mma': 4194304}"   # the commit alone: its L2 prefetch
    python benchmarks/replay_step.py --calls mtp_frozen verify --batch-size 1 4 8 --iters 100 --rounds 7
        # the verify's overhead timed in turns with frozen MTP: the median of 7 rounds' ratios

Shapes: Qwen3-Next (H=16, HV=32, K=V=128), bf16 q/k/v, a pool of 2B scattered slots, accepted
counts random in [1, T] (and all T for the commit's worst case). Times are CUPTI kernel times (or
CUDA events), medians with a cold L2 (flashgdn.bench.timing). With --settings, the grid runs once
per setting of the device table (flashgdn.bench.table_setting; its "setting" column).
"""
from __future__ import annotations

import argparse
import csv
import functools
import statistics
import sys
import time

import torch

from flashgdn.bench.cli import positive_int
from flashgdn.bench.table_setting import label, parse_setting, switched
from flashgdn.cache import CompileCache, compile_variant

H, HV, K, V = 16, 32, 128, 128
DEVICE = "cuda"  # where measure() puts its tensors
SM90_FACTS = ("sm90-hbm3e", 132)  # the device class and SM count the compile-only builds assume: the H200
# The calls `measure` times, in its order (--calls picks some of them).
CALLS = ("mtp_frozen", "verify", "commit", "commit_all_T", "mtp_inter", "copy", "mtp_token_slots")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--state-dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--tokens", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--batch-size", nargs="+", type=int, default=[1, 4, 16, 64, 128, 256])
    p.add_argument("--layers", type=int, default=48, help="layers of the commit's checkpoint (default 48)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="time the calls in turns, this many rounds of --iters each, every other round in reverse "
                        "order: the verify's overhead is then the median of the rounds' ratios (a drift between the "
                        "calls' timings cancels), with their range")
    p.add_argument("--timer", default="auto", choices=["auto", "cupti", "events"])
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--compile-only", action="store_true", help="only build the verify and commit variants (no GPU)")
    p.add_argument("--arch", default="sm_90a", help="target of --compile-only (sm_90a, sm_100a, sm_103a)")
    p.add_argument("--calls", nargs="+", choices=CALLS, default=list(CALLS),
                   help="time only these calls (default: all); a derived column needs its calls")
    p.add_argument("--settings", type=parse_setting, nargs="+", default=[{}],
                   help='device-table settings, each "table" or field=value[,field=value...] (field+={...} adds '
                        'entries to a dict field; default: table)')
    return p.parse_args(argv)


def compile_only(args) -> int:
    """Build every verify and commit variant the sweep would use under each setting, for args.arch,
    on the CPU."""
    device_class = SM90_FACTS[0]
    for setting in args.settings:
        with switched(device_class, setting, CompileCache(compile_variant)):
            _compile_grid(args, setting)
    return 0


def _compile_grid(args, setting) -> None:
    from flashgdn.kernels import policy
    from flashgdn.spec import CommitSpec, KernelSpec

    device_class, sms = SM90_FACTS
    specs = set()
    for sdt in args.state_dtype:
        for T in args.tokens:
            for B in args.batch_size:
                regime = policy.regime(B, HV, sms, device_class)
                specs.add(KernelSpec("klast", H, HV, K, V, T, "bfloat16", sdt, "bfloat16", "float32", K ** -0.5, True,
                                     args.arch, regime, index_dtype="int32", update_state=False, device_class=device_class,
                                     zero_padding_output=False, replay_cache=True))
                specs.add(CommitSpec(H, HV, K, V, T, sdt, True, args.arch,
                                     policy.regime(args.layers * B, HV, sms, device_class), device_class=device_class))
    for spec in sorted(specs, key=lambda s: s.short_name()):
        start = time.perf_counter()
        compile_variant(spec)
        kernel = policy.BuildConfig.for_spec(spec).kernel
        print(f"{spec.short_name()} ({kernel}, {label(setting)}): compiled ({time.perf_counter() - start:.2f} s)",
              flush=True)


def _inputs(B, T, sdt, L, device):
    # Drawn on the device: the checkpoint of 48 layers holds up to 13 G elements.
    gen = torch.Generator(device=device).manual_seed(B * 100 + T)
    rnd = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=gen, device=device, dtype=dt)  # noqa: E731
    P = 2 * B
    idx = torch.randperm(P, generator=gen, device=device)[:B].to(torch.int32)
    inp = dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, HV, V), a=rnd(B, T, HV), b=rnd(B, T, HV),
               A_log=torch.log(torch.rand(HV, generator=gen, device=device) * 15 + 1), dt_bias=rnd(HV, dt=torch.float32))
    ck = rnd(L, P, HV, V, K, dt=getattr(torch, sdt))
    caches = [torch.zeros(L, P, HV, T, V, dtype=torch.bfloat16, device=device),
              torch.zeros(L, P, H, T, K, dtype=torch.bfloat16, device=device),
              torch.zeros(L, P, HV, T, device=device), torch.zeros(L, P, HV, T, device=device)]
    acc = torch.randint(1, T + 1, (B,), generator=gen, dtype=torch.int32, device=device)
    return inp, idx, ck, caches, acc


def measure(B, T, sdt, args, flusher, copy_bw):
    import flashgdn
    from flashgdn.bench.timing import in_turns, summarize, time_fn

    L, dev = args.layers, DEVICE
    inp, idx, ck, caches, acc = _inputs(B, T, sdt, L, dev)
    pool = ck[0]
    out = torch.empty(B, T, HV, V, dtype=torch.bfloat16, device=dev)

    def mtp(pool=pool, idx=idx, **kw):
        flashgdn.gated_delta_rule_mtp(inp["q"], inp["k"], inp["v"], pool, idx, inp["A_log"], inp["a"],
                                      inp["dt_bias"], inp["b"], None, out, **kw)

    windows = dict(replayssm_rawv=caches[0][0], replayssm_rawk=caches[1][0], replayssm_g=caches[2][0],
                   replayssm_beta=caches[3][0])
    full = torch.full_like(acc, T)
    ibuf = torch.empty(B, T, HV, V, K, dtype=ck.dtype, device=dev)
    rows = torch.arange(B, device=dev)
    slots = torch.arange(2 * B, 2 * B + B * T, dtype=torch.int32, device=dev).view(B, T)
    tok_pool = torch.randn(2 * B + B * T, HV, V, K, device=dev).to(ck.dtype)
    tok_idx = idx.clone()

    def accepted_copy():  # the accepted state of each row from the buffer into its slot
        pool[idx.long()] = ibuf[rows, acc.long() - 1]

    calls = {
        "mtp_frozen": lambda: mtp(disable_state_update=True),
        "verify": lambda: mtp(disable_state_update=True, cache_replayssm=True, **windows),
        "commit": lambda: flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, idx, acc),
        "commit_all_T": lambda: flashgdn.gated_delta_rule_replayssm_commit(ck, *caches, idx, full),
        "mtp_inter": lambda: mtp(disable_state_update=True, intermediate_states_buffer=ibuf),
        "copy": accepted_copy,
        "mtp_token_slots": lambda: mtp(pool=tok_pool, idx=tok_idx, disable_state_update=False,
                                       ssm_state_indices=slots),
    }
    assert tuple(calls) == CALLS
    timings = in_turns([functools.partial(time_fn, calls[name], iters=args.iters, timer=args.timer, flusher=flusher)
                        for name in args.calls], args.rounds)
    timed = dict(zip(args.calls, timings))  # per call, each round's (samples, timer)
    timer = timed[args.calls[0]][0][1]
    rounds = {name: [summarize(t)["median_us"] for t, _ in r] for name, r in timed.items()}  # each round's median
    us = {name: summarize([x for t, _ in r for x in t])["median_us"] for name, r in timed.items()}
    state_bytes = 2 * L * B * HV * V * K * ck.element_size()  # one read and one write per layer and slot
    row = dict(state_dtype=sdt, T=T, B=B, layers=L, timer=timer, **{f"{n}_us": round(t, 2) for n, t in us.items()})
    derived = {  # column: (the calls it needs, its value, its decimals)
        "verify_overhead_pct": (("verify", "mtp_frozen"), lambda: 100 * (us["verify"] / us["mtp_frozen"] - 1), 2),
        "commit_per_layer_us": (("commit",), lambda: us["commit"] / L, 2),
        "commit_pct_of_copy": (("commit_all_T",), lambda: 100 * state_bytes / (us["commit_all_T"] * 1e-6) / copy_bw,
                               1),
        "replay_step_us": (("verify", "commit"), lambda: us["verify"] + us["commit"] / L, 2),
        "inter_copy_step_us": (("mtp_inter", "copy"), lambda: us["mtp_inter"] + us["copy"], 2),
        "token_slots_step_us": (("mtp_token_slots",), lambda: us["mtp_token_slots"], 2),
    }
    if args.rounds > 1 and "verify" in us and "mtp_frozen" in us:
        # In turns: the median of the rounds' overheads, and their range.
        ratios = sorted(100 * (v / f - 1) for v, f in zip(rounds["verify"], rounds["mtp_frozen"]))
        derived["verify_overhead_pct"] = (("verify", "mtp_frozen"), lambda: statistics.median(ratios), 2)
        spread = f"{ratios[0]:.2f}..{ratios[-1]:.2f}"
        derived["verify_overhead_range"] = (("verify", "mtp_frozen"), lambda: spread, None)
    for column, (needs, value, digits) in derived.items():
        if all(n in us for n in needs):
            row[column] = value() if digits is None else round(value(), digits)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    from flashgdn.bench.timing import L2Flusher, copy_bandwidth
    from flashgdn.device import facts_of, unavailable_reason

    why = unavailable_reason()
    if why:
        print(f"replay_step: {why}", file=sys.stderr)
        return 2
    flusher = L2Flusher()
    copy_bw = copy_bandwidth(timer=args.timer)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    device_class = facts_of(torch.device("cuda")).device_class
    rows = []
    for setting in args.settings:
        with switched(device_class, setting, CompileCache(compile_variant)):
            for sdt in args.state_dtype:
                for T in args.tokens:
                    for B in args.batch_size:
                        row = dict(setting=label(setting), **measure(B, T, sdt, args, flusher, copy_bw))
                        rows.append(row)
                        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
