"""The issue's performance targets (issue 10, "The engine"), read off one run's table.

Each target compares one moodist figure with one baseline's on the same row, as
moodist's figure in units of the baseline's (``ratio``: a round trip of 2.0 is twice
the baseline's time, a rate of 0.25 a quarter of its rate).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    text: str  # as the issue states it
    row: str  # the table row's label
    impl: str  # the moodist figure: "moodist" or "moodist-noshm"
    baseline: str
    op: str  # how ratio compares with factor when the target is met
    factor: float


TARGETS = (
    Target("round trip p50 <= 2x zmq", "pingpong p50", "moodist", "zmq", "<=", 2.0),
    Target("round trip p50 < gloo", "pingpong p50", "moodist", "gloo", "<", 1.0),
    Target("4K stream >= 0.25x zmq", "stream 4K", "moodist", "zmq", ">=", 0.25),
    Target("objects >= mpqueue", "objects", "moodist", "mpqueue", ">=", 1.0),
    Target("MOODIST_SHM=0: 1M stream >= 0.8x tcp", "stream 1M", "moodist-noshm", "tcp",
           ">=", 0.8),
    Target("MOODIST_SHM=0: 64M stream >= 0.8x tcp", "stream 64M", "moodist-noshm", "tcp",
           ">=", 0.8),
    Target("64M stream >= 0.8x memcpy", "stream 64M", "moodist", "memcpy", ">=", 0.8),
)


def evaluate(values: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Every target against ``values`` (row label -> impl -> median): its ratio and
    whether it is met (both None when the run lacks a figure)."""
    out = []
    for t in TARGETS:
        row = values.get(t.row, {})
        mine, theirs = row.get(t.impl), row.get(t.baseline)
        r = mine / theirs if mine and theirs else None
        out.append({"target": t.text, "row": t.row, "impl": t.impl, "baseline": t.baseline,
                    "op": t.op, "factor": t.factor, "ratio": r,
                    "met": None if r is None else _OPS[t.op](r, t.factor)})
    return out


def format_targets(results: list[dict[str, Any]], window: int) -> str:
    """The block printed under the table."""
    width = max(len(r["target"]) for r in results)
    lines = [f"targets (issue 10): moodist's figure in units of the baseline's, from this run "
             f"(streams with {window} puts in flight; the issue states 4: --window 4)"]
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        verdict = {True: "met", False: "not met", None: "not measured"}[r["met"]]
        lines.append(f"  {r['target']:<{width}}  {ratio:>7}  {verdict}")
    return "\n".join(lines)
