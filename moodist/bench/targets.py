"""The issue's performance targets (issue 10, "The engine"), read off one run's table.

Each target compares one moodist figure with one baseline's on the same row, as
moodist's figure in units of the baseline's (``ratio``: a round trip of 2.0 is twice
the baseline's time, a rate of 0.25 a quarter of its rate).

The 4 KiB stream's target also gets its ``ceiling`` from the same run: the highest
ratio any queue could reach whose ``put_tensor(...).wait()`` returns once the item
is stored at its host (the contract).  A sender that waits for the oldest of
``window`` puts has at most ``window`` in flight, and each takes at least a round
trip, so it moves at most ``window`` puts per round trip (Little's law), and no
round trip is shorter than a pyzmq PAIR's own ping-pong.
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


def evaluate(values: dict[str, dict[str, float]], window: int) -> list[dict[str, Any]]:
    """Every target against ``values`` (row label -> impl -> median): its ratio and
    whether it is met (both None when the run lacks a figure), and the 4 KiB
    stream's ceiling at ``window`` puts in flight (else None; see the module doc)."""
    out = []
    for t in TARGETS:
        row = values.get(t.row, {})
        mine, theirs = row.get(t.impl), row.get(t.baseline)
        r = mine / theirs if mine and theirs else None
        out.append({"target": t.text, "row": t.row, "impl": t.impl, "baseline": t.baseline,
                    "op": t.op, "factor": t.factor, "ratio": r,
                    "met": None if r is None else _OPS[t.op](r, t.factor),
                    "ceiling": _stream_ceiling(values, window) if t.row == "stream 4K" else None})
    return out


def _stream_ceiling(values: dict[str, dict[str, float]], window: int) -> float | None:
    """At most ``window`` puts per pyzmq round trip, in units of pyzmq's 4 KiB rate."""
    round_trip_us = values.get("pingpong p50", {}).get("zmq")
    rate = values.get("stream 4K", {}).get("zmq")
    if not round_trip_us or not rate:
        return None
    return window / (round_trip_us * 1e-6) / rate


def format_targets(results: list[dict[str, Any]], window: int) -> str:
    """The block printed under the table."""
    width = max(len(r["target"]) for r in results)
    lines = [f"targets (issue 10): moodist's figure in units of the baseline's, from this run "
             f"(streams with {window} puts in flight; the issue states 4: --window 4)"]
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        verdict = {True: "met", False: "not met", None: "not measured"}[r["met"]]
        line = f"  {r['target']:<{width}}  {ratio:>7}  {verdict}"
        if r.get("ceiling") is not None:
            line += (f" (ceiling {r['ceiling']:.2f}x for any put that waits until stored: "
                     f"{window} puts per pyzmq round trip)")
        lines.append(line)
    return "\n".join(lines)
