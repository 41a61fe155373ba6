"""The report of a run: the table (one row per pattern, size and metric; a column and a
ratio per implementation), the targets block under it, and the JSON file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .options import DEFAULT_WINDOW, IMPLS, fmt_size
from .patterns import PATTERNS, Pattern
from .targets import evaluate, format_targets

# A column's ratio is (subject, reference): how many times better subject is than
# reference.  moodist against each baseline, except the MOODIST_SHM=0 column, which is
# set against the raw socket (the target for the path between hosts).
_RATIO_OF = {"moodist-noshm": ("moodist-noshm", "tcp")}


@dataclass
class Row:
    label: str
    unit: str
    higher_is_better: bool
    values: dict[str, float]
    spread: dict[str, tuple[float, float]]


def table_rows(results: list[dict[str, Any]]) -> list[Row]:
    """One row per (pattern, size, metric) with the median of every impl."""
    rows: dict[tuple[str, int, str], Row] = {}
    for res in results:
        pattern = PATTERNS[res["pattern"]]
        for metric, unit, label in _row_metrics(pattern, res["size"]):
            key = (res["pattern"], res["size"], metric)
            row = rows.setdefault(key, Row(label, unit, metric not in ("p50_us", "p99_us"),
                                           {}, {}))
            st = res["stats"][metric]
            row.values[res["impl"]] = st["median"]
            row.spread[res["impl"]] = (st["min"], st["max"])
    return list(rows.values())


def _row_metrics(pattern: Pattern, size: int) -> list[tuple[str, str, str]]:
    if pattern.is_latency:
        return [("p50_us", "us", "pingpong p50"), ("p99_us", "us", "pingpong p99")]
    if pattern.is_stream:
        name = f"{pattern.name} {fmt_size(size)}"
        if size < 65536:
            return [("msgs_per_s", "msg/s", name)]
        return [("gb_per_s", "GB/s", name)]
    suffix = "" if pattern.name == "objects" else f" {fmt_size(size)}"
    return [("msgs_per_s", pattern.rate_unit, pattern.name + suffix)]


def ratio(row: Row, impl: str) -> float | None:
    """How many times better moodist is than ``impl`` on this row (> 1: moodist wins);
    for ``moodist-noshm``, how many times better it is than ``tcp``."""
    subject, reference = _RATIO_OF.get(impl, ("moodist", impl))
    m, b = row.values.get(subject), row.values.get(reference)
    if not m or not b:
        return None
    return m / b if row.higher_is_better else b / m


def _ratio_header(impl: str) -> str:
    subject, reference = _RATIO_OF.get(impl, ("moodist", impl))
    return "ratio" if subject == "moodist" else f"vs {reference}"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "GB/s":
        return f"{v:.2f}"
    if unit == "us":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def format_table(report: dict[str, Any]) -> str:
    rows = table_rows(report["results"])
    impls = [i for i in IMPLS[1:] if any(i in r.values for r in rows)]
    header = ["pattern", "unit", "moodist", "spread"]
    for impl in impls:
        header += [impl, _ratio_header(impl)]
    lines = [header]
    for row in rows:
        lo, hi = row.spread.get("moodist", (0.0, 0.0))
        med = row.values.get("moodist")
        several = report["options"]["repeats"] > 1
        spread = f"±{50 * (hi - lo) / med:.0f}%" if med and several else "-"
        cells = [row.label, row.unit, fmt_value(med, row.unit), spread]
        for impl in impls:
            r = ratio(row, impl)
            cells += [fmt_value(row.values.get(impl), row.unit), f"{r:.2f}x" if r else "-"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    m = report["machine"]
    opts = report["options"]
    title = (f"moodist-bench: {report['world_size']} ranks ({report['mode']}), "
             f"{m['cpu_count']} CPUs, torch {m['torch']}, pyzmq {m['pyzmq']}; "
             f"medians of {opts['repeats']} runs")
    note = ("ratio = how many times better moodist is than that baseline (> 1: moodist wins): "
            "baseline/moodist for us, moodist/baseline for rates.\n"
            "spread = half the min-max range of moodist's runs, relative to the median.")
    if "moodist-noshm" in impls:
        note += ("\nmoodist-noshm = moodist with MOODIST_SHM=0 (no same-host shared memory: "
                 "the path between hosts); its ratio is against tcp.")
    return "\n".join([title, "", *out, "", note])


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this report's medians."""
    return evaluate({r.label: r.values for r in table_rows(report["results"])},
                    _window(report))


def _window(report: dict[str, Any]) -> int:
    return int(report["options"].get("window", DEFAULT_WINDOW))


def format_report(report: dict[str, Any]) -> str:
    """The table, then the targets block."""
    return format_table(report) + "\n\n" + format_targets(targets(report), _window(report))


def write_json(report: dict[str, Any], path: str) -> None:
    rows = [{"label": r.label, "unit": r.unit, "higher_is_better": r.higher_is_better,
             "values": r.values, "spread": r.spread,
             "ratio": {i: ratio(r, i) for i in r.values if i != "moodist"}}
            for r in table_rows(report["results"])]
    with open(path, "w") as f:
        json.dump({**report, "table": rows, "targets": targets(report)}, f, indent=1)
