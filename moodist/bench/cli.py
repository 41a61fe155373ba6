"""The ``moodist-bench`` command line: options, then a local or torchrun launch, then the
report (table and targets on stdout, optional JSON and plot)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .launch import launch_local, run_torchrun, torchrun_env
from .options import (
    ALL_BASELINES,
    DEFAULT_SIZES,
    DEFAULT_WINDOW,
    BenchError,
    Options,
    parse_sizes,
)
from .patterns import PATTERNS
from .plot import write_plot
from .report import format_report, write_json


def _csv_choice(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if what == "baseline" and items == ["none"]:
        return []
    bad = [t for t in items if t not in choices]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what}(s) {', '.join(bad)}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moodist-bench",
        description="Benchmark moodist.Queue against gloo, torch.multiprocessing, a raw "
                    "TCP socket, a raw pyzmq PAIR socket, memcpy and itself with "
                    "MOODIST_SHM=0, and check the targets of issue 10.  Without torchrun "
                    "it spawns --nprocs local ranks; under torchrun it uses the job's ranks.",
    )
    p.add_argument("--nprocs", type=int, default=2, help="local ranks to spawn (default 2)")
    p.add_argument("--sizes", default=None,
                   help=f"stream sizes, comma list (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=float, default=None,
                   help="scale of every iteration count (default 1.0)")
    p.add_argument("--patterns", default=None,
                   help="comma list of patterns (default all; see --list-patterns)")
    p.add_argument("--baselines", default=",".join(ALL_BASELINES),
                   help=f"comma list of {', '.join(ALL_BASELINES)}, or none (default all)")
    p.add_argument("--repeats", type=int, default=None,
                   help="measured repetitions per case; medians are reported (default 3)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="sends in flight in streams, fan-in and multicast, for moodist, gloo "
                        f"and zmq's zero-copy sends (default {DEFAULT_WINDOW})")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run for CI: sizes 4K,64K, few iterations, 1 repeat")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before the whole run is abandoned (default 900)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a plot (needs matplotlib)")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt moodist's traffic (CURVE) to measure what it costs")
    p.add_argument("--list-patterns", action="store_true", help="list patterns and exit")
    return p


def options_from_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        opts = Options(
            nprocs=a.nprocs,
            sizes=parse_sizes(a.sizes or ("4K,64K" if a.quick else DEFAULT_SIZES)),
            iters=a.iters if a.iters is not None else (0.05 if a.quick else 1.0),
            patterns=_csv_choice(a.patterns, list(PATTERNS), "pattern") if a.patterns
            else list(PATTERNS),
            baselines=_csv_choice(a.baselines, ALL_BASELINES, "baseline"),
            repeats=a.repeats if a.repeats is not None else (1 if a.quick else 3),
            quick=a.quick, timeout=a.timeout, json=a.json, plot=a.plot, encrypt=a.encrypt,
            window=a.window,
        )
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if opts.nprocs < 2:
        parser.error("--nprocs must be at least 2")
    if opts.iters <= 0 or opts.repeats < 1 or not opts.sizes:
        parser.error("--iters must be > 0, --repeats >= 1 and --sizes not empty")
    if opts.window < 1:
        parser.error("--window must be at least 1")
    return opts, a.list_patterns


def list_patterns() -> str:
    lines = []
    for p in PATTERNS.values():
        baselines = [i for i in p.impls if i != "moodist"]
        lines.append(f"{p.name:<11} {p.doc}\n{'':<11} baselines: {', '.join(baselines)}")
    return "\n".join(lines)


def output(report: dict[str, Any], opts: Options) -> None:
    print(format_report(report), flush=True)
    if opts.json:
        write_json(report, opts.json)
        print(f"wrote {opts.json}", file=sys.stderr)
    if opts.plot:
        write_plot(report, opts.plot)
        print(f"wrote {opts.plot}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    opts, show_patterns = options_from_args(argv)
    if show_patterns:
        print(list_patterns())
        return 0
    if opts.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("moodist-bench: --plot needs matplotlib: pip install 'moodist[bench]'",
                  file=sys.stderr)
            return 2
    try:
        env = torchrun_env()
        report = run_torchrun(env, opts) if env else launch_local(opts)
        if report is not None:
            output(report, opts)
    except BenchError as e:
        print(f"moodist-bench: failed\n{e}", file=sys.stderr)
        return 1
    return 0
