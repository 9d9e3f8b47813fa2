"""`flashgdn-bench --plot`: one panel per (API, state dtype) of the results, against batch size.

A panel shows flashgdn's speedup over the fastest baseline (FLA, FlashInfer) timed in the same run
when its rows have baseline times, else flashgdn's median µs; one series per T, at most MAX_SERIES
of them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .rows import BASELINES, ENGINE_VERSIONS, VERSIONS, sweep_title

API_FUNCTIONS = {
    "pretranspose": "gated_delta_rule_decode_pretranspose",
    "nontranspose": "gated_delta_rule_decode",
    "mtp": "gated_delta_rule_mtp",
    "packed": "fused_recurrent_gated_delta_rule_packed_decode",
    "recurrent": "fused_recurrent_gated_delta_rule (vLLM)",
    "sigmoid_vllm": "fused_sigmoid_gating_delta_rule_update (vLLM)",
    "sglang": "fused_sigmoid_gating_delta_rule_update (SGLang)",
    "fused_step": "gdn_fused_decode_step",
}
MAX_SERIES = 6
BASELINE_LABELS = {"fla": "FLA", "flashinfer": "FlashInfer", "composed": "composed"}


def speedup_over_best_baseline(row: dict) -> Optional[float]:
    """Fastest baseline µs / flashgdn µs of a result row; None without both times."""
    times = [row[f"{b.name}_us"] for b in BASELINES if row.get(f"{b.name}_us")]
    return min(times) / row["median_us"] if times and row.get("median_us") else None


def _pick(values: Sequence[int], n: int) -> List[int]:
    """At most n of the sorted `values`, evenly spread, first and last kept."""
    if len(values) <= n:
        return list(values)
    return sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)})


def write_plot(path: str, rows: List[dict]) -> None:
    """Write the figure of `rows` (result rows of the sweep) to `path` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    panels: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        if r.get("median_us"):
            panels.setdefault((r["version"], r["state_dtype"]), []).append(r)
    versions = [v for v in VERSIONS + ENGINE_VERSIONS if any(k[0] == v for k in panels)]
    states = sorted({k[1] for k in panels}, key=lambda s: (s != "fp32", s))
    modes = set()  # "speedup" and/or "µs": what the panels show, for the figure's title
    fig, axes = plt.subplots(max(len(versions), 1), max(len(states), 1), squeeze=False,
                             figsize=(6.4 * max(len(states), 1), 3.9 * max(len(versions), 1)),
                             constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP"
    for i, version in enumerate(versions):
        for j, state in enumerate(states):
            ax, panel = axes[i][j], panels.get((version, state))
            if not panel:
                ax.set_axis_off()
                continue
            speedups = [speedup_over_best_baseline(r) for r in panel]
            speedup = any(speedups)
            modes.add("speedup" if speedup else "µs")
            points = [(r["T"], r["B"], s if speedup else r["median_us"]) for r, s in zip(panel, speedups)]
            all_ts = sorted({r["T"] for r in panel})
            ts = _pick(all_ts, MAX_SERIES)
            for n, T in enumerate(ts):
                pts = sorted((b, y) for t, b, y in points if t == T and y)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[n % len(markers)],
                            color=colors[n % len(colors)], label=f"T = {T}")
            batches = sorted({r["B"] for r in panel})
            ax.set_xscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xlabel("batch size B")
            if speedup:
                ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
                ax.set_ylabel("speedup vs fastest baseline (×)")
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{round(y, 3):g}x"))
            else:
                ax.set_yscale("log")
                ax.set_ylabel("flashgdn median µs")
                ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            shown = "" if ts == all_ts else f" ({len(ts)} of {len(all_ts)} T)"
            ax.set_title(f"{API_FUNCTIONS.get(version, version)}\n{state} state{shown}", fontsize=10)
            if len(ts) > 1:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8,
                          title="tokens", title_fontsize=8)
    baselines = " / ".join(BASELINE_LABELS.get(b.name, b.name) for b in BASELINES)
    what = {
        "speedup": f"flashgdn speedup over the fastest of {baselines} in the same run",
        "µs": "flashgdn median µs (no baseline timed)",
    }
    title = "; ".join(what[m] for m in sorted(modes, reverse=True)) or "no timed rows"
    fig.suptitle(f"{title}\n{sweep_title(rows)}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
