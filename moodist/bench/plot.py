"""``--plot``: stream bandwidth, round trip latency and message rates, one panel each
(needs matplotlib)."""

from __future__ import annotations

from typing import Any

from .options import IMPLS, BenchError, fmt_size
from .patterns import PATTERNS

_COLORS = {"moodist": "tab:red", "gloo": "tab:blue", "mpqueue": "tab:green",
           "tcp": "tab:gray", "zmq": "tab:orange", "memcpy": "black",
           "moodist-noshm": "tab:purple"}
_LINESTYLES = {"memcpy": "--", "moodist-noshm": ":"}


def write_plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'moodist[bench]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    _plot_stream(axes[0], results)
    _plot_latency(axes[1], results)
    _plot_rates(axes[2], results)
    m = report["machine"]
    fig.suptitle(f"moodist-bench, {report['world_size']} ranks ({report['mode']}), "
                 f"{m['cpu_count']} CPUs, torch {m['torch']}, pyzmq {m['pyzmq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_stream(ax: Any, results: list[dict[str, Any]]) -> None:
    for pattern, marker in (("stream", "o"), ("cuda-stream", "s")):
        for impl in IMPLS:
            pts = sorted((r["size"], r["stats"]["gb_per_s"]["median"]) for r in results
                         if r["pattern"] == pattern and r["impl"] == impl)
            if pts:
                xs, ys = zip(*pts, strict=True)
                label = impl if pattern == "stream" else f"{impl} (cuda)"
                ax.plot(xs, ys, marker=marker, label=label, color=_COLORS[impl],
                        linestyle=_LINESTYLES.get(impl, "-"))
    ax.set_xscale("log", base=2)
    sizes = sorted({r["size"] for r in results if PATTERNS[r["pattern"]].is_stream})
    ax.set_xticks(sizes, [fmt_size(n) for n in sizes])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("stream rank 0 -> 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_latency(ax: Any, results: list[dict[str, Any]]) -> None:
    got = [r for r in results if r["pattern"] == "pingpong"]
    names = [r["impl"] for r in got]
    xs = range(len(got))
    p50 = ax.bar([x - 0.2 for x in xs], [r["stats"]["p50_us"]["median"] for r in got], 0.4,
                 label="p50", color=[_COLORS[n] for n in names])
    ax.bar_label(p50, fmt="%.0f", fontsize=8)
    ax.bar([x + 0.2 for x in xs], [r["stats"]["p99_us"]["median"] for r in got], 0.4,
           label="p99", color=[_COLORS[n] for n in names], alpha=0.45)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("round trip, us (lower is better)")
    ax.set_title("pingpong 8 B: p50 (solid), p99 (light)")
    ax.grid(True, axis="y", alpha=0.3)


def _plot_rates(ax: Any, results: list[dict[str, Any]]) -> None:
    groups = [p for p in PATTERNS if not (PATTERNS[p].is_latency or PATTERNS[p].is_stream)]
    groups = [g for g in groups if any(r["pattern"] == g for r in results)]
    impls = [i for i in IMPLS if any(r["impl"] == i and r["pattern"] in groups for r in results)]
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, name in enumerate(groups):
            for r in results:
                if r["pattern"] == name and r["impl"] == impl:
                    xs.append(g - 0.4 + width * (k + 0.5))
                    ys.append(r["stats"]["msgs_per_s"]["median"])
        ax.bar(xs, ys, width, label=impl, color=_COLORS[impl])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (median)")
    ax.set_title("message rates (4 KiB tensors; objects: small dict)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if impls:
        ax.legend()
